"""One forward pass over the tokens every prompt of a call starts with.

A chat template puts the same head before every user turn: Qwen's default system prompt and
the user turn's opening are 24 of the 42 tokens of an average formatted deccp question. Every
prompt pass (activation capture, gate decisions, next-token log-probs, the prefill of greedy
answers and of perplexity scoring) recomputed them per row. Here they run once per call, and
each batch starts from a copy of their keys and values (bench/bench_prefix.py measures it).

A batch is laid out [shared head | left padding | rest of each prompt]: the padding sits
between head and rest, masked out, and position ids continue from the head, so each row
computes what it computes alone. Two cases keep the plain layout (`prefix_length` says 0):
sliding-window attention counts its window in cache slots, which the padding would eat into;
and a gate's hook on the model, whose decision reads the whole prompt and says, row by row,
whether the layers it steers change the head's states too. A steering profile without a gate
acts on the head the same way in every row, so the head's pass runs under it like any other.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from refusalkit.models import LoadedModel

MIN_SHARED = 4  # fewer tokens than this are not worth a pass of their own


def full_attention(lm: LoadedModel) -> bool:
    """Whether every layer attends to the whole prefix (no sliding window, no recurrent
    state): only then is a row's result independent of the padding's place."""
    cfg = lm.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return not (getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True))


def gate_attached(lm: LoadedModel) -> bool:
    """Whether a topic gate's hook is on the model (by whoever attached it: a caller may
    generate inside its own `steer` block). Its decision differs per row and reads the
    whole prompt, so no head can be shared under it."""
    return any(getattr(hook, "refusalkit_gate", False)
               for layer in lm.arch.layers for hook in layer._forward_pre_hooks.values())


def prefix_length(lm: LoadedModel, rows: Sequence[Sequence[int]], head: int, keep: int) -> int:
    """How many leading tokens every row shares, at most `head` (the template's tokens
    before the user's text, so user-token means stay in the rest) and leaving each row at
    least `keep` tokens (a rest of one token would read as a decoding step to a hook); 0
    when sharing does not apply (sliding windows, a gate attached) or is not worth it."""
    if len(rows) < 2 or not full_attention(lm) or gate_attached(lm):
        return 0
    cap = min(head, min(len(r) for r in rows) - keep)
    first, n = rows[0], 0
    while n < cap and all(r[n] == first[n] for r in rows):
        n += 1
    return n if n >= MIN_SHARED else 0


@dataclass
class Prefix:
    """The shared head's keys and values (batch of one) and its length."""

    length: int
    cache: DynamicCache

    def for_rows(self, n: int) -> DynamicCache:
        """A fresh cache holding the head once per row (a forward appends to its cache)."""
        out = copy.deepcopy(self.cache)
        out.batch_repeat_interleave(n)
        return out


def run_prefix(lm: LoadedModel, ids: Sequence[int],
               stop: type[BaseException] | tuple[type[BaseException], ...] = ()) -> Prefix:
    """The head's forward pass, under whatever hooks are attached. A hook may end it early
    by raising `stop` (activation capture stops after its deepest layer): the layers that
    ran are kept, and the rest's pass stops at the same place."""
    cache = DynamicCache(config=lm.model.config)
    try:
        lm.model(input_ids=torch.tensor([list(ids)], device=lm.device),
                 position_ids=torch.arange(len(ids), device=lm.device)[None],
                 past_key_values=cache, use_cache=True, logits_to_keep=1)
    except stop:
        pass
    return Prefix(len(ids), cache)


def after_prefix(rows: Sequence[Sequence[int]], prefix: Prefix | None, pad: int,
                 device: torch.device | str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache | None]:
    """The rows past the head, left-padded: ids, the attention mask over head and rest,
    position ids continuing from the head, and the head's cache for these rows. Without a
    prefix: the plain left-padded batch and no cache."""
    n = prefix.length if prefix is not None else 0
    width = max(len(r) - n for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n + width), dtype=torch.long)
    mask[:, :n] = 1
    for i, r in enumerate(rows):
        rest = list(r[n:])
        ids[i, width - len(rest):] = torch.tensor(rest, dtype=torch.long)
        mask[i, n + width - len(rest):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, n:]
    return ids, mask, pos, prefix.for_rows(len(rows)) if prefix is not None else None
