"""Residual-stream capture at chosen layers and token positions.

"Layer l" means resid_pre of decoder layer l (the input of layer l); layer index
`n_layers` means the output of the last layer (before the final norm). Prompts are batched
with left padding in length-sorted order, so position -1 is the last prompt token (the one
that emits the first answer token) in every row and padding is minimal. The forward pass is
cut off right after the deepest requested layer: nobody pays for layers nobody reads. The
template's head that every prompt starts with (a system prompt) runs once per call, before
the batches (refusalkit.prefix).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from refusalkit.errors import UserError
from refusalkit.models import LoadedModel
from refusalkit.prefix import Prefix, after_prefix, prefix_length, run_prefix
from refusalkit.progress import bar
from refusalkit.runs import umask_mode

MEAN_POST = "mean_post"  # mean over the post-instruction template tokens
MEAN_ALL = "mean_all"  # mean over every (non-padding) token of the formatted prompt
MEAN_USER = "mean_user"  # mean over the user's own tokens (template and system prompt left out)
Position = int | str


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass early; never escapes `capture`."""


def post_instruction_length(lm: LoadedModel) -> int:
    """How many template tokens follow the user's instruction (e.g. 5 for Qwen's
    `<|im_end|>\\n<|im_start|>assistant\\n`)."""
    return max(1, template_lengths(lm)[1])


def template_lengths(lm: LoadedModel) -> tuple[int, int]:
    """(tokens before, tokens after) the user's text in the formatted prompt: the system
    prompt and template a user-token mean leaves out."""
    marker = "XQZ_MARKER_QZX"
    before, after = lm.format(marker).split(marker, 1)
    n_before, n_after = (len(lm.tokenizer(part, add_special_tokens=False)["input_ids"])
                         for part in (before, after))
    return n_before, n_after


def shared_head(lm: LoadedModel, encoded: Sequence[Sequence[int]]) -> int:
    """How many leading tokens of these formatted prompts run once for all of them
    (refusalkit.prefix): at most the template's head, leaving each prompt its user text and
    the template's tail."""
    before, after = template_lengths(lm)
    return prefix_length(lm, encoded, before, max(1, after) + 1)


def head_prefix(lm: LoadedModel, encoded: Sequence[Sequence[int]]) -> Prefix | None:
    """The shared head of these prompts run once, under whatever hooks are attached; None
    when nothing is shared (refusalkit.prefix.prefix_length says when)."""
    shared = shared_head(lm, encoded)
    return run_prefix(lm, encoded[0][:shared]) if shared else None


def user_mask(mask: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """[batch, seq] mask of the user's tokens from the attention mask (either padding side):
    the non-padding tokens past the first `before` and short of the last `after`. A prompt
    with no user token keeps all its tokens (nothing else to read)."""
    m = mask.to(torch.long)
    seen = m.cumsum(1)
    total = m.sum(1, keepdim=True)
    keep = (m > 0) & (seen > before) & (seen <= total - after)
    empty = ~keep.any(1, keepdim=True)
    return torch.where(empty, m > 0, keep).to(mask.dtype)


def _validate_positions(lm: LoadedModel, positions: Sequence[Position]) -> None:
    n_post = post_instruction_length(lm)
    for p in positions:
        if p in (MEAN_POST, MEAN_ALL, MEAN_USER):
            continue
        if not isinstance(p, int) or p >= 0:
            raise UserError(
                f"position {p!r} is not supported; use a negative offset from the end of the "
                f"prompt (-1 = last prompt token, -{n_post}..-1 are template tokens), "
                f"'{MEAN_POST}', '{MEAN_ALL}' or '{MEAN_USER}'"
            )


def left_padded(prompts: Sequence[Sequence[int]], pad: int, device: torch.device | str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-id prompts as one left-padded batch (every prompt ends at the last column, so
    the next token goes to position -1 in every row): ids, attention mask and position ids
    that count from each prompt's first real token."""
    ids, mask, pos, _ = after_prefix(prompts, None, pad, device)
    return ids, mask, pos


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, longest first (peak memory early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def masked_mean(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of [batch, seq, d] states over the positions a [batch, seq] mask keeps, float32
    (summed in float64: long prompts, big activations)."""
    if mask is None:
        return h.double().mean(dim=1).float()
    m = mask[:, -h.shape[1]:].to(torch.float64)[..., None]
    return ((h.double() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)).float()


def _hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def capture(
    lm: LoadedModel,
    prompts: Sequence[str],
    layers: Sequence[int],
    positions: Sequence[Position] = (-1,),
    *,
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
    formatted: bool = False,
    share_prefix: bool = True,
) -> torch.Tensor:
    """Activations as a float32 tensor [n_prompts, len(layers), len(positions), hidden].

    Prompts are wrapped in the chat template unless `formatted` is True. The tokens every
    prompt starts with run once (refusalkit.prefix; `share_prefix=False` runs every prompt
    whole). With `cache_dir`,
    the result is stored under a key of model fingerprint, formatted texts, layers and
    positions, so a second identical extraction is a file read.
    """
    if not prompts:
        raise UserError("no prompts to extract activations from")
    layers = list(layers)
    lm.arch.check_layers(layers, allow_final=True)
    _validate_positions(lm, positions)
    texts = list(prompts) if formatted else [lm.format(p) for p in prompts]
    cache_file = None
    if cache_dir is not None:
        key = _cache_key(lm, texts, layers, positions)
        cache_file = Path(cache_dir) / f"acts-{key}.safetensors"
        if cache_file.is_file():
            return load_file(str(cache_file))["activations"]

    tok = lm.tokenizer
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = torch.empty(len(texts), len(layers), len(positions), lm.hidden_size, dtype=torch.float32)
    slot = {layer: i for i, layer in enumerate(layers)}
    current: dict[int, torch.Tensor] = {}
    pad_mask: dict[str, torch.Tensor] = {}
    template = template_lengths(lm)
    n_post = max(1, template[1])
    # The template's head, shared by every prompt, runs once (refusalkit.prefix); its
    # states' sums per layer complete a whole-prompt mean.
    shared = shared_head(lm, encoded) if share_prefix else 0
    head_sums: dict[int, torch.Tensor] = {}
    prefix = None
    if shared:
        with _stop_after(lm, layers, lambda h, _layer: h.double().sum(1), head_sums), \
                torch.inference_mode():
            prefix = run_prefix(lm, encoded[0][:shared], _StopForward)
    select = _selector(positions, n_post, pad_mask, template, head_sums, shared)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with _stop_after(lm, layers, select, current), \
            bar("activations", len(texts), show_progress) as progress, torch.inference_mode():
        for idx in length_sorted_batches([len(e) for e in encoded], batch_size):
            current.clear()
            try:
                if prefix is None:
                    batch = tok.pad({"input_ids": [encoded[i] for i in idx]},
                                    return_tensors="pt")
                    pad_mask["mask"] = batch["attention_mask"].to(lm.device)
                    lm.model(input_ids=batch["input_ids"].to(lm.device),
                             attention_mask=pad_mask["mask"], use_cache=False)
                else:
                    ids, mask, pos, past = after_prefix([encoded[i] for i in idx], prefix,
                                                        pad, lm.device)
                    pad_mask["mask"] = mask[:, shared:]
                    lm.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             past_key_values=past, use_cache=True)
            except _StopForward:
                pass
            for layer, acts in current.items():
                out[idx, slot[layer]] = acts.cpu()
            progress.advance(len(idx))
    if cache_file is not None:
        _save_cache(cache_file, out)
    return out


def _selector(positions: Sequence[Position], n_post: int,
              pad_mask: dict[str, torch.Tensor], template: tuple[int, int],
              head_sums: dict[int, torch.Tensor], shared: int
              ) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """[batch, seq, d] states of one layer -> [batch, len(positions), d] float32 at the
    positions. With a shared head of `shared` tokens run apart (its per-layer state sums in
    `head_sums`), the states and mask cover the rest of each prompt only."""
    def select(h: torch.Tensor, layer: int) -> torch.Tensor:
        cols = []
        for p in positions:
            if p == MEAN_POST:
                cols.append(h[:, -n_post:].float().mean(dim=1))
            elif p == MEAN_ALL and shared:
                m = pad_mask["mask"][:, -h.shape[1]:].to(torch.float64)[..., None]
                total = head_sums[layer].to(h.device) + (h.double() * m).sum(dim=1)
                cols.append((total / (shared + m.sum(dim=1))).float())
            elif p == MEAN_ALL:
                cols.append(masked_mean(h, pad_mask["mask"]))
            elif p == MEAN_USER:
                cols.append(masked_mean(h, user_mask(pad_mask["mask"], template[0] - shared,
                                                     template[1])))
            else:
                cols.append(h[:, p].float())
        return torch.stack(cols, dim=1)

    return select


@contextmanager
def _stop_after(lm: LoadedModel, layers: Sequence[int],
                select: Callable[[torch.Tensor, int], torch.Tensor],
                current: dict[int, torch.Tensor]) -> Iterator[None]:
    """Hooks that store each layer's selected input in `current` and stop the forward pass
    after the deepest one (layer n_layers: the final output); always removed."""
    n_layers, deepest = lm.n_layers, max(layers)

    def make_pre_hook(layer: int):
        def hook(_module, args, kwargs):
            current[layer] = select(_hidden_from(args, kwargs), layer)
            if layer == deepest:
                raise _StopForward

        return hook

    def final_hook(_module, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        current[n_layers] = select(h, n_layers)
        raise _StopForward

    handles = []
    try:
        for layer in layers:
            if layer < n_layers:
                handles.append(lm.arch.layers[layer].register_forward_pre_hook(
                    make_pre_hook(layer), with_kwargs=True))
        if n_layers in layers:
            handles.append(lm.arch.layers[n_layers - 1].register_forward_hook(final_hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _save_cache(cache_file: Path, out: torch.Tensor) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    save_file({"activations": out.contiguous()}, str(tmp))
    umask_mode(tmp)
    tmp.replace(cache_file)


def _cache_key(lm: LoadedModel, texts: Sequence[str], layers: Sequence[int], positions) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([lm.fingerprint, list(layers), [str(p) for p in positions]]).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:32]
