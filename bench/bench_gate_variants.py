"""Topic-gate variants side by side on DEV data only (issue 15 §2, §5): each variant is a set
of steer-config overrides; each is fitted as the pipeline fits it and read on

- its out-of-fold recall per topic source (the gate record);
- 1000 unused harmless_train rows (ordinary dev opens) and the KL prompts of the run;
- harmful_test's even rows past the first 200 unused (harmful dev opens; odd rows are held out);
- china_requests_dev and china_requests_zh_fit?split=dev (dev requests, English / Chinese);
- the second halves of the ordinary_zh and harmful_zh fit splits, while variants that fit on
  Chinese negatives use the first halves only ("{ordinary_zh_a}", "{harmful_zh_a}" in a
  variant's gate_sources).

    python bench/bench_gate_variants.py bench/gate_variants_zh.json

No held-out set is read. The chosen variant is then measured held out with bench_gate.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, later_harmful_rows, md_table

SMALL = {"data.max_target": 30, "data.n_fit": 12, "data.n_proxy": 8, "data.n_eval": 10,
         "data.n_kl": 40}  # the real-model remove test's budget


def halves(tmp: Path) -> dict[str, str]:
    """The fit splits of the Chinese sets cut in two: fit on "a", read dev on "b"."""
    from refusalkit.prompts import load_prompts, write_jsonl

    out = {}
    for name in ("ordinary_zh", "harmful_zh"):
        rows = load_prompts(f"builtin:{name}?split=fit").prompts
        for part, sub in (("a", rows[0::2]), ("b", rows[1::2])):
            path = tmp / f"{name}_{part}.jsonl"
            write_jsonl(path, [{"prompt": p} for p in sub])
            out[f"{name}_{part}"] = str(path)
    return out


def fill(value: Any, paths: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**paths) if "{" in value else value
    if isinstance(value, list):
        return [fill(v, paths) for v in value]
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", type=Path, help="JSON: name -> {config key: value}")
    ap.add_argument("--config", default=str(REPO / "configs" / "steer_qwen.toml"))
    ap.add_argument("--small", action="store_true", help="the real-model test's budget")
    args = ap.parse_args()

    from refusalkit.examiner import Examiner
    from refusalkit.judge import KeywordJudge
    from refusalkit.models import load_model
    from refusalkit.prompts import load_prompts
    from refusalkit.steer.config import SteerConfig
    from refusalkit.steer.data import split_data
    from refusalkit.steer.fit import fit_topic_gate, gate_of_record

    variants = json.loads(args.variants.read_text())
    tmp = Path(tempfile.mkdtemp(prefix="gate_variants_"))
    paths = halves(tmp)
    lm = None
    rows = []
    for name, over in variants.items():
        over = {k: fill(v, paths) for k, v in over.items()}
        cfg = SteerConfig.load(args.config, {**(SMALL if args.small else {}), **over})
        lm = lm or load_model(cfg.model)
        splits = split_data(cfg.data, cfg.seed)
        t0 = time.perf_counter()
        rec = fit_topic_gate(lm, {}, splits, cfg.search, batch_size=cfg.batch_size,
                             seed=cfg.seed, show_progress=False)
        fit_s = time.perf_counter() - t0
        gate = gate_of_record(rec)
        assert gate is not None
        ex = Examiner(lm, KeywordJudge(), batch_size=cfg.batch_size)
        used = splits.taken()
        dev = {
            "ordinary dev": [p for p in load_prompts("harmless_train").prompts
                             if p not in used][-1000:],
            "KL prompts": splits.kl_eval,
            "harmful dev": later_harmful_rows(used)[0],
            "requests en": load_prompts("builtin:china_requests_dev").prompts,
            "requests zh": load_prompts("builtin:china_requests_zh_fit?split=dev").prompts,
            "ordinary zh": load_prompts(paths["ordinary_zh_b"]).prompts,
            "harmful zh": load_prompts(paths["harmful_zh_b"]).prompts,
        }
        got = {k: f"{int(ex.opened(gate, ps).sum())}/{len(ps)}" for k, ps in dev.items()}
        for k, name_zh in (("ordinary zh", "ordinary_zh"), ("harmful zh", "harmful_zh")):
            if any(f"builtin:{name_zh}" in src for src in cfg.data.gate_sources):
                got[k] += " (fitted on)"  # the whole fit split is a negative: not dev
        by = rec["recall_oof_by_set"]
        rows.append([name, rec["layer"], rec["shrink"], f"{by.get('target_fit', 0):.3f}",
                     f"{by['gate_topic']:.3f}" if "gate_topic" in by else "–",
                     *got.values(), f"{fit_s:.0f}"])
        print(" | ".join(str(x) for x in rows[-1]), flush=True)
        print("   per layer (layer, λ, recall by source):",
              [(r["layer"], r["shrink"], [round(x, 3) for x in r["recall_by"]])
               for r in rec["layers"]], flush=True)
    print(md_table(["variant", "layer", "λ", "target OOF", "gate_topic OOF",
                    "ordinary dev", "KL prompts", "harmful dev", "requests en", "requests zh",
                    "ordinary zh", "harmful zh", "fit s"], rows))


if __name__ == "__main__":
    main()
