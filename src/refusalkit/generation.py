"""Batched generation with an optional steering profile, returning text and token log-probs.

Log-probabilities are those of the sampled tokens under the model's raw next-token
distribution (temperature 1 = the sampling distribution itself, before any top-p cut), which
is what paper A's answer weights need.

Greedy answers come from our own decoding loop (greedy_rows), which drops a row from the
batch as soon as it ends; sampled ones, and greedy ones under a generation config whose
logit processors that loop does not apply, come from `model.generate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from refusalkit.activations import head_prefix, length_sorted_batches
from refusalkit.errors import UserError
from refusalkit.interventions import Profile, Steering, steer
from refusalkit.models import LoadedModel, strip_thinking
from refusalkit.prefix import Prefix, after_prefix
from refusalkit.progress import bar


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finished: bool  # ended with an end-of-sequence token rather than the length limit

    @property
    def answer(self) -> str:
        """The text with any reasoning-model thinking removed (what a judge should read)."""
        return strip_thinking(self.text)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


def eos_ids(lm: LoadedModel) -> set[int]:
    """Every token id that ends an answer (generation config and tokenizer)."""
    eos = lm.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return ids


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    profile: Profile | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    show_progress: bool = True,
    formatted: bool = False,
    logprobs: bool = True,
) -> list[list[Generation]]:
    """Generate `num_samples` answers per prompt; result[i][k] is sample k of prompt i.

    temperature 0 is greedy decoding (then one sample is returned per prompt). Sampling is
    seeded per batch so results do not depend on what ran before. `logprobs=False` skips the
    chosen tokens' log-probs (each step's full-vocabulary logits kept and normalised), which
    greedy judging never reads.
    """
    if not prompts:
        raise UserError("no prompts to generate from")
    if max_new_tokens < 1:
        raise UserError("max_new_tokens must be at least 1")
    greedy = temperature <= 0
    k = 1 if greedy else num_samples
    texts = list(prompts) if formatted else [lm.format(p) for p in prompts]
    tok = lm.tokenizer
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = eos_ids(lm)
    results: list[list[Generation]] = [[] for _ in prompts]
    # Samples share a prompt's batch, so shrink the prompt batch to keep rows bounded.
    per_batch = max(1, batch_size // k)
    plain, min_new = plain_greedy(lm.model.generation_config)
    with bar("generate", len(prompts), show_progress) as progress, \
            steer(lm, profile) as steering:
        with torch.inference_mode():  # the template's head, once for every batch
            prefix = head_prefix(lm, encoded) if greedy and plain else None
        for idx in length_sorted_batches([len(e) for e in encoded], per_batch):
            if greedy and plain:
                for i, (ids, lps, done) in zip(idx, greedy_rows(
                        steering, [encoded[i] for i in idx], max_new_tokens, eos, logprobs,
                        min_new, prefix), strict=True):
                    results[i].append(Generation(
                        prompt=prompts[i], text=tok.decode(ids, skip_special_tokens=True),
                        token_ids=tuple(ids), logprobs=tuple(lps), finished=done))
                progress.advance(len(idx))
                continue
            batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            input_ids = batch["input_ids"].to(lm.device)
            if not greedy:
                torch.manual_seed(seed + idx[0])
            with torch.inference_mode():
                out = lm.model.generate(
                    input_ids=input_ids,
                    attention_mask=batch["attention_mask"].to(lm.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=not greedy,
                    temperature=temperature if not greedy else None,
                    top_p=top_p if not greedy else None,
                    top_k=None,
                    num_return_sequences=k,
                    pad_token_id=tok.pad_token_id,
                    return_dict_in_generate=True,
                    output_logits=logprobs,
                )
            _collect(results, out, input_ids.shape[1], idx, k, prompts, tok, eos, logprobs)
            progress.advance(len(idx))
    return results


# Generation-config fields that change which token greedy decoding picks. Our own loop
# (greedy_rows) applies none of them but min_new_tokens, so a model whose config sets one
# (a hub model's repetition_penalty, say) is decoded by model.generate as before.
_PROCESSORS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
               "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length", "suppress_tokens",
               "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
               "sequence_bias", "exponential_decay_length_penalty", "guidance_scale",
               "watermarking_config", "force_words_ids", "constraints", "num_beams",
               "penalty_alpha", "low_memory", "prompt_lookup_num_tokens", "assistant_model")


def plain_greedy(config: Any) -> tuple[bool, int]:
    """Whether greedy_rows decodes exactly as model.generate would under this generation
    config, and the config's min_new_tokens (the one processor it applies)."""
    default = GenerationConfig()
    plain = all(getattr(config, f, None) == getattr(default, f, None) for f in _PROCESSORS)
    return plain, int(getattr(config, "min_new_tokens", None) or 0)


@torch.inference_mode()
def greedy_rows(steering: Steering, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                eos: set[int], logprobs: bool = True, min_new_tokens: int = 0,
                prefix: Prefix | None = None) -> list[tuple[list[int], list[float], bool]]:
    """Greedy decoding of one batch of token-id prompts: (answer ids without the end token,
    their log-probs, whether an end token came) per row.

    A row that has ended leaves the batch and the KV cache at once. `model.generate` keeps
    it in every step until the longest answer is done; in a batch that mixes short refusals
    with 40-token answers many of those row-steps decode padding (bench/bench_greedy.py
    measures the difference). A gate keeps the decisions it took on the remaining rows'
    prompts (Steering.keep_rows). With `prefix`, the head every prompt starts with is not
    run again (refusalkit.prefix)."""
    lm = steering.lm
    dev = lm.device
    ids, mask, pos, past = after_prefix(prompts, prefix, lm.tokenizer.pad_token_id or 0, dev)
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                   use_cache=True, logits_to_keep=1)
    answer: list[list[int]] = [[] for _ in prompts]
    logp: list[list[float]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    live = list(range(len(prompts)))
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        pick = logits
        if step < min_new_tokens:  # as model.generate's min_new_tokens: no end token yet
            pick = logits.clone()
            pick[:, sorted(eos)] = -math.inf
        nxt = pick.argmax(-1)
        lp = (logits.log_softmax(-1).gather(-1, nxt[:, None])[:, 0].tolist() if logprobs
              else None)
        keep = []
        for j, (r, t) in enumerate(zip(live, nxt.tolist(), strict=True)):
            if t in eos:
                ended[r] = True
                continue
            answer[r].append(t)
            if lp is not None:
                logp[r].append(lp[j])
            keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        past = out.past_key_values
        if len(keep) < len(live):
            sel = torch.tensor(keep, device=dev)
            past.reorder_cache(sel)
            steering.keep_rows(sel)
            mask, pos, nxt = mask[sel], pos[sel], nxt[sel]
            live = [live[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=-1)
        pos = pos[:, -1:] + 1
        out = lm.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                       past_key_values=past, use_cache=True)
    return list(zip(answer, logp, ended, strict=True))


def _collect(results: list[list[Generation]], out: Any, prompt_len: int, idx: list[int], k: int,
             prompts: Sequence[str], tok: Any, eos: set[int], logprobs: bool) -> None:
    """Append each generated row (cut at the first end token) to its prompt's samples."""
    new = out.sequences[:, prompt_len:]
    chosen = (torch.stack(out.logits, dim=1).float().log_softmax(-1)
              .gather(-1, new[..., None])[..., 0] if logprobs else None)
    for row in range(new.shape[0]):
        ids = new[row].tolist()
        end = next((j for j, t in enumerate(ids) if t in eos), None)
        n = len(ids) if end is None else end
        prompt_i = idx[row // k]
        results[prompt_i].append(Generation(
            prompt=prompts[prompt_i],
            text=tok.decode(ids[:n], skip_special_tokens=True),
            token_ids=tuple(ids[:n]),
            logprobs=() if chosen is None else tuple(chosen[row, :n].tolist()),
            finished=end is not None,
        ))


def generate_text(lm: LoadedModel, prompts: Sequence[str], **kwargs: object) -> list[str]:
    """Greedy (by default) single answers as plain strings."""
    return [g[0].text for g in generate(lm, prompts, **kwargs)]  # type: ignore[arg-type]
