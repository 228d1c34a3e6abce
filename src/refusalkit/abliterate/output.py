"""What an abliterate run leaves: the checkpoint with its model card, the reproduce file,
metrics.json and report.html (with the Pareto front as a figure)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from refusalkit.abliterate.config import AbliterateConfig
from refusalkit.abliterate.search import refusal_count
from refusalkit.artifacts import model_record
from refusalkit.export import tensor_sha256, write_checkpoint
from refusalkit.judge.protocol import classify
from refusalkit.kernels import Kernel, folded
from refusalkit.models import LoadedModel
from refusalkit.report import build_report, figure, save_examples, save_figure, save_table
from refusalkit.runs import RunDir

REPRODUCE = "reproduce.json"
CHECKPOINT = "model"
REPRODUCE_FORMAT = "refusalkit.abliterate.reproduce/v1"


def checkpoint_stamp(lm: LoadedModel, kernel: Kernel, directions: torch.Tensor,
                     trial: int) -> dict[str, Any]:
    """refusalkit-export.json of an abliterated checkpoint."""
    return {"format": "refusalkit.abliterated/v2", "source_model": model_record(lm),
            "kernel": kernel.to_json(), "directions_sha256": tensor_sha256(directions),
            "trial": trial}


def save_checkpoint(lm: LoadedModel, kernel: Kernel, directions: torch.Tensor, out: Path,
                    stamp: dict[str, Any], card: str) -> str:
    """Fold the kernel into a (restored afterwards) copy of the weights, write the HF folder,
    and return the sha256 of its model.safetensors."""
    with folded(lm, kernel, directions):
        write_checkpoint(lm, out, stamp, {"README.md": card})
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def model_card(cfg: AbliterateConfig, lm: LoadedModel, kernel: Kernel, chosen: dict[str, Any],
               held: dict[str, Any], base: dict[str, Any], picked: dict[str, Any]) -> str:
    n = held["n"]
    judges = "\n".join(
        f"| {spec} | {base['refusals'].get(spec, '—')}/{n} | {held['refusals'][spec]}/{n} |"
        for spec in held["refusals"])
    peaks = "\n".join(f"| {c} | {p.max_weight:.3f} | {p.position:.2f} | {p.min_weight:.3f} | "
                      f"{p.distance:.2f} |" for c, p in sorted(kernel.peaks.items()))
    direction = ("each layer's own direction" if kernel.direction is None
                 else f"the refusal direction at layer {kernel.direction:.2f}")
    how = ("difference of means, harmful minus harmless" if cfg.direction_method == "md" else
           "difference of means, harmful minus harmless, with its part along the harmless "
           "mean removed (projected)")
    fold = (" Each writer row is then rescaled to its original norm (norm-preserving)."
            if kernel.preserve_norms else "")
    q = held.get("quality") or {}
    useful = ("" if q.get("useful") is None else
              f"\nBy the default judge {q['useful']:.0%} of the abliterated model's held-out "
              f"answers are useful (compliance, on topic, not looping; the original model: "
              f"{(base.get('quality') or {}).get('useful', 0):.0%}).\n")
    return f"""---
base_model: {lm.name}
tags: [abliterated, refusalkit]
---
# {lm.name}, abliterated with refusalkit

Directional ablation folded into the weights: on every residual writer of layer *l* of
component *c*, W ← W − w(c, l) r̂ r̂ᵀ W, with r̂ {direction}
({how}, last prompt token; {cfg.data.n_fit} prompts a side from {cfg.data.harmful_fit} /
{cfg.data.harmless_fit}); embedding weight {kernel.embed:.3f}.{fold}

| component | peak weight | peak layer | min weight | fall-off (layers) |
|---|---|---|---|---|
{peaks}

Trial {chosen['number']} of {cfg.search.trials} (chosen by {picked['by']}), from an Optuna search
minimising judged refusals on {cfg.data.n_search} dev prompts ({cfg.data.harmful_search}) and
next-token KL on {cfg.data.n_search_kl} ({cfg.data.harmless_search}): dev refusals
{chosen['refusals']}/{chosen['n']}, dev KL {chosen['kl']:.4f}.

## Held out (never used to choose)

Refusals on {n} {cfg.data.harmful_eval} prompts ({cfg.judge.max_new_tokens} new tokens,
greedy) and mean next-token KL on {cfg.data.n_eval_kl} {cfg.data.harmless_eval} prompts:
**KL {held['kl']:.4f}**.

| judge | original | abliterated |
|---|---|---|
{judges}
{useful}
The default judge (`{cfg.judge.spec}`) counts off-topic answers, babble, loops and official
narratives as refusals, so a model that stops refusing by falling apart does not score well.
A model that no longer refuses harmful requests will help with them: use it for research
on refusal, not in front of users.
"""


QUALITY_COLUMNS = ("useful", "on_topic", "loop", "perplexity")


def _rate(held: dict[str, Any], spec: str) -> float:
    return held["refusals"][spec] / max(1, held["n"])


def metrics_of(cfg: AbliterateConfig, records: list[dict[str, Any]],
               front: list[dict[str, Any]], heldout: dict[str, Any], picked: dict[str, Any],
               base: list[dict[str, Any]], sha: str) -> dict[str, Any]:
    chosen = next(r for r in records if r["number"] == picked["number"])
    held, un = heldout[str(chosen["number"])], heldout["unsteered"]
    return {
        "judge": cfg.judge.spec,
        "trials": len(records),
        "pruned": sum(r["pruned"] for r in records),
        "front": [r["number"] for r in front],
        "kl_max": cfg.kl_max,
        "chosen": {"number": chosen["number"], "by": picked["by"],
                   "within_budget": picked.get("within_budget"), "kernel": chosen["kernel"],
                   "dev_refusals": chosen["refusals"], "dev_n": chosen["n"],
                   "dev_kl": chosen["kl"]},
        "dev_refusals_before": refusal_count(base),
        "heldout_n": held["n"],
        "heldout_kl": held["kl"],
        "heldout_refusal_before": {s: _rate(un, s) for s in un["refusals"]},
        "heldout_refusal_after": {s: _rate(held, s) for s in held["refusals"]},
        "heldout_quality_before": un.get("quality"),
        "heldout_quality_after": held.get("quality"),
        "checkpoint_sha256": sha,
    }


def _front_figure(run: RunDir, records: list[dict[str, Any]], front: list[dict[str, Any]],
                  heldout: dict[str, Any], chosen: int, cfg: AbliterateConfig) -> None:
    fig = figure(9.6, 3.8)
    fig.set_layout_engine("constrained")
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    done = [r for r in records if not r["pruned"]]
    ax.scatter([r["kl"] for r in done], [r["refusals"] / r["n"] for r in done], s=14,
               color="#bbbbbb", label="trial")
    ax.plot([r["kl"] for r in front], [r["refusals"] / r["n"] for r in front], "o-",
            color="#1f77b4", label="Pareto front")
    c = next(r for r in done if r["number"] == chosen)
    ax.plot([c["kl"]], [c["refusals"] / c["n"]], "*", ms=14, color="#d62728", label="chosen")
    ax.axvline(cfg.kl_max, ls=":", color="k", lw=0.8)
    ax.set(xlabel="KL on dev ordinary prompts",
           ylabel="judged refusal rate (dev)", title="search (dev)")
    ax.legend(fontsize=7)
    specs = list(heldout["unsteered"]["refusals"])
    keys = sorted((k for k in heldout if k != "unsteered"), key=lambda k: heldout[k]["kl"])
    for spec, color in zip(specs, ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"), strict=False):
        xs = [0.0] + [heldout[k]["kl"] for k in keys]
        ys = [_rate(heldout["unsteered"], spec)] + [_rate(heldout[k], spec) for k in keys]
        bx.plot(xs, ys, "o-", color=color, label=spec)
        if str(chosen) in heldout:
            bx.plot([heldout[str(chosen)]["kl"]], [_rate(heldout[str(chosen)], spec)], "*",
                    ms=14, color=color)
    bx.axvline(cfg.kl_max, ls=":", color="k", lw=0.8)
    bx.set(xlabel="KL on held-out ordinary prompts",
           ylabel="refusal rate (held out)", title="front, held out")
    bx.legend(fontsize=7)
    save_figure(run, "pareto", fig, section="Pareto front",
                caption="Left: every trial on dev data (front in blue, the chosen one starred, "
                "dotted line = KL budget). Right: the front's trials re-measured on held-out "
                "prompts, once per judge; the point at KL 0 is the original model.")


def write_report(run: RunDir, cfg: AbliterateConfig, records: list[dict[str, Any]],
                 front: list[dict[str, Any]], heldout: dict[str, Any], metrics: dict[str, Any],
                 ) -> Path:
    chosen = metrics["chosen"]["number"]
    run.write_metrics(metrics)
    _front_figure(run, records, front, heldout, chosen, cfg)
    rows = []
    for r in front:
        h = heldout.get(str(r["number"]))
        row = {"trial": r["number"], "chosen": r["number"] == chosen, "dev_refusals": r["refusals"],
               "dev_kl": r["kl"], "heldout_kl": h["kl"] if h else None}
        for spec in heldout["unsteered"]["refusals"]:
            row[f"heldout_{spec}"] = h["refusals"][spec] if h else None
        for key in QUALITY_COLUMNS:
            row[f"heldout_{key}"] = (h.get("quality") or {}).get(key) if h else None
        rows.append(row)
    save_table(run, "front", rows, section="Pareto front",
               caption="Pareto trials: dev figures (what the choice saw) and held-out figures: "
               "refusals per judge, and by the default judge the share of useful answers "
               "(compliance, on topic, not looping), on-topic and loop rates and the mean "
               "perplexity of the answers under the original model.")
    save_table(run, "trials", [{"trial": r["number"], "pruned": r["pruned"], "kl": r["kl"],
                                "refusals": r.get("refusals"), **r["params"]} for r in records],
               section="Search", caption="Every trial's parameters and dev objectives.")
    before, after = heldout["unsteered"]["answers"], heldout[str(chosen)]["answers"]
    save_examples(run, [{"dataset": cfg.data.harmful_eval, "prompt": b["prompt"],
                         "before_response": b["response"],
                         "before_label": classify(b["confidence"]),
                         "after_response": a["response"],
                         "after_label": classify(a["confidence"]), "style": a["style"],
                         **{f"after_{k}": (a.get("quality") or {}).get(k)
                            for k in ("useful", "on_topic", "perplexity")}}
                        for b, a in zip(before, after, strict=True)])
    return build_report(run, title=f"refusalkit abliterate — {cfg.model}")


def finish(run: RunDir, lm: LoadedModel, cfg: AbliterateConfig, splits: Any,
           fit: dict[str, torch.Tensor], records: list[dict[str, Any]],
           front: list[dict[str, Any]], heldout: dict[str, Any], picked: dict[str, Any],
           base: list[dict[str, Any]], *, gguf: bool = False) -> Path:
    """Checkpoint, model card, reproduce file, metrics and report; returns the run folder."""
    chosen = next(r for r in records if r["number"] == picked["number"])
    kernel = Kernel.from_json(chosen["kernel"])
    directions = fit["directions"]
    held = heldout[str(chosen["number"])]
    card = model_card(cfg, lm, kernel, chosen, held, heldout["unsteered"], picked)
    stamp = checkpoint_stamp(lm, kernel, directions, chosen["number"])
    out = run.file(CHECKPOINT)
    sha = save_checkpoint(lm, kernel, directions, out, stamp, card)
    run.write_json(REPRODUCE, {
        "format": REPRODUCE_FORMAT, "config": cfg.model_dump(mode="json"),
        "model": model_record(lm), "datasets": splits.records(), "trial": chosen["number"],
        "kernel": kernel.to_json(), "directions_sha256": stamp["directions_sha256"],
        "checkpoint_sha256": sha})
    if gguf:
        from refusalkit.abliterate.gguf_out import write_gguf

        write_gguf(lm, kernel, directions, run.file("model.gguf"))
    metrics = metrics_of(cfg, records, front, heldout, picked, base, sha)
    write_report(run, cfg, records, front, heldout, metrics)
    return run.path
