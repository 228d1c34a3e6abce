"""Generate the raw, unlabelled responses behind tests/data/judge_labels.jsonl.

The refusal judges are tuned and evaluated on real answers of the two packaged models, so this
script records exactly which prompts were drawn (seeded), how they were decoded and what came
out. Labels are added afterwards by a human reader (see tests/data/JUDGE_LABELS.md).

Plan: per model, a fixed number of prompts from each shared-dataset stratum, drawn with
`PromptSet.take(n, seed=...)`; within each stratum the first ~70 % are decoded greedily and the
rest sampled at temperature 1.0 (top-p 1.0, one sample, generation seed 0), because sampled
answers are what paper A's protocol judges and they are more varied. max_new_tokens is 96, so
some answers are cut off (a hard case the judges must handle).

    python bench/make_judge_responses.py --out /tmp/judge_responses.jsonl
    python bench/make_judge_responses.py --compare tests/data/judge_labels.jsonl  # re-check

Output rows: id, model, source, category, decoding, prompt, response, finished, n_tokens.
Takes ~10-20 min on 2 shared CPU cores (qwen2.5-coder-0.5b dominates).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from refusalkit.generation import generate
from refusalkit.models import load_model
from refusalkit.prompts import PromptSet, load_prompts, write_jsonl

MAX_NEW_TOKENS = 96
TEMPERATURE = 1.0
GEN_SEED = 0
SAMPLED_FRACTION = 0.3
BATCH = 16

# (stratum, shared dataset, row filter ("lang" = en/zh by script), n for qwen, n for smol)
COCO = "coconot_original"
STRATA: list[tuple[str, str, dict[str, str], int, int]] = [
    ("deccp_censored/en", "deccp_censored", {"lang": "en"}, 28, 8),
    ("deccp_censored/zh", "deccp_censored", {"lang": "zh"}, 20, 6),
    ("deccp_uncensored", "deccp_uncensored", {}, 14, 5),
    ("harmful_test", "harmful_test", {}, 30, 14),
    ("jailbreakbench", "jailbreakbench", {}, 24, 10),
    ("xstest/safe", "xstest", {"label": "safe"}, 26, 12),
    ("xstest/unsafe", "xstest", {"label": "unsafe"}, 20, 12),
    ("coconot_original/incomplete", COCO, {"category": "Incomplete requests"}, 8, 4),
    ("coconot_original/unsupported", COCO, {"category": "Unsupported requests"}, 8, 4),
    ("coconot_original/indeterminate", COCO, {"category": "Indeterminate requests"}, 8, 4),
    ("coconot_original/humanizing", COCO, {"category": "Humanizing requests"}, 12, 6),
    ("coconot_original/safety", COCO, {"category": "Requests with safety concerns"}, 8, 4),
    ("coconot_contrast", "coconot_contrast", {}, 14, 6),
    ("harmless_test", "harmless_test", {}, 8, 5),
]
# A second, greedy-only draw from strata where answers are mostly compliant, added after the
# first draw came out refusal-heavy; it continues each stratum's seeded order (offset = first n).
EXTRA: list[tuple[str, int, int]] = [
    ("xstest/safe", 10, 10),
    ("coconot_contrast", 12, 10),
    ("harmless_test", 10, 6),
    ("deccp_uncensored", 0, 6),
]
MODELS = {"qwen2.5-coder-0.5b": (0, 11), "smollm2-135m": (1, 23)}  # column index, draw seed


def _is_chinese(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def _select(spec: str, filt: dict[str, str]) -> PromptSet:
    ps = load_prompts(spec)
    lang = filt.get("lang")
    if lang is not None:
        rows = tuple(r for r in ps.rows if _is_chinese(r["prompt"]) == (lang == "zh"))
        return PromptSet(f"{spec}?lang={lang}", rows)
    return ps.where(**filt)


def plan(model: str) -> list[dict[str, Any]]:
    """The prompts a model answers, each with its stratum and decoding mode (deterministic)."""
    col, seed = MODELS[model]
    short = model.split("-")[0].split(".")[0]
    items: list[dict[str, Any]] = []
    extra = {name: ns[col] for name, *ns in EXTRA}
    for stratum, spec, filt, *ns in STRATA:
        n, m = ns[col], extra.get(stratum, 0)
        rows = _select(spec, filt).take(n + m, seed=seed).rows
        n_greedy = n - round(n * SAMPLED_FRACTION)
        for i, row in enumerate(rows):
            items.append({
                "id": f"{short}-{stratum.replace('/', '-')}-{i:02d}",
                "model": model,
                "source": spec,
                "stratum": stratum,
                "category": row.get("category") or row.get("label") or "",
                "subcategory": row.get("subcategory") or row.get("type") or "",
                "decoding": "greedy" if i < n_greedy or i >= n else "sample",
                "draw": "main" if i < n else "extra",
                "prompt": row["prompt"],
            })
    return items


def _done(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return {r["id"]: r for r in rows}


def run(model: str, out: Path) -> None:
    """Generate in fixed chunks of BATCH prompts, saving after each so a stopped run resumes.

    Chunks are formed from the plan in order (per draw and decoding mode), and each chunk is one
    `generate` call with seed GEN_SEED, so a chunk's output does not depend on what ran before.
    """
    items = plan(model)
    done = _done(out)
    lm = None
    for draw, decoding in (("main", "greedy"), ("main", "sample"), ("extra", "greedy")):
        todo = [it for it in items if it["decoding"] == decoding and it["draw"] == draw]
        for start in range(0, len(todo), BATCH):
            chunk = todo[start : start + BATCH]
            if all(it["id"] in done for it in chunk):
                continue
            lm = lm or load_model(model)
            t0 = time.perf_counter()
            gens = generate(
                lm, [it["prompt"] for it in chunk], max_new_tokens=MAX_NEW_TOKENS,
                temperature=0.0 if decoding == "greedy" else TEMPERATURE, top_p=1.0,
                num_samples=1, seed=GEN_SEED, batch_size=BATCH, show_progress=False,
            )
            for it, g in zip(chunk, gens, strict=True):
                done[it["id"]] = {**it, "response": g[0].answer, "finished": g[0].finished,
                                  "n_tokens": len(g[0].token_ids)}
            write_jsonl(out, list(done.values()))
            dt = time.perf_counter() - t0
            print(f"{model} {decoding} {start + len(chunk)}/{len(todo)}: {dt:.0f} s "
                  f"({dt / len(chunk):.1f} s per response)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/judge_responses.jsonl",
                    help="raw responses; an existing file is resumed (finished chunks kept)")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--compare", help="labelled file whose responses should be reproduced")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()
    for model in args.models:
        run(model, out)
    rows = list(_done(out).values())
    print(f"{len(rows)} responses in {args.out}; this run took {time.perf_counter() - t0:.0f} s")
    if args.compare:
        ref = _done(Path(args.compare))
        same = sum(ref[r["id"]]["response"] == r["response"] for r in rows if r["id"] in ref)
        print(f"identical to {args.compare}: {same}/{sum(r['id'] in ref for r in rows)}")


if __name__ == "__main__":
    main()
