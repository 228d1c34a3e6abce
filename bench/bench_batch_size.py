"""Greedy generation time against batch size, side by side in one process: the same 64
deccp prompts, 40 new tokens, batch sizes 8, 16, 32 and 64, each timed twice in turn; medians
and the ratio to 16 are printed. On CPU each decoding step reads the whole model, the
151,936-row output head included, once per batch, so bigger batches amortise those reads.

    python bench/bench_batch_size.py [--model qwen2.5-coder-0.5b] [--n 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    args = ap.parse_args()

    from refusalkit.generation import generate_text
    from refusalkit.models import load_model
    from refusalkit.prompts import load_prompts

    lm = load_model(args.model)
    prompts = load_prompts("deccp_censored").take(args.n, seed=2).prompts
    times: dict[int, list[float]] = {}
    for rep in range(args.repeats):  # interleaved, so drift in machine load hits every size
        for bs in args.sizes:
            t = time.perf_counter()
            generate_text(lm, prompts, max_new_tokens=args.tokens, batch_size=bs,
                          show_progress=False)
            times.setdefault(bs, []).append(time.perf_counter() - t)
            print(rep, bs, round(times[bs][-1], 1), flush=True)
    ref = statistics.median(times[16]) if 16 in times else None
    print(f"\n{args.model}, {args.n} prompts x {args.tokens} tokens, greedy")
    print("| batch | median s | ratio to 16 |\n|---:|---:|---:|")
    for bs, v in times.items():
        m = statistics.median(v)
        print(f"| {bs} | {m:.1f} | {m / ref:.2f} |" if ref else f"| {bs} | {m:.1f} | |")


if __name__ == "__main__":
    main()
