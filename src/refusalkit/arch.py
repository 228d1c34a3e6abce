"""Generic architecture discovery: decoder layers, final norm and residual-stream writers.

No per-family classes. The decoder stack is the ModuleList with one entry per hidden layer;
residual writers are recognised by role name *and* shape (their output dimension is the
hidden size), including MoE experts stored as fused 3-D parameters. Anything we cannot find
raises `UnsupportedArchitecture` naming what is missing, so a new family fails loudly instead
of being steered wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from refusalkit.errors import UserError

# Last name component of modules / parameters that write into the residual stream.
WRITER_NAMES = frozenset(
    {"o_proj", "out_proj", "down_proj", "dense_4h_to_h", "c_proj", "fc2", "w2", "wo", "dense"}
)
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")
# Gemma-style layers normalise a sublayer's output *after* its writer, before the residual add.
POST_NORM_NAMES = ("post_attention_layernorm", "post_feedforward_layernorm")


class UnsupportedArchitecture(UserError):
    """The model's structure does not match what refusalkit can steer."""


@dataclass(frozen=True)
class Writer:
    """One weight that writes into the residual stream.

    `out_dim` is the axis of `param` that indexes the hidden size; `module` is the module
    whose output carries that write (used by hook ablation).
    """

    layer: int
    name: str
    module: nn.Module
    param: nn.Parameter
    out_dim: int
    bias: nn.Parameter | None = None


@dataclass
class Architecture:
    layers: nn.ModuleList
    embed: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Module | None
    hidden_size: int
    writers: list[Writer]
    post_norms: dict[int, list[nn.Module]] = field(default_factory=dict)
    model_type: str = ""

    @property
    def has_post_norms(self) -> bool:
        """True when sublayer outputs pass a norm before the residual add (gemma2/3)."""
        return any(self.post_norms.values())

    def residual_outputs(self, layer: int) -> list[nn.Module]:
        """Modules whose outputs are added to the residual stream inside `layer`."""
        if self.post_norms.get(layer):
            return self.post_norms[layer]
        seen: dict[int, nn.Module] = {}
        for w in self.writers:
            if w.layer == layer:
                seen.setdefault(id(w.module), w.module)
        return list(seen.values())

    def check_layers(self, layers: list[int], allow_final: bool = False) -> None:
        top = len(self.layers) + (1 if allow_final else 0)
        bad = [i for i in layers if not 0 <= i < top]
        if bad:
            raise UserError(
                f"layer {bad[0]} is out of range: this model has layers 0..{top - 1}"
            )


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _find_layers(model: nn.Module, n_layers: int | None) -> nn.ModuleList:
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if n_layers is not None:
        exact = [(n, m) for n, m in lists if len(m) == n_layers]
        if exact:
            return min(exact, key=lambda nm: nm[0].count("."))[1]
    homogeneous = [(n, m) for n, m in lists if len(m) > 1 and len({type(x) for x in m}) == 1]
    if not homogeneous:
        raise UnsupportedArchitecture(
            f"{type(model).__name__}: no decoder layer list found (an nn.ModuleList of "
            f"{n_layers} layers); this architecture is not supported"
        )
    return max(homogeneous, key=lambda nm: len(nm[1]))[1]


def _find_final_norm(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    for _name, parent in model.named_modules():
        if any(child is layers for child in parent.children()):
            for attr in FINAL_NORM_NAMES:
                norm = getattr(parent, attr, None)
                if isinstance(norm, nn.Module):
                    return norm
    raise UnsupportedArchitecture(
        f"{type(model).__name__}: no final norm found next to the decoder layers "
        f"(looked for {', '.join(FINAL_NORM_NAMES)})"
    )


def _layer_writers(index: int, layer: nn.Module, d: int) -> list[Writer]:
    writers: list[Writer] = []
    for name, module in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in WRITER_NAMES and module.out_features == d:
            writers.append(Writer(index, name, module, module.weight, 0, module.bias))
            continue
        # Fused MoE experts: 3-D parameters (experts, out, in) named like a writer.
        for pname, param in module.named_parameters(recurse=False):
            if param.ndim != 3 or pname.removesuffix("_weight") not in WRITER_NAMES:
                continue
            # transformers' linear convention is (experts, out, in); x @ W layouts are
            # (experts, in, out). When both axes equal d we assume the linear convention.
            if param.shape[1] == d:
                out_dim = 1
            elif param.shape[2] == d:
                out_dim = 2
            else:
                continue
            bias = getattr(module, f"{pname}_bias", None)
            writers.append(Writer(index, f"{name}.{pname}", module, param, out_dim, bias))
    return writers


def discover(model: nn.Module) -> Architecture:
    """Find the parts of a decoder-only transformer that steering needs."""
    cfg = _text_config(model)
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    layers = _find_layers(model, n_layers)
    embed = model.get_input_embeddings()
    if not isinstance(embed, nn.Embedding):
        raise UnsupportedArchitecture(
            f"{type(model).__name__}: input embeddings are {type(embed).__name__}, not nn.Embedding"
        )
    d = embed.weight.shape[1]
    final_norm = _find_final_norm(model, layers)
    writers: list[Writer] = []
    post_norms: dict[int, list[nn.Module]] = {}
    for i, layer in enumerate(layers):
        found = _layer_writers(i, layer, d)
        if not found:
            raise UnsupportedArchitecture(
                f"{type(model).__name__}: layer {i} has no residual writer (a Linear or expert "
                f"weight named one of {', '.join(sorted(WRITER_NAMES))} with output size {d})"
            )
        writers.extend(found)
        if hasattr(layer, "post_feedforward_layernorm"):
            post_norms[i] = [getattr(layer, n) for n in POST_NORM_NAMES]
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return Architecture(
        layers=layers,
        embed=embed,
        final_norm=final_norm,
        lm_head=lm_head,
        hidden_size=d,
        writers=writers,
        post_norms=post_norms,
        model_type=str(getattr(cfg, "model_type", "")),
    )
