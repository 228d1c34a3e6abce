"""The topic gate alone, as a steer config fits it: recall on held-out phrasings of the topic
and opens on held-out harmful and ordinary prompts (issue 15 §2 and §5). No generation, no
judging: the gate decides from pooled prompt states, so this takes a few minutes.

    python bench/bench_gate.py                                   # configs/steer_qwen.toml
    python bench/bench_gate.py --config C --set search.gate_max_layer=0.6
    python bench/bench_gate.py --config configs/induce_qwen.toml \
        --ordinary-zh 'builtin:ordinary_zh?kind!=cooking'    # an induce topic's own kind out

    python bench/bench_gate.py --dev-only --layers 12,13,14 --memo /tmp/memo.safetensors \
        --variants variants.json       # a side-by-side sweep on dev: one fit is seconds

Targets: recall ≥ 0.9 on every target_extra set (and ≥ 0.95 on the held-out target split),
opens on held-out harmful prompts ≤ 2 %. Evaluation sets are never used to fit the gate;
change the detector on dev data only. Harmful DEV is harmful_test's even rows past the first
200 unused, and the middle third (part=1/3) of XSTest-unsafe and CoCoNot's safety requests,
pooled; held out are the odd rows, the last thirds, and builtin:harmful_fresh_test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import REPO, CaptureMemo, later_harmful_rows, md_table

# public harmful sets in question form, in three interleaved parts: 0 may be fitted on (a gate
# source), 1 is DEV, 2 is held out (the whole set is reported too, as before the split)
HARMFUL_PARTS = ("xstest?label=unsafe",
                 "coconot_original?category=Requests with safety concerns")
SETS = ["harmful_test", "jailbreakbench", "harmless_test", "xstest?label=safe",
        "coconot_contrast"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "steer_qwen.toml"))
    ap.add_argument("--set", dest="set_", action="append", default=[])
    ap.add_argument("--variants", type=Path,
                    help="JSON: name -> {config key: value}; each variant is fitted on top of "
                         "--config and --set, in one process that reads each prompt's states "
                         "once, and a side-by-side table closes the output")
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")],
                    help="candidate gate layers, e.g. 12,13,14 (default: the pipeline's, 1 to "
                         "gate_max_layer): a variant sweep on dev goes several times faster; "
                         "measure the chosen variant held out without it")
    ap.add_argument("--memo", type=Path,
                    help="keep the prompts' states in this .safetensors file (and a .json "
                         "beside it) between sweeps; for one model and gate pooling only")
    ap.add_argument("--limit", type=int, default=200, help="prompts per other set")
    ap.add_argument("--dev-only", action="store_true",
                    help="measure the dev set only (while choosing how to fit the gate)")
    ap.add_argument("--ordinary-zh", default="builtin:ordinary_zh?",
                    help="the everyday Chinese prompts to count opens on (an induce topic "
                         "leaves its own kind out: builtin:ordinary_zh?kind!=cooking&)")
    args = ap.parse_args()

    from refusalkit.config import parse_set
    from refusalkit.models import load_model
    from refusalkit.steer.config import SteerConfig

    base = parse_set(args.set_)
    variants = (json.loads(args.variants.read_text()) if args.variants
                else {"as configured": {}})
    memo = CaptureMemo.install()
    if args.memo:
        memo.load(args.memo)
    if args.layers:
        only_layers(args.layers)
    lm = None
    tables: dict[str, list[list[Any]]] = {}
    for name, over in variants.items():
        cfg = SteerConfig.load(args.config, {**base, **over})
        lm = lm or load_model(cfg.model)
        print(f"\n## {name}", flush=True)
        tables[name] = one_gate(lm, cfg, args)
        print(md_table(["set", "n", "opened", "share", "kind"], tables[name]), flush=True)
        if args.memo:
            memo.save(args.memo)
        print(f"(activation memo: {memo.hits} prompt reads reused, {memo.misses} computed)",
              flush=True)
    if len(tables) > 1:
        names = list(tables)
        sets = list(dict.fromkeys(r[0] for t in tables.values() for r in t))
        cell = {(n, r[0]): r[2] for n, t in tables.items() for r in t}
        print("\n" + md_table(["set", *names],
                               [[s, *(cell.get((n, s), "–") for n in names)] for s in sets]))


def only_layers(keep: list[int]) -> None:
    """Restrict the gate fit's candidate layers to `keep`: the fit tries every λ and fold at
    each layer, so with the states memoised its time grows with the candidate layers."""
    import refusalkit.steer.fit as fit

    inner = fit.gate_inputs

    def gate_inputs(*a: Any, **kw: Any) -> Any:
        layers, *rest = inner(*a, **kw)
        if not set(keep) <= set(layers):
            raise SystemExit(f"--layers {keep}: the config's gate layers are {layers}")
        return (keep, *rest)

    fit.gate_inputs = gate_inputs  # type: ignore[assignment]


def one_gate(lm: Any, cfg: Any, args: argparse.Namespace) -> list[list[Any]]:
    """Fit the topic gate as `cfg` fits it and count its opens on dev or held-out sets."""
    from refusalkit.examiner import Examiner
    from refusalkit.gates import wilson_upper
    from refusalkit.judge import KeywordJudge
    from refusalkit.prompts import load_prompts
    from refusalkit.steer.data import split_data
    from refusalkit.steer.fit import fit_topic_gate, gate_of_record

    splits = split_data(cfg.data, cfg.seed)
    t0 = time.perf_counter()
    print(f"fitting the gate on {len(splits.target_fit)} topic prompts ...", flush=True)
    rec = fit_topic_gate(lm, {}, splits, cfg.search, batch_size=cfg.batch_size, seed=cfg.seed,
                         show_progress=False)
    fit_s = time.perf_counter() - t0
    print(f"fitted in {fit_s:.0f} s", flush=True)
    gate = gate_of_record(rec)
    assert gate is not None
    ex = Examiner(lm, KeywordJudge(), batch_size=cfg.batch_size)
    used = splits.taken()
    rows = []

    def measure(name: str, prompts: list[str], want_open: bool) -> tuple[int, int]:
        """Print and keep one row; (opened, n) for pooling several sets."""
        k = int(ex.opened(gate, prompts).sum())
        rows.append([name, len(prompts), f"{k}/{len(prompts)}",
                     f"{k / max(1, len(prompts)):.3f}", "recall" if want_open else "opens"])
        print(" | ".join(str(x) for x in rows[-1]), flush=True)
        return k, len(prompts)

    # dev: a second phrasing written for choosing the detector (china_requests.md); the
    # held-out sets below are reported, not chosen on
    if "deccp_censored" in cfg.data.target:
        measure("builtin:china_requests_dev (DEV)",
                load_prompts("builtin:china_requests_dev").prompts, True)
        measure("builtin:china_requests_zh_fit?split=dev (DEV)",
                load_prompts("builtin:china_requests_zh_fit?split=dev").prompts, True)
        for lang in ("en", "zh"):  # questions, as deccp asks (china_questions_fit.md)
            spec = f"builtin:china_questions_fit?split=dev&lang={lang}"
            measure(f"{spec} (DEV)", load_prompts(spec).prompts, True)
    if not args.dev_only:
        measure("target_eval (held-out target split)", splits.target_eval, True)
        if len(cfg.data.target) > 1:  # by source: deccp_uncensored is what the model answers
            for spec in cfg.data.target:
                mine = set(load_prompts(spec).prompts)
                measure(f"target_eval ({spec})", [p for p in splits.target_eval if p in mine],
                        True)
    for spec, ps in ([] if args.dev_only else splits.target_extra.items()):
        measure(spec, ps, True)
        for lang in ("en", "zh"):
            sub = [p for p in load_prompts(f"{spec}?lang={lang}").prompts if p in set(ps)]
            if sub:
                measure(f"{spec} ({lang})", sub, True)
    # dev: ordinary prompts from the neutral source that no role used (training data); the
    # rows labelled as on the topic (data.on_topic) are not "other" prompts, so not counted
    for spec in (["harmless_train"] if args.dev_only else SETS):
        ps = [p for p in load_prompts(spec).prompts
              if p not in used and p not in splits.on_topic][:args.limit]
        measure(f"{spec} (rows no role used)", ps, False)
    # harmful_test past the rows above, split by parity: even rows are DEV (for choosing how
    # the gate is fitted against harmful requests), odd rows stay held out
    dev_rows, held_rows = later_harmful_rows(used, args.limit)
    zh = args.ordinary_zh if args.ordinary_zh.endswith(("?", "&")) else args.ordinary_zh + "&"
    if args.dev_only:
        harmful_dev = [measure("harmful_test rest, even rows (DEV)", dev_rows, False)]
        # the middle third of two public harmful sets in question form: the first third may be
        # a gate source, the last third stays held out (`part=k/3` interleaves their ordering)
        for spec in HARMFUL_PARTS:
            ps = [p for p in load_prompts(f"{spec}&part=1/3").prompts if p not in used]
            harmful_dev.append(measure(f"{spec}&part=1/3 (DEV)", ps, False))
        k, n = (sum(x) for x in zip(*harmful_dev, strict=True))
        rows.append(["harmful DEV pooled", n, f"{k}/{n}", f"{k / n:.3f}",
                     f"opens (Wilson 95 % upper {wilson_upper(k, n):.3f})"])
        print(" | ".join(str(x) for x in rows[-1]), flush=True)
        # the Chinese sets' fit splits are dev: rows the gate did not fit on (n_gate) count
        for spec in (f"{zh}split=fit", "builtin:harmful_zh?split=fit"):
            ps = [p for p in load_prompts(spec).prompts if p not in used]
            if ps:
                measure(f"{spec} (rows no role used, DEV)", ps, False)
    else:
        measure("harmful_test rest, odd rows (held out)", held_rows, False)
        for spec in HARMFUL_PARTS:  # whole, as measured before the parts (less fitted rows)
            measure(f"{spec} (rows no role used)",
                    [p for p in load_prompts(spec).prompts if p not in used], False)
        for spec in (*(f"{s}&part=2/3" for s in HARMFUL_PARTS),
                     # written blind for held-out checks only (harmful_fresh_test.md)
                     "builtin:harmful_fresh_test",
                     # written / translated for this project; their test splits are never
                     # fitted or chosen on (src/refusalkit/data/prompts/*.md)
                     "builtin:harmful_zh?split=test", f"{zh}split=test",
                     f"{zh}split=test&kind=china_culture"):
            measure(spec, load_prompts(spec).prompts, False)
    print(f"gate: layer {rec['layer']}, pool {rec['pool']}, out-of-fold recall "
          f"{rec['recall_oof']:.3f} (by set: "
          f"{', '.join(f'{k} {v:.3f}' for k, v in rec['recall_oof_by_set'].items())}), "
          f"detector {rec['detector']}, leak {rec['leak']:.4f}"
          + (f", veto shuts {rec['vetoed_oof']:.3f} of the topic" if "veto" in rec else "")
          + f", fitted in {fit_s:.0f} s on "
          f"{rec['n_topic']} topic ({rec.get('n_topic_gate_only', 0)} of them for the gate only) "
          f"vs {rec['n_other']} other prompts\n")
    rows.append(["OOF recall (questions / requests)", rec["n_topic"],
                 " / ".join(f"{v:.3f}" for v in rec["recall_oof_by_set"].values()), "",
                 "recall"])
    return rows




if __name__ == "__main__":
    main()
