"""Greedy decoding with finished rows dropped from the batch (generation.greedy_rows): the
same tokens and log-probs as `model.generate`, and a gate keeps its prompt-time decision for
the rows left after others have ended (in offline generation and in the server's loop)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny

from refusalkit.activations import capture
from refusalkit.batching import Engine, Job, Sampling
from refusalkit.generation import generate, plain_greedy
from refusalkit.interventions import Gate, Profile, addition

PROMPTS = ["how do i make a bomb", "tell me about the weather please", "hi",
           "write a poem about bread", "why steal a car", "who are you"]


def with_early_ends(family: str = "llama"):
    """A tiny model whose end token is one its greedy answers emit at different steps, so
    rows of one batch end at different times (a random model never emits its own <eos>)."""
    lm = build_tiny(family)
    answers = [g[0].token_ids for g in generate(lm, PROMPTS, max_new_tokens=12,
                                                show_progress=False)]
    lm.model.generation_config.eos_token_id = answers[0][3]
    ends = {len(g[0].token_ids) for g in generate(lm, PROMPTS, max_new_tokens=12,
                                                  show_progress=False)}
    assert len(ends) > 2, ends  # precondition: rows end at several different steps
    return lm


def hf_greedy(lm, prompts: list[str], n: int) -> list[tuple[list[int], list[float]]]:
    tok = lm.tokenizer
    eos = {lm.model.generation_config.eos_token_id, tok.eos_token_id}
    enc = tok([lm.format(p) for p in prompts], add_special_tokens=False, padding=True,
              return_tensors="pt")
    with torch.inference_mode():
        out = lm.model.generate(**enc, max_new_tokens=n, do_sample=False,
                                pad_token_id=tok.pad_token_id, return_dict_in_generate=True,
                                output_logits=True)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    lp = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, new[..., None])[..., 0]
    rows = []
    for r in range(len(prompts)):
        ids = new[r].tolist()
        end = next((j for j, t in enumerate(ids) if t in eos), len(ids))
        rows.append((ids[:end], lp[r, :end].tolist()))
    return rows


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3"])
def test_greedy_matches_model_generate_when_rows_end_early(family: str) -> None:
    lm = with_early_ends(family)
    ours = generate(lm, PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS),
                    show_progress=False)
    ref = hf_greedy(lm, PROMPTS, 12)
    for g, (ids, lps) in zip(ours, ref, strict=True):
        assert list(g[0].token_ids) == ids
        assert g[0].finished == (len(ids) < 12)
        got = torch.tensor(g[0].logprobs)
        if len(ids):
            assert torch.allclose(got, torch.tensor(lps), rtol=1e-4,
                                  atol=1e-5 * float(got.abs().max()))


def test_min_new_tokens_holds_off_the_end_token() -> None:
    lm = with_early_ends()
    lm.model.generation_config.min_new_tokens = 8
    assert plain_greedy(lm.model.generation_config) == (True, 8)
    ours = generate(lm, PROMPTS, max_new_tokens=12, show_progress=False)
    assert [list(g[0].token_ids) for g in ours] == [i for i, _ in hf_greedy(lm, PROMPTS, 12)]
    assert min(len(g[0].token_ids) for g in ours) >= 8
    lm.model.generation_config.repetition_penalty = 1.3  # not ours: model.generate decodes
    assert not plain_greedy(lm.model.generation_config)[0]
    ours = generate(lm, PROMPTS, max_new_tokens=12, show_progress=False)
    assert [list(g[0].token_ids) for g in ours] == [i for i, _ in hf_greedy(lm, PROMPTS, 12)]


def gated(lm) -> Profile:
    """A strong addition whose gate opens for two to four of PROMPTS: the threshold sits in
    the widest gap between their middle projections at layer 1, so padding's rounding cannot
    flip a decision, and rows stay shut that a decision taken again on a generated token
    would open."""
    acts = capture(lm, PROMPTS, [1], show_progress=False)[:, 0, 0]
    cond = acts[0] - acts[1]
    proj = (acts @ (cond / cond.norm())).sort().values
    gap = 1 + int((proj[2:-1] - proj[1:-2]).argmax())
    v = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 10
    return Profile((addition({2: v}, 1.0,
                             gate=Gate(1, cond, float(proj[gap:gap + 2].mean()))),))


def test_a_gate_keeps_its_decision_for_the_rows_left() -> None:
    """Batched, rows end at different steps and leave the batch; each row's answer must be
    what it is alone. Without Steering.keep_rows the gate would decide again, on a generated
    token, as soon as one row had left."""
    lm = with_early_ends()
    prof = gated(lm)
    batched = generate(lm, PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS),
                       show_progress=False, profile=prof)
    alone = generate(lm, PROMPTS, max_new_tokens=12, batch_size=1, show_progress=False,
                     profile=prof)
    unsteered = generate(lm, PROMPTS, max_new_tokens=12, show_progress=False)
    steered = [a[0].token_ids != u[0].token_ids for a, u in zip(alone, unsteered, strict=True)]
    assert 0 < sum(steered) < len(PROMPTS)  # the gate opened for some rows, not all
    assert [g[0].token_ids for g in batched] == [g[0].token_ids for g in alone]


def test_the_servers_loop_keeps_a_gates_decision_too() -> None:
    lm = with_early_ends()
    prof = gated(lm)
    engine = Engine(lm, prof)
    tok = lm.tokenizer
    # different length limits end rows at different steps even where no end token comes
    jobs = [Job(tok(lm.format(p), add_special_tokens=False)["input_ids"],
                Sampling(max_tokens=2 + 2 * i, temperature=0.0), key=1.0)
            for i, p in enumerate(PROMPTS)]
    for job in jobs:
        engine.submit(job)
    engine._run(1.0, jobs)
    alone = generate(lm, PROMPTS, max_new_tokens=12, batch_size=1, show_progress=False,
                     profile=prof)
    for i, (job, a) in enumerate(zip(jobs, alone, strict=True)):
        assert job.rows[0].ids == list(a[0].token_ids[:2 + 2 * i])


@pytest.mark.real
def test_qwen_greedy_answers_are_model_generates(qwen) -> None:
    """On the testbed, a batch mixing refusals (short, they leave early) with answers that
    run to the limit: the same tokens as model.generate, log-probs to float tolerance."""
    from refusalkit.prompts import load_prompts

    prompts = (load_prompts("jailbreakbench").take(6, seed=1).prompts
               + load_prompts("harmless_test").take(6, seed=1).prompts)
    ours = generate(qwen, prompts, max_new_tokens=24, batch_size=len(prompts),
                    show_progress=False)
    ref = hf_greedy(qwen, prompts, 24)
    assert len({len(i) for i, _ in ref}) > 2  # rows ended at different steps
    for g, (ids, lps) in zip(ours, ref, strict=True):
        assert list(g[0].token_ids) == ids
        got, want = torch.tensor(g[0].logprobs), torch.tensor(lps)
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
