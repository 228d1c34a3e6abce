"""Shared helpers for the benchmark scripts: interleaved timing, medians, peak RSS, tables.

Every speed figure in bench/ comes from variants timed side by side in one process, repeats
interleaved (the order rotates each repeat) so that background load and thermal drift hit all
variants alike, and the median of the repeats is reported. Nothing here is imported by the
package or the tests.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("REFUSALKIT_DATA", str(REPO.parent / "shared" / "datasets"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # peers (repeng) draw progress bars otherwise


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS so an RSS baseline is not inflated by garbage an
    earlier variant left in glibc's free lists (no-op where glibc is absent)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class RssPeak:
    """Resident-set size before a block and the peak seen while it ran (MiB)."""

    start_mib: float = 0.0
    peak_mib: float = 0.0

    @property
    def extra_mib(self) -> float:
        return max(0.0, self.peak_mib - self.start_mib)


@contextmanager
def peak_rss(interval_s: float = 0.005) -> Iterator[RssPeak]:
    """Sample this process's RSS on a thread while the block runs.

    ru_maxrss is a lifetime maximum and cannot attribute memory to one step, and tracemalloc
    does not see torch's allocator, so sampling RSS is the honest per-block measure. Short
    spikes between samples can be missed; 5 ms is well below a forward pass here.
    """
    _trim_heap()
    proc = psutil.Process()
    rec = RssPeak()
    rec.start_mib = rec.peak_mib = proc.memory_info().rss / 2**20
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rec.peak_mib = max(rec.peak_mib, proc.memory_info().rss / 2**20)
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        stop.set()
        thread.join()
        rec.peak_mib = max(rec.peak_mib, proc.memory_info().rss / 2**20)


@dataclass
class Timings:
    """Seconds per repeat for each variant, plus the last result each variant returned."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    rss: dict[str, list[RssPeak]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return median(self.seconds[name])

    def spread(self, name: str) -> str:
        xs = self.seconds[name]
        return f"{min(xs):.2f}–{max(xs):.2f}" if xs else "-"


def interleaved(variants: Mapping[str, Callable[[], Any]], repeats: int, *,
                warmup: Mapping[str, Callable[[], Any]] | None = None,
                track_rss: bool = False, log: Callable[[str], None] | None = None) -> Timings:
    """Time each variant `repeats` times, rotating the order every repeat.

    `warmup` (default: the variants themselves) runs once per variant, untimed, first: it
    pays one-off costs (lazy kernels, page faults on the weights, tokenizer caches).
    """
    names = list(variants)
    out = Timings({n: [] for n in names}, {}, {n: [] for n in names})
    for name in names:
        fn = variants[name] if warmup is None else warmup.get(name)
        if fn is not None:
            fn()
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            if track_rss:
                with peak_rss() as rss:
                    t0 = time.perf_counter()
                    res = variants[name]()
                    dt = time.perf_counter() - t0
                out.rss[name].append(rss)
            else:
                t0 = time.perf_counter()
                res = variants[name]()
                dt = time.perf_counter() - t0
            out.seconds[name].append(dt)
            out.results[name] = res
            if log is not None:
                log(f"  repeat {rep + 1}/{repeats} {name}: {dt:.2f}s")
    return out


MIX = ("deccp_censored", "jailbreakbench", "harmless_test", "xstest?label=safe")
MIX_NOTE = "a quarter each of deccp_censored, JailbreakBench, harmless_test, XSTest-safe"


def steer_mix(n: int, seed: int = 3) -> list[str]:
    """A steer run's held-out mix, n // 4 prompts of each of MIX: refusals that end early
    beside answers that run to the limit, short questions beside long requests."""
    from refusalkit.prompts import load_prompts

    return [p for spec in MIX for p in load_prompts(spec).take(n // 4, seed=seed).prompts]


def timing_args(description: str, n: int) -> argparse.ArgumentParser:
    """The options every side-by-side timing bench takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--n", type=int, default=n)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    return ap


def later_harmful_rows(used: set[str], first: int = 200) -> tuple[list[str], list[str]]:
    """harmful_test rows no role used, past the first `first` of them, split by parity:
    (even rows: DEV for choosing how a gate is fitted against harm, odd rows: held out)."""
    from refusalkit.prompts import load_prompts

    rest = [p for p in load_prompts("harmful_test").prompts if p not in used][first:]
    return rest[0::2], rest[1::2]


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (goes at the top of RESULTS.md)."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def other_cpu(interval_s: float = 1.0) -> float:
    """CPU (in cores) used by processes outside this one and its children over a short
    sample. The load average cannot tell: a benchmark's own threads load a 2-core machine
    to 2–3 with nothing else running."""
    me = psutil.Process()
    mine = {me.pid, *(c.pid for c in me.children(recursive=True)), *(p.pid for p in
                                                                   me.parents())}
    procs = [p for p in psutil.process_iter() if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(interval_s)
    total = 0.0
    for p in procs:
        try:
            total += p.cpu_percent(None)
        except psutil.Error:
            pass
    return total / 100.0


def load_note() -> str:
    """One line on machine load: the load average and the CPU other processes used."""
    la = os.getloadavg()
    cores = psutil.cpu_count(logical=True) or 1
    other = other_cpu(0.5)
    busy = " — OTHER JOBS RUNNING, timings are noisy" if other > 0.25 * cores else ""
    return (f"load average {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} on {cores} cores, "
            f"{other:.2f} cores used by other processes{busy}")


def emit(md: str, md_path: str | None, data: Mapping[str, Any] | None = None,
         json_path: str | None = None) -> None:
    """Print a bench's markdown section and, if asked, write it (and raw data) to files."""
    print(md)
    if md_path:
        Path(md_path).write_text(md + "\n")
    if json_path and data is not None:
        Path(json_path).write_text(json.dumps(data, indent=1, default=str) + "\n")


def say(msg: str) -> None:
    """Progress on stderr (stdout carries the markdown section)."""
    import sys

    print(msg, file=sys.stderr, flush=True)


class CaptureMemo:
    """`activations.capture` memoised per (prompt, layer, position), for benchmarks that fit
    several gate variants in one process: each variant reads the same prompts at overlapping
    layers, and without it each variant spends minutes on the same forward passes. Values are the
    ones `capture` returned for that prompt (batching pads on the left, so a row does not
    depend on its batch mates beyond float noise)."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.rows: dict[tuple[str, Any, int], Any] = {}
        self.hits = self.misses = 0

    def __call__(self, lm: Any, prompts: Sequence[str], layers: Sequence[int],
                 positions: Sequence[Any] = (-1,), **kw: Any) -> Any:
        import torch

        if len(positions) != 1 or kw.get("cache_dir") or kw.get("formatted"):
            return self.inner(lm, prompts, layers, positions, **kw)
        pos, layers = positions[0], list(layers)
        missing = [p for p in dict.fromkeys(prompts)
                   if any((p, pos, layer) not in self.rows for layer in layers)]
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        if missing:
            h = self.inner(lm, missing, layers, positions, **kw)
            for i, p in enumerate(missing):
                for j, layer in enumerate(layers):
                    self.rows[(p, pos, layer)] = h[i, j, 0]
        return torch.stack([torch.stack([self.rows[(p, pos, layer)] for layer in layers])
                            for p in prompts])[:, :, None]

    def save(self, path: Path) -> None:
        """To safetensors (tensors) + JSON (keys): a later sweep in a new process starts warm.
        Keyed by prompt text only: valid for one model and pooling, which the caller keeps."""
        import torch
        from safetensors.torch import save_file

        keys = list(self.rows)
        if keys:
            save_file({"rows": torch.stack([self.rows[k] for k in keys]).contiguous()},
                      str(path))
            path.with_suffix(".json").write_text(json.dumps([list(k) for k in keys]))

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        if path.is_file():
            rows = load_file(str(path))["rows"]
            keys = json.loads(path.with_suffix(".json").read_text())
            self.rows.update({tuple(k): rows[i] for i, k in enumerate(keys)})

    @classmethod
    def install(cls) -> CaptureMemo:
        """Put one memo in front of the `capture` the gate fit and `gate_open` call."""
        import refusalkit.gates as gates
        import refusalkit.steer.fit as fit

        memo = cls(fit.capture)
        fit.capture = memo  # type: ignore[assignment]
        gates.capture = memo  # type: ignore[assignment]
        return memo
