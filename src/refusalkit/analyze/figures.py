"""The figures of an `analyze` run (matplotlib, no pyplot), registered with the report."""

from __future__ import annotations

import numpy as np

from refusalkit import report as R
from refusalkit.analyze import divergence as D
from refusalkit.analyze import geometry as G
from refusalkit.analyze.config import AnalyzeConfig
from refusalkit.analyze.styles import LEXICAL_STYLES
from refusalkit.runs import RunDir


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def draw_all(run: RunDir, cfg: AnalyzeConfig, layer: int, geo: dict, oracle: dict,
             summary: dict, unit_scale: float) -> None:
    li, p0 = layer - 1, str(cfg.directions.positions[0])
    names = geo["names"]
    _heatmap(run, oracle, names, layer, p0)
    _depth(run, geo, p0, layer)
    _stability(run, geo, names, layer)
    _layer_profile(run, geo, names, p0, layer)
    _tradeoff(run, summary, unit_scale)
    _styles(run, summary)
    del li


def _heatmap(run: RunDir, oracle: dict, names: list[str], layer: int, p0: str) -> None:
    labels = oracle["names"] or names
    c = np.array(oracle["cosine"]) if oracle["names"] else None
    if c is None:
        return
    k = len(labels)
    fig = R.figure(1.2 + 0.45 * k, 0.8 + 0.42 * k)
    ax = fig.add_subplot()
    im = ax.imshow(c, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{c[i, j]:.2f}", ha="center", va="center", fontsize=5.5,
                    color="white" if abs(c[i, j]) > 0.6 else "black")
    n_or = k - len(names)
    if n_or > 0:
        ax.axhline(n_or - 0.5, color="k", lw=0.8)
        ax.axvline(n_or - 0.5, color="k", lw=0.8)
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine")
    R.save_figure(run, "cosine_heatmap", fig, section="Geometry", order=0,
                  caption=f"Cosine similarity of refusal directions at layer {layer}, position "
                  f"{p0}: oracle bucket directions (top-left block) and split directions.")


def _depth(run: RunDir, geo: dict, p0: str, layer: int) -> None:
    import torch

    layers = geo["layers"]
    stats = np.array([[float(x) for x in (lambda o: (o.min(), o.median(), o.max()))(
        G.off_diagonal(torch.tensor(geo["cosine"][p0][j], dtype=torch.float64)))]
        for j in range(len(layers))])
    fig = R.figure(6.4, 3.2)
    ax = fig.add_subplot()
    ax.fill_between(layers, stats[:, 0], stats[:, 2], alpha=0.25, label="min–max")
    ax.plot(layers, stats[:, 1], marker="o", ms=3, label="median")
    ax.axvline(layer, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("layer (resid_pre; last = final output)")
    ax.set_ylabel("cosine between split directions")
    ax.set_ylim(-0.2, 1.0)
    ax.legend(fontsize=8)
    R.save_figure(run, "cosine_by_layer", fig, section="Geometry", order=2,
                  caption="How similar the split directions are at each depth (off-diagonal "
                  "cosines; dashed: analysis layer).")


def _stability(run: RunDir, geo: dict, names: list[str], layer: int) -> None:
    positions = geo["positions"]
    fig = R.figure(6.4, 3.4)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    w = 0.8 / len(positions)
    for i, p in enumerate(positions):
        vals = [geo["splits"][n]["stability"][str(p)]["stability"] for n in names]
        ax.bar(x + (i - (len(positions) - 1) / 2) * w, vals, w, label=f"position {p}")
    ax.axhline(0.9, color="k", ls="--", lw=0.8)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("stability (mean pairwise cosine)")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
    ax.legend(fontsize=8)
    R.save_figure(run, "stability", fig, section="Directions", order=0,
                  caption=f"Within-split stability at layer {layer} over independent resamples "
                  "(dashed: 0.9).")


def _layer_profile(run: RunDir, geo: dict, names: list[str], p0: str, layer: int) -> None:
    layers = geo["layers"]
    colors = _colors(len(names))
    fig = R.figure(9.0, 3.4)
    axes = fig.subplots(1, 3)
    for n, col in zip(names, colors, strict=True):
        s = geo["splits"][n]
        axes[0].plot(layers, s["separability"], color=col, lw=1, label=n)
        axes[1].plot(layers, s["participation_ratio"], color=col, lw=1)
        axes[2].plot(layers, [p["minimal"] for p in s["pcs"]], color=col, lw=1)
    titles = ("separability (CV AUC)", "participation ratio of δ", "PCs holding 90 % of ‖δ‖²")
    for ax, t in zip(axes, titles, strict=True):
        ax.set_title(t, fontsize=8)
        ax.set_xlabel("layer", fontsize=8)
        ax.axvline(layer, color="grey", ls="--", lw=0.8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=5, ncol=2)
    R.save_figure(run, "layer_profile", fig, section="Layers", order=0,
                  caption=f"Where the signal lives, per split and layer (position {p0}); "
                  "dashed: analysis layer.")


def _tradeoff(run: RunDir, summary: dict, unit_scale: float) -> None:
    curves = summary["curves"]
    if not curves:
        return
    colors = _colors(len(curves))
    fig = R.figure(6.4, 4.6)
    ax = fig.add_subplot()
    for (d, pts), col in zip(curves.items(), colors, strict=True):
        style = "--" if d in ("HR-BC", "BR-BC", "HC-BC", "HR-HC") else "-"
        ax.plot([p["rr"] for p in pts], [p["orr"] for p in pts], style, marker="o", ms=3,
                color=col, lw=1.2, label=d)
        if d in summary["ablation"]:
            a = summary["ablation"][d]
            ax.scatter([a["rr"]], [a["orr"]], marker="x", color=col, s=25)
    ax.set_xlabel("RR (refusal rate on harmful)")
    ax.set_ylabel("ORR (refusal rate on benign)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=6, ncol=2)
    gap = summary["gap"]
    sub = ""
    if gap.get("max_gap") is not None:
        lo, hi = gap.get("max_gap_ci", [None, None])
        sub = f"; largest ORR gap at matched RR {gap['max_gap']:.2f}"
        if lo is not None:
            sub += f" (95 % CI {lo:.2f}–{hi:.2f})"
    site = summary["site"]
    R.save_figure(run, "tradeoff_curves", fig, section="Trade-offs", order=0,
                  caption="RR–ORR trade-off of activation addition at layer "
                  f"{site['layer']}, position {site['position']} along each "
                  "direction (dots: "
                  f"α = 0 and the α grid, unit {unit_scale:.3g}; dashed: oracle directions; "
                  f"x: directional ablation){sub}.")


def _styles(run: RunDir, summary: dict) -> None:
    lex = {d: v for d, v in summary["styles"]["lexical"].items() if v}
    if not lex:
        return
    names = list(lex)
    dists = np.array([D.distribution(lex[d], LEXICAL_STYLES).numpy() for d in names])
    colors = _colors(len(LEXICAL_STYLES))
    fig = R.figure(7.0, 0.9 + 0.3 * len(names))
    ax = fig.add_subplot()
    left = np.zeros(len(names))
    for j, s in enumerate(LEXICAL_STYLES):
        ax.barh(range(len(names)), dists[:, j], left=left, color=colors[j], label=s)
        left += dists[:, j]
    ax.set_yticks(range(len(names)), [f"{d} (n={len(lex[d])})" for d in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of steered refusals")
    ax.legend(fontsize=6, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    t = summary["style_tests"].get("lexical", {}).get("overall", {})
    cap = ""
    if t.get("p_value") is not None:
        cap = (f" I(direction; style) = {t['statistic']:.3f} bits, permutation "
               f"p = {t['p_value']:.3g}.")
    R.save_figure(run, "style_distributions", fig, section="Styles", order=0,
                  caption="How each direction's steered refusals are phrased (lexical style)."
                  + cap)
