"""Greedy decoding: refusalkit's loop, which drops a row from the batch (and the KV cache)
as soon as it ends, against `model.generate`, which keeps every row until the batch's
longest answer is done. Side by side in one process, interleaved repeats, medians.

A steering run's held-out sets mix short refusals ("I'm sorry, but I can't assist with
that.", about 12 tokens) with answers that run to the 40-token limit, so many row-steps of
`model.generate` decode padding. The prompts here are the same mix: a quarter each of
deccp_censored, JailbreakBench, harmless_test and XSTest-safe. Both variants see the same
length-sorted batches; the answers must be token-identical (printed).

    python bench/bench_greedy.py [--model qwen2.5-coder-0.5b] [--n 128] [--tokens 40]
        [--batch 32] [--repeats 3] [--md out.md] [--json out.json]
"""

from __future__ import annotations

from typing import Any

from common import MIX_NOTE, emit, interleaved, load_note, md_table, say, steer_mix, timing_args


def main() -> None:
    args = timing_args(__doc__.splitlines()[0], 128).parse_args()

    import torch

    from refusalkit.activations import length_sorted_batches
    from refusalkit.generation import generate
    from refusalkit.models import load_model

    prompts = steer_mix(args.n)
    lm = load_model(args.model)
    tok = lm.tokenizer
    encoded = [tok(lm.format(p), add_special_tokens=False)["input_ids"] for p in prompts]
    out: dict[str, list[list[int]]] = {}

    def ours() -> None:
        gens = generate(lm, prompts, max_new_tokens=args.tokens, batch_size=args.batch,
                        show_progress=False, logprobs=False)
        out["refusalkit"] = [list(g[0].token_ids) for g in gens]

    def reference() -> None:
        ids: list[list[int]] = [[] for _ in prompts]
        eos = {lm.model.generation_config.eos_token_id, tok.eos_token_id}
        for idx in length_sorted_batches([len(e) for e in encoded], args.batch):
            b = tok.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            with torch.inference_mode():
                seq = lm.model.generate(input_ids=b["input_ids"],
                                        attention_mask=b["attention_mask"],
                                        max_new_tokens=args.tokens, do_sample=False,
                                        pad_token_id=tok.pad_token_id)
            for row, i in enumerate(idx):
                new = seq[row, b["input_ids"].shape[1]:].tolist()
                end = next((j for j, t in enumerate(new) if t in eos), len(new))
                ids[i] = new[:end]
        out["model.generate"] = ids

    t = interleaved({"model.generate": reference, "refusalkit": ours}, args.repeats, log=say)
    same = sum(a == b for a, b in zip(out["refusalkit"], out["model.generate"], strict=True))
    lengths = sorted(len(x) for x in out["model.generate"])
    short = sum(n < args.tokens for n in lengths)
    ref = t.median("model.generate")
    rows = [[name, f"{t.median(name):.1f}", t.spread(name), f"{ref / t.median(name):.2f}"]
            for name in ("model.generate", "refusalkit")]
    md = (f"{args.model}, {len(prompts)} prompts ({MIX_NOTE}) x {args.tokens} new tokens, greedy, "
          f"batch {args.batch}, {args.repeats} interleaved repeats; {load_note()}. Answers "
          f"token-identical: {same}/{len(prompts)}; answers that end before the limit: "
          f"{short}/{len(prompts)} (median length {lengths[len(lengths) // 2]} tokens)\n\n"
          + md_table(["decoder", "median s", "spread", "speed-up over model.generate"], rows))
    data: dict[str, Any] = {"identical": same, "n": len(prompts), "ended_early": short,
                            "median_s": {k: t.median(k) for k in t.seconds},
                            "times": t.seconds}
    emit(md, args.md, data, args.json)


if __name__ == "__main__":
    main()
