"""Run folders: stages, atomic writes, resume, locking — and a real run killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refusalkit.errors import UserError
from refusalkit.runs import (
    SLOW_SECONDS_ENV,
    SLOW_STAGE_ENV,
    RunDir,
    atomic_write_json,
    run_manifest,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "refusalkit"
MANIFEST = run_manifest("test", {"a": 1}, model={"name": "m", "fingerprint": "f"},
                        datasets=[{"name": "d", "count": 2, "sha256": "x"}], seeds={"seed": 0})


def test_stages_compute_once_and_resume(tmp_path: Path) -> None:
    calls: list[str] = []

    def compute(name: str, value: object):
        def f():
            calls.append(name)
            return value
        return f

    with RunDir(tmp_path / "r", MANIFEST) as run:
        assert run.stage("a", compute("a", {"x": [1, 2.5]})) == {"x": [1, 2.5]}
        t = run.tensor_stage("t", compute("t", {"w": torch.arange(6.0).view(2, 3)}))
        assert torch.equal(t["w"], torch.arange(6.0).view(2, 3))
        assert run.done("a") and run.done("t") and not run.done("b")
        assert run.ran == ["a", "t"] and run.reused == []
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["config"] == {"a": 1} and "torch" in manifest["versions"]
    assert set(json.loads((tmp_path / "r" / "timings.json").read_text())) == {"a", "t"}

    with RunDir(tmp_path / "r", MANIFEST, resume=True) as run:
        assert run.stage("a", compute("a2", None)) == {"x": [1, 2.5]}
        assert torch.equal(run.tensor_stage("t", compute("t2", {}))["w"],
                           torch.arange(6.0).view(2, 3))
        assert run.stage("b", compute("b", 3)) == 3
        assert run.reused == ["a", "t"] and run.ran == ["b"]
    assert calls == ["a", "t", "b"]
    log = (tmp_path / "r" / "run.log").read_text()
    assert "stage a: reused" in log and log.count("stage a: start") == 1


def test_stage_results_are_what_a_resume_sees(tmp_path: Path) -> None:
    """A tuple comes back as a list both times, so code cannot behave differently on resume."""
    with RunDir(tmp_path / "r", MANIFEST) as run:
        assert run.stage("a", lambda: {"k": (1, 2)}) == {"k": [1, 2]}


def test_folder_misuse_is_one_clear_error(tmp_path: Path) -> None:
    RunDir(tmp_path / "r", MANIFEST).close()
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        RunDir(tmp_path / "r", MANIFEST)
    for key, value in [("config", {"a": 2}), ("model", {"name": "other"}), ("datasets", [])]:
        with pytest.raises(UserError, match=f"different {key}"):
            RunDir(tmp_path / "r", {**MANIFEST, key: value}, resume=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no run"):
        RunDir(tmp_path / "busy", MANIFEST)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        RunDir(tmp_path / "file", MANIFEST)
    with RunDir(tmp_path / "fresh", MANIFEST, resume=True) as run:  # nothing yet: starts
        assert run.stage("a", lambda: 1) == 1 and run.ran == ["a"]


def test_temp_files_of_a_killed_writer_are_never_trusted(tmp_path: Path) -> None:
    root = tmp_path / "r"
    RunDir(root, MANIFEST).close()
    # What a writer killed before its rename leaves: a temp file, no stage file.
    stale = root / "stages" / ".a.json.tmp999999"
    stale.write_text('{"half": ')
    with RunDir(root, MANIFEST, resume=True) as run:
        assert not stale.exists() and not run.done("a")
        assert run.stage("a", lambda: 1) == 1 and run.ran == ["a"]


def test_atomic_write_leaves_old_content_on_failure(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.json"
    atomic_write_json(path, {"v": 1})

    def boom(self, target):  # the process "dies" between writing and renaming
        raise OSError("killed")

    monkeypatch.setattr(Path, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(path, {"v": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}


def test_a_second_process_cannot_use_a_busy_run_folder(tmp_path: Path) -> None:
    code = ("import sys; from refusalkit.runs import RunDir; from refusalkit.errors import "
            "UserError\ntry:\n    RunDir(sys.argv[1], {}, resume=True)\nexcept UserError as e:\n"
            "    print(e); sys.exit(3)")
    with RunDir(tmp_path / "r", {}):
        busy = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")],
                              capture_output=True, text=True, timeout=120)
        assert busy.returncode == 3 and "in use by another process" in busy.stdout
        RunDir(tmp_path / "r", {}, resume=True).close()  # the same process may reopen it
    free = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert free.returncode == 0, free.stdout + free.stderr


def test_slow_stage_hook_is_opt_in(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(SLOW_STAGE_ENV, "b")
    monkeypatch.setenv(SLOW_SECONDS_ENV, "0")
    with RunDir(tmp_path / "r", MANIFEST) as run:
        run.stage("a", lambda: 1)
        run.stage("b", lambda: 2)
    log = (tmp_path / "r" / "run.log").read_text()
    assert "stage b: test hook sleeping" in log and "stage a: test hook" not in log


# -------------------------------------------------------------- a real run, killed and resumed
EXTRACT = ["--model", "smollm2-135m", "--positive", "harmful_train",
           "--negative", "harmless_train", "--limit", "8", "--layers", "10-29"]


def _extract(run_dir: Path, *extra: str, env: dict[str, str] | None = None,
             wait: bool = True) -> subprocess.Popen[str] | subprocess.CompletedProcess[str]:
    cmd = [str(BIN), "--quiet", "extract", *EXTRACT, "--run-dir", str(run_dir), *extra]
    full_env = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, env=full_env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def _wait_for(path: Path, text: str, proc: subprocess.Popen[str], timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before '{text}': {proc.stderr.read()}")  # type: ignore[union-attr]
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"timed out waiting for '{text}' in {path}")


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a run folder except the log, timings and the run manifest (compared
    apart: its package versions are this machine's)."""
    skip = {"run.log", "timings.json", "manifest.json"}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and str(p.relative_to(root)) not in skip
            and not p.name.startswith(".")}


@pytest.mark.real
def test_killed_run_resumes_to_identical_results(tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    # 1. Kill a real run with SIGKILL while it is inside the stage activations.negative
    #    (after activations.positive was stored).
    proc = _extract(killed, env={SLOW_STAGE_ENV: "activations.negative",
                                 SLOW_SECONDS_ENV: "300"}, wait=False)
    _wait_for(killed / "run.log", "stage activations.negative: test hook sleeping", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    stages = killed / "stages"
    assert (stages / "activations.positive.safetensors").is_file()
    assert not (stages / "activations.negative.safetensors").exists()
    assert not (killed / "directions").exists() and not (killed / "metrics.json").exists()

    # 2. Without --resume the folder is protected; with it, the run finishes.
    refused = subprocess.run([str(BIN), "extract", *EXTRACT, "--run-dir", str(killed)],
                             capture_output=True, text=True, cwd=REPO, timeout=600)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    _extract(killed, "--resume")
    log = (killed / "run.log").read_text()
    assert log.count("stage activations.positive: start") == 1  # never ran again
    assert "stage activations.positive: reused" in log
    assert log.count("stage activations.negative: start") == 2  # the killed one, then again
    assert "ran ['activations.negative', 'directions'], reused ['activations.positive']" in log
    assert not [p for p in killed.rglob(".*.tmp*")]

    # 3. An uninterrupted run with the same inputs gives byte-identical results:
    #    the direction artifact (also when written via --out), stages, metrics, figures,
    #    tables and the report.
    _extract(clean, "--out", str(tmp_path / "art"))
    got, want = _files(killed), _files(clean)
    assert "directions/tensors.safetensors" in got and "metrics.json" in want
    assert "report.html" in want and "figures/layer_profile.svg" in want
    for name in ("tensors.safetensors", "manifest.json"):
        want[f"directions/{name}"] = (tmp_path / "art" / name).read_bytes()
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
    m_killed = json.loads((killed / "manifest.json").read_text())
    m_clean = json.loads((clean / "manifest.json").read_text())
    assert m_killed == m_clean and len(m_clean["datasets"]) == 2
    assert m_clean["model"]["fingerprint"] and m_clean["config"]["limit"] == 8
