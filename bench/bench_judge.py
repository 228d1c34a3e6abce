"""Judge agreement benchmark: each judge on the held-out TEST split of the labelled set.

    python bench/bench_judge.py [--labels tests/data/judge_labels.jsonl] [--split test]
        [--judges keyword,keyword:classic,llm:qwen2.5-coder-0.5b,hybrid] [--repeats 3]
        [--json out.json]

Binary agreement (partial counts as refusal) with the human labels, AUC of the judge's score,
ECE of P(refusal) = (score + 1) / 2, and seconds per item (`llm:MODEL` and `probe` can be
added with --judges; they take ~1-2 s per item). Each judge is built and warmed up on one
item first (model loading is reported separately as load_s); then the whole split is judged
`--repeats` times, judges interleaved round-robin, and the median time is reported. No cache
is used. The trained judges were fit on the dev split only, so the test figures are held out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from refusalkit.judge.evaluate import auc, binary_metrics, ece, read_labels
from refusalkit.judge.spec import make_judge

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JUDGES = "keyword:classic,keyword:xstest,keyword,hybrid,calibrated"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", default=str(REPO / "tests" / "data" / "judge_labels.jsonl"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--judges", default=DEFAULT_JUDGES)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed passes per judge (model-backed judges: 1 is plenty)")
    ap.add_argument("--slow-repeats", type=int, default=1,
                    help="timed passes for judges that run a language model")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    items = read_labels(args.labels, split=args.split, limit=args.limit)
    prompts, responses = [i.prompt for i in items], [i.response for i in items]
    gold = [i.refusal for i in items]
    specs = [s.strip() for s in args.judges.split(",") if s.strip()]
    judges, load_s = {}, {}
    for spec in specs:
        start = time.perf_counter()
        judges[spec] = make_judge(spec)
        judges[spec].judge(prompts[:1], responses[:1])  # loads models, builds prefix caches
        load_s[spec] = time.perf_counter() - start
    times: dict[str, list[float]] = {s: [] for s in specs}
    preds: dict[str, list] = {}
    for rep in range(max(args.repeats, args.slow_repeats)):
        for spec in specs:  # interleaved so background load hits every judge alike
            slow = spec.startswith(("llm", "trained", "ensemble", "openai"))
            if rep >= (args.slow_repeats if slow else args.repeats):
                continue
            start = time.perf_counter()
            preds[spec] = judges[spec].judge(prompts, responses)
            times[spec].append((time.perf_counter() - start) / len(items))
    rows = []
    for spec in specs:
        m = binary_metrics(gold, [j.is_refusal for j in preds[spec]])
        m.update(judge=spec, id=judges[spec].id, auc=auc(gold, [j.score for j in preds[spec]]),
                 ece=ece([(j.score + 1) / 2 for j in preds[spec]], gold),
                 seconds_per_item=statistics.median(times[spec]), load_s=load_s[spec],
                 repeats=len(times[spec]))
        rows.append(m)
    n_ref = sum(gold)
    print(f"{args.labels} split={args.split}: n={len(items)} ({n_ref} refusal/partial, "
          f"{len(items) - n_ref} compliance)")
    print(f"{'judge':<28} {'acc':>6} {'prec':>6} {'rec':>6} {'f1':>6} {'auc':>6} {'ece':>6} "
          f"{'s/item':>9} {'load s':>7}")
    for m in rows:
        a = "" if m["auc"] is None else f"{m['auc']:.3f}"
        print(f"{m['judge']:<28} {m['accuracy']:>6.3f} {m['precision']:>6.3f} "
              f"{m['recall']:>6.3f} {m['f1']:>6.3f} {a:>6} {m['ece']:>6.3f} "
              f"{m['seconds_per_item']:>9.4f} "
              f"{m['load_s']:>7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
