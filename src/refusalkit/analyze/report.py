"""Tables, figures, metrics and report of an `analyze` run (all rebuilt from stage results).

Figures: cosine heatmap (splits + oracle directions), cosine vs depth, stability bars, layer
profile (separability, participation ratio, PC count per layer), RR–ORR trade-off curves of
every direction, style distributions. Every figure's numbers are also a table (JSON + CSV).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from refusalkit import report as R
from refusalkit.analyze import divergence as D
from refusalkit.analyze import geometry as G
from refusalkit.analyze.config import AnalyzeConfig
from refusalkit.analyze.styles import LEXICAL_STYLES
from refusalkit.runs import RunDir


def _r(x: Any, nd: int = 4) -> Any:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def _offdiag_stats(c: list[list[float]]) -> dict[str, float]:
    import torch

    off = G.off_diagonal(torch.tensor(c, dtype=torch.float64))
    return {"min": float(off.min()), "median": float(off.median()), "mean": float(off.mean()),
            "max": float(off.max())}


def write_outputs(run: RunDir, cfg: AnalyzeConfig, model: str, layer: int, pools: dict,
                  base: dict, eval_rows: dict, geo: dict, oracle: dict, sweeps: dict,
                  summary: dict, unit_scale: float, judge_id: str) -> None:
    """Tables, figures, examples and metrics of an analyze run, then report.html."""
    _split_table(run, cfg, layer, geo)
    _geometry_tables(run, cfg, layer, geo, oracle)
    _layer_table(run, cfg, geo)
    _tradeoff_tables(run, cfg, geo, summary, unit_scale, judge_id)
    _style_tables(run, summary)
    from refusalkit.analyze.figures import draw_all

    draw_all(run, cfg, layer, geo, oracle, summary, unit_scale)
    _examples(run, eval_rows, sweeps, cfg.sweep.examples)
    metrics = headline(cfg, model, layer, geo, oracle, summary, judge_id, run.path)
    R.save_table(run, "claims", claims(metrics), section="Summary", order=1,
                 caption="Paper B's claims on this model: whether each holds, by which rule, "
                 "with the figure and its interval (bootstrap CI or range over splits)")
    run.write_metrics(metrics)
    R.build_report(run)




def _split_table(run: RunDir, cfg: AnalyzeConfig, layer: int, geo: dict) -> None:
    names, li, sp = geo["names"], layer - 1, geo["splits"]
    p0 = str(cfg.directions.positions[0])
    split_rows = []
    for n in names:
        s = sp[n]
        row = {"split": n, "n_refuse": s["n_refuse"], "n_benign": s["n_benign"],
               "pool_refuse": s["pool_refuse"], "pool_benign": s["pool_benign"]}
        for p, st in s["stability"].items():
            row[f"stability@{p}"] = _r(st["stability"])
            row[f"resample_n@{p}"] = st["n"]
            row[f"overlap@{p}"] = _r(st["overlap"], 3)
            proj = st[f"projected_at_{cfg.directions.n}"]
            row[f"projected_n{cfg.directions.n}@{p}"] = _r(proj)
            row[f"n_for_0.9@{p}"] = _n_needed(st)
        row.update({f"cos_pos{p0}_vs{p}": _r(v) for p, v in s["position_cosine"].items()
                    if p != p0})
        sep = s["separability"]
        row.update({"separability": _r(sep[li]), "peak_layer": int(np.argmax(sep)) + 1,
                    "participation_ratio": _r(s["participation_ratio"][li], 1),
                    "pcs_leading": s["pcs"][li]["leading"],
                    "pcs_minimal": s["pcs"][li]["minimal"],
                    "pcs_captured": _r(s["pcs"][li]["captured"], 3)})
        split_rows.append(row)
    R.save_table(run, "splits", split_rows, section="Directions", order=1,
                 caption=f"Per split at layer {layer}, position {p0}: stability = mean pairwise "
                 "cosine of directions from independent (disjoint) resamples of resample_n "
                 "prompts a side (overlap = share of prompts resamples have in common; "
                 "projected = the stability expected at n prompts a side, 1/c − 1 ∝ 1/n; "
                 "n_for_0.9 = prompts a side at which that model expects 0.9, so a split "
                 "below 0.9 with a modest n_for_0.9 is short of samples, not direction); "
                 "separability = cross-validated AUC; PR = "
                 f"participation ratio; PCs = principal components holding "
                 f"{cfg.stats.pc_fraction:.0%} of ‖δ‖².")


def _geometry_tables(run: RunDir, cfg: AnalyzeConfig, layer: int, geo: dict,
                     oracle: dict) -> None:
    names, li = geo["names"], layer - 1
    p0 = str(cfg.directions.positions[0])
    cos = geo["cosine"][p0][li]
    R.save_table(run, "cosine_matrix", [{"split": a, **{b: _r(cos[i][j]) for j, b in
                                                        enumerate(names)}}
                                        for i, a in enumerate(names)],
                 section="Geometry", order=1,
                 caption=f"Cosine similarity of split directions (layer {layer}, position {p0}).")
    depth = [{"layer": j + 1, **{k: _r(v) for k, v in _offdiag_stats(geo["cosine"][p0][j]).items()}}
             for j in range(len(geo["layers"]))]
    R.save_table(run, "cosine_by_layer", depth, section="Geometry", order=3,
                 caption="Off-diagonal cosines of the split directions at every layer.")
    onames, ocos = oracle["names"], oracle["cosine"]
    if onames:
        R.save_table(run, "oracle_cosine", [{"direction": a, **{b: _r(ocos[i][j]) for j, b in
                                                                 enumerate(onames)}}
                                            for i, a in enumerate(onames)],
                     section="Geometry", order=4,
                     caption="Cosines of oracle bucket directions (HR, HC, BR, BC) with each "
                     "other and with the split directions.")
    R.save_table(run, "buckets", [{"bucket": b, "n": v} for b, v in oracle["sizes"].items()]
                 + [{"bucket": f"{k} stability", "n": v["n"], "stability": _r(v["stability"]),
                     "overlap": _r(v["overlap"], 3),
                     f"projected_n{cfg.directions.n}": _r(v[f"projected_at_{cfg.directions.n}"])}
                    for k, v in oracle["stability"].items()],
                 section="Baseline", order=1,
                 caption="Unsteered behaviour buckets (judged) and oracle-direction stability.")


def _layer_table(run: RunDir, cfg: AnalyzeConfig, geo: dict) -> None:
    names, sp = geo["names"], geo["splits"]
    p0 = str(cfg.directions.positions[0])
    prof = [{"split": n, "layer": j + 1, "separability": _r(sp[n]["separability"][j]),
             "stability": _r(sp[n]["stability"][p0]["by_layer"][j]),
             "participation_ratio": _r(sp[n]["participation_ratio"][j], 1),
             "pcs_leading": sp[n]["pcs"][j]["leading"], "pcs_minimal": sp[n]["pcs"][j]["minimal"],
             "raw_norm": _r(sp[n]["raw_norm"][j])}
            for n in names for j in range(len(geo["layers"]))]
    R.save_table(run, "layer_profile", prof, section="Layers", order=1,
                 caption="Where the signal lives, per split and layer.")


def _tradeoff_tables(run: RunDir, cfg: AnalyzeConfig, geo: dict, summary: dict,
                     unit_scale: float, judge_id: str) -> None:
    names = geo["names"]
    sweep_rows = []
    for d, pts in summary["curves"].items():
        for p in pts:
            sweep_rows.append({"direction": d, "condition": "add", "alpha": p["alpha"],
                               "alpha_abs": _r(p["alpha"] * unit_scale), "rr": _r(p["rr"]),
                               "orr": _r(p["orr"]), "acc": _r(p["acc"]),
                               "n_harmful": p["n_harmful"], "n_benign": p["n_benign"]})
        if d in summary["ablation"]:
            a = summary["ablation"][d]
            sweep_rows.append({"direction": d, "condition": "ablate", "alpha": None,
                               "alpha_abs": None, "rr": _r(a["rr"]), "orr": _r(a["orr"]),
                               "acc": _r(a["acc"]), "n_harmful": a["n_harmful"],
                               "n_benign": a["n_benign"]})
    R.save_table(run, "sweeps", sweep_rows, section="Trade-offs", order=1,
                 caption=f"Judged ({judge_id}) refusal rate on harmful (RR), on benign (ORR) and "
                 f"accuracy per α (α in units of {unit_scale:.3g}) and under ablation; directions "
                 f"taken and added at layer {summary['site']['layer']}, position "
                 f"{summary['site']['position']}.")
    cal_path = run.path / "stages" / "calibration.json"
    if cal_path.is_file():
        cal = json.loads(cal_path.read_text())
        R.save_table(run, "calibration", [{k: _r(v) for k, v in st.items()}
                                          for st in cal["ladder"]],
                     section="Trade-offs", order=3,
                     caption=f"Calibration of α_max on '{names[0]}': judged refusal share of "
                     f"{cal['n_prompts']} complied benign prompts per ladder value (target "
                     f"{cfg.sweep.calibrate_target:.0%}; "
                     f"{'reached' if cal['reached'] else 'NOT reached'}); α grid = α_max × "
                     f"{cfg.sweep.alphas}.")
    gap = summary["gap"]
    gap_rows = [{"pair": k, "max_gap": _r(v["max"]), "mean_gap": _r(v["mean"]),
                 "rr_from": _r(v["rr_range"][0]), "rr_to": _r(v["rr_range"][1])}
                for k, v in (gap.get("pairs") or {}).items()]
    R.save_table(run, "tradeoff_gaps", gap_rows, section="Trade-offs", order=2,
                 caption="|ΔORR| between two directions' curves at matched RR (linear "
                 "interpolation over their shared RR range).")


def _style_tables(run: RunDir, summary: dict) -> None:
    lex = summary["styles"]["lexical"]
    style_rows = []
    for d, labels in lex.items():
        dist = D.distribution(labels, LEXICAL_STYLES)
        shares = {s: _r(float(v), 3) for s, v in zip(LEXICAL_STYLES, dist, strict=True)}
        style_rows.append({"direction": d, "n": len(labels), **shares})
    R.save_table(run, "styles", style_rows, section="Styles", order=1,
                 caption="Lexical style of each steered refusal (per prompt, at the largest α "
                 "that made it refuse), share per direction.")
    R.save_table(run, "markers", [{"direction": d, **{k: _r(v, 3) for k, v in m.items()}}
                                  for d, m in summary["markers"].items()],
                 section="Styles", order=2,
                 caption="Share of steered refusals (all α) containing each lexical marker.")
    test_rows = []
    for src, t in summary["style_tests"].items():
        o = t["overall"]
        test_rows.append({"labels": src, "pair": "all directions", "statistic": _r(o["statistic"]),
                          "p_value": _r(o["p_value"])})
        for k, v in t["pairs"].items():
            test_rows.append({"labels": src, "pair": k, "statistic": _r(v["jsd"]),
                              "p_value": _r(v["p_value"]), "p_holm": _r(v["p_holm"])})
    R.save_table(run, "style_tests", test_rows, section="Styles", order=3,
                 caption="Style divergence: all directions = I(direction; style) in bits, "
                 "pairs = Jensen–Shannon divergence (bits); permutation p-values, Holm-adjusted "
                 "over pairs.")


def headline(cfg: AnalyzeConfig, model: str, layer: int, geo: dict, oracle: dict,
             summary: dict, judge_id: str, run_path: Path) -> dict[str, Any]:
    """The numbers a reader needs first (metrics.json / report summary)."""
    li, p0 = layer - 1, str(cfg.directions.positions[0])
    stab = {n: geo["splits"][n]["stability"][p0]["stability"] for n in geo["names"]}
    off = _offdiag_stats(geo["cosine"][p0][li])
    out: dict[str, Any] = {
        "model": model, "judge": judge_id, "layer": layer, "position": int(p0),
        "splits": len(geo["names"]),
        "stability_min": _r(min(stab.values())), "stability_median": _r(float(np.median(
            list(stab.values())))),
        "splits_below_0.9": sorted(n for n, v in stab.items() if v < 0.9),
        "n_for_0.9": {n: _n_needed(geo["splits"][n]["stability"][p0]) for n, v in stab.items()
                      if v < 0.9},
        "stability_projected_min": _r(min(
            (geo["splits"][n]["stability"][p0][f"projected_at_{cfg.directions.n}"]
             for n in geo["names"]), key=lambda v: -1.0 if math.isnan(v) else v)),
        "cosine_min": _r(off["min"]), "cosine_median": _r(off["median"]),
        "cosine_max": _r(off["max"]),
        "buckets": oracle["sizes"],
        "sweep_layer": summary["site"]["layer"], "sweep_position": summary["site"]["position"],
    }
    names, ocos = oracle["names"], oracle["cosine"]
    if "HR-BC" in names and "BR-BC" in names:
        out["cos_HR-BC_BR-BC"] = _r(ocos[names.index("HR-BC")][names.index("BR-BC")])
    split_idx = [names.index(n) for n in geo["names"]]
    for k in ("HR-BC", "BR-BC"):
        if k in names:  # the split direction closest to this oracle direction
            row = ocos[names.index(k)]
            best = max(split_idx, key=lambda j: row[j])
            out[f"cos_{k}_max_split"] = [names[best], _r(row[best])]
    for k in ("HR-BC", "BR-BC"):
        if k in oracle["stability"]:
            st = oracle["stability"][k]
            out[f"stability_{k}"] = _r(st["stability"])
            out[f"stability_{k}_n"] = st["n"]
            out[f"stability_{k}_projected"] = _r(st[f"projected_at_{cfg.directions.n}"])
    gap = summary["gap"]
    if gap.get("max_gap") is not None:
        out["tradeoff_max_gap"] = _r(gap["max_gap"])
        out["tradeoff_max_gap_ci"] = [_r(x) for x in gap.get("max_gap_ci", [])]
        out["tradeoff_max_pair"] = gap.get("max_pair")
        out["tradeoff_mean_gap"] = _r(gap.get("mean_gap"))
        out["tradeoff_mean_gap_ci"] = [_r(x) for x in gap.get("mean_gap_ci", [])]
    cal_path = run_path / "stages" / "calibration.json"
    if cal_path.is_file():
        cal = json.loads(cal_path.read_text())
        out["alpha_max"] = cal["alpha_max"]
        out["alpha_max_reached_target"] = cal["reached"]
    lex = summary["style_tests"].get("lexical", {}).get("overall", {})
    out["style_MI_bits"] = _r(lex.get("statistic"))
    out["style_p_value"] = _r(lex.get("p_value"))
    return out


STABLE = 0.9  # within-split stability a direction needs (paper B measured >= 0.95)
GAP = 0.1  # |ΔORR| at matched RR below which two directions share one trade-off
ALPHA = 0.05  # significance of the style test


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("holds" if ok else "does not hold")


def claims(m: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per claim of paper B, read off the headline metrics with a stated rule."""
    stab_med, cos_med = m.get("stability_median"), m.get("cosine_median")
    distinct = (None if stab_med is None or cos_med is None
                or math.isnan(stab_med) or math.isnan(cos_med) else cos_med < stab_med)
    stab_min = m.get("stability_min")
    gap_ci = m.get("tradeoff_max_gap_ci") or []
    shared = None if m.get("tradeoff_max_gap") is None else (
        (gap_ci[1] if len(gap_ci) == 2 else m["tradeoff_max_gap"]) <= GAP)
    below = ", ".join(m.get("splits_below_0.9", []))
    p_style = m.get("style_p_value")
    styled = None if p_style is None or math.isnan(p_style) else p_style < ALPHA
    return [
        {"claim": "directions are distinct", "paper B": "cosines 0.4–0.6 between splits",
         "rule": "median cosine between splits < median stability within a split",
         "here": _verdict(distinct), "figure": f"median cosine {cos_med}",
         "interval": f"{m.get('cosine_min')} – {m.get('cosine_max')} (range over pairs)"},
        {"claim": "each direction is stable", "paper B": "≥ 0.95 over 32/32 resamples",
         "rule": f"every split's stability ≥ {STABLE}",
         "here": _verdict(None if stab_min is None or math.isnan(stab_min)
                          else stab_min >= STABLE),
         "figure": f"min {stab_min}, median {stab_med}",
         "interval": f"splits below {STABLE}: {below or 'none'}"},
        {"claim": "one shared refusal vs over-refusal trade-off",
         "paper B": "RR and ORR rise along nearly one curve",
         "rule": f"upper CI of the largest |ΔORR| at matched RR ≤ {GAP}",
         "here": _verdict(shared), "figure": f"max gap {m.get('tradeoff_max_gap')} "
         f"({m.get('tradeoff_max_pair')})", "interval": f"95% CI {gap_ci or 'n/a'}"},
        {"claim": "directions change how the model refuses (style)",
         "paper B": "shown qualitatively only",
         "rule": f"permutation test of I(direction; lexical style), p < {ALPHA}",
         "here": _verdict(styled), "figure": f"MI {m.get('style_MI_bits')} bits",
         "interval": f"p = {p_style}"},
    ]


def _n_needed(st: dict) -> int | None:
    n = G.n_for_stability(st["stability"], st["n"])
    return None if math.isinf(n) else math.ceil(n)


def _examples(run: RunDir, eval_rows: dict, sweeps: dict, per_direction: int) -> None:
    """Before/after rows: the unsteered response vs the largest-α response, per direction,
    preferring prompts whose label changed."""
    rows = []
    for d, sw in sweeps.items():
        adds = [c for c in sw["conditions"] if c["kind"] == "add"]
        if not adds:
            continue
        top = max(adds, key=lambda c: c["alpha"])
        cands = []
        for side in ("harmful", "benign"):
            for i, b in enumerate(eval_rows[side]):
                a = top[side][i]
                cands.append((a["refusal"] == b["refusal"], side, b, a))
        cands.sort(key=lambda t: t[0])  # changed first (stable order otherwise)
        for _, side, b, a in cands[:per_direction]:
            rows.append({"dataset": d, "category": f"{side}/{b['bucket']}",
                         "prompt": b["prompt"], "before_response": b["response"],
                         "before_label": "refusal" if b["refusal"] else "compliance",
                         "after_response": a["response"],
                         "after_label": "refusal" if a["refusal"] else "compliance",
                         "confidence": a["score"], "style": a["style"],
                         "alpha": top["alpha"]})
    R.save_examples(run, rows)

