"""Benchmark: the full default `analyze` run (configs/analyze.toml) on qwen2.5-coder-0.5b.

    python bench/bench_analyze.py [--out DIR] [--resume] [--config FILE] [--judge SPEC]

Prints the issue's acceptance numbers (stability per split, cosine range, HR−BC vs BR−BC
cosine, trade-off gap with its CI, style divergence), the wall time of this process and the
compute time of every stage (timings.json; a resumed run adds only what it computed). Target:
≤ 45 minutes on 2 CPU cores. Not a test: it takes most of that time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/work/notes/analyze_run"))
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "analyze.toml")
    ap.add_argument("--judge", default=None, help="override the config's judge spec")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("REFUSALKIT_DATA", str(REPO.parent / "shared" / "datasets"))

    import torch

    from refusalkit.analyze.config import AnalyzeConfig
    from refusalkit.analyze.pipeline import analyze
    from refusalkit.config import load_config

    t0 = time.perf_counter()
    cfg = load_config(args.config, AnalyzeConfig, {"judge": args.judge})
    out = analyze(cfg, args.out, resume=args.resume, show_progress=True)
    wall = time.perf_counter() - t0

    m = json.loads((out / "metrics.json").read_text())
    geo = json.loads((out / "stages" / "geometry.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    p0 = str(cfg.directions.positions[0])
    li = geo["layer"] - 1
    print(f"\nmodel {m['model']}  judge {m['judge']}  layer {m['layer']}  position {p0}  "
          f"threads {torch.get_num_threads()}")
    print(f"\nsplit               stab({p0})   n  proj@{cfg.directions.n}  stab(other)  "
          "separability  PR     PCs90")
    for n in geo["names"]:
        s = geo["splits"][n]
        other = [k for k in s["stability"] if k != p0]
        s1 = s["stability"][other[0]]["stability"] if other else float("nan")
        st = s["stability"][p0]
        print(f"{n:<20}{st['stability']:>8.3f}  {st['n']:>3}  "
              f"{st[f'projected_at_{cfg.directions.n}']:>7.3f}"
              f"{s1:>12.3f}  {s['separability'][li]:>12.3f}  "
              f"{s['participation_ratio'][li]:>6.1f}  {s['pcs'][li]['minimal']:>4}")
    keys = ("stability_min", "stability_median", "splits_below_0.9",
            "stability_projected_min", "cosine_min", "cosine_median", "cosine_max", "buckets",
            "stability_HR-BC", "stability_HR-BC_n", "stability_HR-BC_projected",
            "stability_BR-BC", "stability_BR-BC_n", "stability_BR-BC_projected",
            "cos_HR-BC_BR-BC", "cos_HR-BC_max_split", "cos_BR-BC_max_split", "tradeoff_max_gap",
            "tradeoff_max_gap_ci", "tradeoff_max_pair", "tradeoff_mean_gap",
            "tradeoff_mean_gap_ci", "style_MI_bits", "style_p_value")
    print()
    for k in keys:
        if k in m:
            print(f"{k:<24} {m[k]}")
    sweeps = json.loads((out / "tables" / "sweeps.json").read_text())
    print("\ndirection        " + "  ".join(f"α={a:<4}" for a in [0.0, *cfg.sweep.alphas])
          + "  ablate   (RR/ORR)")
    for d in dict.fromkeys(r["direction"] for r in sweeps):
        rows = [r for r in sweeps if r["direction"] == d]
        cells = [f"{r['rr']:.2f}/{r['orr']:.2f}" for r in rows]
        print(f"{d:<16} " + "  ".join(cells))
    print("\nstage compute seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"stage total {sum(timings.values()) / 60:.1f} min; this process {wall / 60:.1f} min "
          f"(target ≤ 45 min on 2 cores)")
    print(f"report: {out / 'report.html'}")


if __name__ == "__main__":
    main()
