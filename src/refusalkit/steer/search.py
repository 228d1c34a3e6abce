"""Automatic multi-layer selection of steering layers and strengths with Optuna.

A trial is a contiguous block of layers (start, width) and one strength α in units of each
layer's refuse-vs-answer projection gap (α = 1 moves the refusing mean onto the answering
mean along the direction). Trials are scored with cheap no-generation proxies — first-token
refusal log-odds on target and safety prompts and next-token KL on neutral prompts — in a
multi-objective TPE study stored in SQLite (resumable). Only the most promising Pareto
trials are then generated and judged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import optuna
import torch

from refusalkit.examiner import Examiner
from refusalkit.gates import gate_of
from refusalkit.interventions import Gate, Profile, addition, clamping, lift_gate
from refusalkit.models import LoadedModel
from refusalkit.scoring import kl_divergence, last_logprobs, refusal_log_odds, refusal_token_ids

T = TypeVar("T")


@dataclass(frozen=True)
class SearchSpace:
    window: tuple[int, int]  # candidate layers [lo, hi)
    max_layers: int
    alpha_max: float
    sign: float  # -1 removes refusal, +1 induces it
    gate_choices: tuple[bool, ...] = (False,)
    operator: str = "add"  # "add", or "clamp" (addition capped per state, see clamping)
    phase: str = "both"  # when the profile steers (SearchConfig.phase)


@dataclass(frozen=True)
class TrialParams:
    """One trial's steering: a block of `width` layers from `start`, each steered by `alpha`
    times its layer's refuse-vs-answer gap, behind the topic gate or not."""

    start: int
    width: int
    alpha: float
    gate: bool = False

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> TrialParams:
        """From the JSON dict stages and profiles store."""
        return cls(int(params["start"]), int(params["width"]), float(params["alpha"]),
                   bool(params.get("gate", False)))

    @property
    def size(self) -> float:
        """How much it steers (α × layers)."""
        return self.alpha * self.width


@dataclass(frozen=True)
class ProxySets:
    """Prompts for the cheap objectives with their unsteered next-token log-probs.

    With a gate, `open` holds its decision per prompt of each set: a closed gate adds
    nothing, so those rows keep their unsteered log-probs and only open rows are run under
    a gated trial (exact, and most of the search's forward passes saved).
    """

    target: Sequence[str]  # behaviour to change
    keep: Sequence[str]  # behaviour to keep (refused harmful prompts, or other topics)
    neutral: Sequence[str]  # KL reference
    neutral_base: torch.Tensor
    target_base: torch.Tensor | None = None
    keep_base: torch.Tensor | None = None
    open: Mapping[str, torch.Tensor] | None = None  # "target" / "keep" / "neutral" -> bool [n]
    leak: float = 0.0  # the gate's estimated false-open rate on ordinary prompts
    gate: Gate | None = None  # the gate `open` was decided by (other gates run in full)


class Proxies(NamedTuple):
    target: float  # mean first-token refusal log-odds on the target prompts
    keep: float  # the same on the prompts whose behaviour must stay
    kl: float  # (expected) next-token KL on neutral prompts
    kl_lifted: float  # gated profiles: the KL with the gate lifted (what a leak costs)


def proxy_sets(ex: Examiner, target: Sequence[str], keep: Sequence[str],
               neutral: Sequence[str], gate: Gate | None = None,
               leak: float = 0.0) -> ProxySets:
    """Unsteered log-probs of every proxy set and, with a gate, its decisions (both from the
    examiner, which remembers them for the later stages)."""
    opened = None
    if gate is not None:
        opened = {name: ex.opened(gate, ps)
                  for name, ps in (("target", target), ("keep", keep), ("neutral", neutral))}
    return ProxySets(target, keep, neutral, ex.logprobs(neutral), ex.logprobs(target),
                     ex.logprobs(keep), opened, leak, gate)


def steered_logprobs(lm: LoadedModel, prompts: Sequence[str], profile: Profile,
                     base: torch.Tensor | None, opened: torch.Tensor | None,
                     gate: Gate | None, batch_size: int) -> torch.Tensor:
    """Steered last-position log-probs, running only the rows a gated profile changes (when
    its gate is the one the decisions came from)."""
    if base is None or opened is None or gate is None or gate_of(profile) is not gate:
        return last_logprobs(lm, prompts, profile=profile, batch_size=batch_size)
    out = base.clone()
    rows = opened.nonzero()[:, 0].tolist()
    if rows:
        out[rows] = last_logprobs(lm, [prompts[i] for i in rows], profile=profile,
                                  batch_size=batch_size)
    return out


def build_profile(params: Mapping[str, Any], directions: torch.Tensor, gaps: Sequence[float],
                  space: SearchSpace, gate: Gate | None,
                  levels: Sequence[float] | None = None) -> Profile:
    """The profile a trial's parameters describe (`levels`: for a clamp, the projection of
    the class being moved — refusing prompts when removing — per layer)."""
    tp = TrialParams.of(params)
    use_gate = gate if tp.gate else None
    # A gate decides before steering starts: a gated block begins at the gate's layer at the
    # earliest (shifted, keeping its width).
    start = max(tp.start, use_gate.layer) if use_gate is not None else tp.start
    layers = range(start, min(start + tp.width, space.window[1]))
    vectors = {layer: directions[layer] for layer in layers}
    strengths = {layer: space.sign * tp.alpha * abs(gaps[layer]) for layer in layers}
    if space.operator == "clamp":
        if levels is None:
            raise ValueError("a clamp search needs the moved class's projection per layer")
        op = clamping(vectors, strengths, {layer: levels[layer] for layer in layers},
                      space.phase, use_gate)
    else:
        op = addition(vectors, strengths, space.phase, use_gate)
    return Profile((op,), meta={"search_params": dict(params)})


def proxy_objectives(lm: LoadedModel, profile: Profile, sets: ProxySets,
                     batch_size: int = 16) -> Proxies:
    """The cheap objectives of a profile.

    A gated profile's KL is its expected KL: prompts the gate opens count in full, shut ones
    at `sets.leak` × their KL with the gate lifted. A shut gate is the decision of a detector
    that errs on held-out prompts, and a trial that wrecks any prompt it reaches must not look
    free (gated trials otherwise all tie at KL 0, and the strongest — incoherent — wins).
    """
    ids = refusal_token_ids(lm)
    opened = sets.open or {}

    def run(name: str, prompts: Sequence[str], base: torch.Tensor | None) -> torch.Tensor:
        return steered_logprobs(lm, prompts, profile, base, opened.get(name), sets.gate, batch_size)

    target = refusal_log_odds(run("target", sets.target, sets.target_base), ids).mean()
    keep = refusal_log_odds(run("keep", sets.keep, sets.keep_base), ids).mean()
    neutral = run("neutral", sets.neutral, sets.neutral_base)
    kl_rows = kl_divergence(sets.neutral_base, neutral)
    lifted = lift_gate(profile)
    if lifted is profile or sets.leak <= 0:
        return Proxies(float(target), float(keep), float(kl_rows.mean()), float("nan"))
    lift_rows = kl_divergence(sets.neutral_base, last_logprobs(lm, sets.neutral, profile=lifted,
                                                               batch_size=batch_size))
    # rows the gate shuts (unknown without decisions: then every row ran steered, in full)
    known = "neutral" in opened and gate_of(profile) is sets.gate
    shut = (~opened["neutral"]).to(kl_rows.dtype) if known else 0.0
    expected = kl_rows + shut * sets.leak * lift_rows
    return Proxies(float(target), float(keep), float(expected.mean()), float(lift_rows.mean()))


def run_study(
    lm: LoadedModel,
    directions: torch.Tensor,
    gaps: Sequence[float],
    space: SearchSpace,
    sets: ProxySets,
    *,
    trials: int,
    storage: Path,
    seed: int,
    gate: Gate | None = None,
    on_trial: Callable[[int], None] | None = None,
    levels: Sequence[float] | None = None,
) -> optuna.Study:
    """Run (or resume) the study until it holds `trials` finished trials.

    Objectives (all minimised): −sign·target, sign·keep and KL.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                         n_startup_trials=min(8, max(2, trials // 3)))
    study = optuna.create_study(
        study_name="steer", storage=f"sqlite:///{storage}", load_if_exists=True,
        directions=["minimize", "minimize", "minimize"], sampler=sampler,
    )
    lo, hi = space.window
    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        params = {
            "start": trial.suggest_int("start", lo, hi - 1),
            "width": trial.suggest_int("width", 1, space.max_layers),
            "alpha": trial.suggest_float("alpha", 0.05, space.alpha_max),
        }
        if len(space.gate_choices) > 1:
            params["gate"] = trial.suggest_categorical("gate", list(space.gate_choices))
        else:
            params["gate"] = space.gate_choices[0]
        profile = build_profile(params, directions, gaps, space, gate, levels)
        target, keep, kl, kl_lifted = proxy_objectives(lm, profile, sets)
        s = space.sign
        trial.set_user_attr("gate", bool(params["gate"]))  # not sampled when fixed
        trial.set_user_attr("target", target)
        trial.set_user_attr("keep", keep)
        trial.set_user_attr("kl", kl)
        if kl_lifted == kl_lifted:  # not NaN
            trial.set_user_attr("kl_lifted", kl_lifted)
        if on_trial is not None:
            on_trial(trial.number)
        # remove (s=-1): lower target refusal, keep safety refusal high; induce (s=+1): raise
        # target refusal, keep other topics' refusal low. All three are minimised.
        return -s * target, s * keep, kl

    if trials > done:
        study.optimize(objective, n_trials=trials - done)
    return study


def within_kl_budget(items: list[T], kl: Callable[[T], float], kl_max: float,
                     n: int) -> list[T]:
    """The items within the KL budget; if none is, the n lowest-KL ones (the honest
    fallback). One rule for the search and for anything compared with it."""
    ok = [t for t in items if kl(t) <= kl_max]
    return ok or sorted(items, key=kl)[:n]


def trial_params(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """All of a trial's parameters: a gate choice the space fixes is not sampled, so it is
    kept in the trial's user attributes."""
    return {"gate": bool(t.user_attrs.get("gate", False)), **t.params}


def trial_record(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {"number": t.number, **t.user_attrs, "params": trial_params(t)}


def pareto_candidates(study: optuna.Study, kl_max: float, n: int,
                      base_objective: float | None = None) -> list[dict[str, Any]]:
    """Up to n trials to generate and judge, from the Pareto front within the KL budget.

    With `base_objective` (the unsteered model's target objective), the candidates are spread
    evenly along the front, from its strongest trial to the gentlest one that still has at
    least half the strongest one's effect on the target proxy: the proxy saturates long before
    answers stop making sense, so the judged check must see gentler settings too. Without it,
    the best target objectives come first. A front smaller than n is filled with the next best
    trials within the budget.
    """
    kl = lambda t: t.user_attrs.get("kl", 1e9)  # noqa: E731
    front = sorted(within_kl_budget(study.best_trials, kl, kl_max, n), key=lambda t: t.values[0])
    if base_objective is not None and front:
        half = base_objective + 0.5 * (front[0].values[0] - base_objective)
        front = spread([t for t in front if t.values[0] <= half] or front[:1], n)
    done = [t for t in study.trials if t.values is not None]
    rest = sorted((t for t in within_kl_budget(done, kl, kl_max, n) if t not in front),
                  key=lambda t: t.values[0])
    return [trial_record(t) for t in (front + rest)[:n]]


def spread(items: list[T], n: int) -> list[T]:
    """n items evenly spaced over a sorted list, both ends included."""
    if n <= 0:
        return []
    if len(items) <= n:
        return items
    if n == 1:
        return items[:1]
    picks = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in picks]
