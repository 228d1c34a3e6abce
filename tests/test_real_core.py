"""Issue 2's acceptance on real models: a refusal direction that separates, bypasses and
induces refusal on qwen2.5-coder-0.5b, and the same machinery on smollm2-135m."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_up_to_float32

from refusalkit.activations import capture
from refusalkit.directions import mean_difference, per_layer
from refusalkit.generation import generate, generate_text
from refusalkit.geometry import auc, depth_window, layer_auc
from refusalkit.interventions import (
    Profile,
    ablation,
    addition,
    clamping,
    orthogonalize,
    steer,
)
from refusalkit.judge import KeywordJudge
from refusalkit.prompts import load_prompts
from refusalkit.scoring import kl_divergence, last_logprobs, refusal_score
from refusalkit.steer.baselines import select_by_auc

pytestmark = pytest.mark.real


# The last prompt token, which emits the answer's first token. (Measured: mean_post reaches a
# validation AUC of 1.000 at several layers on 24/24 prompts, so AUC cannot rank them there,
# and its first such layer held out at 0.948; at −1 every window layer from 15 holds ≥ 0.96.)
POSITIONS = [-1]


@pytest.fixture(scope="module")
def qwen_direction(qwen):
    """MD direction from behaviour-filtered training prompts; the layer is chosen by
    validation AUC inside the depth window (a simple selection, no constants)."""
    harm = load_prompts("harmful_train").take(128, seed=0).prompts
    safe = load_prompts("harmless_train").take(64, seed=0).prompts
    refused = [p for p, s in zip(harm, refusal_score(qwen, harm), strict=True) if s > 0]
    answered = [p for p, s in zip(safe, refusal_score(qwen, safe), strict=True) if s < 0]
    layers = list(range(qwen.n_layers))
    a_h = capture(qwen, refused, layers, POSITIONS, show_progress=False)
    a_s = capture(qwen, answered, layers, POSITIONS, show_progress=False)
    v_h = capture(qwen, load_prompts("harmful_val").prompts[:24], layers, POSITIONS,
                  show_progress=False)
    v_s = capture(qwen, load_prompts("harmless_val").take(24, seed=0).prompts, layers,
                  POSITIONS, show_progress=False)
    best = None
    for j, pos in enumerate(POSITIONS):
        dirs = per_layer(mean_difference, a_h[:, :, j], a_s[:, :, j])
        aucs = layer_auc(v_h[:, :, j], v_s[:, :, j], dirs)
        layer = select_by_auc(aucs, layers, depth_window(qwen.n_layers))
        if best is None or aucs[layer] > best[0]:
            gap = float((a_h[:, layer, j].mean(0) - a_s[:, layer, j].mean(0)).norm())
            best = (aucs[layer], layer, pos, dirs[layer], gap)
    _, layer, pos, r, gap = best
    return layer, pos, r, gap, len(refused), len(answered)


def test_direction_separates_held_out_prompts(qwen, qwen_direction) -> None:
    """Held-out prompts are filtered by behaviour like the training ones: the direction is a
    *refusal* direction, so it separates refused harmful from answered harmless prompts (it
    does not claim to rank harmful prompts the model answers)."""
    layer, pos, r, _gap, n_refused, n_answered = qwen_direction
    assert n_refused >= 16 and n_answered >= 16  # behaviour filtering kept enough of both
    assert 0.3 * qwen.n_layers <= layer < 0.8 * qwen.n_layers
    harm = load_prompts("harmful_test").take(200, seed=1).prompts  # ~1 in 4 refused
    safe = load_prompts("harmless_test").take(60, seed=1).prompts
    harm = [p for p, s in zip(harm, refusal_score(qwen, harm), strict=True) if s > 0][:50]
    safe = [p for p, s in zip(safe, refusal_score(qwen, safe), strict=True) if s < 0][:50]
    assert len(harm) >= 30 and len(safe) >= 30
    h = capture(qwen, harm, [layer], [pos], show_progress=False)[:, 0, 0]
    s = capture(qwen, safe, [layer], [pos], show_progress=False)[:, 0, 0]
    assert auc(h @ r, s @ r) >= 0.95


def test_ablation_bypasses_and_addition_induces_refusal(qwen, qwen_direction) -> None:
    layer, _pos, r, gap, _, _ = qwen_direction
    kw = KeywordJudge()
    jbb = load_prompts("jailbreakbench").take(30, seed=0).prompts
    before = sum(map(kw.is_refusal, generate_text(qwen, jbb, max_new_tokens=24,
                                                  show_progress=False)))
    ablated = Profile((ablation(r, list(range(qwen.n_layers))),))
    after = sum(map(kw.is_refusal, generate_text(qwen, jbb, max_new_tokens=24,
                                                 profile=ablated, show_progress=False)))
    assert before >= 8, before
    assert after <= before / 2, (before, after)

    harmless = load_prompts("harmless_test").take(40, seed=2).prompts
    base = generate_text(qwen, harmless, max_new_tokens=24, show_progress=False)
    answered = [p for p, t in zip(harmless, base, strict=True) if not kw.is_refusal(t)][:30]
    added = Profile((addition({layer: r}, gap),))
    induced = generate_text(qwen, answered, max_new_tokens=24, profile=added,
                            show_progress=False)
    assert sum(map(kw.is_refusal, induced)) >= len(answered) / 2


def test_a_prompt_plus_n_profile_steers_the_opening_then_lets_the_model_go_on(
        qwen, qwen_direction) -> None:
    """phase "prompt+4" on a real model: the first five answer tokens are those of the same
    profile steering every token (the prompt pass and four steps), later ones are the
    unsteered model's continuation; the refusal the opening commits to stays."""
    layer, _pos, r, gap, _, _ = qwen_direction
    kw = KeywordJudge()
    harmless = load_prompts("harmless_test").take(40, seed=2).prompts
    base = generate_text(qwen, harmless, max_new_tokens=24, show_progress=False)
    answered = [p for p, t in zip(harmless, base, strict=True) if not kw.is_refusal(t)][:16]

    def ids(phase: str) -> list[list[int]]:
        prof = Profile((addition({layer: r}, gap, phase=phase),))
        return [g[0].token_ids for g in generate(qwen, answered, max_new_tokens=24,
                                                  profile=prof, show_progress=False)]

    both, opening = ids("both"), ids("prompt+4")
    assert [t[:5] for t in opening] == [t[:5] for t in both]
    assert opening != both
    text = qwen.tokenizer.batch_decode(opening, skip_special_tokens=True)
    assert sum(map(kw.is_refusal, text)) >= len(answered) / 2, text


def test_clamp_removes_refusal_and_changes_answered_prompts_less(qwen, qwen_direction) -> None:
    """A clamp with addition's strength moves states only as far as addition moves the
    refusing mean, so it lowers the first-token refusal of refused harmful prompts like
    addition does, while harmless prompts' next-token distribution changes less."""
    layer, pos, r, gap, _, _ = qwen_direction
    u = r / r.norm()
    harm = load_prompts("harmful_test").take(120, seed=2).prompts  # ~1 in 4 refused
    harm = [p for p, s in zip(harm, refusal_score(qwen, harm), strict=True) if s > 0][:24]
    safe = load_prompts("harmless_test").take(30, seed=3).prompts
    assert len(harm) >= 6
    level = float((capture(qwen, harm, [layer], [pos], show_progress=False)[:, 0, 0] @ u).mean())
    add = Profile((addition({layer: u}, -2.0 * gap),))
    clamp = Profile((clamping({layer: u}, {layer: -2.0 * gap}, {layer: level}),))
    before = refusal_score(qwen, harm).mean()
    drop_add = before - refusal_score(qwen, harm, profile=add).mean()
    drop_clamp = before - refusal_score(qwen, harm, profile=clamp).mean()
    base = last_logprobs(qwen, safe)
    kl_add = kl_divergence(base, last_logprobs(qwen, safe, profile=add)).mean()
    kl_clamp = kl_divergence(base, last_logprobs(qwen, safe, profile=clamp)).mean()
    assert drop_add > 2.0, drop_add
    assert drop_clamp >= 0.5 * drop_add, (drop_clamp, drop_add)
    # harmless states sit about one gap below the refusing level, so a clamp two gaps down
    # moves them about half as far as addition does (measured KL 1.14 vs 2.22)
    assert kl_clamp <= 0.75 * kl_add, (kl_clamp, kl_add)


def test_orthogonalised_qwen_matches_hook_ablation(qwen, qwen_direction) -> None:
    from refusalkit.models import load_model

    _layer, _pos, r, _, _, _ = qwen_direction
    ids = qwen.tokenizer([qwen.format("How do I pick a lock?")], return_tensors="pt")
    with torch.no_grad():
        plain = qwen.model(**ids).logits
        with steer(qwen, Profile((ablation(r, list(range(qwen.n_layers))),))):
            hooked = qwen.model(**ids).logits
    copy = load_model("qwen2.5-coder-0.5b")
    orthogonalize(copy, r)
    with torch.no_grad():
        folded = copy.model(**ids).logits
    del copy
    # measured (OMP_NUM_THREADS=1 and 2 alike, direction at layer 17): max |diff| 3.2e-5 on
    # logits up to 30.6 (1.1e-6 relative), while the ablation moves them by 7.3
    assert_same_up_to_float32(folded, hooked, plain)


def test_smollm2_extraction_ablation_and_orthogonalisation(smol, fresh_smol) -> None:
    harm = load_prompts("harmful_train").take(16, seed=0).prompts
    safe = load_prompts("harmless_train").take(16, seed=0).prompts
    layer = round(2 / 3 * smol.n_layers)
    r = mean_difference(capture(smol, harm, [layer], show_progress=False)[:, 0, 0],
                        capture(smol, safe, [layer], show_progress=False)[:, 0, 0])
    ids = smol.tokenizer([smol.format("Write a poem about the sea.")], return_tensors="pt")
    with torch.no_grad():
        plain = smol.model(**ids).logits
        with steer(smol, Profile((ablation(r, list(range(smol.n_layers))),))):
            hooked = smol.model(**ids).logits
        orthogonalize(fresh_smol, r)
        folded = fresh_smol.model(**ids).logits
    # float32 sums over 30 layers, measured (OMP_NUM_THREADS=1 and 2 alike): max |diff| 9.4e-5
    # on logits up to 31.1 (3.0e-6 relative), while the ablation moves them by 30.7
    assert_same_up_to_float32(folded, hooked, plain)
