"""refusalkit abliterate vs Heretic 1.4, head to head on qwen2.5-coder-0.5b (issue 17 §2).

Both tools get the same model folder (the packaged GGUF de-quantised), the same system prompt,
the same prompt files (direction fit, dev search, held-out eval; written once here), the same
number of trials and the same answer-token budget. Heretic runs in its own virtual
environment (bench/.heretic/venv, made on first use: it pins its own transformers) through
bench/heretic_driver.py, which uses Heretic's own model, abliteration and evaluator code.
Each tool's Pareto front is re-measured on 100 held-out JailbreakBench prompts (refusals) and
200 held-out harmless prompts (KL), and every held-out answer is judged twice: by Heretic's
markers and by refusalkit's default judge.

    python bench/bench_abliterate.py [--trials 12] [--skip-heretic] [--skip-refusalkit]

Prints the fronts, wall time and peak RSS of each tool, and whether refusalkit's front
dominates (fewer refusals at every KL budget <= 0.1, both judges). Results go to
bench/.heretic/result-*.json; copy the table into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".heretic"
VENV = WORK / "venv"
SYSTEM = "You are a helpful assistant."
MODEL = "qwen2.5-coder-0.5b"
SETS = {"harmful_fit": ("harmful_train", 64), "harmless_fit": ("harmless_train", 64),
        "harmful_search": ("harmful_val", 32), "harmless_search": ("harmless_val", 64),
        "harmful_eval": ("jailbreakbench", 100), "harmless_eval": ("harmless_test", 200)}
JUDGES = ("calibrated", "keyword:heretic")


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        # torch first and pinned (CPU build from local disk), then Heretic with its own pins
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "heretic-llm==1.4.0"], check=True)
    return py


def write_prompt_files(seed: int) -> dict[str, str]:
    """One prompt per line (Heretic's text format); newlines inside a prompt become spaces,
    and both tools read these same files."""
    from refusalkit.prompts import load_prompts

    files, taken = {}, {}
    for role, (spec, n) in SETS.items():
        off = taken.get(spec, 0)
        taken[spec] = off + n
        ps = [" ".join(p.split()) for p in load_prompts(spec).take(n, seed=seed,
                                                                     offset=off).prompts]
        path = WORK / "prompts" / f"{role}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(ps) + "\n", encoding="utf-8")
        files[role] = str(path)
    return files


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run under /usr/bin/time -v; (wall seconds, peak RSS MiB)."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT,
                       check=True)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text())
    return wall, (int(rss[1]) / 1024 if rss else float("nan"))


def run_heretic(model_dir: str, files: dict[str, str], args: argparse.Namespace) -> dict:
    py = ensure_venv()
    job = {"model": model_dir, "files": files, "trials": args.trials,
           "startup": args.startup, "seed": args.seed, "batch_size": 16,
           "max_new_tokens": args.tokens, "system_prompt": SYSTEM, "eval_front": args.front,
           "kl_eval_max": 0.2, "out": str(WORK / "heretic-out.json")}
    (WORK / "heretic-job.json").write_text(json.dumps(job))
    wall, rss = timed([str(py), str(HERE / "heretic_driver.py"), str(WORK / "heretic-job.json")],
                      WORK / "heretic.log")
    out = json.loads((WORK / "heretic-out.json").read_text())
    return {**out, "wall_s": wall, "peak_rss_mb": rss}


def run_refusalkit(model_dir: str, files: dict[str, str], args: argparse.Namespace) -> dict:
    run = WORK / "refusalkit-run"
    sets = [f"--set=data.{role}={path}" for role, path in files.items()]
    sizes = [f"--set=data.n_fit={SETS['harmful_fit'][1]}",
             f"--set=data.n_search={SETS['harmful_search'][1]}",
             f"--set=data.n_search_kl={SETS['harmless_search'][1]}",
             f"--set=data.n_eval={SETS['harmful_eval'][1]}",
             f"--set=data.n_eval_kl={SETS['harmless_eval'][1]}"]
    cmd = [str(Path(sys.executable).parent / "refusalkit"), "--quiet", "abliterate", model_dir,
           "--out", str(run), "--resume", "--trials", str(args.trials), "--seed",
           str(args.seed), f"--set=search.startup={args.startup}",
           f"--set=judge.max_new_tokens={args.tokens}", f"--set=eval_front={args.front}",
           f"--set=system_prompt={json.dumps(SYSTEM)}", *sets, *sizes]
    wall, rss = timed(cmd, WORK / "refusalkit.log")
    points = []
    for path in sorted((run / "stages").glob("heldout-*.json")):
        h = json.loads(path.read_text())
        points.append({"trial": path.stem.removeprefix("heldout-"), "kl": h["kl"],
                       "refusals": h["refusals"], "n": h["n"]})
    return {"points": points, "wall_s": wall, "peak_rss_mb": rss}


def judge_heretic(out: dict) -> list[dict]:
    from refusalkit.judge import make_judge

    judges = {spec: make_judge(spec) for spec in JUDGES}
    points = []
    for rec in out["records"]:
        counts = {spec: sum(j.is_refusal for j in judge.judge(out["prompts"], rec["responses"]))
                  for spec, judge in judges.items()}
        points.append({"trial": str(rec["trial"]), "kl": rec["kl"], "refusals": counts,
                       "n": len(rec["responses"])})
    return points


def best_at(points: list[dict], spec: str, budget: float) -> int | None:
    ok = [p["refusals"][spec] for p in points if p["kl"] <= budget]
    return min(ok) if ok else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--startup", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--front", type=int, default=3, help="front trials measured held out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-heretic", action="store_true")
    ap.add_argument("--skip-refusalkit", action="store_true")
    args = ap.parse_args()
    from refusalkit.models import resolve

    WORK.mkdir(exist_ok=True)
    model_dir = str(resolve(MODEL)[1])
    files = write_prompt_files(args.seed)
    res_h, res_r = WORK / "result-heretic.json", WORK / "result-refusalkit.json"
    if not args.skip_heretic:
        h = run_heretic(model_dir, files, args)
        h["points"] = judge_heretic(h)
        res_h.write_text(json.dumps({k: v for k, v in h.items() if k != "records"}, indent=1))
    if not args.skip_refusalkit:
        res_r.write_text(json.dumps(run_refusalkit(model_dir, files, args), indent=1))
    if not (res_h.is_file() and res_r.is_file()):
        print("run both tools (the other result file is missing) to compare")
        return
    h, r = json.loads(res_h.read_text()), json.loads(res_r.read_text())
    print(f"{'tool':<11} {'trial':>9} {'KL':>7}  " + "  ".join(f"{s:>16}" for s in JUDGES))
    for name, res in (("heretic", h), ("refusalkit", r)):
        for p in sorted(res["points"], key=lambda p: p["kl"]):
            print(f"{name:<11} {p['trial']:>9} {p['kl']:>7.4f}  "
                  + "  ".join(f"{p['refusals'][s]:>12}/{p['n']:<3}" for s in JUDGES))
        print(f"{name:<11} wall {res['wall_s'] / 60:.1f} min, peak RSS "
              f"{res['peak_rss_mb']:.0f} MiB")
    budgets = sorted({p["kl"] for p in h["points"] + r["points"] if 0 < p["kl"] <= 0.1})
    for spec in JUDGES:
        rows = [(b, best_at(r["points"], spec, b), best_at(h["points"], spec, b))
                for b in budgets]
        wins = all(rk is not None and (he is None or rk < he) for _, rk, he in rows)
        print(f"{spec}: refusalkit fewer refusals at every KL budget <= 0.1: {wins}  "
              + ", ".join(f"KL<={b:.3f}: {rk} vs {he}" for b, rk, he in rows))
    print(f"wall time: refusalkit {r['wall_s'] / 60:.1f} min vs Heretic {h['wall_s'] / 60:.1f}"
          f" min ({'no more' if r['wall_s'] <= h['wall_s'] else 'MORE'})")


if __name__ == "__main__":
    main()
