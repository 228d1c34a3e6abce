"""Activation capture: refusalkit vs a bare forward pass, a truncated one, and two peers.

    python bench/bench_activations.py [--model qwen2.5-coder-0.5b] [--n 256] [--repeats 3]
        [--batch-size 16] [--quick] [--md out.md] [--json out.json]

Half harmless_train, half harmful_train prompts (seeded draw), chat-formatted; 4 layers evenly
spaced up to two thirds of the depth; last prompt token. Variants, all on the same
length-sorted, left-padded batches of the same formatted texts:

- refusalkit: `refusalkit.activations.capture`.
- bare full: `model(input_ids, attention_mask)` over the whole model, nothing recorded.
- bare truncated: the same, ended by a hook at the input of the deepest requested layer —
  the least work any tool can do to read that layer (the practical limit).
- steering-vectors: `record_activations(model, "decoder_block", layer_nums=...)` around a full
  forward, as its users call it (decoder-block output l = our resid_pre l + 1), last token
  taken from each batch's recording.
- repeng: `repeng.extract.batched_get_hiddens` (full forward with output_hidden_states;
  hidden layer l = our resid_pre l + 1).

The peers get the prompts already in our length-sorted order, which only helps them (it
minimises their padding). The three recording variants are checked to return the same
activations (allclose, on the outputs of the timed runs themselves) so the
comparison is like for like.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from common import emit, interleaved, load_note, md_table, median, say

from refusalkit.activations import capture, length_sorted_batches
from refusalkit.models import LoadedModel, load_model
from refusalkit.prompts import load_prompts


def bench_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts, half harmless_train and half harmful_train (seeded)."""
    half = n // 2
    return (load_prompts("harmless_train").take(n - half, seed=seed).prompts
            + load_prompts("harmful_train").take(half, seed=seed).prompts)


def default_layers(n_layers: int, k: int = 4) -> list[int]:
    """k layers evenly spaced up to two thirds of the depth (resid_pre indices)."""
    deepest = round(2 * n_layers / 3)
    return sorted({max(1, round(deepest * (i + 1) / k)) for i in range(k)})


class _Stop(Exception):
    pass


class Variants:
    """The five ways to get the activations, sharing one tokenisation and batch order."""

    def __init__(self, lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int],
                 batch_size: int) -> None:
        self.lm, self.layers, self.bs = lm, list(layers), batch_size
        self.texts = [lm.format(p) for p in prompts]
        tok = lm.tokenizer
        self.encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in self.texts]
        self.batches = list(length_sorted_batches([len(e) for e in self.encoded], batch_size))
        self.order = [i for b in self.batches for i in b]
        self.n_tokens = sum(len(e) for e in self.encoded)

    def _padded(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return self.lm.tokenizer.pad({"input_ids": [self.encoded[i] for i in idx]},
                                     return_tensors="pt")

    def refusalkit(self) -> torch.Tensor:
        return capture(self.lm, self.texts, self.layers, batch_size=self.bs,
                       show_progress=False, formatted=True)[:, :, 0]

    def bare_full(self) -> None:
        with torch.inference_mode():
            for idx in self.batches:
                b = self._padded(idx)
                self.lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                              use_cache=False)

    def bare_truncated(self) -> None:
        def stop(*_a: object) -> None:
            raise _Stop

        handle = self.lm.arch.layers[max(self.layers)].register_forward_pre_hook(stop)
        try:
            with torch.inference_mode():
                for idx in self.batches:
                    b = self._padded(idx)
                    try:
                        self.lm.model(input_ids=b["input_ids"],
                                      attention_mask=b["attention_mask"], use_cache=False)
                    except _Stop:
                        pass
        finally:
            handle.remove()

    def steering_vectors(self) -> torch.Tensor:
        from steering_vectors import record_activations

        out = torch.empty(len(self.texts), len(self.layers), self.lm.hidden_size)
        blocks = [layer - 1 for layer in self.layers]  # block l output = resid_pre l + 1
        with torch.inference_mode(), record_activations(
                self.lm.model, layer_type="decoder_block", layer_nums=blocks) as rec:
            for idx in self.batches:
                b = self._padded(idx)
                self.lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                              use_cache=False)
                for j, block in enumerate(blocks):
                    out[idx, j] = rec[block].pop()[:, -1].float()
        return out

    def repeng(self) -> torch.Tensor:
        import numpy as np

        # repeng 0.4.0 (the newest on the registry) still uses np.float_, which numpy 2
        # removed: restore the alias (same dtype) so a clean `make bench` can import it
        if not hasattr(np, "float_"):
            np.float_ = np.float64
        from repeng.extract import batched_get_hiddens

        blocks = [layer - 1 for layer in self.layers]
        sorted_texts = [self.texts[i] for i in self.order]
        hid = batched_get_hiddens(self.lm.model, self.lm.tokenizer, sorted_texts, blocks,
                                  self.bs)
        out = torch.empty(len(self.texts), len(self.layers), self.lm.hidden_size)
        stacked = torch.stack([torch.from_numpy(hid[b]) for b in blocks], dim=1)
        out[self.order] = stacked
        return out


def check_same(results: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs difference of each peer's activations from refusalkit's (must be allclose)."""
    ref = results["refusalkit"]
    scale = float(ref.abs().max())
    diffs = {}
    for name in ("steering_vectors", "repeng"):
        other = results[name]
        diffs[name] = float((other - ref).abs().max())
        if not torch.allclose(other, ref, rtol=1e-4, atol=1e-4 * scale):
            raise SystemExit(f"{name} activations differ from refusalkit's (max abs diff "
                             f"{diffs[name]:.3g}, max |act| {scale:.3g}): not comparable")
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="32 prompts, 2 repeats")
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = min(args.n, 32), min(args.repeats, 2)

    lm = load_model(args.model)
    layers = default_layers(lm.n_layers)
    v = Variants(lm, bench_prompts(args.n), layers, args.batch_size)
    say(f"activations: {args.model}, {args.n} prompts ({v.n_tokens} tokens), layers {layers}")
    names = ["refusalkit", "bare_truncated", "bare_full", "steering_vectors", "repeng"]
    fns = {n: getattr(v, n) for n in names}
    # Warm up on one batch each: one-off costs without paying a whole extra pass.
    small = Variants(lm, bench_prompts(args.batch_size, seed=1), layers, args.batch_size)
    t = interleaved(fns, args.repeats, warmup={n: getattr(small, n) for n in names}, log=say)
    diffs = check_same(t.results)  # the timed runs' own outputs
    say(f"  allclose ok: max abs diff {diffs}")

    pps = {n: args.n / t.median(n) for n in names}
    peer = max(("steering_vectors", "repeng"), key=lambda n: pps[n])
    ratios = {
        "vs bare truncated (target ≥ 0.95)": pps["refusalkit"] / pps["bare_truncated"],
        "vs bare full forward": pps["refusalkit"] / pps["bare_full"],
        f"vs faster peer, {peer} (target ≥ 1.5)": pps["refusalkit"] / pps[peer],
        "vs steering-vectors": pps["refusalkit"] / pps["steering_vectors"],
        "vs repeng": pps["refusalkit"] / pps["repeng"],
    }
    rows = [(n.replace("_", " "), t.median(n), t.spread(n), pps[n], pps[n] / pps["bare_full"])
            for n in names]
    md = "\n".join([
        "## Activation capture",
        "",
        f"{args.model}, {args.n} prompts (half harmless_train, half harmful_train; "
        f"{v.n_tokens} prompt tokens after the chat template), layers {layers} "
        f"(resid_pre; {lm.n_layers} layers in all), last token, batch {args.batch_size}, "
        f"float32, {args.repeats} interleaved repeats, {load_note()}.",
        "",
        md_table(["variant", "median s", "range s", "prompts/s", "× bare full"], rows),
        "",
        md_table(["refusalkit speed ratio", "value"], [(k, r) for k, r in ratios.items()]),
        "",
        f"Same activations checked on the timed runs: max |Δ| vs refusalkit — steering-vectors "
        f"{diffs['steering_vectors']:.2g}, repeng {diffs['repeng']:.2g}.",
    ])
    emit(md, args.md, {"model": args.model, "n": args.n, "layers": layers, "tokens": v.n_tokens,
                       "seconds": t.seconds, "prompts_per_s": pps, "ratios": ratios,
                       "max_abs_diff": diffs, "median_s": {n: median(t.seconds[n])
                                                           for n in names}}, args.json)


if __name__ == "__main__":
    main()
