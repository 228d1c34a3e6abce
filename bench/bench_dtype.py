"""Greedy generation in float32 against bfloat16 weights, side by side in one process.

The evaluate stage of a steering run is mostly greedy generation (about 1,000 answers of 40
tokens on qwen 0.5B), and on 2 cores each decoding step is bound by reading the weights.
bfloat16 halves those reads, and CPUs with AVX512-BF16 multiply them natively. The price is
numerics: greedy answers may differ. So this prints, per dtype, the median time for the same
prompts and batches, and how many answers are identical to the float32 ones and how many are
refusals by the keyword judge (a cheap check that the model's behaviour did not move).

    python bench/bench_dtype.py [--model qwen2.5-coder-0.5b] [--n 64] [--tokens 40]
        [--batch 32] [--repeats 3] [--md out.md] [--json out.json]
"""

from __future__ import annotations

import argparse
from typing import Any

from common import emit, interleaved, load_note, md_table, say


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from refusalkit.generation import generate_text
    from refusalkit.judge import KeywordJudge
    from refusalkit.models import load_model
    from refusalkit.prompts import load_prompts

    half = args.n // 2  # refused and answered prompts both, so a shift either way shows
    prompts = (load_prompts("deccp_censored").take(half, seed=2).prompts
               + load_prompts("harmless_test").take(args.n - half, seed=2).prompts)
    models = {d: load_model(args.model, dtype=d) for d in args.dtypes}
    texts: dict[str, list[str]] = {}

    def run(d: str) -> Any:
        texts[d] = generate_text(models[d], prompts, max_new_tokens=args.tokens,
                                 batch_size=args.batch, show_progress=False)

    t = interleaved({d: (lambda d=d: run(d)) for d in args.dtypes}, args.repeats, log=say)
    kw = KeywordJudge()
    ref_dtype = args.dtypes[0]
    ref = t.median(ref_dtype)
    rows, data = [], {}
    for d in args.dtypes:
        same = sum(a == b for a, b in zip(texts[d], texts[ref_dtype], strict=True))
        refused = sum(kw.is_refusal(x) for x in texts[d])
        m = t.median(d)
        rows.append([d, f"{m:.1f}", f"{ref / m:.2f}", f"{same}/{len(prompts)}",
                     f"{refused}/{len(prompts)}"])
        data[d] = {"median_s": m, "times": t.seconds[d], "speedup": ref / m,
                   "identical": same, "keyword_refusals": refused}
    md = (f"{args.model}, {len(prompts)} prompts ({half} deccp_censored, {args.n - half} "
          f"harmless_test) × {args.tokens} new tokens, greedy, batch {args.batch}, "
          f"{args.repeats} interleaved repeats; {load_note()}\n\n"
          + md_table(["dtype", "median s", f"speed-up over {ref_dtype}",
                      f"answers identical to {ref_dtype}", "keyword refusals"], rows))
    emit(md, args.md, data, args.json)


if __name__ == "__main__":
    main()
