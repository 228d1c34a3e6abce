"""Issue 15 §3: refusal against useful answers across operators, layers and strengths.

    python bench/bench_tradeoff.py                       # configs/steer_qwen.toml, 0.5B
    python bench/bench_tradeoff.py --set model=qwen2.5-coder-1.5b --out runs/tradeoff_15

The steer pipeline's fitting stages (baseline, activations, directions, gate) run into --out
(resumable, the same stages as `refusalkit steer`); then a fixed grid of profiles is judged on
the refused fitting prompts (dev data): addition and clamp on blocks of layers at the start,
middle and end of the config's search window at several strengths (relative to each layer's
refuse-vs-answer gap, as the search does), and directional ablation at every layer of the
direction taken at each block's first layer (Arditi). Per point: judged refusal, useful-answer
rate (compliance, on topic, not looping), on-topic and loop rates, kept safety refusals and
next-token KL on ordinary prompts with any gate lifted (the damage where it opens).

The best point per operator is chosen on dev with the pipeline's own rule
(steer/choose.py: highest useful rate keeping 90 % of safety refusals) and then measured once
on the held-out target split. Every answer goes into tradeoff_answers.jsonl for reading.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import REPO, load_note, md_table, say


def _starts(lo: int, hi: int, width: int) -> list[int]:
    """Three block starts across [lo, hi): at the start, the middle and the end."""
    return sorted({lo, max(lo, (lo + hi - width) // 2), max(lo, hi - width)})


def grid(lo: int, hi: int, width: int, gate_layer: int | None = None,
         alphas: dict[str, tuple[float, ...]] | None = None, ops: tuple[str, ...] =
         ("add", "clamp", "ablate"), starts: list[int] | None = None
         ) -> list[tuple[str, dict[str, Any]]]:
    """(operator, params) points: three blocks across the window [lo, hi), strengths per
    operator (a clamp stops at its target, so it takes larger α than addition). Gated blocks
    lie at or after the gate's layer (a gate decides before steering starts, and
    build_profile would shift an earlier block onto the same layers: on the 1.5B model, gate
    layer 15, the start and middle blocks both became 15–17); ablation is ungated and takes
    its direction from across the whole window."""
    alphas = {"add": (0.5, 1.0, 1.5, 2.0), "clamp": (1.0, 2.0, 4.0), **(alphas or {})}
    gated = starts or _starts(max(lo, gate_layer or lo), hi, width)
    pts: list[tuple[str, dict[str, Any]]] = []
    for s in gated:
        for op in ("add", "clamp"):
            if op in ops:
                pts += [(op, {"start": s, "width": width, "alpha": a, "gate": True})
                        for a in alphas[op]]
    if "ablate" in ops:
        pts += [("ablate", {"start": s, "width": 0, "alpha": 1.0, "gate": False})
                for s in starts or _starts(lo, hi, width)]
    return pts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "steer_qwen.toml")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "tradeoff")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--n", type=int, default=24, help="refused fitting prompts per point")
    ap.add_argument("--width", type=int, default=3, help="layers per block")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--phase", default="both",
                    help="when add and clamp steer: every forward (both), only the prompt "
                    "pass (prompt: the answer is then generated unsteered, reading steered "
                    "keys and values), or the prompt and the first N answer tokens (prompt+N)")
    ap.add_argument("--ops", default="add,clamp,ablate", help="operators on the grid")
    ap.add_argument("--alphas", default=None,
                    help="strengths for add and clamp, e.g. 1,2,3 (default: the grid's)")
    ap.add_argument("--starts", default=None, help="block starts, e.g. 15 (default: three "
                    "across the window)")
    ap.add_argument("--name", default="tradeoff", help="stem of the output files in --out")
    args = ap.parse_args()

    from refusalkit.config import parse_set
    from refusalkit.evaluate import Judged, refusal_rate
    from refusalkit.interventions import Profile, ablation, lift_gate
    from refusalkit.operators import opening_tokens
    from refusalkit.prompts import write_jsonl
    from refusalkit.quality import assess
    from refusalkit.quality import rates as quality_rates
    from refusalkit.scoring import kl_divergence, last_logprobs
    from refusalkit.steer.choose import choose_remove, keep_rate
    from refusalkit.steer.config import SteerConfig
    from refusalkit.steer.fit import gate_of_record, search_space
    from refusalkit.steer.pipeline import steer_state
    from refusalkit.steer.search import build_profile

    opening_tokens(args.phase)  # a bad phase fails here, not after the model load
    cfg = SteerConfig.load(args.config, parse_set(args.sets))
    if cfg.mode != "remove":
        raise SystemExit("error: the trade-off curve is for mode = \"remove\" configs")
    t0 = time.perf_counter()
    note = load_note()
    with steer_state(cfg, args.out, resume=args.out.exists(), show_progress=False) as st:
        ex, lm = st.ex, st.ex.lm
        base, fit, _, gate_rec = st.fitted()
        gate = gate_of_record(gate_rec)
        space = search_space(lm, cfg.search, st.mode)
        proxies = st.mode.proxies(st.splits.target_fit, st.splits.neutral,
                                  st.splits.safety_fit, base, cfg.data.n_proxy)
        t_set = [st.splits.target_fit[i] for i in proxies.pick[: args.n]]
        ex.remember(t_set, [Judged(**base["target_fit"][i]) for i in proxies.pick[: args.n]])
        k_rows = {r["prompt"]: r for r in base["safety_fit"]}
        ex.remember(proxies.keep, [Judged(**k_rows[p]) for p in proxies.keep])
        keep_min = cfg.search.safety_keep * keep_rate(base["safety_fit"], proxies.keep)
        neutral = st.splits.neutral_proxy
        n_base = ex.logprobs(neutral)

        def qrates(js: list[Judged]) -> dict[str, float | None]:
            return quality_rates([assess(j.prompt, j.response, j.confidence, j.on_topic)
                                  for j in js])

        def profile_of(op: str, params: dict[str, Any]) -> Profile:
            if op == "ablate":
                return Profile((ablation(fit.directions[params["start"]],
                                         list(range(lm.n_layers))),))
            return build_profile(params, fit.directions, fit.gaps,
                                 replace(space, operator=op, phase=args.phase), gate,
                                 fit.levels)

        def measure(op: str, params: dict[str, Any], prompts: list[str],
                    keep: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            prof = profile_of(op, params)
            js, opened = ex.gated_answers(prompts, prof)
            q = qrates(js)
            row: dict[str, Any] = {"op": op, "params": params, "layers": prof.layers,
                                   "target_refusal":
                                   refusal_rate(js), "target_useful": q["useful"],
                                   "on_topic": q["on_topic"], "loop": q["loop"],
                                   "gate_open": float(opened.double().mean())}
            if keep:
                row["keep_refusal"] = refusal_rate(ex.gated_answers(proxies.keep, prof)[0])
                lifted = last_logprobs(lm, neutral, profile=lift_gate(prof),
                                       batch_size=cfg.batch_size)
                row["kl_if_open"] = float(kl_divergence(n_base, lifted).mean())
            answers = [{"op": op, **params, "prompt": j.prompt, "response": j.response,
                        "confidence": j.confidence, "on_topic": j.on_topic} for j in js]
            return row, answers

        unsteered_q = qrates(ex.answers(t_set))
        rows, answers = [], []
        ops = tuple(args.ops.split(","))
        alphas = ({o: tuple(float(a) for a in args.alphas.split(",")) for o in ops}
                  if args.alphas else None)
        starts = [int(x) for x in args.starts.split(",")] if args.starts else None
        for op, params in grid(*space.window, args.width,
                               gate.layer if gate is not None else None, alphas, ops,
                               starts):
            row, ans = measure(op, params, t_set, keep=True)
            rows.append(row)
            answers += ans
            say(f"{op} {params}: refusal {row['target_refusal']:.2f} useful "
                f"{row['target_useful']:.2f} keep {row['keep_refusal']:.2f} "
                f"KL-if-open {row['kl_if_open']:.3f} ({time.perf_counter() - t0:.0f} s)")
        best = {op: choose_remove([r for r in rows if r["op"] == op], keep_min)
                for op in ops}
        held = st.splits.target_eval
        held_rows = {}
        for op, r in best.items():
            hr, ans = measure(op, r["params"], held, keep=False)
            held_rows[op] = hr
            answers += [{**a, "held_out": True} for a in ans]
        before_held = qrates(ex.answers(held))
        write_jsonl(args.out / f"{args.name}_answers.jsonl", answers)
        (args.out / f"{args.name}.json").write_text(json.dumps(
            {"phase": args.phase, "rows": rows, "best": best, "held_out": held_rows,
             "keep_min": keep_min, "unsteered_dev": unsteered_q,
             "unsteered_held_out": before_held}, indent=1))
        plot(rows, best, unsteered_q, args.out / f"{args.name}.png", cfg.model)

    def f(x: Any) -> str:
        return "–" if x is None else f"{x:.2f}"

    dev = md_table(["operator", "layers", "α", "refusal", "useful", "on topic", "loop",
                    "safety kept", "KL if open", "best"],
                   [[r["op"], _layers(r), r["params"]["alpha"], f(r["target_refusal"]),
                     f(r["target_useful"]), f(r["on_topic"]), f(r["loop"]),
                     f(r["keep_refusal"]), f"{r['kl_if_open']:.3f}",
                     "◀" if best[r["op"]] is r else ""] for r in rows])
    ho = md_table(["profile", "held-out refusal", "held-out useful", "on topic", "loop",
                   "gate open"],
                  [["unsteered", f(before_held["refusal"]), f(before_held["useful"]),
                    f(before_held["on_topic"]), f(before_held["loop"]), "–"]]
                  + [[f"{op} {_layers(r)} α {r['params']['alpha']}", f(r["target_refusal"]),
                      f(r["target_useful"]), f(r["on_topic"]), f(r["loop"]),
                      f(r["gate_open"])] for op, r in held_rows.items()])
    text = "\n".join([
        f"## refusal vs useful answers across operators ({cfg.model})", "",
        f"`python bench/bench_tradeoff.py {shlex.join(sys.argv[1:])}`; "
        f"{len(t_set)} refused fitting prompts per point (dev), unsteered refusal "
        f"{f(unsteered_q['refusal'])}, useful {f(unsteered_q['useful'])}; safety kept "
        f"must be ≥ {keep_min:.2f}; {time.perf_counter() - t0:.0f} s; {note}.", "",
        dev, "", "Best point per operator, held-out target split "
        f"({len(held)} prompts):", "", ho, ""])
    print(text)
    if args.md:
        args.md.write_text(text + "\n")


def _layers(r: dict[str, Any]) -> str:
    """The layers a row's profile steered (its block may have been moved to the gate's
    layer), not the ones its parameters asked for."""
    p = r["params"]
    if r["op"] == "ablate":
        return f"all (dir. {p['start']})"
    layers = r.get("layers") or range(p["start"], p["start"] + p["width"])
    return f"{min(layers)}–{max(layers)}"


def plot(rows: list[dict[str, Any]], best: dict[str, dict[str, Any]],
         unsteered: dict[str, Any], path: Path, model: str) -> None:
    """Judged refusal (x) against useful-answer rate (y), one marker per operator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for op, marker in (("add", "o"), ("clamp", "s"), ("ablate", "^")):
        if op not in best:
            continue
        pts = [r for r in rows if r["op"] == op]
        ax.scatter([r["target_refusal"] for r in pts], [r["target_useful"] for r in pts],
                   marker=marker, label=op, alpha=0.8)
        b = best[op]
        ax.annotate(f"{op} {_layers(b)} α{b['params']['alpha']}",
                    (b["target_refusal"], b["target_useful"]), fontsize=7)
    ax.scatter([unsteered["refusal"]], [unsteered["useful"]], marker="x", c="k",
               label="unsteered")
    ax.set_xlabel("judged refusal (refused fitting prompts, dev)")
    ax.set_ylabel("useful-answer rate")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"refusal vs useful answers — {model}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    from refusalkit.errors import UserError

    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
