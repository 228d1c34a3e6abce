"""Scaling: how activation capture and generation time and memory grow with prompt count and
prompt length.

    python bench/bench_scaling.py [--model qwen2.5-coder-0.5b] [--repeats 2] [--quick]
        [--md out.md] [--json out.json]

Four sweeps, each over at least three sizes, sizes interleaved within every repeat:

- capture vs prompt count: real prompts (half harmless, half harmful), 4 layers to 2/3 depth;
- capture vs prompt length: synthetic prompts cut to a fixed token length from joined Alpaca
  instructions, fixed count;
- generation vs prompt count: greedy, fixed new tokens (EOS suppressed);
- generation vs prompt length: the synthetic prompts, fixed count and new tokens.

For each point: median seconds, cost per unit (per prompt, per prompt token, or per generated
token) relative to the smallest size — flat means linear — and peak RSS above the process's
resident size before the run (a sampled measure; the model weights are already resident and
not counted).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
from bench_activations import bench_prompts, default_layers
from bench_generation import exact_length
from common import emit, interleaved, load_note, md_table, median, say

from refusalkit.activations import capture
from refusalkit.generation import generate
from refusalkit.models import LoadedModel, load_model
from refusalkit.prompts import load_prompts


def fixed_length_prompts(lm: LoadedModel, n: int, length: int) -> list[str]:
    """n distinct instructions of `length` tokens each, cut from joined Alpaca prompts."""
    pool = load_prompts("harmless_train").take(4 * n * max(1, length // 8) + 64, seed=5).prompts
    ids = lm.tokenizer(" ".join(pool), add_special_tokens=False)["input_ids"]
    if len(ids) < n * length:
        raise SystemExit(f"not enough text for {n} prompts of {length} tokens")
    return [lm.tokenizer.decode(ids[i * length:(i + 1) * length]) for i in range(n)]


def sweep(name: str, unit: str, sizes: Sequence[int], make: Callable[[int], Callable[[], Any]],
          units: Callable[[int], float], repeats: int) -> dict[str, Any]:
    """Time every size (interleaved), with peak RSS, and the per-unit cost relative to the
    smallest size."""
    fns = {str(s): make(s) for s in sizes}
    say(f"scaling: {name} over {list(sizes)}")
    t = interleaved(fns, repeats, warmup={str(sizes[0]): fns[str(sizes[0])]},
                    track_rss=True, log=say)
    rows = []
    base = None
    for s in sizes:
        sec = t.median(str(s))
        per = sec / units(s)
        base = base if base is not None else per
        rows.append({"size": s, "seconds": sec, "units": units(s), "per_unit_ms": 1e3 * per,
                     "relative": per / base,
                     "peak_extra_mib": median([r.extra_mib for r in t.rss[str(s)]]),
                     "peak_rss_mib": max(r.peak_mib for r in t.rss[str(s)])})
    return {"name": name, "unit": unit, "rows": rows, "seconds": t.seconds}


def table(res: dict[str, Any], size_label: str) -> str:
    rows = [(r["size"], r["seconds"], int(r["units"]), r["per_unit_ms"], r["relative"],
             r["peak_extra_mib"], r["peak_rss_mib"]) for r in res["rows"]]
    return "\n".join([
        f"### {res['name']}",
        "",
        md_table([size_label, "median s", res["unit"] + "s", f"ms per {res['unit']}",
                  "per-unit cost vs smallest", "peak RSS above start MiB", "peak RSS MiB"],
                 rows),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 repeat")
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bs = args.batch_size
    if args.quick:
        args.repeats = 1
        cap_counts, cap_lens, cap_len_n = [16, 32, 64], [32, 64, 128], 16
        gen_counts, gen_lens, gen_len_n, new = [4, 8, 16], [32, 64, 128], 8, 8
    else:
        # sized for about 6 min on 2 cores; pass larger sizes by editing here
        cap_counts, cap_lens, cap_len_n = [32, 64, 128], [64, 128, 256, 512], 16
        gen_counts, gen_lens, gen_len_n, new = [8, 16, 32], [64, 128, 256], 8, 16

    lm = load_model(args.model)
    layers = default_layers(lm.n_layers)
    tok = lm.tokenizer
    pool = bench_prompts(max(cap_counts + gen_counts), seed=11)
    long_pool = {n_len: fixed_length_prompts(lm, max(cap_len_n, gen_len_n), n_len)
                 for n_len in sorted(set(cap_lens + gen_lens))}

    def n_tokens(prompts: Sequence[str]) -> int:
        return sum(len(tok(lm.format(p), add_special_tokens=False)["input_ids"])
                   for p in prompts)

    def cap(prompts: Sequence[str]) -> Callable[[], Any]:
        return lambda: capture(lm, prompts, layers, batch_size=bs, show_progress=False)

    def gen(prompts: Sequence[str]) -> Callable[[], Any]:
        return lambda: generate(lm, prompts, max_new_tokens=new, batch_size=bs,
                                show_progress=False)

    results = []
    results.append(sweep("capture vs prompt count", "prompt", cap_counts,
                         lambda n: cap(pool[:n]), float, args.repeats))
    results.append(sweep(f"capture vs prompt length ({cap_len_n} prompts)", "prompt token",
                         cap_lens, lambda n: cap(long_pool[n][:cap_len_n]),
                         lambda n: float(n_tokens(long_pool[n][:cap_len_n])), args.repeats))
    with exact_length(lm, new):
        results.append(sweep(f"generation vs prompt count ({new} new tokens)",
                             "generated token", gen_counts, lambda n: gen(pool[:n]),
                             lambda n: float(n * new), args.repeats))
        results.append(sweep(f"generation vs prompt length ({gen_len_n} prompts, {new} new "
                             "tokens)", "generated token", gen_lens,
                             lambda n: gen(long_pool[n][:gen_len_n]),
                             lambda n: float(gen_len_n * new), args.repeats))
    labels = ["prompts", "prompt tokens", "prompts", "prompt tokens"]
    md = "\n\n".join([
        "## Scaling",
        f"{args.model}, capture at layers {layers} (last token), batch {bs}, float32, "
        f"{args.repeats} interleaved repeats per sweep, {load_note()}. Length sweeps use "
        "synthetic prompts of exactly that many tokens before the chat template. A per-unit "
        "cost near 1.0 across sizes means time grows linearly. Generation per-unit cost "
        "grows slowly with prompt length, as attention over a longer cache should.",
        *[table(r, lab) for r, lab in zip(results, labels, strict=True)],
    ])
    emit(md, args.md, {"model": args.model, "layers": layers, "sweeps": results}, args.json)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
