"""Behaviour fingerprints of the tiny steer and analyze runs (issue 16's acceptance).

A redesign that moves code must not change what a run computes. These tests run the tiny
steer (remove and induce) and analyze configs and compare every artifact of the run folder —
metrics, stages, tables, examples, profiles, directions — with fingerprints recorded before the
move (tests/data/fingerprints/). Timings, logs, caches, the manifest's clock and the rendered
report are left out; floats are compared relative to their size (float32 summation order
differs between machines and thread counts).

To record new fingerprints after an *intended* change of behaviour:
    REFUSALKIT_RECORD_FINGERPRINTS=1 pytest tests/test_fingerprint.py
and say in the commit why the numbers moved.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import PlantedWord, build_tiny

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "fingerprints"
RECORD = os.environ.get("REFUSALKIT_RECORD_FINGERPRINTS") == "1"
SKIP = {"timings.json", "run.log", "manifest.json"}  # paths in the run folder
SKIP_SUFFIXES = {".sqlite", ".sqlite-wal", ".sqlite-shm", ".svg", ".png", ".lock", ".html"}
VOLATILE_KEYS = {"stage_seconds", "created", "wall_seconds", "seconds", "started", "finished",
                 # checksums over float content (an artifact's manifest, its tensors file):
                 # one last-bit difference changes them, and what they cover is compared
                 # field by field within tolerance. On a second machine of this kind the
                 # profile strengths differed by 3e-7 relative and the manifest's sha with them
                 "manifest_sha256", "tensors_sha256"}
RTOL, ATOL = 1e-4, 1e-6


def _number(x: str) -> Any:
    try:
        return float(x)
    except ValueError:
        return x


def _drop_volatile(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _drop_volatile(v) for k, v in x.items() if k not in VOLATILE_KEYS}
    if isinstance(x, list):
        return [_drop_volatile(v) for v in x]
    return x


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out = {}
    for name, t in sorted(load_file(path).items()):
        d = t.double()
        out[name] = {"shape": list(t.shape), "dtype": str(t.dtype),
                     "sum": float(d.sum()), "norm": float(d.norm())}
    return out


def fingerprint(run: Path) -> dict[str, Any]:
    """Every artifact of a run folder as comparable JSON."""
    out: dict[str, Any] = {}
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run).as_posix()
        if (not p.is_file() or rel in SKIP or p.suffix in SKIP_SUFFIXES
                or p.name.startswith(".")):
            continue
        if p.suffix == ".json":
            out[rel] = _drop_volatile(json.loads(p.read_text()))
        elif p.suffix == ".jsonl":
            out[rel] = [_drop_volatile(json.loads(x)) for x in p.read_text().splitlines()]
        elif p.suffix == ".csv":
            with p.open(newline="") as f:
                out[rel] = [[_number(c) for c in row] for row in csv.reader(f)]
        elif p.suffix == ".safetensors":
            out[rel] = _tensors(p)
        else:
            out[rel] = p.read_text()
    return out


def differences(want: Any, got: Any, where: str = "") -> list[str]:
    """Where `got` differs from `want` (floats within RTOL of their size, or ATOL near 0)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}/{k}: missing" for k in want.keys() - got.keys()]
        out += [f"{where}/{k}: unexpected" for k in got.keys() - want.keys()]
        for k in sorted(want.keys() & got.keys()):
            out += differences(want[k], got[k], f"{where}/{k}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{where}: length {len(got)}, recorded {len(want)}"]
        return [d for i, (a, b) in enumerate(zip(want, got, strict=True))
                for d in differences(a, b, f"{where}[{i}]")]
    if (isinstance(want, float | int) and isinstance(got, float | int)
            and not isinstance(want, bool) and not isinstance(got, bool)):
        if isinstance(want, float) and math.isnan(want):
            return [] if isinstance(got, float) and math.isnan(got) else [f"{where}: {got}, nan"]
        if math.isclose(want, got, rel_tol=RTOL, abs_tol=ATOL):
            return []
        return [f"{where}: {got!r}, recorded {want!r}"]
    return [] if want == got else [f"{where}: {got!r}, recorded {want!r}"]


def check(name: str, run: Path) -> None:
    got = fingerprint(run)
    path = GOLDEN / f"{name}.json"
    if RECORD:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = _drop_volatile(json.loads(path.read_text()))
    diff = differences(want, got)
    assert not diff, f"{len(diff)} differences from {path.name}:\n" + "\n".join(diff[:30])


def test_differences_sees_what_it_must() -> None:
    """The comparison itself can fail: a moved number, a lost key, a changed string."""
    assert differences({"a": [1.0, "x"]}, {"a": [1.0 + 1e-7, "x"]}) == []
    assert differences({"a": 1.0}, {"a": 1.001}) == ["/a: 1.001, recorded 1.0"]
    assert differences({"a": 1, "b": 2}, {"a": 1}) == ["/b: missing"]
    assert differences({"a": "md"}, {"a": "wrmd"}) == ["/a: 'wrmd', recorded 'md'"]
    assert differences([1, 2], [1]) == [": length 1, recorded 2"]


@pytest.mark.parametrize("mode", ["remove", "induce"])
def test_the_tiny_steer_run_computes_what_it_did(mode: str, tmp_path: Path, monkeypatch) -> None:
    from test_steer import tiny_cfg

    import refusalkit.steer.pipeline as steer_module
    from refusalkit.steer.pipeline import run_steer

    monkeypatch.setattr(steer_module, "make_judge", lambda spec: PlantedWord())
    out = run_steer(tiny_cfg(mode=mode), tmp_path / "run", show_progress=False,
                    lm=build_tiny("llama"))
    check(f"steer-{mode}", out)


def test_the_tiny_analyze_run_computes_what_it_did(tmp_path: Path, monkeypatch) -> None:
    from test_analyze import _tiny_config

    from refusalkit.analyze.pipeline import analyze

    monkeypatch.chdir(tmp_path)  # relative prompt paths: the sampling seed hashes the specs
    cfg = _tiny_config(Path("."))
    out = analyze(cfg, tmp_path / "run", lm=build_tiny("qwen2"), show_progress=False)
    check("analyze", out)
