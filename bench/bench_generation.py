"""Steered generation: tokens/s with a multi-layer addition profile vs unsteered and vs
steering-vectors' hooks carrying the same vectors.

    python bench/bench_generation.py [--model qwen2.5-coder-0.5b] [--n 32] [--tokens 32]
        [--steer-layers 6] [--repeats 3] [--quick] [--md out.md] [--json out.json]

All three variants call `refusalkit.generation.generate` (greedy, same prompts, batches and
lengths); they differ only in the hooks attached:

- unsteered: no hooks;
- refusalkit: `generate(profile=...)`, an `add` operator on 6 consecutive layers (input of
  layer l);
- steering-vectors: `SteeringVector(layer_activations={l - 1: s_l·v_l},
  layer_type="decoder_block").apply(model)` — the output of block l − 1 is the input of
  layer l, so this is the same intervention.

The end-of-sequence token is suppressed (`min_new_tokens` = `--tokens` on the model's
generation config) so every variant generates exactly n × tokens tokens, whatever the
steering does to the answers. The steered outputs of refusalkit and steering-vectors are
checked to be token-identical. The vectors are mean differences harmful − harmless at each
layer, subtracted at a quarter of their norm, so the steering visibly changes the text.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from bench_activations import bench_prompts
from common import emit, interleaved, load_note, md_table, say

from refusalkit.activations import capture
from refusalkit.generation import generate
from refusalkit.interventions import Profile, addition
from refusalkit.models import LoadedModel, load_model
from refusalkit.prompts import load_prompts


@contextmanager
def exact_length(lm: LoadedModel, tokens: int) -> Iterator[None]:
    """Suppress EOS for the first `tokens` tokens so every run does the same work."""
    cfg = lm.model.generation_config
    old = cfg.min_new_tokens
    cfg.min_new_tokens = tokens
    try:
        yield
    finally:
        cfg.min_new_tokens = old


def steering_profile(lm: LoadedModel, n_layers: int, n_fit: int = 16) -> Profile:
    """Subtract a quarter of the harmful − harmless mean difference on n_layers consecutive
    layers starting a quarter of the way down."""
    start = max(1, lm.n_layers // 4)
    layers = list(range(start, min(lm.n_layers, start + n_layers)))
    harmful = load_prompts("harmful_train").take(n_fit, seed=7).prompts
    harmless = load_prompts("harmless_train").take(n_fit, seed=7).prompts
    a = capture(lm, harmful, layers, show_progress=False)[:, :, 0].mean(0)
    b = capture(lm, harmless, layers, show_progress=False)[:, :, 0].mean(0)
    md = a - b
    vectors = {layer: md[i] / md[i].norm() for i, layer in enumerate(layers)}
    strengths = {layer: -0.25 * float(md[i].norm()) for i, layer in enumerate(layers)}
    return Profile((addition(vectors, strengths),))


def peer_vector(profile: Profile):
    """The same additions as a steering-vectors SteeringVector (block index = layer − 1)."""
    from steering_vectors import SteeringVector

    op = profile.ops[0]
    acts = {layer - 1: op.strength(layer) * profile.scale * vec
            for layer, vec in op.vectors.items()}
    return SteeringVector(layer_activations=acts, layer_type="decoder_block")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steer-layers", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="8 prompts, 8 tokens, 2 repeats")
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n, args.tokens, args.repeats = min(args.n, 8), min(args.tokens, 8), 2

    lm = load_model(args.model)
    profile = steering_profile(lm, args.steer_layers)
    sv = peer_vector(profile)
    prompts = bench_prompts(args.n, seed=3)
    kw = {"max_new_tokens": args.tokens, "batch_size": args.batch_size, "show_progress": False}

    def unsteered():
        return generate(lm, prompts, **kw)

    def ours():
        return generate(lm, prompts, profile=profile, **kw)

    def theirs():
        with sv.apply(lm.model):
            return generate(lm, prompts, **kw)

    fns = {"unsteered": unsteered, "refusalkit": ours, "steering_vectors": theirs}
    say(f"generation: {args.model}, {args.n} prompts × {args.tokens} tokens, "
        f"steered layers {profile.layers}")
    with exact_length(lm, args.tokens):
        t = interleaved(fns, args.repeats, log=say)

    def ids(name: str) -> list[tuple[int, ...]]:
        return [g[0].token_ids for g in t.results[name]]

    n_tokens = sum(len(x) for x in ids("refusalkit"))
    identical = ids("refusalkit") == ids("steering_vectors")
    changed = sum(a != b for a, b in zip(ids("refusalkit"), ids("unsteered"), strict=True))
    if not identical:
        raise SystemExit("refusalkit and steering-vectors generated different tokens")
    tps = {n: n_tokens / t.median(n) for n in fns}
    ratios = {
        "refusalkit steered / unsteered (target ≥ 0.95)": tps["refusalkit"] / tps["unsteered"],
        "refusalkit / steering-vectors": tps["refusalkit"] / tps["steering_vectors"],
        "steering-vectors / unsteered": tps["steering_vectors"] / tps["unsteered"],
    }
    rows = [(n.replace("_", " "), t.median(n), t.spread(n), tps[n]) for n in fns]
    md = "\n".join([
        "## Steered generation",
        "",
        f"{args.model}, {args.n} prompts × {args.tokens} new tokens (EOS suppressed, so "
        f"{n_tokens} tokens per run), greedy, batch {args.batch_size}, addition on "
        f"{len(profile.layers)} layers {profile.layers}, {args.repeats} interleaved repeats, "
        f"{load_note()}.",
        "",
        md_table(["variant", "median s", "range s", "tokens/s"], rows),
        "",
        md_table(["ratio", "value"], [(k, r) for k, r in ratios.items()]),
        "",
        f"refusalkit and steering-vectors outputs token-identical: {identical}; the steering "
        f"changed {changed}/{args.n} answers relative to unsteered.",
    ])
    emit(md, args.md, {"model": args.model, "n": args.n, "tokens": args.tokens,
                       "layers": profile.layers, "seconds": t.seconds, "tokens_per_s": tps,
                       "ratios": ratios, "identical": identical, "changed": changed},
         args.json)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
