"""Generate the second batch of judge-development answers: steered and unsteered, three models.

The pipeline judges *steered* answers, and steering fails in ways ordinary answers never do:
off-topic babble in a product-help register, echoes, loops, official narratives. So most rows
here come from qwen2.5-coder-0.5b under profiles of varied layers and strengths (gentle,
typical and over-steered; addition and directional ablation), on the target topic (deccp),
safety prompts (harmful_test, JailbreakBench) and ordinary prompts (harmless_test, XSTest safe).
A few more come from smollm2-135m with refusal *induced*, and unsteered answers of
qwen2.5-coder-1.5b and of the 0.5B model on prompts it has not answered in the first batch.

The direction is the mean difference (last prompt token, every layer) between deccp_censored
prompts (refused by this model) and harmless_train prompts; addition uses the unnormalised
difference, so strength α is α × the layer's refuse-vs-answer gap (the pipeline's convention).

    python bench/make_steered_judge_responses.py --out /tmp/steered_responses.jsonl

Resumable (finished profiles are kept). Labels are added afterwards by a reader
(tests/data/JUDGE_LABELS.md). ~20 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from refusalkit.activations import capture
from refusalkit.generation import generate
from refusalkit.interventions import Profile, ablation, addition
from refusalkit.models import load_model
from refusalkit.prompts import load_prompts, write_jsonl

MAX_NEW_TOKENS = 64
SEED = 5
LABELS = Path(__file__).resolve().parents[1] / "tests" / "data" / "judge_labels.jsonl"

# name, operator, layers, alpha (× gap; sign chosen by mode), decoding
QWEN_PROFILES: list[tuple[str, str, list[int], float, str]] = [
    ("add-l8-11-a1.0", "add", [8, 9, 10, 11], 1.0, "greedy"),
    ("add-l10-13-a1.5", "add", [10, 11, 12, 13], 1.5, "greedy"),
    ("add-l12-15-a1.0", "add", [12, 13, 14, 15], 1.0, "sample"),
    ("add-l15-16-a2.0", "add", [15, 16], 2.0, "greedy"),
    ("add-l15-16-a1.2", "add", [15, 16], 1.2, "greedy"),
    ("add-l17-19-a1.5", "add", [17, 18, 19], 1.5, "greedy"),
    ("add-l10-16-a2.5", "add", list(range(10, 17)), 2.5, "greedy"),
    ("ablate-d15-all", "ablate", list(range(24)), 0.0, "greedy"),
    ("add-l5-8-a3.0", "add", [5, 6, 7, 8], 3.0, "sample"),
    ("add-l13-14-a0.8", "add", [13, 14], 0.8, "greedy"),
]
# per steered qwen profile: (dataset, filter, n)
PER_PROFILE = [("deccp_censored", "en", 6), ("deccp_censored", "zh", 3), ("harmful_test", "", 3),
               ("jailbreakbench", "", 2), ("harmless_test", "", 4), ("xstest", "safe", 2),
               ("deccp_uncensored", "", 2)]
# a second draw (its own seed; prompts may repeat those of the first draw, answers differ):
# the first draw's per-profile pools of deccp prompts ran dry after seven profiles
EXTRA_PROFILES: list[tuple[str, str, list[int], float, str]] = [
    ("add-l14-15-a1.0", "add", [14, 15], 1.0, "greedy"),
    ("add-l11-14-a0.7", "add", [11, 12, 13, 14], 0.7, "sample"),
]
SMOL_PROFILES = [("induce-l12-15-a2.0", [12, 13, 14, 15], 2.0),
                 ("induce-l8-20-a4.0", list(range(8, 21)), 4.0)]
UNSTEERED = {
    "qwen2.5-coder-1.5b": [("deccp_censored", "en", 12), ("deccp_censored", "zh", 4),
                           ("jailbreakbench", "", 10), ("harmless_test", "", 8),
                           ("xstest", "safe", 8), ("coconot_original", "", 6)],
    "qwen2.5-coder-0.5b": [("deccp_uncensored", "", 8), ("coconot_contrast", "", 8),
                           ("harmful_test", "", 8)],
}


def _zh(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


class Pool:
    """Seeded draws without replacement per (dataset, filter), skipping excluded prompts."""

    def __init__(self, exclude: set[str], seed: int) -> None:
        self.exclude, self.seed, self.queues = exclude, seed, {}

    def take(self, dataset: str, filt: str, n: int) -> list[dict[str, Any]]:
        key = (dataset, filt)
        if key not in self.queues:
            rows = list(load_prompts(dataset).rows)
            if filt in ("en", "zh"):
                rows = [r for r in rows if _zh(r["prompt"]) == (filt == "zh")]
            elif filt:
                rows = [r for r in rows if r.get("label") == filt]
            rows = [r for r in rows if r["prompt"] not in self.exclude]
            random.Random(f"{self.seed}-{dataset}-{filt}").shuffle(rows)
            self.queues[key] = rows
        out, self.queues[key] = self.queues[key][:n], self.queues[key][n:]
        return [{**r, "source": dataset} for r in out]


def md_vectors(lm: Any, refused: list[str], answered: list[str]) -> dict[int, torch.Tensor]:
    layers = list(range(lm.n_layers))
    r = capture(lm, refused, layers, show_progress=False)[:, :, 0].double().mean(0)
    a = capture(lm, answered, layers, show_progress=False)[:, :, 0].double().mean(0)
    return {i: (r[i] - a[i]).float() for i in layers}


def _rows(model: str, name: str, items: list[dict], decoding: str, lm: Any,
          profile: Profile | None, steering: dict | None) -> list[dict[str, Any]]:
    gens = generate(lm, [it["prompt"] for it in items], profile=profile,
                    max_new_tokens=MAX_NEW_TOKENS, temperature=1.0 if decoding == "sample"
                    else 0.0, seed=SEED, batch_size=16, show_progress=False)
    short = {"qwen2.5-coder-0.5b": "q05", "qwen2.5-coder-1.5b": "q15",
             "smollm2-135m": "smol"}[model]
    out = []
    for i, (it, g) in enumerate(zip(items, gens, strict=True)):
        out.append({"id": f"s-{short}-{name}-{i:02d}", "model": model, "source": it["source"],
                    "category": it.get("category") or it.get("label") or "",
                    "prompt": it["prompt"], "response": g[0].answer,
                    "lang": "zh" if _zh(it["prompt"]) else "en", "decoding": decoding,
                    "finished": g[0].finished, "n_tokens": len(g[0].token_ids),
                    "steering": steering})
    return out


def run(out: Path) -> None:
    done = {json.loads(x)["id"]: json.loads(x) for x in out.read_text("utf-8").splitlines()
            if x.strip()} if out.is_file() else {}
    old = [json.loads(x) for x in LABELS.read_text("utf-8").splitlines() if x.strip()]

    def save(rows: list[dict]) -> None:
        done.update({r["id"]: r for r in rows})
        write_jsonl(out, list(done.values()))

    def todo(prefix: str) -> bool:
        return not any(k.startswith(prefix) for k in done)

    fit = load_prompts("deccp_censored").take(40, seed=1).prompts
    ordinary = load_prompts("harmless_train").take(64, seed=1).prompts
    lm = load_model("qwen2.5-coder-0.5b")
    pool = Pool({r["prompt"] for r in old if r["model"] == lm.name}, SEED)
    vec = md_vectors(lm, fit, ordinary)
    for name, op, layers, alpha, decoding in QWEN_PROFILES:
        items = [it for d, f, n in PER_PROFILE for it in pool.take(d, f, n)]
        if not todo(f"s-q05-{name}-"):
            continue
        t0 = time.perf_counter()
        o = (ablation(vec[15], layers) if op == "ablate"
             else addition({i: vec[i] for i in layers}, -alpha))
        steering = {"op": op, "layers": layers, "alpha_x_gap": alpha, "direction": "md@deccp"
                    + ("/15" if op == "ablate" else "")}
        save(_rows(lm.name, name, items, decoding, lm, Profile((o,)), steering))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if todo("s-q05-plain-"):
        items = [it for d, f, n in UNSTEERED[lm.name] for it in pool.take(d, f, n)]
        save(_rows(lm.name, "plain", items, "greedy", lm, None, None))
    smol = load_model("smollm2-135m")
    spool = Pool(set(), SEED + 1)
    harmful = load_prompts("harmful_train").take(48, seed=1).prompts
    svec = md_vectors(smol, harmful, ordinary)
    for name, layers, alpha in SMOL_PROFILES:
        items = spool.take("harmless_test", "", 6) + spool.take("xstest", "safe", 4)
        if todo(f"s-smol-{name}-"):
            save(_rows(smol.name, name, items, "greedy", smol,
                       Profile((addition({i: svec[i] for i in layers}, alpha),)),
                       {"op": "add", "layers": layers, "alpha_x_gap": alpha,
                        "direction": "md@harmful_train", "mode": "induce"}))
    del smol
    extra = Pool(set(), SEED + 3)
    for name, op, layers, alpha, decoding in EXTRA_PROFILES:
        items = [it for d, f, n in PER_PROFILE for it in extra.take(d, f, n)]
        if todo(f"s-q05-{name}-"):
            lm = lm if lm is not None else load_model("qwen2.5-coder-0.5b")
            o = addition({i: vec[i] for i in layers}, -alpha)
            save(_rows(lm.name, name, items, decoding, lm, Profile((o,)), {
                "op": op, "layers": layers, "alpha_x_gap": alpha, "direction": "md@deccp"}))
    lm = None
    if todo("s-q15-plain-"):
        big = load_model("qwen2.5-coder-1.5b")
        items = _draw_all(UNSTEERED[big.name], SEED + 2)
        save(_rows(big.name, "plain", items, "greedy", big, None, None))


def _draw_all(spec: list[tuple[str, str, int]], seed: int) -> list[dict[str, Any]]:
    pool = Pool(set(), seed)
    return [it for d, f, n in spec for it in pool.take(d, f, n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/steered_responses.jsonl")
    args = ap.parse_args()
    t0 = time.perf_counter()
    run(Path(args.out))
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
