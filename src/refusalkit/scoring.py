"""Signals that need no generation: first-token refusal log-odds and next-token KL.

Both read only the last prompt position's next-token distribution, one forward pass per
batch, so they are the cheap proxies used to filter prompts by behaviour and prune searches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refusalkit.activations import head_prefix, length_sorted_batches
from refusalkit.interventions import Profile, steer
from refusalkit.models import LoadedModel
from refusalkit.prefix import after_prefix
from refusalkit.progress import bar

# First tokens of typical refusal openings (Arditi et al. use "I" / "As" for Qwen).
REFUSAL_STARTS = ("I", "As", "Sorry", "Unfortunately", "我", "抱歉", "对不起")


def refusal_token_ids(lm: LoadedModel, starts: Sequence[str] = REFUSAL_STARTS) -> list[int]:
    """The first token id of each refusal opening, deduplicated."""
    ids: list[int] = []
    for s in starts:
        toks = lm.tokenizer(s, add_special_tokens=False)["input_ids"]
        if toks and toks[0] not in ids:
            ids.append(toks[0])
    return ids


def last_logprobs(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    profile: Profile | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
    formatted: bool = False,
) -> torch.Tensor:
    """log p(next token | prompt) at the last prompt position, float32 [n, vocab]."""
    texts = list(prompts) if formatted else [lm.format(p) for p in prompts]
    tok = lm.tokenizer
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    out: torch.Tensor | None = None
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with bar("next-token", len(texts), show_progress) as progress, \
            steer(lm, profile), torch.inference_mode():
        # the template's head runs once under the hooks (not with a gate: refusalkit.prefix)
        prefix = head_prefix(lm, encoded)
        for idx in length_sorted_batches([len(e) for e in encoded], batch_size):
            if prefix is None:
                batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
                logits = lm.model(
                    input_ids=batch["input_ids"].to(lm.device),
                    attention_mask=batch["attention_mask"].to(lm.device),
                    use_cache=False,
                    logits_to_keep=1,
                ).logits[:, -1]
            else:
                ids, mask, pos, past = after_prefix([encoded[i] for i in idx], prefix, pad,
                                                    lm.device)
                logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                  past_key_values=past, use_cache=True,
                                  logits_to_keep=1).logits[:, -1]
            logp = logits.float().log_softmax(-1).cpu()
            if out is None:
                out = torch.empty(len(texts), logp.shape[-1])
            out[idx] = logp
            progress.advance(len(idx))
    assert out is not None
    return out


def refusal_log_odds(logp: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """log p(R) − log(1 − p(R)) computed stably as logsumexp(R) − logsumexp(not R)."""
    mask = torch.zeros(logp.shape[-1], dtype=torch.bool)
    mask[list(token_ids)] = True
    lse_r = torch.logsumexp(logp[:, mask].double(), -1)
    lse_not = torch.logsumexp(logp[:, ~mask].double(), -1)
    return (lse_r - lse_not).float()


def refusal_score(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    profile: Profile | None = None,
    token_ids: Sequence[int] | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
) -> torch.Tensor:
    """First-token refusal log-odds per prompt (> 0: a refusal opening is more likely)."""
    ids = token_ids if token_ids is not None else refusal_token_ids(lm)
    logp = last_logprobs(lm, prompts, profile=profile, batch_size=batch_size,
                         show_progress=show_progress)
    return refusal_log_odds(logp, ids)


def kl_divergence(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ other) per row from two [n, vocab] log-prob tensors."""
    b, o = base.double(), other.double()
    return (b.exp() * (b - o)).sum(-1).float()


def next_token_kl(
    lm: LoadedModel,
    prompts: Sequence[str],
    profile: Profile,
    *,
    base: torch.Tensor | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Per-prompt KL of the steered next-token distribution from the unsteered one.

    Pass `base` (from `last_logprobs` without a profile) to reuse it across many profiles.
    """
    if base is None:
        base = last_logprobs(lm, prompts, batch_size=batch_size)
    steered = last_logprobs(lm, prompts, profile=profile, batch_size=batch_size)
    return kl_divergence(base, steered)


def answer_logprobs(
    lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], *,
    max_answer_tokens: int = 96, batch_size: int = 16,
) -> list[torch.Tensor]:
    """Per-token log-probs (float32) of each answer's first tokens given its chat-formatted
    prompt, by teacher forcing: how fluent an answer is to an unsteered model (its perplexity
    is exp(−mean)). Batches are right-padded; only answer positions are read."""
    tok = lm.tokenizer
    ids = []
    for p, a in zip(prompts, answers, strict=True):
        head = tok(lm.format(p), add_special_tokens=False)["input_ids"]
        body = tok(a, add_special_tokens=False)["input_ids"][:max_answer_tokens]
        ids.append((head, body))
    out: list[torch.Tensor] = [torch.empty(0)] * len(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for idx in length_sorted_batches([len(h) + len(b) for h, b in ids], batch_size):
        width = max(len(ids[i][0]) + len(ids[i][1]) for i in idx)
        x = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = ids[i][0] + ids[i][1]
            x[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.inference_mode():
            # the decoder's states, then the output head only at answer positions: the head
            # over every prompt position and the whole vocabulary would cost more than the
            # rest of the forward (smollm2: 49k × 576 per position)
            hidden = lm.model.get_decoder()(input_ids=x.to(lm.device),
                                            attention_mask=mask.to(lm.device)).last_hidden_state
            head = lm.model.get_output_embeddings()
            for row, i in enumerate(idx):
                h, b = len(ids[i][0]), len(ids[i][1])
                lp = head(hidden[row, h - 1 : h + b - 1]).float().log_softmax(-1).cpu()
                out[i] = lp[torch.arange(b), torch.tensor(ids[i][1], dtype=torch.long)]
    return out
