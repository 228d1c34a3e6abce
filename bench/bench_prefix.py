"""The template's shared head run once per call (refusalkit.prefix) against every row
running it, for the four prompt passes a steer run is made of: a gate's decisions (capture
to the gate layer, whole-prompt mean), next-token log-probs (KL, the search's proxies),
greedy answers and their perplexity. Side by side in one process, interleaved repeats,
medians; the results must agree to float tolerance and the answers token for token.

Qwen's default system prompt and the user turn's opening are 24 tokens before every user
text; a formatted deccp question is 42 on average. The prompts are a steer run's mix: a
quarter each of deccp_censored, JailbreakBench, harmless_test and XSTest-safe.

    python bench/bench_prefix.py [--model qwen2.5-coder-0.5b] [--n 128] [--tokens 40]
        [--batch 32] [--repeats 3] [--md out.md] [--json out.json]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common import MIX_NOTE, emit, interleaved, load_note, md_table, say, steer_mix, timing_args


def main() -> None:
    args = timing_args(__doc__.splitlines()[0], 128).parse_args()

    import refusalkit.prefix as prefix
    from refusalkit.activations import MEAN_ALL, capture, shared_head
    from refusalkit.evaluate import answer_nlls
    from refusalkit.generation import generate
    from refusalkit.models import load_model
    from refusalkit.scoring import last_logprobs

    prompts = steer_mix(args.n)
    lm = load_model(args.model)
    tok = lm.tokenizer
    encoded = [tok(lm.format(p), add_special_tokens=False)["input_ids"] for p in prompts]
    head = shared_head(lm, encoded)
    gate_layer = lm.n_layers // 2
    b = args.batch
    answers = [g[0].text for g in generate(lm, prompts, max_new_tokens=args.tokens,
                                           batch_size=b, show_progress=False)]
    ops: dict[str, Callable[[], Any]] = {
        f"gate decisions (layer {gate_layer}, whole-prompt mean)": lambda: capture(
            lm, prompts, [gate_layer], [MEAN_ALL], batch_size=b, show_progress=False),
        "next-token log-probs": lambda: last_logprobs(lm, prompts, batch_size=b),
        f"greedy answers ({args.tokens} tokens)": lambda: [
            g[0].token_ids for g in generate(lm, prompts, max_new_tokens=args.tokens,
                                             batch_size=b, show_progress=False,
                                             logprobs=False)],
        "answer perplexity": lambda: answer_nlls(lm, prompts, answers, batch_size=b),
    }

    def plain(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            keep = prefix.MIN_SHARED
            prefix.MIN_SHARED = 10**9  # no head is long enough: every row runs its own
            try:
                return fn()
            finally:
                prefix.MIN_SHARED = keep
        return run

    rows, data = [], {}
    for name, fn in ops.items():
        say(name)
        t = interleaved({"plain": plain(fn), "shared head": fn}, args.repeats, log=say)
        a, s = t.results["plain"], t.results["shared head"]
        if name.startswith("greedy"):
            agree = f"{sum(x == y for x, y in zip(a, s, strict=True))}/{len(a)} identical"
        elif name.startswith("answer"):
            worst = max(abs(x[0] - y[0]) / max(abs(x[0]), 1e-9)
                        for x, y in zip(a, s, strict=True))
            agree = f"NLL rel. diff ≤ {worst:.1e}"
        else:
            worst = float((a - s).abs().max() / a.abs().max())
            agree = f"max diff {worst:.1e} of max |value|"
        ratio = t.median("plain") / t.median("shared head")
        rows.append([name, f"{t.median('plain'):.1f}", f"{t.median('shared head'):.1f}",
                     f"{ratio:.2f}", agree])
        data[name] = {"median_s": {k: t.median(k) for k in t.seconds}, "times": t.seconds,
                      "speedup": ratio, "agreement": agree}
    mean_len = sum(map(len, encoded)) / len(encoded)
    md = (f"{args.model}, {len(prompts)} prompts ({MIX_NOTE}; formatted {mean_len:.1f} tokens on "
          f"average, of which the shared head {head}), batch {b}, {args.repeats} interleaved "
          f"repeats; {load_note()}\n\n"
          + md_table(["prompt pass", "every row, median s", "head once, median s",
                      "speed-up", "agreement"], rows))
    emit(md, args.md, {"head_tokens": head, "mean_prompt_tokens": mean_len, **data},
         args.json)


if __name__ == "__main__":
    main()
