"""The steer run's report: figures, tables and examples, then report.html."""

from __future__ import annotations

from typing import Any

from refusalkit.report import build_report, figure, save_examples, save_figure, save_table
from refusalkit.runs import RunDir


def write_report(run: RunDir, layer_rows: list[dict[str, Any]], searched: dict[str, Any],
                 verified: dict[str, Any], metrics: dict[str, Any],
                 examples: list[dict[str, Any]], kl: list[dict[str, Any]] | None = None
                 ) -> None:
    """Figures, tables and examples for report.html, then the report itself."""
    save_examples(run, examples)
    _summary(run, metrics)
    if kl:
        _kl_top(run, kl)
    _layers(run, layer_rows, metrics.get("chosen_layers", []))
    _evaluation(run, metrics["per_dataset"])
    _search(run, searched["trials"], verified)
    _gate(run, metrics.get("gate"), metrics.get("gate_open") or {})
    build_report(run, title=f"Refusal steering — {metrics.get('mode', '')}")


def _layers(run: RunDir, layer_rows: list[dict[str, Any]], chosen: list[int]) -> None:
    fig = figure()
    ax = fig.add_subplot()
    layers = [r["layer"] for r in layer_rows]
    ax.plot(layers, [r["auc"] for r in layer_rows], marker="o", label="AUC refused vs answered")
    if any(r["corr_c"] == r["corr_c"] for r in layer_rows):  # not all NaN
        ax.plot(layers, [abs(r["corr_c"]) for r in layer_rows], marker="s",
                label="|corr(projection, c)|")
    for layer in chosen:
        ax.axvspan(layer - 0.5, layer + 0.5, color="orange", alpha=0.15)
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    save_figure(run, "layer_profile", fig, section="Layers", order=1,
                caption="Per-layer separability of the target direction (steered layers shaded)")
    save_table(run, "layers", layer_rows, section="Layers", caption="Layer ranking", order=2)


def profile_order(per: dict[str, Any]) -> list[str]:
    """before → after → baselines (metrics read back from JSON come with sorted keys)."""
    return ["before", "after", *(k for k in per if k not in ("before", "after"))]


def set_order(per: dict[str, Any]) -> list[str]:
    """The topic first, then safety, then the over-refusal sets."""
    sets = list(per["before"]["judge"])
    extra = [s for s in sets if s.startswith("target_extra:")]
    first = ([s for s in sets if s == "target_eval"] + extra
             + [s for s in sets if s == "safety_eval"])
    return first + [s for s in sets if s not in first]


def _summary(run: RunDir, metrics: dict[str, Any]) -> None:
    """What a reader takes in first: per held-out set, refusal and useful-answer rate before,
    after and under each baseline; then KL, the gate's recall and leaks. (report.html adds
    the wall time from timings.json and keeps the raw metrics in a collapsed section.)"""
    per = metrics["per_dataset"]
    names = profile_order(per)
    rows = []
    for s in set_order(per):
        row: dict[str, Any] = {"held-out set": s}
        row.update({f"refusal {n}": per[n]["judge"][s] for n in names})
        row.update({f"useful {n}": per[n].get("quality", {}).get(s, {}).get("useful")
                    for n in names})
        rows.append(row)
    other = metrics.get("overrefusal_other") or {}
    for s, x in other.get("per_set", {}).items():  # the same sets less their on-topic rows
        rows.append({"held-out set": f"{s} (off topic, n={x['n']})",
                     **{f"refusal {n}": x.get(n) for n in names},
                     **{f"useful {n}": None for n in names}})
    save_table(run, "summary", rows, section="Summary", order=1,
               caption="Held-out refusal rate (judged) and useful-answer rate (compliance, on "
               "topic, not looping) per set: unsteered (before), the chosen profile (after) "
               "and each baseline steered the same way")
    base = metrics.get("baselines", {})
    costs = [{"profile": "after", "kl_harmless": metrics.get("kl_harmless"),
              "perplexity_ratio": metrics.get("perplexity_ratio")}]
    costs += [{"profile": n, "kl_harmless": b.get("kl_harmless"),
               "perplexity_ratio": b.get("perplexity_ratio")} for n, b in sorted(base.items())]
    kl_other = metrics.get("kl_other")
    if kl_other:  # the KL prompts less those labelled as on the topic (data.on_topic)
        for row in costs:
            row[f"kl_harmless off topic (n={kl_other['n']})"] = kl_other.get(row["profile"])
    g, opened = metrics.get("gate"), metrics.get("gate_open", {}).get("after", {})
    harmful = metrics.get("gate_harmful") or {}
    for row in costs:
        row["gate_recall_oof"] = g["recall_oof"] if g and row["profile"] == "after" else None
        for s in (k for k in opened if k.startswith("target_extra:")):
            row[f"gate_recall {s[len('target_extra:'):]}"] = (
                opened[s] if row["profile"] == "after" else None)
        row["harmful_opened"] = (f"{harmful['opened']}/{harmful['n']}"
                                 if harmful and row["profile"] == "after" else None)
        row["harmful_refusal_on_opened_after"] = (harmful.get("refusal_after_on_opened")
                                                  if row["profile"] == "after" else None)
        row["gate_open_safety"] = opened.get("safety_eval") if row["profile"] == "after" else None
        row["gate_open_harmless"] = (opened.get("harmless_eval") if row["profile"] == "after"
                                     else None)
    save_table(run, "costs", costs, section="Summary", order=2,
               caption="Cost on ordinary prompts: next-token KL on "
               f"{metrics.get('kl_harmless_prompts')} held-out harmless prompts and the "
               "perplexity ratio of unsteered answers; the "
               "topic gate's out-of-fold recall on the topic and how often it opened on "
               "held-out harmful (safety) and harmless prompts (leaks)")


def _kl_top(run: RunDir, kl: list[dict[str, Any]], n: int = 10) -> None:
    """The harmless prompts the chosen profile moved most: a KL mean near its bound can be a
    few prompts on the topic or a broad shift, and only the prompts tell which."""
    top = sorted((r for r in kl if r.get("after", 0.0) > 0.0), key=lambda r: -r["after"])[:n]
    if top:
        save_table(run, "kl_top", top, section="Summary", order=3,
                   caption=f"The {len(top)} held-out harmless prompts with the highest "
                   "next-token KL under the chosen profile (after) and each baseline; "
                   "on_topic: labelled as on the target topic (data.on_topic). Every "
                   "prompt is in kl.jsonl")


def _evaluation(run: RunDir, per: dict[str, Any]) -> None:
    sets = set_order(per)
    fig = figure(7.5, 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(per)
    for i, name in enumerate(profile_order(per)):
        ax.bar([j + i * width for j in range(len(sets))], [per[name]["judge"][s] for s in sets],
               width=width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))],
                  [s.replace("overrefusal:", "over:") for s in sets], fontsize=7)
    ax.set_ylabel("judged refusal rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    save_figure(run, "refusal_bars", fig, section="Evaluation", order=1,
                caption="Held-out refusal rate per dataset: before, after and baselines")
    quality_rows = [{"profile": name, "dataset": s, **per[name]["quality"][s]}
                    for name in profile_order(per) if "quality" in per[name] for s in sets]
    if quality_rows:
        save_table(run, "answer_quality", quality_rows, section="Evaluation", order=2,
                   caption="What the answers are worth, per profile and held-out set: refusal "
                   "rate, useful answers (compliance, on topic, not looping), on-topic, loop "
                   "and language-match rates, and mean perplexity of the answers under the "
                   "unsteered model")


def _search(run: RunDir, trials: list[dict[str, Any]], verified: dict[str, Any]) -> None:
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


def _gate(run: RunDir, g: dict[str, Any] | None, opened: dict[str, dict[str, float]]) -> None:
    if g and opened:
        sets = list(dict.fromkeys(s for by_set in opened.values() for s in by_set))
        rows = [{"dataset": s, **{name: by_set.get(s) for name, by_set in opened.items()}}
                for s in sets]
        save_table(run, "gate_open", rows, section="Gate", order=1,
                   caption=f"Share of held-out prompts the topic gate opens for (layer "
                           f"{g['layer']}, {g['pool']} pooling; out-of-fold recall "
                           f"{g['recall_oof']:.2f} on the topic's fitting prompts"
                           + (f", its harm veto shutting {g['vetoed_oof']:.2f} of them"
                              if "vetoed_oof" in g else "") + ")")
