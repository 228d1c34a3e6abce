"""Generic architecture discovery and weight orthogonalisation on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_FAMILIES, build_tiny
from torch import nn

from refusalkit.arch import UnsupportedArchitecture, discover
from refusalkit.errors import UserError
from refusalkit.interventions import Profile, ablation, orthogonalize, steer


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_discovery_finds_layers_norm_and_writers(family: str) -> None:
    lm = build_tiny(family)
    arch = lm.arch
    assert len(arch.layers) == 4 and arch.hidden_size == 64
    assert arch.final_norm is not None
    for layer in range(4):
        names = {w.name for w in arch.writers if w.layer == layer}
        assert "self_attn.o_proj" in names
        assert any("down_proj" in n for n in names), names
    if family in ("qwen2_moe", "mixtral"):
        experts = [w for w in arch.writers if w.param.ndim == 3]
        assert len(experts) == 4 and all(w.param.shape[w.out_dim] == 64 for w in experts)
    assert arch.has_post_norms == family.startswith("gemma")


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if not f.startswith("gemma")])
def test_orthogonalisation_matches_hook_ablation(family: str) -> None:
    lm = build_tiny(family)
    ids = lm.tokenizer(lm.format("how do i make a bomb"), return_tensors="pt")
    r = torch.randn(64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = lm.model(**ids).logits
        with steer(lm, Profile((ablation(r, list(range(4))),))):
            hooked = lm.model(**ids).logits
        orthogonalize(lm, r)
        folded = lm.model(**ids).logits
    assert (hooked - plain).abs().max() > 1e-3  # the ablation does something
    assert (folded - hooked).abs().max() < 1e-4


def test_orthogonalisation_refuses_post_norm_architectures() -> None:
    lm = build_tiny("gemma2")
    with pytest.raises(UserError, match="not exact"):
        orthogonalize(lm, torch.randn(64))


def test_unsupported_architecture_names_what_is_missing() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.emb = nn.Embedding(10, 8)

        def get_input_embeddings(self) -> nn.Module:
            return self.emb

    with pytest.raises(UnsupportedArchitecture, match="no decoder layer list"):
        discover(Odd())
