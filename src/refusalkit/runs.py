"""Run folders: a manifest, one file per finished stage, atomic writes, resume.

A long command works inside a run folder. Each stage's result is written atomically (temp
name, then rename) once the stage has finished, so a killed process never leaves a
half-written file that a later run would trust. With `resume=True` finished stages are read
back instead of computed again. Timings live apart (`timings.json`) so that everything else
is byte-identical across runs with the same inputs and seeds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from refusalkit import __version__
from refusalkit.errors import UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
MANIFEST = "manifest.json"
TIMINGS = "timings.json"
STAGES = "stages"
LOCK = ".lock"
REUSED = "reused.json"  # stage -> the earlier run it was copied from (--reuse-from)
# Manifest keys that must match for --resume to reuse stages (versions may differ).
RESUME_KEYS = ("command", "config", "model", "datasets", "seeds")
# Test-only hook: the stage named here sleeps after computing and before storing its result,
# so a test can SIGKILL a real run "in the middle of a stage" deterministically.
SLOW_STAGE_ENV = "REFUSALKIT_TEST_SLOW_STAGE"
SLOW_SECONDS_ENV = "REFUSALKIT_TEST_SLOW_SECONDS"
_TMP = re.compile(r"^\..+\.tmp(\d+)$")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True,
                                              ensure_ascii=False) + "\n")


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if needed) for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def versions() -> dict[str, str]:
    out = {"refusalkit": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "optuna", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def umask_mode(path: str | Path) -> Path:
    """Give a written file the mode a plain open() would (0666 less the umask): safetensors
    writes through a private temp file and leaves 0600, so a checkpoint or artifact handed to
    another user or service account would be unreadable."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return Path(path)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_manifest(command: str, config: Mapping[str, Any], *, model: Mapping[str, Any] | None = None,
                 datasets: Sequence[Mapping[str, Any]] = (), seeds: Mapping[str, int] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """The manifest of a run: what was asked (config), on what (model, datasets) and seeds.

    `model` is `artifacts.model_record(lm)`, datasets are `artifacts.dataset_record(...)`.
    RunDir adds package versions. Nothing time-dependent goes in, so it is reproducible.
    """
    out: dict[str, Any] = {"command": command, "config": dict(config)}
    if model is not None:
        out["model"] = dict(model)
    out["datasets"] = [dict(d) for d in datasets]
    out["seeds"] = dict(seeds or {})
    return {**out, **extra}


@dataclass(frozen=True)
class Reads:
    """What one stage's result depends on, so that a run can take it from an earlier run
    whose inputs were the same (`RunDir(reuse_from=...)`): config keys as dotted paths (a
    trailing `*` matches a prefix, `*` alone the whole config), prompt sets by their manifest
    name (same wildcards), and earlier stages, compared by their stored bytes. The model
    record always counts. A stage that reads more than it declares would be reused wrongly,
    so the declarations are tested against what the stage functions touch."""

    config: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    after: tuple[str, ...] = ()


def stage_inputs(manifest: Mapping[str, Any], stages: Path, reads: Reads) -> dict[str, Any]:
    """Everything `reads` names, taken from a run's manifest and stage folder: two runs whose
    values are equal would compute the same stage (package versions aside, as for resume)."""
    config = _flatten(manifest.get("config", {}))
    sets = {d["name"]: d["sha256"] for d in manifest.get("datasets", [])}
    after = {}
    for name in reads.after:
        found = [p for p in (stages / f"{name}.json", stages / f"{name}.safetensors")
                 if p.is_file()]
        after[name] = file_sha256(found[0]) if found else None
    return {"model": manifest.get("model"), "after": after,
            "config": {k: v for k, v in config.items() if matches(k, reads.config)},
            "sets": {k: v for k, v in sets.items() if matches(k, reads.sets)}}


def with_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any] | None
                  ) -> dict[str, Any]:
    """`config` with the keys it lacks (at any depth) filled in from `defaults`."""
    out = dict(config)
    for key, value in (defaults or {}).items():
        if key not in out:
            out[key] = value
        elif isinstance(value, Mapping) and isinstance(out[key], Mapping):
            out[key] = with_defaults(out[key], value)
    return out


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def matches(key: str, patterns: Sequence[str]) -> bool:
    """A dotted key against patterns: exact, a section (`data` holds `data.n_fit`), or a
    prefix ending in `*`."""
    for pat in patterns:
        if pat.endswith("*"):
            if key.startswith(pat[:-1]):
                return True
        elif key == pat or key.startswith(pat + "."):
            return True
    return False


def check_run_folder(path: str | Path, resume: bool,
                     reuse_from: str | Path | None = None) -> None:
    """Fail early (before loading a model) if `path` cannot hold this run, or `reuse_from`
    is not a run to take stages from.

    `resume` on a folder that holds no run yet simply starts one, so scripts can always
    pass --resume."""
    path = Path(path)
    if reuse_from is not None:
        _source_run(reuse_from, path)
    if path.exists() and not path.is_dir():
        raise UserError(f"run folder '{path}' is a file; choose a folder path")
    if (path / MANIFEST).is_file():
        if not resume:
            raise UserError(f"run folder '{path}' already holds a run; pass --resume "
                            "to continue it or choose another folder")
    elif path.is_dir() and any(p.name != LOCK for p in path.iterdir()):
        raise UserError(f"'{path}' is not empty and holds no run; choose a new or "
                        "empty folder")


class RunDir:
    """A run folder. Stages are named; their results are JSON values or tensor dicts.

    One process at a time owns a run folder (an advisory lock, released by the kernel when
    the process dies, so SIGKILL never leaves it locked). Leftover temp files of a killed
    process are deleted on open: only fully written files are ever trusted.
    """

    def __init__(self, path: str | Path, manifest: Mapping[str, Any], *,
                 resume: bool = False, reuse_from: str | Path | None = None,
                 defaults: Mapping[str, Any] | None = None) -> None:
        """`defaults`: the config's default values (ConfigModel.defaults()); a key an earlier
        run's config lacks is taken at its default, so adding an option (whose default keeps
        the old behaviour) does not stop older runs from resuming or lending stages."""
        self.path = Path(path)
        existing = self.path / MANIFEST
        check_run_folder(self.path, resume)
        self.source = _source_run(reuse_from, self.path) if reuse_from is not None else None
        if self.source is not None:
            src_dir, src_manifest = self.source
            self.source = (src_dir, {**src_manifest, "config": with_defaults(
                src_manifest.get("config", {}), defaults)})
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire(self.path / LOCK)
        if existing.is_file():
            old = json.loads(existing.read_text())
            if isinstance(old.get("config"), Mapping):
                old["config"] = with_defaults(old["config"], defaults)
            for key in RESUME_KEYS:
                if old.get(key) != manifest.get(key):
                    self.close()
                    raise UserError(f"run folder '{self.path}' was started with a different "
                                    f"{key}; resume with the same inputs or choose another "
                                    "folder")
        _remove_stale_temps(self.path)
        (self.path / STAGES).mkdir(exist_ok=True)
        atomic_write_json(existing, {**manifest, "versions": versions()})
        self.manifest = dict(manifest)
        self.resume = resume
        self.ran: list[str] = []  # stages computed (not reused) in this process
        self.reused: list[str] = []
        self.borrowed: list[str] = []  # stages copied from `reuse_from` in this process
        self.log = _file_logger(self.path / "run.log")
        self.log.info("run opened (%s)", "resume" if resume else "new")

    def close(self) -> None:
        """Release the folder lock and the log file (also happens when the process ends)."""
        if getattr(self, "log", None) is not None:
            for handler in list(self.log.handlers):
                handler.close()
                self.log.removeHandler(handler)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plain files -----------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def write_metrics(self, metrics: Mapping[str, Any]) -> Path:
        """`metrics.json`: the run's headline numbers (the report's summary table)."""
        return self.write_json("metrics.json", dict(metrics))

    # -- stages ----------------------------------------------------------------------
    def _stage_path(self, name: str, suffix: str) -> Path:
        return self.path / STAGES / f"{name}{suffix}"

    def done(self, name: str) -> bool:
        return (self._stage_path(name, ".json").is_file()
                or self._stage_path(name, ".safetensors").is_file())

    def borrow(self, name: str, suffix: str, reads: Reads | None) -> bool:
        """Copy stage `name` from the run given as `reuse_from` when everything `reads` names
        is the same there as here; False when there is no such run, stage or match."""
        if self.source is None or reads is None:
            return False
        src_dir, src_manifest = self.source
        src = src_dir / STAGES / f"{name}{suffix}"
        if not src.is_file() or (stage_inputs(src_manifest, src_dir / STAGES, reads)
                                 != stage_inputs(self.manifest, self.path / STAGES, reads)):
            return False
        dst = self._stage_path(name, suffix)
        tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
        self.borrowed.append(name)
        self.log.info("stage %s: taken from %s (same inputs)", name, src_dir)
        atomic_write_json(self.path / REUSED, {**taken_from(self.path), name: str(src_dir)})
        return True

    def stage(self, name: str, compute: Callable[[], T], reads: Reads | None = None) -> T:
        """JSON-valued stage: reuse the stored result (or, with `reads`, the reuse_from
        run's), or compute, store and return it."""
        path = self._stage_path(name, ".json")
        if not path.is_file() and self.borrow(name, ".json", reads):
            return json.loads(path.read_text())
        if path.is_file():
            self.reused.append(name)
            self.log.info("stage %s: reused", name)
            return json.loads(path.read_text())
        result = self._timed(name, compute)
        atomic_write_json(path, result)
        self._finish(name)
        return json.loads(path.read_text())  # callers see exactly what a resume would see

    def tensor_stage(self, name: str, compute: Callable[[], Mapping[str, torch.Tensor]],
                     reads: Reads | None = None) -> dict[str, torch.Tensor]:
        """Tensor-valued stage, stored as safetensors."""
        from safetensors.torch import load_file, save_file

        path = self._stage_path(name, ".safetensors")
        if not path.is_file() and self.borrow(name, ".safetensors", reads):
            return load_file(str(path))
        if path.is_file():
            self.reused.append(name)
            self.log.info("stage %s: reused", name)
            return load_file(str(path))
        result = self._timed(name, compute)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file({k: v.detach().contiguous().cpu() for k, v in sorted(result.items())},
                  str(tmp))
        umask_mode(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
        self._finish(name)
        return load_file(str(path))

    def _timed(self, name: str, compute: Callable[[], T]) -> T:
        self.log.info("stage %s: start", name)
        t0 = time.perf_counter()
        result = compute()
        seconds = time.perf_counter() - t0
        timings = self.read_json(TIMINGS) if (self.path / TIMINGS).is_file() else {}
        timings[name] = round(seconds, 3)
        atomic_write_json(self.path / TIMINGS, timings)
        self.log.info("stage %s: computed in %.1fs", name, seconds)
        if name in os.environ.get(SLOW_STAGE_ENV, "").split(","):
            self.log.info("stage %s: test hook sleeping before storing", name)
            time.sleep(float(os.environ.get(SLOW_SECONDS_ENV, "60")))
        return result

    def _finish(self, name: str) -> None:
        self.ran.append(name)
        self.log.info("stage %s: stored", name)


def taken_from(path: str | Path) -> dict[str, str]:
    """The stages a run folder copied from earlier runs (stage -> that run's folder)."""
    record = Path(path) / REUSED
    return json.loads(record.read_text()) if record.is_file() else {}


def reuse_line(path: str | Path, source: str | Path) -> str:
    """What a command prints after a run with --reuse-from."""
    return f"taken from {source}: {', '.join(taken_from(path)) or 'no stage'}"


def _source_run(path: str | Path, own: Path) -> tuple[Path, dict[str, Any]]:
    """The run a new run may take stages from: a folder holding a manifest, not this one."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise UserError(f"--reuse-from '{path}' holds no run (no {MANIFEST}); give the "
                        "folder of an earlier run")
    if path.resolve() == own.resolve():
        raise UserError(f"--reuse-from '{path}' is the run folder itself; to continue a run "
                        "use --resume")
    try:
        return path, json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path / MANIFEST}: {exc}") from None


def _acquire(path: Path) -> Any:
    """Lock the run folder for this process; a second process gets one clear line."""
    f = path.open("a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip()
        f.close()
        if owner == str(os.getpid()):
            return None  # this process already holds it (a second RunDir on the same folder)
        raise UserError(f"run folder '{path.parent}' is in use by another process "
                        f"(pid {owner or '?'}); wait for it or choose another folder") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _remove_stale_temps(root: Path) -> None:
    """Delete temp files (`.NAME.tmpPID`) that a killed writer left behind."""
    for path in root.rglob(".*.tmp*"):
        m = _TMP.match(path.name)
        if m and int(m.group(1)) != os.getpid():
            if path.is_dir():
                import shutil

                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _file_logger(path: Path) -> logging.Logger:
    """A logger writing to the run folder only (one handler per file, reused on resume)."""
    logger = logging.getLogger(f"refusalkit.run.{path.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger
