"""Run the benchmarks and write bench/RESULTS.md (what `make bench` does).

    python bench/run_all.py                         # default set (~50 min on 2 cores)
    python bench/run_all.py --quick                 # small sizes, a few minutes
    python bench/run_all.py --benches activations,generation --out /tmp/r.md
    python bench/run_all.py --list

Each benchmark runs in its own process (memory figures are not polluted by an earlier one,
and one that fails or times out does not stop the rest). Its markdown section, or for
scripts without one its printed output, goes into the results file under a header with the
machine, the date, the load average and the exact commands.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO, machine, md_table, other_cpu

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    script: str
    what: str
    md: bool = True  # writes its own markdown section via --md
    default: bool = True
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ("--quick",)
    timeout_s: int = 1200
    model_flag: bool = False  # accepts --model
    env: dict[str, str] = field(default_factory=dict)


BENCHES: dict[str, Bench] = {
    # Default sizes keep `make bench` to about 50 minutes on 2 cores; each script's own
    # defaults (e.g. 256 prompts for activations) are larger.
    "activations": Bench("bench_activations.py", "activation capture vs bare passes and peers",
                         args=("--n", "64"), model_flag=True),
    "generation": Bench("bench_generation.py", "steered generation vs unsteered and peer",
                        args=("--n", "16", "--repeats", "7"), model_flag=True),
    "search": Bench("bench_search.py", "proxy-guided vs exhaustive steering search",
                    args=("--quick", "--trials", "8"), quick=("--quick",), timeout_s=1800),
    "scaling": Bench("bench_scaling.py", "capture and generation vs prompt count and length",
                     model_flag=True),
    "judge": Bench("bench_judge.py", "judge agreement and seconds per judged response",
                   md=False, quick=("--limit", "16", "--repeats", "1"), timeout_s=1200),
    "serve": Bench("bench_serve.py", "serving throughput, batching on vs off", md=False,
                   args=("--clients", "8", "--requests", "2"),
                   quick=("--clients", "4", "--requests", "2", "--repeats", "1"),
                   timeout_s=900),
    "dtype": Bench("bench_dtype.py", "greedy generation in float32 vs bfloat16 weights",
                   default=False, quick=("--n", "16", "--repeats", "1"), model_flag=True),
    "greedy": Bench("bench_greedy.py", "greedy decoding that drops ended rows vs "
                    "model.generate", default=False, quick=("--n", "32", "--repeats", "1"),
                    model_flag=True),
    "nll": Bench("bench_nll.py", "answer perplexity: a shared prompt pass vs one pass per "
                 "answer", default=False, quick=("--n", "12", "--repeats", "1"),
                 model_flag=True),
    "steer": Bench("bench_steer.py", "issue 4's acceptance run of configs/steer_qwen.toml "
                   "(about 22 min)", default=False, quick=(), timeout_s=3000),
    "analyze": Bench("bench_analyze.py", "the full `analyze` run (about 45 min)", md=False,
                     default=False, quick=(), timeout_s=3600),
}


def run_one(name: str, b: Bench, quick: bool, model: str | None, work: Path) -> dict:
    """Run one bench script; returns its command, status, seconds and markdown."""
    cmd = [sys.executable, str(HERE / b.script), *b.args, *(b.quick if quick else ())]
    if model and b.model_flag:
        cmd += ["--model", model]
    if name == "analyze":
        cmd += ["--out", str(work / "analyze_run")]
    if name == "steer":
        cmd += ["--out", str(work / "steer_run")]
    md_file = work / f"{name}.md"
    if b.md:
        cmd += ["--md", str(md_file), "--json", str(work / f"{name}.json")]
    shown = " ".join(shlex.quote(c) for c in [Path(cmd[0]).name, *cmd[1:]])
    shown = shown.replace(str(HERE) + "/", "bench/").replace(str(work) + "/", "$TMP/")
    print(f"\n=== {name}: {shown}", file=sys.stderr, flush=True)
    load0 = os.getloadavg()[0]
    other0 = other_cpu()
    t0 = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", **b.env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=None,
                              text=True, timeout=b.timeout_s)
        rc, stdout = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    seconds = time.perf_counter() - t0
    sys.stderr.write(stdout[-4000:])
    if b.md and rc == 0 and md_file.is_file():
        body = md_file.read_text().rstrip()
    else:
        title = f"## {name} ({b.what})"
        status = "" if rc == 0 else (f"\n\n**Did not finish** (exit status {rc}); the last "
                                     "lines of its output follow.")
        text = stdout.strip()[-6000:] or "(no output)"
        body = f"{title}{status}\n\n```\n{text}\n```"
    return {"name": name, "cmd": shown, "rc": rc, "seconds": seconds, "md": body,
            "load_before": load0, "load_after": os.getloadavg()[0], "other_before": other0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benches", default=None,
                    help="comma-separated names (default: " +
                    ",".join(n for n, b in BENCHES.items() if b.default) + ")")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not data")
    ap.add_argument("--model", default=None, help="model for the activation, generation and "
                                                  "scaling benches (default qwen2.5-coder-0.5b)")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for n, b in BENCHES.items():
            print(f"{n:<12} {'default' if b.default else 'opt-in ':<8} {b.script:<22} {b.what}")
        return
    names = ([n.strip() for n in args.benches.split(",") if n.strip()] if args.benches
             else [n for n, b in BENCHES.items() if b.default])
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        sys.exit(f"unknown bench {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    info = machine()
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="refusalkit_bench_") as tmp:
        for n in names:
            b = BENCHES[n]
            if not (HERE / b.script).is_file():
                print(f"skipping {n}: bench/{b.script} not present", file=sys.stderr)
                continue
            results.append(run_one(n, b, args.quick, args.model, Path(tmp)))
    total = time.perf_counter() - t0
    args.out.write_text(render(info, results, total, args) + "\n")
    print(f"\nwrote {args.out} ({total / 60:.1f} min)", file=sys.stderr)
    if any(r["rc"] != 0 for r in results):
        sys.exit(1)


def render(info: dict, results: list[dict], total: float, args: argparse.Namespace) -> str:
    busy = max([r["other_before"] for r in results], default=0.0)
    cores = info["cores"] or 1
    warn = []
    if args.quick:
        warn.append("**Quick run** (`--quick`): small sizes for a smoke test; the ratios are "
                    "indicative only.")
    if busy > 0.25 * cores:
        warn.append(f"**Taken next to other jobs**: other processes used up to {busy:.2f} of "
                    f"{cores} cores when a benchmark started. Interleaved repeats spread that "
                    "load over all variants, so ratios are more trustworthy than absolute "
                    "times, but both are noisy.")
    cmd = "python bench/run_all.py" + "".join(
        f" {a}" for a in sys.argv[1:])
    rows = [(r["name"], r["cmd"], "ok" if r["rc"] == 0 else f"FAILED ({r['rc']})",
             f"{r['seconds']:.0f}", f"{r['load_before']:.1f} → {r['load_after']:.1f}",
             f"{r['other_before']:.2f}")
            for r in results]
    head = [
        "# Benchmark results",
        "",
        "Generated by `make bench` (`" + cmd + "`); do not edit by hand. Every speed figure "
        "is a median over repeats that interleave the compared variants in one process; "
        "ratios are between variants of the same run.",
        "",
        *[w + "\n" for w in warn],
        "## Machine",
        "",
        md_table(["", ""], [(k, ", ".join(map(str, v)) if isinstance(v, list) else v)
                            for k, v in info.items()]),
        "",
        f"## Runs ({total / 60:.1f} min in all)",
        "",
        md_table(["bench", "command", "status", "seconds", "load avg before → after",
                  "other processes' cores at start"], rows),
    ]
    return "\n".join(head + [""] + ["\n\n".join(r["md"] for r in results)])


if __name__ == "__main__":
    main()
