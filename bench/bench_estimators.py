"""MD, RMD and WRMD steered the same way on the held-out target (issue 15 §3: "WRMD vs MD"
on both sizes).

    python bench/bench_estimators.py --out runs/steer_qwen_pub
    python bench/bench_estimators.py --out runs/steer_qwen15_pub --set model=qwen2.5-coder-1.5b …

Reuses a finished steer run (pass the same --config/--set it ran with): its fitting stages,
its gate and the parameters verification chose (layers, strength in units of each layer's
refuse-vs-answer gap, gate). Each estimator's direction is fitted on the run's own classes and
steered with those parameters and its own gaps, as the pipeline steers its WRMD baseline;
every held-out target prompt is answered and judged. The MD row reproduces the run's own
held-out figure (a check that nothing else changed). bench_claims.py gives the same
estimators' out-of-fold separability from the same activations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_claims import METHODS
from common import REPO, emit, load_note, md_table, say


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "steer_qwen.toml")
    ap.add_argument("--out", type=Path, required=True, help="a finished steer run folder")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not (args.out / "stages" / "verify.json").is_file():
        raise SystemExit(f"error: {args.out} holds no finished steer run (no verify stage); "
                         "run bench/bench_steer.py --out there first")

    from refusalkit.config import parse_set
    from refusalkit.evaluate import refusal_rate
    from refusalkit.quality import assess
    from refusalkit.quality import rates as quality_rates
    from refusalkit.steer.config import SteerConfig
    from refusalkit.steer.fit import estimate, gaps_levels, gate_of_record, search_space
    from refusalkit.steer.pipeline import steer_state
    from refusalkit.steer.search import build_profile

    cfg = SteerConfig.load(args.config, parse_set(args.sets))
    note = load_note()
    params = json.loads((args.out / "stages" / "verify.json").read_text())["chosen"]["params"]
    metrics = json.loads((args.out / "metrics.json").read_text())
    rows, data = [], {}
    with steer_state(cfg, args.out, resume=True, show_progress=False) as st:
        ex = st.ex
        _, fit, _, gate_rec = st.fitted()
        gate = gate_of_record(gate_rec)
        space = search_space(ex.lm, cfg.search, st.mode)
        held = st.splits.target_eval
        cl = fit.classes
        for m in METHODS:
            dirs = estimate(m, cl.refused, cl.complied, w_refused=cl.w_refused,
                            w_complied=cl.w_complied, neutral=fit.acts["neutral"],
                            lam=cfg.directions.lam)
            gaps, levels = gaps_levels(cl, st.mode, dirs)
            prof = build_profile(params, dirs, gaps, space, gate, levels)
            js, opened = ex.gated_answers(held, prof)
            q = quality_rates([assess(j.prompt, j.response, j.confidence, j.on_topic)
                               for j in js])
            data[m] = {"refusal": refusal_rate(js), "useful": q["useful"],
                       "on_topic": q["on_topic"], "loop": q["loop"],
                       "gate_open": float(opened.double().mean()), "layers": prof.layers,
                       "answers": [{"prompt": j.prompt, "response": j.response,
                                    "confidence": j.confidence} for j in js]}
            say(f"{m}: refusal {data[m]['refusal']:.2f} useful {data[m]['useful']:.2f}")
            rows.append([m.upper(), f"{data[m]['refusal']:.2f}", f"{data[m]['useful']:.2f}",
                         f"{data[m]['on_topic']:.2f}", f"{data[m]['loop']:.2f}"])
    same = (abs(data["md"]["refusal"] - metrics["target_refusal_after"]) < 1e-9
            and abs(data["md"]["useful"] - metrics["target_useful_after"]) < 1e-9)
    if not same:
        say("warning: the MD row does not reproduce the run's own held-out figure; the model, "
            "data, judge or code differ from the run's, so compare the rows with each other "
            "only")
    md = (f"{cfg.model}, `{args.out}`: the chosen parameters {params} (layers "
          f"{data['md']['layers']}), held-out target ({len(held)} prompts; unsteered refusal "
          f"{metrics['target_refusal_before']:.2f}; the run's own MD figure "
          f"{metrics['target_refusal_after']:.2f} refusal / "
          f"{metrics['target_useful_after']:.2f} useful); {note}\n\n"
          + md_table(["estimator", "refusal", "useful", "on topic", "loop"], rows))
    emit(md, args.md, {"params": params, "estimators": data}, args.json)


if __name__ == "__main__":
    main()
