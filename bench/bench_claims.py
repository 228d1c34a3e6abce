"""Paper A's analysis claims, measured on finished steer runs (issue 15 §3): does the
refuse-vs-answer signal sit in deeper layers, is it spread over many dimensions, and does
WRMD separate the classes better than MD?

    python bench/bench_claims.py runs/steer_qwen_pub runs/steer_qwen15_pub [--md out.md]

No model is loaded: each run folder stores its fitting activations (every layer, the last
prompt token) and its baseline judgements, and the run's own classes are rebuilt from them
exactly as the pipeline builds them (`Mode.classes`). Two contrasts per run:

- **target**: the target prompts the model refused vs those it answered (same topic, so the
  direction is refusal, not topic; few answered prompts, so the figures are noisy);
- **safety**: the harmful fitting prompts it refused vs the ordinary ones (neutral) it answered.

Per layer and estimator (MD, RMD, WRMD as the pipeline fits them, the run's λ): out-of-fold
AUC (4-fold stratified, 8 fold draws; the direction is fitted on the other folds, WRMD with
their weights and the neutral set), and, for the direction fitted on all rows, how its
energy spreads over the coordinates: the participation ratio 1/Σv̂ᵢ⁴ over what a random
direction gives (d/3), the share of coordinates holding 90 % of the energy, and the largest
coordinate's share.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from common import emit, md_table
from safetensors.torch import load_file

from refusalkit.analyze.geometry import count_for_fraction, participation_ratio, separability
from refusalkit.judge.protocol import THRESHOLD
from refusalkit.steer.fit import estimate
from refusalkit.steer.mode import mode_of

METHODS = ("md", "rmd", "wrmd")


def contrasts(run: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The run's manifest and its two contrasts as refused/complied activations and weights."""
    manifest = json.loads((run / "manifest.json").read_text())
    acts = load_file(str(run / "stages" / "activations.safetensors"))
    base = json.loads((run / "stages" / "baseline.json").read_text())
    conf = {k: torch.tensor([r["confidence"] for r in v]) for k, v in base.items()}
    mode = mode_of(manifest.get("config", {}).get("mode", "remove"))
    cl = mode.classes(acts, conf["target_fit"], conf["safety_fit"])
    refused_safety = conf["safety_fit"] > THRESHOLD
    return manifest, {
        "target": {"r": cl.refused, "c": cl.complied, "wr": cl.w_refused, "wc": cl.w_complied,
                   "n": acts["neutral"]},
        "safety": {"r": acts["safety_fit"][refused_safety], "c": acts["neutral"],
                   "wr": conf["safety_fit"][refused_safety].abs(),
                   "wc": torch.ones(len(acts["neutral"])), "n": acts["neutral"]},
    }


def fit(method: str, x: dict[str, torch.Tensor], layer: int, lam: float,
        keep_r: torch.Tensor | None = None, keep_c: torch.Tensor | None = None
        ) -> torch.Tensor:
    """The pipeline's estimator (steer.fit.estimate) at one layer, on the rows kept."""
    kr = slice(None) if keep_r is None else keep_r
    kc = slice(None) if keep_c is None else keep_c
    return estimate(method, x["r"][kr, layer], x["c"][kc, layer], w_refused=x["wr"][kr],
                    w_complied=x["wc"][kc], neutral=x["n"][:, layer], lam=lam)


def oof_auc(method: str, x: dict[str, torch.Tensor], layer: int, lam: float, k: int = 4,
            repeats: int = 8) -> float:
    """Mean over repeats of the out-of-fold AUC (analyze.geometry.separability, each class
    split into k folds), the direction fitted by `method` on the other folds."""
    r, c = x["r"][:, layer], x["c"][:, layer]
    return sum(separability(r, c, folds=k, seed=rep,
                            direction=lambda kr, kc: fit(method, x, layer, lam, kr, kc))
               for rep in range(repeats)) / repeats


def spread(v: torch.Tensor) -> dict[str, float]:
    """How a direction's energy spreads over coordinates (1.0 = like a random direction,
    whose participation ratio is about d/3)."""
    e = ((v.double() / v.double().norm()) ** 2).sort(descending=True).values
    d = len(e)
    return {"pr_ratio": participation_ratio(v) / (d / 3.0),
            "k90_share": count_for_fraction(e, 0.9) / d, "top1": float(e[0])}


def measure(run: Path) -> dict[str, Any]:
    manifest, cons = contrasts(run)
    lam = float(manifest.get("config", {}).get("directions", {}).get("lam", 1e-2))
    n_layers = next(iter(cons.values()))["r"].shape[1]
    out: dict[str, Any] = {"run": str(run), "model": manifest.get("config", {}).get("model"),
                           "n_layers": n_layers, "contrasts": {}}
    for name, x in cons.items():
        rows = []
        for layer in range(1, n_layers):  # layer 0 (embeddings) sees only the last token
            row: dict[str, Any] = {"layer": layer}
            for m in METHODS:
                row[f"auc_{m}"] = oof_auc(m, x, layer, lam)
                row.update({f"{key}_{m}": val
                            for key, val in spread(fit(m, x, layer, lam)).items()})
            rows.append(row)
        out["contrasts"][name] = {"n_refused": len(x["r"]), "n_complied": len(x["c"]),
                                  "layers": rows}
    return out


def summary(res: dict[str, Any]) -> list[list[Any]]:
    """One row per contrast: where separability peaks, how spread the direction is there,
    and MD against WRMD over the deeper half."""
    n = res["n_layers"]
    rows = []
    for name, c in res["contrasts"].items():
        ls = c["layers"]
        best = max(ls, key=lambda r: r["auc_md"])
        first = next(r for r in ls if r["auc_md"] >= best["auc_md"] - 0.02)
        early = [r["auc_md"] for r in ls if r["layer"] < n / 3]
        deep = [r for r in ls if r["layer"] >= n / 2]
        mean = {m: sum(r[f"auc_{m}"] for r in deep) / len(deep) for m in METHODS}
        wins = sum(r["auc_wrmd"] > r["auc_md"] for r in deep)
        rows.append([res["model"], name, f"{c['n_refused']}/{c['n_complied']}",
                     f"{best['layer']} ({best['layer'] / n:.2f}): {best['auc_md']:.3f}",
                     f"{first['layer']} ({first['layer'] / n:.2f})",
                     f"{sum(early) / len(early):.3f}",
                     f"{best['pr_ratio_md']:.2f} / {best['k90_share_md']:.2f} / "
                     f"{best['top1_md']:.3f}",
                     f"{best['pr_ratio_wrmd']:.2f} / {best['k90_share_wrmd']:.2f}",
                     " / ".join(f"{mean[m]:.3f}" for m in METHODS),
                     f"{wins}/{len(deep)}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for r in args.runs:
        if not (r / "stages" / "activations.safetensors").is_file():
            raise SystemExit(f"error: {r} holds no steer run with stored activations; pass "
                             "folders written by bench/bench_steer.py or `refusalkit steer`")
    results = [measure(r) for r in args.runs]
    head = ["model", "contrast", "refused / answered", "best layer (depth): OOF AUC (MD)",
            "first layer within 0.02 of it", "mean OOF AUC, first third",
            "at best layer, MD: PR / random, coords for 90 %, top coord",
            "WRMD: PR / random, coords for 90 %",
            "mean OOF AUC, deeper half: MD / RMD / WRMD", "layers there WRMD > MD"]
    md = md_table(head, [row for r in results for row in summary(r)])
    per_layer = []
    for r in results:
        for name, c in r["contrasts"].items():
            for row in c["layers"]:
                per_layer.append([r["model"], name, row["layer"],
                                  *(f"{row[f'auc_{m}']:.3f}" for m in METHODS),
                                  f"{row['pr_ratio_md']:.2f}", f"{row['top1_md']:.3f}"])
    md += "\n\nPer layer:\n\n" + md_table(
        ["model", "contrast", "layer", "OOF AUC MD", "RMD", "WRMD", "PR/random MD",
         "top coord MD"], per_layer)
    emit(md, args.md, {"runs": results}, args.json)


if __name__ == "__main__":
    main()
