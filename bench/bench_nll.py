"""Answer perplexity under the unsteered model: one forward over prompt + answer per answer
(`full_pass_nlls`) against one pass per prompt whose KV cache every answer of that prompt
continues from (`shared_prompt_nlls`, what `answer_nlls` does unsteered). Side by side in
one process, interleaved repeats, medians; the NLLs must agree to float tolerance.

A steer run's evaluate stage scores about 3.3 distinct answers per held-out prompt
(unsteered, chosen profile, WRMD, Arditi; 952 answers to 286 prompts in the 0.5B
acceptance run) and the formatted prompt, with Qwen's system prompt and chat template, is
longer than a 40-token answer. The workload here has that shape from public data: the 1,350
human-labelled XSTest answers of three models (three per prompt), each cut to its first 40
tokens, for the first `--n` prompts.

    python bench/bench_nll.py [--model qwen2.5-coder-0.5b] [--n 48] [--batch 32]
        [--repeats 3] [--md out.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from common import emit, interleaved, load_note, md_table, say


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--n", type=int, default=48, help="prompts (three answers each)")
    ap.add_argument("--tokens", type=int, default=40, help="answer length cap, tokens")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from refusalkit.evaluate import full_pass_nlls, shared_prompt_nlls
    from refusalkit.models import load_model

    data = Path(os.environ.get("REFUSALKIT_DATA", Path(__file__).parents[2] / "shared"
                               / "datasets"))
    rows = [json.loads(x) for x in (data / "xstest_judge_labels.jsonl").open()]
    lm = load_model(args.model)
    tok = lm.tokenizer
    keep = list(dict.fromkeys(r["prompt"] for r in rows))[: args.n]
    pairs = [(r["prompt"], tok.decode(tok(r["response"], add_special_tokens=False)
                                      ["input_ids"][: args.tokens]))
             for r in rows if r["prompt"] in set(keep)]
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    p_tok = sum(len(tok(lm.format(p), add_special_tokens=False)["input_ids"]) for p in keep)
    a_tok = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    out: dict[str, Any] = {}

    def run(name: str, fn: Any) -> None:
        out[name] = fn(lm, prompts, answers, batch_size=args.batch)

    variants = {"full pass per answer": lambda: run("full", full_pass_nlls),
                "shared prompt pass": lambda: run("shared", shared_prompt_nlls)}
    warm = {k: (lambda fn=fn: fn(lm, prompts[:6], answers[:6], batch_size=args.batch))
            for k, fn in (("full pass per answer", full_pass_nlls),
                          ("shared prompt pass", shared_prompt_nlls))}
    t = interleaved(variants, args.repeats, warmup=warm, log=say)
    worst = max(abs(a - b) / max(abs(b), 1e-9) for (a, _), (b, _) in
                zip(out["shared"], out["full"], strict=True))
    ref = t.median("full pass per answer")
    table = md_table(["scoring", "median s", "spread", "speed-up over a full pass each"],
                     [[k, f"{t.median(k):.1f}", t.spread(k), f"{ref / t.median(k):.2f}"]
                      for k in variants])
    md = (f"{args.model}, {len(keep)} XSTest prompts x 3 human-labelled answers cut to "
          f"{args.tokens} tokens ({len(pairs)} answers; formatted prompts {p_tok} tokens once, "
          f"answers {a_tok} tokens), batch {args.batch} answers, {args.repeats} interleaved "
          f"repeats; {load_note()}. Largest relative NLL difference: {worst:.1e}\n\n{table}")
    emit(md, args.md, {"median_s": {k: t.median(k) for k in variants}, "times": t.seconds,
                       "max_rel_diff": worst, "answers": len(pairs)}, args.json)


if __name__ == "__main__":
    main()
