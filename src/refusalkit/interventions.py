"""Steering profiles: activation addition and directional ablation, applied through hooks.

A `Profile` is a list of operators, each a strategy over per-layer vectors (operators.py):
- `add`: h ← h + s_l · v_l at the input of layer l (s < 0 with a refusal direction removes
  refusal, s > 0 induces it);
- `ablate`: h ← h − (h·r̂_l) r̂_l at the input of layer l *and* on every residual write inside
  it. Over all layers this is exactly what weight orthogonalisation bakes into the weights;
- `clamp`: addition that stops where it has done its job — along v̂_l a state's projection
  moves toward where addition would take a state starting at `level_l`, never past it, and
  states already beyond it are left alone.
Each operator runs in the prompt phase (a forward over more than one new token), the
generation phase (one new token with a KV cache), both, or the prompt and the first N
generated tokens ("prompt+N"). `steer()` attaches a profile and
always removes its hooks, on exit and on exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from refusalkit.activations import masked_mean, template_lengths, user_mask
from refusalkit.artifacts import (
    PROFILE_FORMAT,
    model_record,
    need_tensor,
    read_artifact,
    write_artifact,
)
from refusalkit.errors import UserError
from refusalkit.geometry import unit
from refusalkit.kernels import arditi_kernel, fold_kernel
from refusalkit.models import LoadedModel
from refusalkit.operators import OPERATORS, opening_tokens, operator

Kind = str  # a key of operators.OPERATORS: add, ablate, clamp
# "both", "prompt", "generation", or "prompt+N": the prompt and the first N generated tokens
# (operators.phase_clock says why)
Phase = str


@dataclass(frozen=True)
class Gate:
    """Conditional steering (IBM CAST-style): steer a sequence only when its prompt's
    projection on `vector` at the input of `layer` exceeds `threshold` — the last prompt
    token's state, (pool "mean") the mean state over the whole formatted prompt, which reads
    the topic far better at early layers (measured on qwen2.5-coder-0.5b, see gates.py), or
    (pool "user") the mean over the user's own tokens, leaving out the system prompt and
    chat template, which otherwise make up most of a short prompt's mean.

    The decision is taken once per sequence in the prompt pass and kept for generation, so a
    topic detector can switch a behaviour vector on for one topic and leave others alone.
    A gate may hold several detectors at its layer (`vector` [k, d], one threshold each): it
    opens when any of them passes, e.g. one for the topic asked as questions and one for it
    given as instructions (gates.fit_gate's per-source fit). A `veto` detector at the same
    layer shuts it again where the prompt reads as a harmful request (projection above
    `veto_threshold`): a two-sided gate, for a topic whose look-alike harmful requests one
    direction cannot keep out.
    """

    layer: int
    vector: torch.Tensor  # [d], or [k, d] for k detectors
    threshold: float | tuple[float, ...]
    pool: Literal["last", "mean", "user"] = "last"  # last token, mean over prompt / user text
    veto: torch.Tensor | None = None  # [d]
    veto_threshold: float = math.inf

    def __post_init__(self) -> None:
        if self.pool not in ("last", "mean", "user"):
            raise UserError(f"unknown gate pooling '{self.pool}'; use last, mean or user")
        k = 1 if self.vector.ndim == 1 else self.vector.shape[0]
        if self.vector.ndim not in (1, 2) or len(self.thresholds) != k:
            raise UserError(f"a gate needs one threshold per detector: vector "
                            f"{tuple(self.vector.shape)}, {len(self.thresholds)} threshold(s)")

    @property
    def thresholds(self) -> tuple[float, ...]:
        t = self.threshold
        return tuple(float(x) for x in t) if isinstance(t, (tuple, list)) else (float(t),)

    @classmethod
    def of(cls, layer: Any, vector: torch.Tensor, threshold: Any, pool: Any = "last",
           veto: torch.Tensor | None = None, veto_threshold: Any = None) -> Gate:
        """From a JSON record: a threshold is a number (one detector) or a list."""
        t = (tuple(float(x) for x in threshold) if isinstance(threshold, (list, tuple))
             else float(threshold))
        if veto is None:
            return cls(int(layer), vector.float(), t, pool)
        return cls(int(layer), vector.float(), t, pool, veto.float(), float(veto_threshold))

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Gate:
        """From a steer run's gate record (stages/gate.json), whose vectors are inline lists."""
        veto = torch.tensor(rec["veto"]) if rec.get("veto") is not None else None
        return cls.of(rec["layer"], torch.tensor(rec["vector"]), rec["threshold"],
                      rec.get("pool", "last"), veto, rec.get("veto_threshold"))

    def record(self) -> dict[str, Any]:
        """The JSON fields besides the vectors (what `of` reads back)."""
        rec: dict[str, Any] = {"layer": self.layer, "threshold": self.threshold,
                               "pool": self.pool}
        if self.veto is not None:
            rec["veto_threshold"] = self.veto_threshold
        return rec

    def decide(self, features: torch.Tensor) -> torch.Tensor:
        """Open (True) per row of pooled prompt states [n, d]: the one rule the hook and the
        offline check (gates.gate_open) both apply."""
        v = unit(self.vector.to(features.device)).reshape(len(self.thresholds), -1)
        t = torch.tensor(self.thresholds, dtype=torch.float64, device=features.device)
        opened = (features.double() @ v.T > t).any(-1)
        if self.veto is None:
            return opened
        veto = unit(self.veto.to(features.device)).double()
        return opened & ~(features.double() @ veto > self.veto_threshold)


@dataclass(frozen=True)
class Op:
    kind: Kind
    vectors: Mapping[int, torch.Tensor]
    strengths: Mapping[int, float] = field(default_factory=dict)
    phase: Phase = "both"
    gate: Gate | None = None
    levels: Mapping[int, float] = field(default_factory=dict)  # clamp: reference projection

    def strength(self, layer: int) -> float:
        return float(self.strengths.get(layer, 1.0))


@dataclass(frozen=True)
class Profile:
    """Operators plus a global `scale` on addition strengths (0 turns additions off)."""

    ops: tuple[Op, ...]
    scale: float = 1.0
    meta: Mapping[str, Any] = field(default_factory=dict)

    def scaled(self, scale: float) -> Profile:
        return replace(self, scale=scale)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for op in self.ops for layer in op.vectors})


def addition(vectors: Mapping[int, torch.Tensor], strengths: Mapping[int, float] | float,
             phase: Phase = "both", gate: Gate | None = None) -> Op:
    """h += s · v at each listed layer (one strength for all or one per layer)."""
    if not isinstance(strengths, Mapping):
        strengths = dict.fromkeys(vectors, float(strengths))
    if gate is not None and vectors and gate.layer > min(vectors):
        raise UserError(f"gate layer {gate.layer} must not come after the first steered layer "
                        f"{min(vectors)}: the gate decides before steering starts")
    return Op("add", dict(vectors), dict(strengths), phase, gate)


def clamping(vectors: Mapping[int, torch.Tensor], strengths: Mapping[int, float],
             levels: Mapping[int, float], phase: Phase = "both",
             gate: Gate | None = None) -> Op:
    """Addition capped per state: with target t_l = level_l + s_l·‖v_l‖ (where addition moves
    a state whose projection on v̂_l is level_l, e.g. the refusing class mean), a projection p
    becomes min(p, t_l) for s < 0 and max(p, t_l) for s > 0.

    Why: addition shifts every state by the same amount, including ordinary prompts and
    answers that already comply; the clamp moves a state only as far as it must to reach the
    target, so states already near or past it change less (on qwen2.5-coder-0.5b, at the
    strengths addition needed on the China topic: next-token KL on harmless prompts with the
    gate lifted 0.39 instead of 1.63).
    """
    missing = sorted(set(vectors) - set(levels))
    if missing:
        raise UserError(f"a clamp needs a level for every layer it steers (missing {missing})")
    op = addition(vectors, strengths, phase, gate)
    return replace(op, kind="clamp", levels={k: float(levels[k]) for k in vectors})


def lift_gate(profile: Profile) -> Profile:
    """The profile with every gate removed (itself when it has none): what a gated profile
    does to a prompt its gate opens for."""
    if all(op.gate is None for op in profile.ops):
        return profile
    return replace(profile, ops=tuple(replace(op, gate=None) for op in profile.ops))


def ablation(direction: torch.Tensor | Mapping[int, torch.Tensor], layers: list[int],
             phase: Phase = "both") -> Op:
    """Project a direction (unit-normalised here) out of the stream at the given layers."""
    if isinstance(direction, Mapping):
        vectors = {layer: unit(direction[layer]).float() for layer in layers}
    else:
        vectors = dict.fromkeys(layers, unit(direction).float())
    return Op("ablate", vectors, {}, phase)


class Steering:
    """What `steer()` yields. A decoder that drops finished rows from its batch (and from the
    KV cache) tells it which rows are left, so each gate keeps the decision it took on those
    rows' prompts; otherwise a gate seeing fewer rows than it decided for would decide again,
    on a generated token."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self._gates: list[dict[str, torch.Tensor]] = []

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the current batch) of every gate's decision."""
        for state in self._gates:
            if "mask" in state:
                state["mask"] = state["mask"][rows.to(state["mask"].device)]


@contextmanager
def steer(lm: LoadedModel, profile: Profile | None) -> Iterator[Steering]:
    """Attach a profile's hooks for the duration of the block (None attaches nothing)."""
    handles: list[Any] = []
    steering = Steering(lm)
    try:
        if profile is not None:
            lm.arch.check_layers(profile.layers)
            for op in profile.ops:
                mask = _attach_gate(lm, op, handles)
                if mask is not None:
                    steering._gates.append(mask)
                for layer, vec in op.vectors.items():
                    if vec.shape != (lm.hidden_size,):
                        raise UserError(f"profile vector for layer {layer} has shape "
                                        f"{tuple(vec.shape)}, the model's hidden size is "
                                        f"{lm.hidden_size}")
                    handles.extend(_attach(lm, op, layer, vec.to(lm.device), profile.scale,
                                           mask))
        yield steering
    finally:
        for h in handles:
            h.remove()


def _attach_gate(lm: LoadedModel, op: Op, handles: list[Any]) -> dict[str, torch.Tensor] | None:
    """Register the gate's decision hook; returns the shared state holding the row mask."""
    if op.gate is None:
        return None
    if not operator(op.kind).gateable:
        gateable = ", ".join(k for k, o in OPERATORS.items() if o.gateable)
        raise UserError(f"gates apply to these operators only: {gateable} (not {op.kind})")
    gate = op.gate
    lm.arch.check_layers([gate.layer])
    state: dict[str, Any] = {}

    def padding(_m: Any, args: tuple, kwargs: dict) -> None:
        # the model's own [batch, seq] attention mask, so a mean skips left padding
        state["attention"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    template = template_lengths(lm) if gate.pool == "user" else (0, 0)

    def decide(_m: Any, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[1] > 1 or "mask" not in state or len(state["mask"]) != h.shape[0]:
            if gate.pool == "last":
                feat = h[:, -1]
            else:
                attn = state.get("attention")
                if not (isinstance(attn, torch.Tensor) and attn.ndim == 2):
                    attn = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
                feat = masked_mean(h, user_mask(attn, *template) if gate.pool == "user"
                                   else attn)
            state["mask"] = gate.decide(feat).to(h.dtype)[:, None, None]

    decide.refusalkit_gate = True  # type: ignore[attr-defined]  # prefix.gate_attached
    if gate.pool != "last":
        handles.append(lm.model.register_forward_pre_hook(padding, with_kwargs=True))
    handles.append(lm.arch.layers[gate.layer].register_forward_pre_hook(decide, with_kwargs=True))
    return state


def _attach(lm: LoadedModel, op: Op, layer: int, vec: torch.Tensor, scale: float,
            gate_state: dict[str, torch.Tensor] | None = None) -> list[Any]:
    return operator(op.kind).attach(lm, op, layer, vec, scale, gate_state)


# ---------------------------------------------------------------- weight orthogonalisation

@torch.no_grad()
def orthogonalize(lm: LoadedModel, direction: torch.Tensor) -> None:
    """Fold ablation of one direction into the weights (permanent; Arditi et al. §4).

    W ← W − r̂ r̂ᵀ W on the embedding and every residual writer (MoE experts and biases
    included). A tied output embedding is untied first, so logits keep reading the full
    stream. Exact only when every write reaches the residual unnormalised.
    """
    arch = lm.arch
    if arch.has_post_norms:
        raise UserError(
            f"weight orthogonalisation is not exact for '{arch.model_type}': its sublayer outputs "
            "pass a norm before the residual add; use hook ablation (a profile) instead"
        )
    # Arditi's case of an ablation kernel: one direction, weight 1 everywhere, embedding too.
    fold_kernel(lm, arditi_kernel(0, lm.n_layers),
                direction.detach()[None].expand(lm.n_layers, -1))


# ---------------------------------------------------------------- profile artifacts

def save_profile(profile: Profile, path: str | Path,
                 lm: LoadedModel | Mapping[str, Any]) -> Path:
    """Write a profile artifact; `lm` is the model it was made for, or that model's record
    (`artifacts.model_record`), e.g. taken from a directions artifact without loading it."""
    tensors: dict[str, torch.Tensor] = {}
    ops_meta = []
    for i, op in enumerate(profile.ops):
        for layer, vec in op.vectors.items():
            tensors[f"op{i}.layer{layer}"] = vec
        meta: dict[str, Any] = {
            "kind": op.kind, "phase": op.phase, "layers": sorted(op.vectors),
            "strengths": {str(k): v for k, v in sorted(op.strengths.items())}}
        if op.levels:
            meta["levels"] = {str(k): v for k, v in sorted(op.levels.items())}
        if op.gate is not None:
            tensors[f"op{i}.gate"] = op.gate.vector
            if op.gate.veto is not None:
                tensors[f"op{i}.gate_veto"] = op.gate.veto
            meta["gate"] = op.gate.record()
        ops_meta.append(meta)
    model = dict(lm) if isinstance(lm, Mapping) else model_record(lm)
    manifest = {"model": model, "ops": ops_meta, "scale": profile.scale,
                **dict(profile.meta)}
    return write_artifact(path, PROFILE_FORMAT, tensors, manifest)


def load_profile(path: str | Path, lm: LoadedModel | None = None,
                 *, allow_other_model: bool = False) -> Profile:
    art = read_artifact(path, PROFILE_FORMAT, lm, allow_other_model=allow_other_model)
    ops = []
    for i, meta in enumerate(art.manifest["ops"]):
        vectors = {int(layer): need_tensor(art, f"op{i}.layer{layer}", path)
                   for layer in meta["layers"]}
        strengths = {int(k): float(v) for k, v in meta.get("strengths", {}).items()}
        gate = None
        if "gate" in meta:
            g = meta["gate"]
            veto = need_tensor(art, f"op{i}.gate_veto", path) if "veto_threshold" in g else None
            gate = Gate.of(g["layer"], need_tensor(art, f"op{i}.gate", path), g["threshold"],
                           g.get("pool", "last"), veto, g.get("veto_threshold"))
        levels = {int(k): float(v) for k, v in meta.get("levels", {}).items()}
        op = Op(meta["kind"], vectors, strengths, meta.get("phase", "both"), gate, levels)
        opening_tokens(op.phase)
        operator(op.kind).validate(op, str(path))
        ops.append(op)
    extra = {k: v for k, v in art.manifest.items()
             if k not in ("ops", "scale", "format", "tensors_sha256", "tensor_names",
                          "manifest_sha256")}
    return Profile(tuple(ops), float(art.manifest.get("scale", 1.0)), extra)
