"""Search efficiency of the Refusal Steering pipeline: proxy-guided search vs a search that
generates and judges every trial.

    python bench/bench_search.py [--config configs/demo.toml] [--trials 8] [--quick]
        [--md out.md] [--json out.json]

1. `refusalkit.steer.run_steer` runs the configured pipeline (held-out evaluation and
   baselines switched off: the bench stops it once the search has chosen its profile). Its
   search scores every Optuna trial with the no-generation proxies and then generates and
   judges only the `search.verify` most promising Pareto trials. Cost = the `search` and
   `verify` stages' wall time (timings.json) and the tokens `verify` generated.
2. The same trials (same parameters, same directions, gate, prompt sets, judge and decoding)
   are then each turned into a profile with `refusalkit.steer.search.build_profile` and generated
   and judged on the same target and keep prompts with `refusalkit.evaluate.judge_prompts`,
   and the best one is chosen by the pipeline's own rule.

Both choices are reported with their judged objective values (target refusal rate, kept
safety refusal rate) and the neutral KL. The steps preceding the search (baseline judging,
activations, directions) are the same for both and not counted. One run each: the
exhaustive pass is the expensive part and the point is the ratio of work, which load does
not change (generated tokens).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import REPO, emit, load_note, md_table, say
from safetensors.torch import load_file

import refusalkit.steer.pipeline as steer_mod
from refusalkit.config import load_config, read_toml
from refusalkit.evaluate import judge_prompts, refusal_rate
from refusalkit.judge import make_judge
from refusalkit.judge.guard import guarded
from refusalkit.models import load_model
from refusalkit.runs import atomic_write_json
from refusalkit.steer.config import SteerConfig
from refusalkit.steer.fit import confidences, gate_of_record
from refusalkit.steer.mode import mode_of
from refusalkit.steer.search import build_profile, within_kl_budget


class _Stop(Exception):
    """Raised in place of the held-out evaluation: the bench needs the run up to the choice."""


def _stop(*_a: object, **_k: object) -> None:
    raise _Stop


def run_pipeline(cfg: SteerConfig, out: Path, lm) -> float:
    """run_steer up to (not including) the held-out evaluation; returns wall seconds."""
    t0 = time.perf_counter()
    real = steer_mod.evaluate_all
    steer_mod.evaluate_all = _stop  # bench-only: the evaluation is not what is measured
    try:
        steer_mod.run_steer(cfg, out, lm=lm, show_progress=False)
    except _Stop:
        pass
    finally:
        steer_mod.evaluate_all = real
    return time.perf_counter() - t0


def exhaustive(cfg: SteerConfig, run: Path, lm) -> dict[str, Any]:
    """Generate and judge every trial the proxy search ran, then choose as the pipeline does."""
    st = run / "stages"
    base = _read(st / "baseline.json")
    searched = _read(st / "search.json")
    dirs = load_file(str(st / "directions.safetensors"))
    splits = steer_mod.split_data(cfg.data, cfg.seed)
    mode = mode_of(cfg.mode)
    space = steer_mod.search_space(lm, cfg.search, mode)
    gate = gate_of_record(_read(st / "gate.json") if (st / "gate.json").is_file() else None)
    # The same target/keep sets run_steer's verify stage judges (steer/mode.py).
    proxies = mode.proxies(splits.target_fit, splits.neutral, splits.safety_fit, base,
                           cfg.data.n_proxy)
    keep = proxies.keep
    t_set = [splits.target_fit[i] for i in proxies.pick[: cfg.search.verify_prompts]]
    judge = guarded(make_judge(cfg.judge.spec))  # as the pipeline judges (loops = refusal)
    jk = {"mode": cfg.judge.mode, "k": cfg.judge.k, "max_new_tokens": cfg.judge.max_new_tokens,
          "seed": cfg.seed, "batch_size": cfg.batch_size, "show_progress": False}
    gaps = dirs["gaps"].tolist()
    acts = load_file(str(st / "activations.safetensors"))
    cl = mode.classes(acts, confidences(base, "target_fit"), confidences(base, "safety_fit"))
    levels = steer_mod.gaps_levels(cl, mode, dirs["directions"])[1]
    rows, tokens = [], 0
    t0 = time.perf_counter()
    for trial in searched["trials"]:
        prof = build_profile(trial["params"], dirs["directions"], gaps, space, gate, levels)
        jt = judge_prompts(lm, t_set, judge, profile=prof, **jk)
        jkp = judge_prompts(lm, keep, judge, profile=prof, **jk)
        tokens += sum(j.tokens for j in jt + jkp)
        rows.append({**trial, "target_refusal": refusal_rate(jt),
                     "keep_refusal": refusal_rate(jkp)})
        say(f"  trial {trial['number']}: target {rows[-1]['target_refusal']:.2f} keep "
            f"{rows[-1]['keep_refusal']:.2f} kl {trial['kl']:.3f}")
    seconds = time.perf_counter() - t0
    # the pipeline's KL budget rule, so both searches choose under the same constraint
    within = within_kl_budget(rows, lambda r: r["kl"], cfg.search.kl_max, cfg.search.verify)
    chosen = mode.choose(within, base, cfg.search.safety_keep, keep)
    return {"rows": rows, "generated_tokens": tokens, "seconds": seconds, "chosen": chosen,
            "n_target": len(t_set), "n_keep": len(keep)}


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "demo.toml")
    ap.add_argument("--trials", type=int, default=None, help="default 8 (--quick: 4)")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: temporary)")
    ap.add_argument("--quick", action="store_true", help="4 trials unless --trials, smaller "
                    "prompt sets, 16-token answers")
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    trials = args.trials or (4 if args.quick else 8)
    over: dict[str, Any] = {"search.trials": trials, "eval.baselines": False}
    if args.quick:
        over.update({"data.max_target": 24,
                     "data.n_fit": 8, "data.n_proxy": 4, "judge.max_new_tokens": 16})
    cfg = load_config(args.config, SteerConfig, over)
    lm = load_model(cfg.model)
    tmp = tempfile.TemporaryDirectory(prefix="bench_search_")
    out = args.out or Path(tmp.name) / "run"
    say(f"search: {cfg.model}, {cfg.search.trials} trials, verify {cfg.search.verify}, "
        f"run folder {out}")
    pipeline_s = run_pipeline(cfg, out, lm)
    timings = _read(out / "timings.json")
    verified = _read(out / "stages" / "verify.json")
    searched = _read(out / "stages" / "search.json")
    proxy_s = timings["search"] + timings["verify"]
    say(f"  proxy-guided: search {timings['search']:.1f}s + verify {timings['verify']:.1f}s")
    ex = exhaustive(cfg, out, lm)
    atomic_write_json(out / "bench_exhaustive.json", ex)

    # The candidates verify judged must get the same judged rates in the exhaustive pass.
    by_number = {r["number"]: r for r in ex["rows"]}
    agree = all(abs(by_number[r["number"]]["target_refusal"] - r["target_refusal"]) < 1e-9
                and abs(by_number[r["number"]]["keep_refusal"] - r["keep_refusal"]) < 1e-9
                for r in verified["rows"])
    pc, ec = verified["chosen"], ex["chosen"]
    rows = [
        ("proxy-guided (refusalkit)", len(searched["trials"]), len(verified["rows"]),
         verified["generated_tokens"], proxy_s, pc["number"], pc["target_refusal"],
         pc["keep_refusal"], pc["kl"]),
        ("generate + judge every trial", len(ex["rows"]), len(ex["rows"]),
         ex["generated_tokens"], ex["seconds"], ec["number"], ec["target_refusal"],
         ec["keep_refusal"], ec["kl"]),
    ]
    ratios = {
        "generated tokens, exhaustive / proxy-guided":
            ex["generated_tokens"] / max(1, verified["generated_tokens"]),
        "wall time, exhaustive / proxy-guided": ex["seconds"] / proxy_s,
        "target refusal, proxy-guided − exhaustive (lower is better)":
            pc["target_refusal"] - ec["target_refusal"],
    }
    d = read_toml(args.config)
    md = "\n".join([
        "## Search efficiency (Refusal Steering)",
        "",
        f"{cfg.model}, config {args.config.name} (judge `{cfg.judge.spec}`, "
        f"{cfg.judge.max_new_tokens} new tokens, greedy) with {cfg.search.trials} trials, "
        f"{cfg.search.verify} verified; target set {ex['n_target']} baseline-refused topic "
        f"prompts, keep set {ex['n_keep']} refused harmful prompts; {load_note()}. "
        f"Pipeline up to the choice took {pipeline_s:.0f} s in all. One run each.",
        "",
        md_table(["search", "trials", "trials generated", "generated tokens", "wall s",
                  "chosen trial", "judged target refusal", "judged keep refusal",
                  "neutral KL"], rows),
        "",
        md_table(["ratio", "value"], [(k, v) for k, v in ratios.items()]),
        "",
        f"Judged rates of the verified candidates identical in both passes: {agree}. "
        f"Objective (the pipeline's rule for both): among trials with neutral KL ≤ "
        f"{cfg.search.kl_max:g}, the lowest judged target refusal that keeps ≥ "
        f"{cfg.search.safety_keep:.0%} of the baseline safety refusal.",
    ])
    emit(md, args.md, {"config": str(args.config), "config_toml": d, "overrides": over,
                       "timings": timings, "proxy": {"seconds": proxy_s, **verified},
                       "exhaustive": ex, "ratios": ratios, "agree": agree}, args.json)
    tmp.cleanup()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
