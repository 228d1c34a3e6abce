"""Behavioural evaluation: judged refusal rates, confidence scores, KL and perplexity.

Everything here compares the model with and without a profile on the same prompts, so the
numbers in metrics.json are always before/after pairs measured in one run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from refusalkit.activations import head_prefix, length_sorted_batches
from refusalkit.errors import UserError
from refusalkit.gates import gate_of, gate_open
from refusalkit.interventions import Profile, lift_gate, steer
from refusalkit.judge import Judge, JudgementCache
from refusalkit.judge.cache import CachedJudge
from refusalkit.judge.protocol import THRESHOLD, PromptScore, SampleScore, aggregate, classify
from refusalkit.models import LoadedModel
from refusalkit.prefix import Prefix, after_prefix
from refusalkit.quality import AnswerQuality, assess, perplexities


@dataclass(frozen=True)
class Judged:
    prompt: str
    response: str
    label: str  # refusal / neutral / compliance by c(x)
    confidence: float  # c(x) in [-1, 1]; > 0.1 refusal, < -0.1 compliance
    style: str | None
    tokens: int  # generated tokens judged for this prompt (search cost accounting)
    on_topic: float | None = None  # the judge's P(on topic) for the first answer, if it has one


def score_prompts(
    lm: LoadedModel,
    prompts: Sequence[str],
    judge: Judge,
    *,
    k: int = 5,
    temperature: float = 1.0,
    max_new_tokens: int = 128,
    mode: Literal["sample", "greedy"] = "sample",
    signed: bool = True,
    threshold: float = THRESHOLD,
    cache: JudgementCache | None = None,
    profile: Any = None,
    seed: int = 0,
    batch_size: int = 16,
    show_progress: bool = False,
) -> list[PromptScore]:
    """Refusal confidence c(x) per prompt under `lm` (optionally steered by `profile`)."""
    from refusalkit.generation import generate

    if mode not in ("sample", "greedy"):
        raise UserError(f"unknown scoring mode '{mode}'; use sample or greedy")
    if mode == "sample" and (k < 1 or temperature <= 0):
        raise UserError("sampling mode needs k ≥ 1 and temperature > 0")
    greedy = mode == "greedy"
    gens = generate(lm, prompts, profile=profile, max_new_tokens=max_new_tokens,
                    temperature=0.0 if greedy else temperature, num_samples=1 if greedy else k,
                    seed=seed, batch_size=batch_size, show_progress=show_progress,
                    logprobs=not greedy)  # only sampled answers are weighted by them
    judged: Judge = CachedJudge(judge, cache) if cache is not None else judge
    flat_p = [g.prompt for row in gens for g in row]
    flat_a = [g.answer for row in gens for g in row]
    flat_j = judged.judge(flat_p, flat_a)
    out: list[PromptScore] = []
    pos = 0
    for prompt, row in zip(prompts, gens, strict=True):
        js = flat_j[pos : pos + len(row)]
        pos += len(row)
        texts = [g.answer for g in row]
        if greedy:
            j = js[0]
            c = float(j.score) if j.parsed else 0.0
            sample = SampleScore(texts[0], 1.0, c, j)
            out.append(PromptScore(prompt, c, classify(c, threshold), (sample,)))
        else:
            out.append(aggregate(prompt, texts, [g.mean_logprob for g in row], js,
                                 signed=signed, threshold=threshold))
    return out


def judge_prompts(
    lm: LoadedModel,
    prompts: Sequence[str],
    judge: Judge,
    *,
    profile: Profile | None = None,
    max_new_tokens: int = 48,
    mode: str = "greedy",
    k: int = 5,
    cache: JudgementCache | None = None,
    seed: int = 0,
    batch_size: int = 16,
    show_progress: bool = False,
) -> list[Judged]:
    """Refusal confidence c(x) per prompt (paper A's protocol in `sample` mode, the judge's
    signed score on the greedy answer in `greedy` mode), with the first answer kept."""
    if not prompts:
        return []
    scores = score_prompts(lm, prompts, judge, k=k, max_new_tokens=max_new_tokens, mode=mode,
                           cache=cache, profile=profile, seed=seed, batch_size=batch_size,
                           show_progress=show_progress)
    tok = lm.tokenizer
    out = []
    for s in scores:
        first = s.samples[0]
        n_tokens = sum(len(tok(x.text, add_special_tokens=False)["input_ids"])
                       for x in s.samples)
        out.append(Judged(s.prompt, first.text, s.cls, float(s.c), s.style, n_tokens,
                          first.judgement.on_topic))
    return out


def refusal_rate(judged: Sequence[Judged]) -> float:
    """Fraction classified as refusal (c > 0.1)."""
    return sum(classify(j.confidence) == "refusal" for j in judged) / max(1, len(judged))


def answer_nlls(
    lm: LoadedModel,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    profile: Profile | None = None,
    batch_size: int = 8,
) -> list[tuple[float, int]]:
    """Per answer: negative log-likelihood given its prompt, and its token count ((0, 0)
    for an empty answer). Unsteered, a prompt's answers share one pass over the prompt."""
    if profile is None:
        return shared_prompt_nlls(lm, prompts, responses, batch_size=batch_size)
    return full_pass_nlls(lm, prompts, responses, profile=profile, batch_size=batch_size)


def full_pass_nlls(lm: LoadedModel, prompts: Sequence[str], responses: Sequence[str], *,
                   profile: Profile | None = None, batch_size: int = 8
                   ) -> list[tuple[float, int]]:
    """answer_nlls with one forward over prompt + answer per answer: a steering profile then
    acts on the prompt and the answer alike, in one prompt-phase pass."""
    tok = lm.tokenizer
    seqs: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids_p = tok(lm.format(p), add_special_tokens=False)["input_ids"]
        ids_r = tok(r, add_special_tokens=False)["input_ids"]
        if ids_r:
            seqs[i], starts[i] = ids_p + ids_r, len(ids_p)
    out = [(0.0, 0)] * len(prompts)
    keys = list(seqs)
    with steer(lm, profile), torch.inference_mode():
        for idx in length_sorted_batches([len(seqs[k]) for k in keys], batch_size):
            rows = [keys[i] for i in idx]
            batch = tok.pad({"input_ids": [seqs[k] for k in rows]}, return_tensors="pt")
            ids = batch["input_ids"].to(lm.device)
            # Rows are left-padded, so every answer ends the row: the last `keep` positions
            # hold every logit that predicts an answer token. Projecting only those onto the
            # vocabulary (not the prompt's) made it 1.10x faster on qwen 0.5B's held-out answers.
            keep = max(len(seqs[k]) - starts[k] for k in rows) + 1
            logits = lm.model(input_ids=ids,
                              attention_mask=batch["attention_mask"].to(lm.device),
                              use_cache=False, logits_to_keep=keep).logits[:, :-1].float()
            targets = ids[:, ids.shape[1] - keep + 1:, None]
            logp = logits.log_softmax(-1).gather(-1, targets)[..., 0]
            for row, k in enumerate(rows):
                n = len(seqs[k]) - starts[k]
                out[k] = (-float(logp[row, -n:].sum()), n)
    return out


def shared_prompt_nlls(lm: LoadedModel, prompts: Sequence[str], responses: Sequence[str], *,
                       batch_size: int = 8) -> list[tuple[float, int]]:
    """answer_nlls of the unsteered model, each prompt run once with its KV cache copied to
    every answer it has. A steer run's evaluate stage scores 3.3 answers per held-out
    prompt (unsteered, chosen, two baselines), and the formatted prompt (system prompt and
    chat template included) is most of each prompt + answer (bench/bench_nll.py)."""
    tok = lm.tokenizer
    by_prompt: dict[str, list[tuple[int, list[int]]]] = {}
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids_r = tok(r, add_special_tokens=False)["input_ids"]
        if ids_r:
            by_prompt.setdefault(p, []).append((i, ids_r))
    out = [(0.0, 0)] * len(prompts)
    order = list(by_prompt)
    encoded = [tok(lm.format(p), add_special_tokens=False)["input_ids"] for p in order]
    with torch.inference_mode():
        prefix = head_prefix(lm, encoded)  # the template's head, once (refusalkit.prefix)
        for group in _answer_groups([len(e) for e in encoded],
                                    [len(by_prompt[p]) for p in order], batch_size):
            rows = [(g, i, a) for g, k in enumerate(group) for i, a in by_prompt[order[k]]]
            scored = _score_group(lm, [encoded[k] for k in group], rows, prefix)
            for (_, i, _), nll in zip(rows, scored, strict=True):
                out[i] = nll
    return out


def _answer_groups(prompt_lengths: Sequence[int], n_answers: Sequence[int], rows: int
                   ) -> list[list[int]]:
    """Prompts grouped by length (longest first), each group holding at most `rows` answers
    (one prompt with more answers than that is a group of its own)."""
    groups: list[list[int]] = []
    count = 0
    for k in sorted(range(len(prompt_lengths)), key=lambda k: -prompt_lengths[k]):
        if not groups or count + n_answers[k] > rows:
            groups.append([])
            count = 0
        groups[-1].append(k)
        count += n_answers[k]
    return groups


def _score_group(lm: LoadedModel, prompts: list[list[int]],
                 rows: list[tuple[int, int, list[int]]], prefix: Prefix | None = None
                 ) -> list[tuple[float, int]]:
    """Prefill the prompts (left-padded, after their shared head if given), copy each one's
    cache to its answers, then one pass over the right-padded answers; (NLL, tokens) per row
    (prompt index, _, answer ids)."""
    dev, pad = lm.device, lm.tokenizer.pad_token_id or 0
    ids, mask, pos, past = after_prefix(prompts, prefix, pad, dev)
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                   use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float().log_softmax(-1)  # predicts each answer's first token
    sel = torch.tensor([g for g, _, _ in rows], device=dev)
    past = out.past_key_values
    past.reorder_cache(sel)  # index_select: a prompt's cache, once per answer
    longest = max(len(a) for _, _, a in rows)
    a_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    a_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, (_, _, a) in enumerate(rows):
        a_ids[r, :len(a)] = torch.tensor(a, dtype=torch.long)
        a_mask[r, :len(a)] = 1
    a_ids, a_mask = a_ids.to(dev), a_mask.to(dev)
    nll = -first[sel].gather(-1, a_ids[:, :1])[:, 0]
    if longest > 1:  # every answer token but the last predicts the next one
        n = longest - 1
        a_pos = pos[sel][:, -1:] + 1 + torch.arange(n, device=dev)[None]
        logits = lm.model(input_ids=a_ids[:, :n], position_ids=a_pos, past_key_values=past,
                          attention_mask=torch.cat([mask[sel], a_mask[:, :n]], -1),
                          use_cache=True).logits.float()
        logp = logits.log_softmax(-1).gather(-1, a_ids[:, 1:, None])[..., 0]
        nll = nll - (logp * a_mask[:, 1:]).sum(-1)
    return [(float(nll[r]), len(a)) for r, (_, _, a) in enumerate(rows)]


def fill_perplexities(lm: LoadedModel, judged: Sequence[Judged],
                      cache: dict[tuple[str, str], float | None], *, batch_size: int = 8
                      ) -> None:
    """Add the unsteered perplexity of every (prompt, answer) not yet in `cache`. Called once
    with every profile's answers, a prompt's answers share one pass over the prompt."""
    todo = list(dict.fromkeys((j.prompt, j.response) for j in judged
                              if (j.prompt, j.response) not in cache))
    if todo:
        nlls = answer_nlls(lm, [p for p, _ in todo], [r for _, r in todo],
                           batch_size=batch_size)
        cache.update(zip(todo, perplexities(nlls), strict=True))


def assess_answers(lm: LoadedModel, judged: Sequence[Judged], *, batch_size: int = 8,
                   cache: dict[tuple[str, str], float | None] | None = None
                   ) -> list[AnswerQuality]:
    """What each judged answer is worth (quality.assess), with its perplexity under `lm`
    unsteered. `cache` maps (prompt, answer) to perplexity across calls: a gated profile's
    closed rows repeat the unsteered answers, which are scored once."""
    cache = {} if cache is None else cache
    fill_perplexities(lm, judged, cache, batch_size=batch_size)
    return [assess(j.prompt, j.response, j.confidence, j.on_topic, cache[j.prompt, j.response])
            for j in judged]


def response_nll(
    lm: LoadedModel,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    profile: Profile | None = None,
    batch_size: int = 8,
) -> tuple[float, int]:
    """Total negative log-likelihood of the responses given their prompts, and token count."""
    per = answer_nlls(lm, prompts, responses, profile=profile, batch_size=batch_size)
    return sum(n for n, _ in per), sum(c for _, c in per)


def perplexity_ratio(lm: LoadedModel, prompts: Sequence[str], responses: Sequence[str],
                     profile: Profile, opened: torch.Tensor | None = None) -> float:
    """Perplexity of the unsteered model's own answers, steered over unsteered (1 = no cost).

    A gate decides on the last *prompt* token; scoring prompt + answer in one pass would let
    it read the answer instead. So the gate decides first, on the prompts alone (`opened`:
    its decisions, when the caller has them), and the open rows are scored with the gate
    lifted; a closed row's steered NLL is its unsteered one.
    """
    per = answer_nlls(lm, prompts, responses)
    base, n = sum(x for x, _ in per), sum(c for _, c in per)
    gate = gate_of(profile)
    if gate is None:
        steered, _ = response_nll(lm, prompts, responses, profile=profile)
        return math.exp((steered - base) / max(1, n))
    flags = (opened if opened is not None else gate_open(lm, gate, prompts)).tolist()
    rows = [i for i, o in enumerate(flags) if o]
    steered = sum(per[i][0] for i, o in enumerate(flags) if not o)
    if rows:
        steered += response_nll(lm, [prompts[i] for i in rows], [responses[i] for i in rows],
                                profile=lift_gate(profile))[0]
    return math.exp((steered - base) / max(1, n))
