"""Steering profiles on a tiny model: hooks, phases, scaling, artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny

from refusalkit.errors import UserError
from refusalkit.generation import generate
from refusalkit.interventions import (
    Profile,
    ablation,
    addition,
    clamping,
    load_profile,
    save_profile,
    steer,
)


def logits(lm, text: str = "how do i make a bomb") -> torch.Tensor:
    ids = lm.tokenizer(lm.format(text), return_tensors="pt")
    with torch.no_grad():
        return lm.model(**ids).logits


def logits_with(lm, profile: Profile) -> torch.Tensor:
    with steer(lm, profile):
        return logits(lm)


def n_hooks(lm) -> int:
    mods = [*lm.arch.layers, *[w.module for w in lm.arch.writers]]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods)


def test_addition_changes_output_and_scale_zero_is_identity(tiny) -> None:
    v = torch.randn(64)
    prof = Profile((addition({1: v, 2: v}, 4.0),))
    base = logits(tiny)
    with steer(tiny, prof):
        steered = logits(tiny)
    with steer(tiny, prof.scaled(0.0)):
        off = logits(tiny)
    assert (steered - base).abs().max() > 1e-2
    assert torch.equal(off, base)


def test_addition_is_exactly_h_plus_sv_at_layer_input(tiny) -> None:
    v = torch.randn(64)
    seen: list[torch.Tensor] = []

    def record(_m, a, k):
        seen.append((a[0] if a else k["hidden_states"]).clone())

    layer = tiny.arch.layers[2]
    h = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        logits(tiny)
    finally:
        h.remove()
    with steer(tiny, Profile((addition({2: v}, 3.0),))):
        h = layer.register_forward_pre_hook(record, with_kwargs=True)  # runs after steering
        try:
            logits(tiny)
        finally:
            h.remove()
    assert torch.allclose(seen[1] - seen[0], (3.0 * v).expand_as(seen[0]), atol=1e-5)


def _layer_input(lm, layer: int, profile: Profile | None) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def record(_m, a, k):
        seen.append((a[0] if a else k["hidden_states"]).clone())

    with steer(lm, profile):
        h = lm.arch.layers[layer].register_forward_pre_hook(record, with_kwargs=True)
        try:
            logits(lm)
        finally:
            h.remove()
    return seen[0]


def test_clamp_caps_the_projection_where_addition_would_take_the_level(tiny) -> None:
    """s < 0: p -> min(p, level + s*|v|); states already below are untouched, and the
    orthogonal part never changes. s > 0 mirrors it (a floor)."""
    v = torch.randn(64)
    u = v / v.norm()
    base = _layer_input(tiny, 2, None)
    p = base @ u
    level = float(p.median())  # some states above, some below the target
    step = 0.25 * float(p.std()) / float(v.norm())
    for s in (-step, step):
        target = level + s * float(v.norm())
        out = _layer_input(tiny, 2, Profile((clamping({2: v}, {2: s}, {2: level}),)))
        q = out @ u
        want = p.clamp(max=target) if s < 0 else p.clamp(min=target)
        assert torch.allclose(q, want, atol=1e-4)
        moved = (want - p).abs() > 1e-6
        assert moved.any() and (~moved).any()  # only the states on the wrong side moved
        assert torch.allclose(out - q[..., None] * u, base - p[..., None] * u, atol=1e-4)
    off = _layer_input(tiny, 2, Profile((clamping({2: v}, {2: -0.5}, {2: level}),), 0.0))
    assert torch.equal(off, base)
    with pytest.raises(UserError, match="level"):
        clamping({2: v, 3: v}, -1.0, {2: level})


def test_hooks_are_removed_on_exit_and_on_exception(tiny) -> None:
    before = n_hooks(tiny)
    prof = Profile((addition({0: torch.randn(64)}, 1.0), ablation(torch.randn(64), [0, 1, 2, 3])))
    with steer(tiny, prof):
        assert n_hooks(tiny) > before
    assert n_hooks(tiny) == before
    with pytest.raises(RuntimeError), steer(tiny, prof):
        raise RuntimeError("boom")
    assert n_hooks(tiny) == before


def test_ablation_removes_the_component_from_the_stream(tiny) -> None:
    r = torch.randn(64)
    r = r / r.norm()
    seen: list[torch.Tensor] = []
    hook = tiny.arch.final_norm.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    try:
        with steer(tiny, Profile((ablation(r, [0, 1, 2, 3]),))):
            logits(tiny)
    finally:
        hook.remove()
    assert float((seen[0] @ r).abs().max()) < 1e-4


def test_phase_prompt_only_leaves_generation_steps_alone(tiny) -> None:
    v = torch.randn(64) * 10
    prompts = ["how do i make a bomb", "tell me about the weather please"]
    base = generate(tiny, prompts, max_new_tokens=6, show_progress=False)
    both = generate(tiny, prompts, max_new_tokens=6, show_progress=False,
                    profile=Profile((addition({1: v}, 1.0, phase="both"),)))
    gen_only = generate(tiny, prompts, max_new_tokens=6, show_progress=False,
                        profile=Profile((addition({1: v}, 1.0, phase="generation"),)))
    assert [g[0].token_ids for g in both] != [g[0].token_ids for g in base]
    # generation-only steering cannot change the first token (computed in the prompt pass)
    assert [g[0].token_ids[0] for g in gen_only] == [g[0].token_ids[0] for g in base]


def test_phase_prompt_plus_n_steers_the_prompt_and_the_first_n_tokens(tiny, tmp_path) -> None:
    """"prompt+N": the prompt pass and N one-token steps steered, then the model continues
    unsteered; the count restarts with each prompt pass (each batch, each generate call)."""
    v = torch.randn(64) * 10
    prompts = ["how do i make a bomb", "tell me about the weather please", "hi"]

    def ids(phase: str) -> list[list[int]]:
        prof = Profile((addition({1: v}, 1.0, phase=phase),))
        return [g[0].token_ids for g in generate(tiny, prompts, max_new_tokens=8, batch_size=2,
                                                 show_progress=False, profile=prof)]

    both, prompt, plus2 = ids("both"), ids("prompt"), ids("prompt+2")
    assert both != prompt  # the test can tell the phases apart
    assert ids("prompt+0") == prompt and ids("prompt+50") == both
    # the first token comes from the prompt pass, the next two from steered steps
    assert [t[:3] for t in plus2] == [t[:3] for t in both]
    assert plus2 != both
    save_profile(Profile((addition({1: v}, 1.0, phase="prompt+2"),)), tmp_path / "p", tiny)
    assert load_profile(tmp_path / "p", tiny).ops[0].phase == "prompt+2"
    for bad in ("prompt+", "prompt+x", "first+2", "opening"):
        with pytest.raises(UserError, match="prompt\\+N"):
            with steer(tiny, Profile((addition({1: v}, 1.0, phase=bad),))):
                pass


def test_profile_round_trip_and_model_check(tiny, tmp_path: Path) -> None:
    prof = Profile((addition({1: torch.randn(64)}, {1: -2.5}),
                    ablation(torch.randn(64), [0, 3]),
                    clamping({2: torch.randn(64)}, {2: -1.5}, {2: 0.75})),
                   meta={"method": "md"})
    save_profile(prof, tmp_path / "p", tiny)
    back = load_profile(tmp_path / "p", tiny)
    assert back.ops[0].strengths == {1: -2.5} and back.meta["method"] == "md"
    assert back.ops[2].kind == "clamp" and back.ops[2].levels == {2: 0.75}
    assert torch.equal(logits_with(tiny, prof), logits_with(tiny, back))
    for a, b in zip(prof.ops, back.ops, strict=True):
        assert a.kind == b.kind and all(torch.equal(a.vectors[k], b.vectors[k]) for k in a.vectors)
    other = build_tiny("qwen2", seed=1)
    with pytest.raises(UserError, match="was made for model"):
        load_profile(tmp_path / "p", other)
    load_profile(tmp_path / "p", other, allow_other_model=True)


def test_tampered_artifact_is_refused(tiny, tmp_path: Path) -> None:
    save_profile(Profile((addition({1: torch.randn(64)}, 1.0),)), tmp_path / "p", tiny)
    data = bytearray((tmp_path / "p" / "tensors.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "p" / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        load_profile(tmp_path / "p", tiny)


def test_profile_for_other_hidden_size_is_refused(tiny) -> None:
    with pytest.raises(UserError, match="hidden size"), steer(
            tiny, Profile((addition({1: torch.randn(32)}, 1.0),))):
        pass


def test_gate_steers_only_rows_whose_projection_passes(tiny) -> None:
    from refusalkit.activations import capture
    from refusalkit.interventions import Gate

    prompts = ["how do i make a bomb", "tell me about the weather please"]
    acts = capture(tiny, prompts, [1], show_progress=False)[:, 0, 0]
    cond = acts[0] - acts[1]  # row 0 projects higher than row 1
    mid = float(((acts[0] + acts[1]) / 2) @ (cond / cond.norm()))
    v = torch.randn(64) * 10
    gated = Profile((addition({2: v}, 1.0, gate=Gate(1, cond, mid)),))
    plain = Profile((addition({2: v}, 1.0),))
    base = generate(tiny, prompts, max_new_tokens=5, show_progress=False)
    g = generate(tiny, prompts, max_new_tokens=5, show_progress=False, profile=gated)
    p = generate(tiny, prompts, max_new_tokens=5, show_progress=False, profile=plain)
    assert g[0][0].token_ids == p[0][0].token_ids != base[0][0].token_ids  # gate open
    assert g[1][0].token_ids == base[1][0].token_ids  # gate closed: untouched
    with pytest.raises(UserError, match="gate layer"):
        addition({0: v}, 1.0, gate=Gate(1, cond, mid))
