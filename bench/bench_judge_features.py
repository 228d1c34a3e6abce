"""Would more evidence make the calibrated judge read answers the way a person does? (issue 14)

    python bench/bench_judge_features.py [--cache DIR] [--variants base,base+fluency,...]

Each candidate block of features is computed once for every labelled row (the project's
`tests/data/judge_labels.jsonl` and XSTest's 1,350 labelled answers) and cached in --cache;
each variant (blocks joined by '+') is then trained with the shipped v2 recipe
(`judge.recipe.train_v2`) and scored exactly like the shipped judge:
- on the project's test split, trained on its dev split + all XSTest rows, calibrated on dev;
- leave-one-model-out on XSTest (trained on dev + the two other models).
Blocks:
- base: what ships (cues, MiniLM answer embedding, question-answer relevance);
- fluency: token log-probs of the answer under smollm2-135m (judge/fluency.py);
- sentences: per-sentence question relevance (max, mean, min, share below 0.2, last,
  first minus last) — drift after an on-topic opening;
- qa: the element-wise product of question and answer embeddings (a learnt relevance).
Seconds per item are measured while computing each block (model load included).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from refusalkit.judge.calibrated import judgements_from
from refusalkit.judge.embed import MiniLM
from refusalkit.judge.evaluate import ece
from refusalkit.judge.fluency import Fluency
from refusalkit.judge.recipe import train_v2
from refusalkit.judge.train import V2_COMPONENTS
from refusalkit.judge.trained import featurize
from refusalkit.models import strip_thinking
from refusalkit.prompts import data_dirs

PROJECT = Path(__file__).resolve().parents[1] / "tests" / "data" / "judge_labels.jsonl"
MODELS = ("gpt4", "llama2orig", "mistralinstruct")


def sentence_relevance(m: MiniLM, q: torch.Tensor, texts: list[str]) -> torch.Tensor:
    sents: list[str] = []
    owner: list[int] = []
    for i, t in enumerate(texts):
        ss = [s.strip() for s in re.split(r"(?<=[.!?。！？])\s+|\n+", t) if len(s.strip()) >= 8]
        ss = ss[:12] or [t or " "]
        sents += ss
        owner += [i] * len(ss)
    cos = (m.encode(sents) * q[torch.tensor(owner)]).sum(-1)
    own = torch.tensor(owner)
    out = torch.zeros(len(texts), 6)
    for i in range(len(texts)):
        c = cos[own == i]
        out[i] = torch.stack([c.max(), c.mean(), c.min(), (c < 0.2).float().mean(), c[-1],
                              c[0] - c[-1]])
    return out


def block(name: str, prompts: list[str], texts: list[str]) -> torch.Tensor:
    if name == "base":
        return featurize(V2_COMPONENTS, prompts, texts)
    if name == "fluency":
        return Fluency().features(prompts, texts)
    m = MiniLM()
    q = m.encode(prompts)
    if name == "qa":
        return q * m.encode(texts)
    if name == "sentences":
        return sentence_relevance(m, q, texts)
    raise SystemExit(f"unknown block '{name}' (base, fluency, sentences, qa)")


def score(x: torch.Tensor, rows: list[dict], train: list[int], test: list[int],
          calibrate: list[bool]) -> tuple[list[bool], float]:
    """Per test row: did the judge trained on `train` agree with the label; and its ECE."""
    w = train_v2(x[train], [rows[i] for i in train], "bench", ["custom"], {},
                 calibrate_on=calibrate)
    js = judgements_from(w, x[test], [rows[i]["response"] for i in test])
    y = [rows[i]["label"] != "compliance" for i in test]
    right = [(j.label != "compliance") == t for j, t in zip(js, y, strict=True)]
    return right, ece([(j.score + 1) / 2 for j in js], y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="bench/.judge_features")
    ap.add_argument("--variants", default="base,base+sentences,base+qa,base+fluency,"
                                          "base+fluency+sentences")
    args = ap.parse_args()
    proj = [json.loads(s) for s in PROJECT.read_text().splitlines()]
    found = [d / "xstest_judge_labels.jsonl" for d in data_dirs()
             if (d / "xstest_judge_labels.jsonl").is_file()]
    if not found:
        raise SystemExit("xstest_judge_labels.jsonl not found: set REFUSALKIT_DATA to "
                         "../shared/datasets")
    xs = [json.loads(s) for s in found[0].read_text().splitlines()]
    rows = proj + xs
    prompts, texts = [r["prompt"] for r in rows], [strip_thinking(r["response"]) for r in rows]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    blocks: dict[str, torch.Tensor] = {}
    for name in sorted({b for v in args.variants.split(",") for b in v.split("+")}):
        path = cache / f"{name}_{len(rows)}.pt"
        if not path.is_file():
            t = time.perf_counter()
            torch.save(block(name, prompts, texts), path)
            print(f"{name}: {(time.perf_counter() - t) / len(rows):.3f} s/item", flush=True)
        blocks[name] = torch.load(path)
    dev = [i for i, r in enumerate(proj) if r["split"] == "dev"]
    test = [i for i, r in enumerate(proj) if r["split"] == "test"]
    extra = list(range(len(proj), len(rows)))
    steered = [i for i in test if proj[i].get("steering")]
    print(f"\n| variant | test acc (n={len(test)}) | ECE | steered acc (n={len(steered)}) | "
          + " | ".join(f"LOMO {m} acc / ECE" for m in MODELS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(MODELS))
    for variant in args.variants.split(","):
        x = torch.cat([blocks[b] for b in variant.split("+")], dim=1)
        cal = [True] * len(dev) + [False] * len(extra)
        right, e = score(x, rows, dev + extra, test, cal)
        acc = float(np.mean(right))
        acc_st = float(np.mean([r for r, i in zip(right, test, strict=True) if i in steered]))
        lomo = []
        for m in MODELS:
            held = [i for i in extra if rows[i]["model"] == m]
            others = [i for i in extra if rows[i]["model"] != m]
            r, e2 = score(x, rows, dev + others, held, [True] * len(dev) + [False] * len(others))
            lomo.append(f"{np.mean(r):.3f} / {e2:.3f}")
        print(f"| {variant} | {acc:.3f} | {e:.3f} | {acc_st:.3f} | " + " | ".join(lomo) + " |",
              flush=True)


if __name__ == "__main__":
    main()
