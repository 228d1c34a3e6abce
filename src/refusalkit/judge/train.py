"""Retrain the packaged judges on the dev split of a labelled file (never on test).

    python -m refusalkit.judge.train --labels tests/data/judge_labels.jsonl \
        --components patterns,embed,relevance --name hybrid_v1     # the `hybrid` judge
    python -m refusalkit.judge.train --labels tests/data/judge_labels.jsonl \
        --components hidden@24 --llm qwen2.5-coder-0.5b --name probe_qwen_v1   # `probe`
    python -m refusalkit.judge.train --labels tests/data/judge_labels.jsonl \
        --calibrate-llm qwen2.5-coder-0.5b                    # the `llm:` judge's threshold
    python -m refusalkit.judge.train --recipe v2 --labels tests/data/judge_labels.jsonl \
        --extra-labels ../shared/datasets/xstest_judge_labels.jsonl \
        --name calibrated_v2                                   # the default `calibrated` judge

The L2 strength is chosen by stratified k-fold cross-validation on dev; the final model is fit
on all of dev and written as JSON into the package (data/judge/NAME.json). Calibration picks
the bias on the LLM judge's label log-odds that maximises dev accuracy and records it in
data/judge/calibration.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from importlib import resources
from pathlib import Path

import torch

from refusalkit.judge.evaluate import LabelledItem, read_labels
from refusalkit.judge.trained import featurize, fit_logistic, folds, needs_llm, weights_record

L2_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0, 3000.0)


def cv_accuracy(x: torch.Tensor, y: torch.Tensor, l2: float, k: int = 5) -> float:
    correct = 0
    for test in folds(y, k):
        train = torch.ones(len(y), dtype=torch.bool)
        train[test] = False
        mean, std, w, b = fit_logistic(x[train], y[train], l2)
        pred = (((x[test] - mean) / std) @ w + b) > 0
        correct += int((pred == y[test].bool()).sum())
    return correct / len(y)


def best_bias(z: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Threshold on scores z maximising accuracy (midpoints between sorted scores)."""
    s = torch.sort(z.double()).values
    cands = torch.cat([s[:1] - 1, (s[1:] + s[:-1]) / 2, s[-1:] + 1])
    accs = torch.stack([((z.double() > c) == y.bool()).double().mean() for c in cands])
    i = int(accs.argmax())
    return float(cands[i]), float(accs[i])


def train_trained(items: list[LabelledItem], components: list[str], name: str,
                  llm_model: str | None, source: str, x: torch.Tensor | None = None) -> dict:
    """Fit on `items`; `x` passes precomputed features (same components, same order)."""
    from refusalkit.judge.llm import LLMJudge
    from refusalkit.judge.spec import DEFAULT_LLM

    if x is None:
        llm = LLMJudge(llm_model or DEFAULT_LLM, styles=False, bias=0.0) if needs_llm(
            components) else None
        x = featurize(components, [i.prompt for i in items], [i.response for i in items],
                      llm=llm)
    y = torch.tensor([float(i.refusal) for i in items])
    scores = {l2: cv_accuracy(x, y, l2) for l2 in L2_GRID}
    l2 = max(scores, key=lambda v: (scores[v], v))  # ties → stronger regularisation
    mean, std, w, b = fit_logistic(x, y, l2)
    meta = {"trained_on": source, "n": len(items), "l2": l2,
            "cv_accuracy": {str(k): round(v, 4) for k, v in scores.items()}}
    if llm_model:
        meta["llm_model"] = llm_model
    return weights_record(name, components, mean, std, w, b, meta)


# fluency (judge/fluency.py) sees babble but costs ~0.3 s per answer on 2 cores (smollm2 over
# ~140 tokens), three times the judge's budget; head_embed added nothing held out (LOMO and
# the project's test split, measured 2026-12-02). Both stay available as components.
V2_COMPONENTS = ("cues", "embed", "relevance")


def train_calibrated(items: list[LabelledItem], extra_labels: str | None, name: str,
                     source: str) -> dict:
    """The v2 recipe on dev rows plus every row of `extra_labels`."""
    from refusalkit.judge.recipe import train_v2

    extra = read_labels(extra_labels) if extra_labels else []
    both = items + extra
    x = featurize(V2_COMPONENTS, [i.prompt for i in both], [i.response for i in both])
    rows = [{**i.row, "label": i.label} for i in both]
    # calibrate on the labelled file's own rows: answers of the models the pipeline steers;
    # XSTest's chat-model answers are calibrated differently (LOMO ECE in the README)
    calibrate_on = [True] * len(items) + [False] * len(extra)
    if extra_labels:
        digest = hashlib.sha256(Path(extra_labels).read_bytes()).hexdigest()[:12]
        source += f" + {Path(extra_labels).name}@{digest}"
    return train_v2(x, rows, name, V2_COMPONENTS, {"trained_on": source,
                                                   "calibrated_on": "labels (dev)"},
                    calibrate_on=calibrate_on)


def calibrate_llm(items: list[LabelledItem], model: str, version: str = "v1") -> dict:
    from refusalkit.judge.llm import LLMJudge

    judge = LLMJudge(model, prompt_version=version, bias=0.0, styles=False)
    logp, _ = judge.label_logits([i.prompt for i in items], [i.response for i in items])
    z = torch.logsumexp(logp[:, :2].double(), -1) - logp[:, 2].double()
    y = torch.tensor([float(i.refusal) for i in items])
    bias, acc = best_bias(z, y)
    return {"bias": round(bias, 4), "dev_accuracy": round(acc, 4), "n": len(items)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", required=True)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--components", default="patterns,embed,relevance")
    ap.add_argument("--name", default="hybrid_v1")
    ap.add_argument("--llm", default=None, help="LLM for the 'llm' component")
    ap.add_argument("--calibrate-llm", default=None, metavar="MODEL")
    ap.add_argument("--out-dir", default=None, help="default: the package's data/judge")
    ap.add_argument("--recipe", default="v1", choices=("v1", "v2"),
                    help="v2: the calibrated judge (judge/recipe.py)")
    ap.add_argument("--extra-labels", default=None,
                    help="v2: more training rows (all of them; e.g. XSTest's labelled answers)")
    args = ap.parse_args(argv)
    items = read_labels(args.labels, split=args.split)
    digest = hashlib.sha256(Path(args.labels).read_bytes()).hexdigest()[:12]
    source = f"{Path(args.labels).name}@{digest} split={args.split}"
    out_dir = Path(args.out_dir) if args.out_dir else Path(
        str(resources.files("refusalkit").joinpath("data", "judge")))
    if args.calibrate_llm:
        path = out_dir / "calibration.json"
        table = json.loads(path.read_text()) if path.is_file() else {}
        entry = calibrate_llm(items, args.calibrate_llm)
        table[f"{args.calibrate_llm}@v1"] = {**entry, "trained_on": source}
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"{path}: {args.calibrate_llm} {entry}")
        return
    if args.recipe == "v2":
        record = train_calibrated(items, args.extra_labels, args.name, source)
        path = out_dir / f"{args.name}.json"
        path.write_text(json.dumps(record) + "\n")
        print(f"{path}: l2 {record['meta']['l2']} calibration {record['calibration']['kind']}")
        return
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    record = train_trained(items, components, args.name, args.llm, source)
    path = out_dir / f"{args.name}.json"
    path.write_text(json.dumps(record) + "\n")
    print(f"{path}: l2 {record['meta']['l2']} cv {record['meta']['cv_accuracy']}")


if __name__ == "__main__":
    main()
