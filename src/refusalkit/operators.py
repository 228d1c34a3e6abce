"""Steering operators as strategies: what each kind of operator does to the residual stream.

An operator kind is one class here with one signature (steering-vectors' design): `attach`
registers its hooks on one layer, `validate` checks a loaded operator, and two attributes say
whether a topic gate can switch it and why a llama.cpp control vector cannot carry it. Adding
an operator (the next after add, ablate and clamp) means adding one class to `OPERATORS`;
profiles save, load, steer and export it without another if-chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from refusalkit.errors import UserError

if TYPE_CHECKING:
    from refusalkit.interventions import Op
    from refusalkit.models import LoadedModel

Fn = Callable[[torch.Tensor], torch.Tensor]
GateState = dict[str, torch.Tensor] | None


def in_phase(phase: str, h: torch.Tensor) -> bool:
    """Prompt phase: a forward over more than one new token; generation: one token."""
    if phase == "both":
        return True
    prompt_pass = h.shape[1] > 1
    return prompt_pass if phase == "prompt" else not prompt_pass


def opening_tokens(phase: str) -> int | None:
    """N for a "prompt+N" phase (the prompt pass and the first N generation steps), None for
    the three plain phases; a malformed phase is one line."""
    if phase in ("both", "prompt", "generation"):
        return None
    head, _, n = phase.partition("+")
    if head != "prompt" or not n.isdigit():
        raise UserError(f"unknown phase '{phase}'; use both, prompt, generation or prompt+N "
                        "(the prompt and the first N generated tokens, e.g. prompt+8)")
    return int(n)


def phase_clock(phase: str) -> Callable[[torch.Tensor], bool]:
    """Whether a hook acts on this forward, one clock per hook. "prompt+N" steers the prompt
    pass and the next N one-token steps: the model decides whether to refuse in its first
    words, and an answer it has started is then continued by the unsteered model, which
    keeps it fluent; a new prompt pass restarts the count. A teacher-forced forward over a
    prompt and its answer together is one prompt pass, so it is steered throughout (what
    scores next-token distributions wants; answer perplexities then over-state the change)."""
    n = opening_tokens(phase)
    if n is None:
        return lambda h: in_phase(phase, h)
    steps = {"since_prompt": 0}

    def active(h: torch.Tensor) -> bool:
        if h.shape[1] > 1:
            steps["since_prompt"] = 0
            return True
        steps["since_prompt"] += 1
        return steps["since_prompt"] <= n

    return active


def project_out(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    r = r.to(h.dtype)
    return h - (h @ r)[..., None] * r


def _rewrite_input(args: tuple, kwargs: dict, fn: Fn) -> tuple[tuple, dict]:
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}


def _rewrite_output(output: Any, fn: Fn) -> Any:
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


def _on_input(lm: LoadedModel, layer: int, fn: Fn) -> Any:
    return lm.arch.layers[layer].register_forward_pre_hook(
        lambda _m, a, k: _rewrite_input(a, k, fn), with_kwargs=True)


class Operator:
    kind: ClassVar[str]
    gateable: ClassVar[bool] = True
    not_a_control_vector: ClassVar[str | None] = None
    """Why a llama.cpp control vector (a fixed vector added everywhere) cannot carry this
    operator; None when it can."""

    def attach(self, lm: LoadedModel, op: Op, layer: int, vec: torch.Tensor, scale: float,
               gate_state: GateState) -> list[Any]:
        """Register this operator's hooks on one layer; returns their handles."""
        raise NotImplementedError

    def validate(self, op: Op, where: str) -> None:
        """Check an operator read from an artifact (a damaged one fails here, in one line)."""


class Add(Operator):
    """h ← h + s_l · v_l at the input of layer l."""

    kind = "add"

    def attach(self, lm: LoadedModel, op: Op, layer: int, vec: torch.Tensor, scale: float,
               gate_state: GateState) -> list[Any]:
        coef = op.strength(layer) * scale
        if coef == 0.0:
            return []
        active = phase_clock(op.phase)

        def add_fn(h: torch.Tensor) -> torch.Tensor:
            if not active(h):
                return h
            delta = (coef * vec).to(h.dtype)
            if gate_state is not None:
                return h + gate_state["mask"] * delta
            return h + delta

        return [_on_input(lm, layer, add_fn)]


class Clamp(Operator):
    """Addition capped per state: the projection on v̂_l moves toward level_l + s_l·‖v_l‖,
    never past it (see interventions.clamping)."""

    kind = "clamp"
    not_a_control_vector = ("the profile clamps a projection; a llama.cpp control vector can "
                            "only add a fixed vector, and a clamp depends on the activations — "
                            "serve the profile with 'refusalkit serve' instead")

    def attach(self, lm: LoadedModel, op: Op, layer: int, vec: torch.Tensor, scale: float,
               gate_state: GateState) -> list[Any]:
        coef = op.strength(layer) * scale
        if coef == 0.0:
            return []
        norm = vec.double().norm().clamp_min(1e-12)
        unit = (vec.double() / norm).float()
        target = float(op.levels[layer] + coef * norm)
        active = phase_clock(op.phase)

        def clamp_fn(h: torch.Tensor) -> torch.Tensor:
            if not active(h):
                return h
            u = unit.to(h.dtype)
            p = h @ u
            move = -torch.relu(p - target) if coef < 0 else torch.relu(target - p)
            delta = move[..., None] * u
            if gate_state is not None:
                delta = gate_state["mask"] * delta
            return h + delta

        return [_on_input(lm, layer, clamp_fn)]

    def validate(self, op: Op, where: str) -> None:
        if set(op.levels) != set(op.vectors):
            raise UserError(f"profile {where}: a clamp operator lacks levels for some layers; "
                            "the artifact is damaged — re-run the command that wrote it")


class Ablate(Operator):
    """h ← h − (h·r̂_l) r̂_l at the input of layer l and on every residual write inside it."""

    kind = "ablate"
    gateable = False
    not_a_control_vector = ("the profile ablates a direction; a llama.cpp control vector can "
                            "only add a fixed vector, and ablation depends on the activations "
                            "— export it with 'refusalkit export abliterated' instead")

    def attach(self, lm: LoadedModel, op: Op, layer: int, vec: torch.Tensor, scale: float,
               gate_state: GateState) -> list[Any]:
        # The phase is decided on the layer input ([batch, seq, d]); writers inside the layer
        # (MoE experts may see flattened [tokens, d]) follow that decision.
        active = {"on": True}
        clock = phase_clock(op.phase)

        def ablate_in(h: torch.Tensor) -> torch.Tensor:
            active["on"] = clock(h)
            return project_out(h, vec) if active["on"] else h

        def ablate_out(h: torch.Tensor) -> torch.Tensor:
            return project_out(h, vec) if active["on"] else h

        handles = [_on_input(lm, layer, ablate_in)]
        for module in lm.arch.residual_outputs(layer):
            handles.append(module.register_forward_hook(
                lambda _m, _a, out: _rewrite_output(out, ablate_out)))
        return handles


OPERATORS: dict[str, Operator] = {o.kind: o for o in (Add(), Clamp(), Ablate())}


def operator(kind: str) -> Operator:
    if kind not in OPERATORS:
        raise UserError(f"unknown operator kind '{kind}'; use {', '.join(OPERATORS)}")
    return OPERATORS[kind]
