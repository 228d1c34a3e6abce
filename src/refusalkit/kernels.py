"""Ablation kernels: directional ablation with a weight per layer and per residual writer.

Arditi et al. project one direction out of every residual write (weight 1 everywhere, the
embedding included). Heretic showed that a gentler shape often removes as much refusal at a
fraction of the damage: a weight that peaks at some layer and falls off linearly to both
sides, with separate peaks for attention-out and MLP-down writers, and a direction taken at a
(possibly fractional) layer. A `Kernel` is that parametrisation. It acts in two equivalent
ways:

- `kernel_hooks`: on each writer's output o, o ← o − w (o·r̂) r̂ (reversible, for trials);
- `fold_kernel`: on its weight W ← W − w r̂ r̂ᵀ W (and bias), the checkpoint that ships.

With the direction at an integer layer, weight 1 at every layer and on the embedding, the
kernel *is* Arditi's single-direction weight orthogonalisation (`interventions.orthogonalize`).

`preserve_norms` is norm-preserving ablation (grimjim's "norm-preserving biprojected
abliteration", Heretic 1.4's default): each writer row (one output unit's weights) is
normalised, the direction projected out, and the row rescaled to its original norm, so the
writer keeps its per-unit scale and only its direction changes. Per output unit that is a fixed
linear map of the writer's output, so the hooks still reproduce the folded weights exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from refusalkit.arch import Architecture, Writer
from refusalkit.errors import UserError
from refusalkit.geometry import unit
from refusalkit.models import LoadedModel

COMPONENTS = ("attn", "mlp")


@dataclass(frozen=True)
class Peak:
    """Weight `max_weight` at layer `position`, falling linearly to `min_weight` at
    `distance` layers away on both sides, and 0 beyond (Heretic's kernel)."""

    max_weight: float
    position: float
    min_weight: float
    distance: float

    def at(self, layer: int) -> float:
        d = abs(layer - self.position)
        if d > self.distance:
            return 0.0
        if self.distance <= 0:
            return self.max_weight
        return self.max_weight + (d / self.distance) * (self.min_weight - self.max_weight)


@dataclass(frozen=True)
class Kernel:
    """Where and how strongly to ablate.

    `direction`: the layer whose refusal direction is ablated everywhere; a fraction
    interpolates between the two neighbouring layers' directions; None ablates each layer's own
    direction at that layer. `peaks`: one weight profile per writer component ("attn", "mlp").
    `embed`: weight on the token embedding (Arditi ablates it; Heretic leaves it).
    `preserve_norms`: keep each writer row's norm (see the module docstring; the embedding is
    always projected plainly).
    """

    direction: float | None
    peaks: Mapping[str, Peak]
    embed: float = 0.0
    preserve_norms: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)

    def weight(self, component: str, layer: int) -> float:
        peak = self.peaks.get(component)
        return 0.0 if peak is None else peak.at(layer)

    def to_json(self) -> dict[str, Any]:
        return {"direction": self.direction, "embed": self.embed,
                "preserve_norms": self.preserve_norms,
                "peaks": {k: vars(p) for k, p in sorted(self.peaks.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Kernel:
        d = data.get("direction")
        return cls(None if d is None else float(d),
                   {k: Peak(**{f: float(x) for f, x in p.items()})
                    for k, p in data["peaks"].items()},
                   float(data.get("embed", 0.0)), bool(data.get("preserve_norms", False)))


def arditi_kernel(layer: int, n_layers: int) -> Kernel:
    """Arditi et al.'s ablation as a kernel: one layer's direction, weight 1 everywhere."""
    flat = Peak(1.0, float(layer), 1.0, float(n_layers))
    return Kernel(float(layer), dict.fromkeys(COMPONENTS, flat), embed=1.0)


def direction_at(directions: torch.Tensor, index: float) -> torch.Tensor:
    """The unit direction at a fractional layer index: the two neighbours' unit directions
    interpolated linearly, then normalised (float64)."""
    rows = unit(directions)
    n = rows.shape[0]
    if not 0 <= index <= n - 1:
        raise UserError(f"direction index {index} is outside layers 0..{n - 1}")
    frac, lo = math.modf(index)
    lo = int(lo)
    if frac == 0 or lo + 1 >= n:
        return rows[lo]
    v = torch.lerp(rows[lo], rows[lo + 1], frac)
    return v / v.norm().clamp_min(1e-12)


def component_of(name: str) -> str:
    """"attn" for writers inside an attention block (by module path), else "mlp"."""
    return "attn" if re.search(r"attn|attention", name) else "mlp"


def layer_modules(arch: Architecture, layer: int) -> list[tuple[str, nn.Module]]:
    """(component, module) pairs whose outputs are written into the residual inside `layer`:
    the post-norms where sublayers are normalised after the writer, else the writers."""
    post = arch.post_norms.get(layer)
    if post:
        return list(zip(COMPONENTS, post, strict=True))
    seen: dict[int, tuple[str, nn.Module]] = {}
    for w in arch.writers:
        if w.layer == layer:
            seen.setdefault(id(w.module), (component_of(w.name), w.module))
    return list(seen.values())


def direction_of(kernel: Kernel, directions: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """layer -> the unit direction the kernel ablates there (float64), normalised once."""
    rows = unit(directions)
    if kernel.direction is None:
        return lambda layer: rows[layer]
    fixed = direction_at(directions, kernel.direction)
    return lambda _layer: fixed


def touched(lm: LoadedModel, kernel: Kernel) -> list[nn.Parameter]:
    """The parameters folding the kernel changes: writers (and biases) with a nonzero weight,
    the embedding when it has one."""
    out: list[nn.Parameter] = []
    for w in lm.arch.writers:
        if kernel.weight(component_of(w.name), w.layer):
            out += [w.param] if w.bias is None else [w.param, w.bias]
    if kernel.embed:
        out.append(lm.arch.embed.weight)
    return out


def row_rescale(param: torch.Tensor, out_dim: int, r: torch.Tensor,
                weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm-preserving ablation of one writer: its row norms n (one per output unit) and the
    factors s that restore them once the normalised rows have r projected out, so that
    W' = diag(s) (I − w r rᵀ) diag(1/n) W (float64)."""
    flat = param.detach().double().movedim(out_dim, -1).reshape(-1, param.shape[out_dim])
    n = flat.norm(dim=0).clamp_min(1e-12)
    hat = flat / n
    kept = hat - weight * (hat @ r)[:, None] * r
    return n, n / kept.norm(dim=0).clamp_min(1e-12)


def _sole_writer(lm: LoadedModel, layer: int, module: nn.Module) -> Writer:
    """The one writer whose output `module` is. Norm preservation rescales writer rows, a
    linear map of that writer's output; a norm after the writer (gemma's post-norms) or two
    writers summed in one module would not commute with it. (Stacked experts are one writer:
    their rows are rescaled jointly, one factor per output unit, so the hook stays exact.)"""
    found = [w for w in lm.arch.writers if w.layer == layer and w.module is module]
    if len(found) != 1 or lm.arch.has_post_norms:
        raise UserError(
            "norm-preserving ablation rescales writer rows, which needs each residual write to "
            f"come from one writer with no norm after it; layer {layer} of "
            f"'{lm.arch.model_type}' does not: set search.preserve_norms = false")
    return found[0]


def _check(lm: LoadedModel, directions: torch.Tensor) -> None:
    if directions.ndim != 2 or directions.shape != (lm.n_layers, lm.hidden_size):
        raise UserError(f"expected one direction per layer [{lm.n_layers}, {lm.hidden_size}], "
                        f"got {tuple(directions.shape)}")


@contextmanager
def kernel_hooks(lm: LoadedModel, kernel: Kernel, directions: torch.Tensor) -> Iterator[None]:
    """Apply the kernel with forward hooks for the duration of the block (always removed)."""
    _check(lm, directions)
    r_at = direction_of(kernel, directions)
    dtype = lm.arch.embed.weight.dtype
    handles: list[Any] = []

    def as_model(t: torch.Tensor) -> torch.Tensor:  # converted once, not on every forward
        return t.to(device=lm.device, dtype=dtype)

    def project(weight: float, r: torch.Tensor):
        u0 = as_model(r)

        def fn(h: torch.Tensor) -> torch.Tensor:
            u = u0 if h.dtype == u0.dtype else u0.to(h.dtype)
            return h - weight * (h @ u)[..., None] * u
        return fn

    def preserve(weight: float, r: torch.Tensor, writer: Writer):
        n, s = (as_model(t) for t in row_rescale(writer.param, writer.out_dim, r, weight))
        u0 = as_model(r)
        if writer.bias is None:
            b = b_kept = None
        else:
            b64 = writer.bias.detach().double()
            b, b_kept = as_model(b64), as_model(b64 - weight * (b64 @ r) * r)

        def fn(h: torch.Tensor) -> torch.Tensor:  # h = W x + b  ->  W' x + b'
            x = h if b is None else h - b.to(h.dtype)
            u = x / n.to(h.dtype)
            uu = u0.to(h.dtype)
            u = (u - weight * (u @ uu)[..., None] * uu) * s.to(h.dtype)
            return u if b_kept is None else u + b_kept.to(h.dtype)
        return fn

    def hook_of(fn: Callable[[torch.Tensor], torch.Tensor]):
        def hook(_m: nn.Module, _a: Any, out: Any) -> Any:
            return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
        return hook

    try:
        if kernel.embed:
            handles.append(lm.arch.embed.register_forward_hook(
                hook_of(project(kernel.embed, r_at(0)))))
        for layer in range(lm.n_layers):
            r = r_at(layer)
            for component, module in layer_modules(lm.arch, layer):
                w = kernel.weight(component, layer)
                if not w:
                    continue
                fn = (preserve(w, r, _sole_writer(lm, layer, module)) if kernel.preserve_norms
                      else project(w, r))
                handles.append(module.register_forward_hook(hook_of(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fold_kernel(lm: LoadedModel, kernel: Kernel, directions: torch.Tensor) -> None:
    """Fold the kernel into the weights, in place: W ← W − w r̂ r̂ᵀ W on every residual writer
    (bias too; with `preserve_norms`, each row is then restored to its norm) and the embedding.
    A tied output embedding is untied first, so logits keep reading the full stream."""
    _check(lm, directions)
    arch = lm.arch
    if arch.has_post_norms:
        raise UserError(
            f"an ablation kernel cannot be folded into '{arch.model_type}' weights: its sublayer "
            "outputs pass a norm before the residual add; use the hooks (kernel_hooks) instead")
    r_at = direction_of(kernel, directions)
    if kernel.preserve_norms:  # fail before anything is changed
        for layer in range(lm.n_layers):
            for component, module in layer_modules(arch, layer):
                if kernel.weight(component, layer):
                    _sole_writer(lm, layer, module)
    if kernel.embed:
        head = arch.lm_head
        if head is not None and head.weight is arch.embed.weight:
            head.weight = nn.Parameter(head.weight.detach().clone())
            lm.model.config.tie_word_embeddings = False
        r = r_at(0)
        emb = arch.embed.weight
        e = emb.double()
        emb.copy_((e - kernel.embed * (e @ r)[:, None] * r).to(emb.dtype))
    for wr in arch.writers:
        w = kernel.weight(component_of(wr.name), wr.layer)
        if not w:
            continue
        r = r_at(wr.layer)
        p = wr.param
        moved = p.double().movedim(wr.out_dim, -1)
        if kernel.preserve_norms:
            n, s = row_rescale(p, wr.out_dim, r, w)
            moved = moved / n
            moved = (moved - w * (moved @ r)[..., None] * r) * s
        else:
            moved = moved - w * (moved @ r)[..., None] * r
        p.copy_(moved.movedim(-1, wr.out_dim).to(p.dtype))
        if wr.bias is not None:
            b = wr.bias.double()
            wr.bias.copy_((b - w * (b @ r)[..., None] * r).to(wr.bias.dtype))


@contextmanager
def folded(lm: LoadedModel, kernel: Kernel, directions: torch.Tensor) -> Iterator[LoadedModel]:
    """The kernel folded into `lm`'s weights for the duration of the block, then undone
    exactly (the touched tensors are copied first and restored, also on exceptions), so a
    caller's model is never left changed."""
    arch = lm.arch
    saved = [(p, p.detach().clone()) for p in touched(lm, kernel)]  # only what changes
    head, head_weight = arch.lm_head, getattr(arch.lm_head, "weight", None)
    tied = lm.model.config.tie_word_embeddings if hasattr(lm.model.config,
                                                          "tie_word_embeddings") else None
    try:
        fold_kernel(lm, kernel, directions)
        yield lm
    finally:
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)
        if head is not None and head_weight is not None and head.weight is not head_weight:
            head.weight = head_weight
        if tied is not None:
            lm.model.config.tie_word_embeddings = tied
