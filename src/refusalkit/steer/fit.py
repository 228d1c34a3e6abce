"""What the steer run fits from its baseline, computed once: the direction per layer (and the
baseline estimator's), each layer's refuse-vs-answer gap and the moved class's level, the layer
table, the search space and the topic gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from refusalkit.activations import capture
from refusalkit.directions import get_method, per_layer
from refusalkit.gates import fit_gate, pool_position
from refusalkit.geometry import auc
from refusalkit.interventions import Gate
from refusalkit.models import LoadedModel
from refusalkit.prompts import cjk_share
from refusalkit.steer.config import DirectionConfig, SearchConfig
from refusalkit.steer.data import FITTING, Splits
from refusalkit.steer.mode import Classes, Mode
from refusalkit.steer.search import SearchSpace

# Plain mean difference and paper A's WRMD: whichever the run does not steer with is steered
# with the same layers, strengths and gate, so the value of the estimator is measured.
BASELINE_METHODS = ("md", "wrmd")


@dataclass(frozen=True)
class Fit:
    acts: dict[str, torch.Tensor]  # FITTING set -> [n, L, d] at the configured position
    c_target: torch.Tensor  # baseline c(x) of target_fit
    classes: Classes
    directions: torch.Tensor  # [L, d], the configured estimator
    gaps: list[float]  # per layer (as stored with the directions)
    levels: list[float]  # per layer: the moved class's projection (a clamp's start)
    others: dict[str, torch.Tensor]  # the baseline estimator's directions [L, d]


def confidences(base: dict[str, Any], name: str) -> torch.Tensor:
    return torch.tensor([r["confidence"] for r in base[name]])


def activations(lm: LoadedModel, splits: Splits, position: int, batch_size: int,
                show_progress: bool) -> dict[str, torch.Tensor]:
    """Every layer's residual stream at the configured prompt position, per fitting set."""
    sets = splits.named()
    return {name: capture(lm, sets[name], list(range(lm.n_layers)), [position],
                          batch_size=batch_size, show_progress=show_progress)[:, :, 0]
            for name in FITTING}


def estimate(method: str, refused: torch.Tensor, complied: torch.Tensor, *,
             w_refused: torch.Tensor, w_complied: torch.Tensor, neutral: torch.Tensor,
             lam: float) -> torch.Tensor:
    """One estimator's direction from the two classes: [n, d] rows give [d], [n, L, d] give
    one per layer [L, d]. Each estimator gets only what it reads (λ for the ridge ones;
    WRMD also the confidence weights and the neutral reference set)."""
    kwargs: dict[str, Any] = {}
    if method in ("rmd", "wrmd"):
        kwargs["lam"] = lam
    if method == "wrmd":
        kwargs.update(w_refused=w_refused, w_complied=w_complied, neutral=neutral)
    fn = get_method(method)
    return per_layer(fn, refused, complied, **kwargs) if refused.ndim == 3 else fn(
        refused, complied, **kwargs)


def directions(acts: dict[str, torch.Tensor], cl: Classes, mode: Mode,
               spec: DirectionConfig) -> dict[str, torch.Tensor]:
    """The directions stage: the configured estimator per layer, its gaps, and the other
    estimator of the md / wrmd pair (steered the same way, as a baseline)."""
    def of(method: str) -> torch.Tensor:
        return estimate(method, cl.refused, cl.complied, w_refused=cl.w_refused,
                        w_complied=cl.w_complied, neutral=acts["neutral"], lam=spec.lam)

    dirs = of(spec.method)
    return {"directions": dirs, "gaps": torch.tensor(gaps_levels(cl, mode, dirs)[0]),
            **{m: of(m) for m in BASELINE_METHODS if m != spec.method}}


def fit_of(acts: dict[str, torch.Tensor], c_target: torch.Tensor, cl: Classes,
           stage: dict[str, torch.Tensor], mode: Mode) -> Fit:
    """The Fit from the directions stage (fresh or resumed)."""
    return Fit(acts, c_target, cl, stage["directions"], stage["gaps"].tolist(),
               gaps_levels(cl, mode, stage["directions"])[1],
               {m: stage[m] for m in BASELINE_METHODS if m in stage})


def gaps_levels(cl: Classes, mode: Mode, dirs: torch.Tensor
                ) -> tuple[list[float], list[float]]:
    """Per layer: the refuse-vs-answer projection gap, and the projection of the class the
    steering moves (refusing prompts when removing, answering ones when inducing), which a
    clamp starts from."""
    moved = mode.moved(cl)
    gaps, levels = [], []
    for i in range(dirs.shape[0]):
        u = dirs[i] / dirs[i].norm().clamp_min(1e-12)
        gaps.append(float((cl.refused[:, i] @ dirs[i]).mean()
                          - (cl.complied[:, i] @ dirs[i]).mean()))
        levels.append(float((moved[:, i] @ u).mean()))
    return gaps, levels


def layer_table(fit: Fit, mode: Mode) -> list[dict[str, Any]]:
    """Per layer: separability of the classes, correlation of the target projection with
    c(x) (removal: the target holds both classes), gap and participation ratio."""
    rows = []
    for i in range(fit.directions.shape[0]):
        v = fit.directions[i]
        proj = fit.acts["target_fit"][:, i] @ v
        corr = (torch.corrcoef(torch.stack([proj, fit.c_target]))[0, 1]
                if mode.correlates and fit.c_target.std() > 0 else torch.tensor(float("nan")))
        energy = v.double() ** 2
        rows.append({"layer": i, "auc": auc(fit.classes.refused[:, i] @ v,
                                            fit.classes.complied[:, i] @ v),
                     "corr_c": float(corr), "gap": float(fit.gaps[i]),
                     "participation_ratio": float(1.0 / (energy ** 2).sum())})
    return rows


def search_space(lm: LoadedModel, search: SearchConfig, mode: Mode) -> SearchSpace:
    lo, hi = (round(f * lm.n_layers) for f in search.window)
    lo, hi = max(1, min(lo, lm.n_layers - 1)), max(lo + 1, min(hi, lm.n_layers))
    gate = {"off": (False,), "on": (True,), "search": (False, True)}[search.gate]
    return SearchSpace((lo, hi), search.max_layers, search.alpha_max, mode.sign, gate,
                       search.operator, search.phase)


def gate_of_record(rec: dict[str, Any] | None) -> Gate | None:
    if rec is None:
        return None
    return Gate.from_record(rec)


def gate_inputs(lm: LoadedModel, splits: Splits, search: SearchConfig
                ) -> tuple[list[int], list[str], list[str], torch.Tensor]:
    """What a topic gate is fitted on: its candidate layers (1 to `gate_max_layer` of the
    depth), the names of the sets on its other side, their prompts in that order, and which
    of those are everyday prompts (the ones PU cleaning may set aside, see gates.py)."""
    hi = max(1, min(lm.n_layers - 1, round(search.gate_max_layer * lm.n_layers)))
    data = splits.named()
    names = ["neutral", "safety_fit"] + (["gate_negatives"] if data["gate_negatives"] else [])
    texts = [p for n in names for p in data[n]]
    everyday = set(splits.neutral) | set(splits.gate_ordinary)
    ordinary = torch.tensor([p in everyday for p in texts], dtype=torch.bool)
    return list(range(1, hi + 1)), names, texts, ordinary


def fit_topic_gate(lm: LoadedModel, acts: dict[str, torch.Tensor],
                    splits: Splits, search: SearchConfig, *, batch_size: int, seed: int,
                    show_progress: bool) -> dict[str, Any]:
    """A topic detector no deeper than `gate_max_layer`, fitted on the topic's fitting prompts
    (and data.gate_topic's) against every other prompt the run fits on plus the gate
    negatives (see gates.py)."""
    layers, names, texts, ordinary = gate_inputs(lm, splits, search)
    pool = search.gate_pool

    data = splits.named()
    phrasings = ["{prompt}", *search.gate_phrasings]

    def read(name: str) -> torch.Tensor:
        """[phrasings, n, layers, d]: the set in each phrasing."""
        out = []
        for tpl in phrasings:
            if tpl == "{prompt}" and pool == "last" and name in acts:
                out.append(acts[name][:, layers])  # the activations stage read exactly this
                continue
            wrapped = [tpl.replace("{prompt}", p) for p in data[name]]
            out.append(capture(lm, wrapped, layers, [pool_position(pool)],
                               batch_size=batch_size, show_progress=show_progress)[:, :, 0])
        return torch.stack(out)

    # rows phrasing-major: row i is prompt i % n of its set, in phrasing i // n
    # topic sets and their source: 0 the target's phrasing (its fitting prompts and
    # data.gate_target's), 1 the other phrasing (data.gate_topic)
    topic = ["target_fit"] + (["gate_topic"] if data["gate_topic"] else [])
    sets = [(n, i) for n, i in (("target_fit", 0), ("gate_target", 0), ("gate_topic", 1))
            if n == "target_fit" or data[n]]
    pos = torch.cat([read(n) for n, _ in sets], dim=1).flatten(0, 1)
    neg = torch.cat([read(n) for n in names], dim=1).flatten(0, 1)
    n_pos, n_neg, k = sum(len(data[n]) for n, _ in sets), len(texts), len(phrasings)
    # each topic row's source (phrasing-major like pos), so the layer must hold on each;
    # per language, a source's Chinese prompts are a source of their own
    split = search.gate_per_language
    source = torch.tensor([2 * i + (split and cjk_share(p) > 0.5)
                           for n, i in sets for p in data[n]])
    labels = {2 * i + z: f"{topic[i]}{'/zh' if z else ''}" for i in range(len(topic))
              for z in range(2)}
    several = len(source.unique()) > 1
    groups = (torch.arange(n_pos).repeat(k), torch.arange(n_neg).repeat(k)) if k > 1 else None
    fit = fit_gate(pos, neg, layers, max_false_open=search.gate_false_open, pool=pool,
                   seed=seed, ordinary=ordinary.repeat(k), groups=groups,
                   strata=torch.arange(k).repeat_interleave(n_neg) if k > 1 else None,
                   pos_strata=source.repeat(k) if several else None,
                   per_source=search.gate_per_source and several,
                   detector=search.gate_detector,
                   veto=(~ordinary).repeat(k) if search.gate_veto > 0 else None,
                   veto_share=search.gate_veto,
                   per_detector=search.gate_thresholds == "per_detector")
    dropped = sorted({i % n_neg for i in fit.dropped})
    return {**fit.gate.record(), "detector": search.gate_detector,
            "vector": fit.gate.vector.tolist(), "recall_oof": fit.recall, "leak": fit.leak,
            "margin_z": fit.margin_z, "shrink": fit.shrink,
            "recall_oof_by_set": dict(zip([labels[int(i)] for i in source.unique()],
                                          fit.recall_by, strict=True)),
            "n_topic": n_pos, "n_other": n_neg,
            "n_topic_gate_only": len(data["gate_topic"]) + len(data["gate_target"]),
            "dropped_ordinary": [texts[i] for i in dropped], "layers": fit.table,
            "detectors": 1 if fit.gate.vector.ndim == 1 else fit.gate.vector.shape[0],
            **({"veto": fit.gate.veto.tolist(), "veto_share": search.gate_veto,
                "vetoed_oof": fit.vetoed}
               if fit.gate.veto is not None else {}),
            **({"phrasings": search.gate_phrasings} if search.gate_phrasings else {})}
