"""The steer run's report: figures, tables and examples, then report.html."""

from __future__ import annotations

from typing import Any

from refusalkit.report import build_report, figure, save_examples, save_figure, save_table
from refusalkit.runs import RunDir


def write_report(run: RunDir, layer_rows: list[dict[str, Any]], searched: dict[str, Any],
                 verified: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Figures, tables and examples for report.html, then the report itself."""
    examples = metrics.pop("_examples", [])
    run.write_json("metrics.json", metrics)
    save_examples(run, examples)

    fig = figure()
    ax = fig.add_subplot()
    layers = [r["layer"] for r in layer_rows]
    ax.plot(layers, [r["auc"] for r in layer_rows], marker="o", label="AUC refused vs answered")
    if any(r["corr_c"] == r["corr_c"] for r in layer_rows):  # not all NaN
        ax.plot(layers, [abs(r["corr_c"]) for r in layer_rows], marker="s",
                label="|corr(projection, c)|")
    chosen = metrics.get("chosen_layers", [])
    for layer in chosen:
        ax.axvspan(layer - 0.5, layer + 0.5, color="orange", alpha=0.15)
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    save_figure(run, "layer_profile", fig, section="Layers", order=1,
                caption="Per-layer separability of the target direction (steered layers shaded)")
    save_table(run, "layers", layer_rows, section="Layers", caption="Layer ranking", order=2)

    per = metrics["per_dataset"]
    sets = list(per["before"]["judge"])
    fig = figure(7.5, 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(per)
    for i, (name, vals) in enumerate(per.items()):
        ax.bar([j + i * width for j in range(len(sets))], [vals["judge"][s] for s in sets],
               width=width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))],
                  [s.replace("overrefusal:", "over:") for s in sets], fontsize=7)
    ax.set_ylabel("judged refusal rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    save_figure(run, "refusal_bars", fig, section="Evaluation", order=1,
                caption="Held-out refusal rate per dataset: before, after and baselines")
    quality_rows = [{"profile": name, "dataset": s, **vals["quality"][s]}
                    for name, vals in per.items() if "quality" in vals for s in sets]
    if quality_rows:
        save_table(run, "answer_quality", quality_rows, section="Evaluation", order=2,
                   caption="What the answers are worth, per profile and held-out set: refusal "
                   "rate, useful answers (compliance, on topic, not looping), on-topic, loop "
                   "and language-match rates, and mean perplexity of the answers under the "
                   "unsteered model")

    trials = searched["trials"]
    fig = figure()
    ax = fig.add_subplot()
    ax.scatter([t["kl"] for t in trials], [t["target"] for t in trials], s=14, label="trials")
    picked = verified["chosen"]
    ax.scatter([picked["kl"]], [picked["target"]], s=60, color="red", label="chosen")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("KL on neutral prompts")
    ax.set_ylabel("target refusal log-odds (proxy)")
    ax.legend()
    save_figure(run, "search_trials", fig, section="Search", order=1,
                caption="Search trials: proxy target refusal vs KL (chosen trial in red)")
    save_table(run, "verified", verified["rows"], section="Search", order=2,
               caption="Pareto candidates generated and judged before choosing")
    g, opened = metrics.get("gate"), metrics.get("gate_open") or {}
    if g and opened:
        sets = list(dict.fromkeys(s for by_set in opened.values() for s in by_set))
        rows = [{"dataset": s, **{name: by_set.get(s) for name, by_set in opened.items()}}
                for s in sets]
        save_table(run, "gate_open", rows, section="Gate", order=1,
                   caption=f"Share of held-out prompts the topic gate opens for (layer "
                           f"{g['layer']}, {g['pool']} pooling; out-of-fold recall "
                           f"{g['recall_oof']:.2f} on the topic's fitting prompts)")
    build_report(run, title=f"Refusal steering — {metrics.get('mode', '')}")
