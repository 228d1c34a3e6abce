"""Direction sets and steering profiles on disk: safetensors + a JSON manifest.

An artifact is a folder with `tensors.safetensors` and `manifest.json`. The manifest records
the model (name, fingerprint, hidden size, layer count), how the tensors were made, dataset
hashes, the sha256 of the tensor file and the names of the tensors it holds, and
`manifest_sha256` covers the manifest itself, so a manifest edited to point at a tensor that
is not there (or at another one) is refused rather than half-loaded. Loading checks all of it
against the model in hand and refuses a mismatch with one clear line. No pickle: safetensors
and JSON only. Nothing time-dependent is written, so identical inputs give byte-identical
artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from refusalkit import __version__
from refusalkit.errors import UserError, json_error
from refusalkit.models import LoadedModel
from refusalkit.runs import umask_mode

TENSORS = "tensors.safetensors"
MANIFEST = "manifest.json"
DIRECTIONS_FORMAT = "refusalkit.directions/v1"
PROFILE_FORMAT = "refusalkit.profile/v1"


def dataset_record(name: str, prompts: Sequence[str]) -> dict[str, Any]:
    """How a prompt set is named in manifests: name, count and a content hash."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(hashlib.sha256(p.encode()).digest())
    return {"name": name, "count": len(prompts), "sha256": h.hexdigest()}


def model_record(lm: LoadedModel) -> dict[str, Any]:
    return {"name": lm.name, "fingerprint": lm.fingerprint, "hidden_size": lm.hidden_size,
            "n_layers": lm.n_layers}


@dataclass
class Artifact:
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """Checksum of a manifest's content (every key but this checksum), canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_artifact(path: str | Path, kind: str, tensors: Mapping[str, torch.Tensor],
                   manifest: Mapping[str, Any]) -> Path:
    """Write atomically: build in a sibling temp folder, then rename over the target."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().cpu().clone() for k, v in sorted(tensors.items())},
              str(tmp / TENSORS))
    umask_mode(tmp / TENSORS)
    full = {"format": kind, "refusalkit_version": __version__, **manifest,
            "tensor_names": sorted(tensors), "tensors_sha256": _file_sha256(tmp / TENSORS)}
    full["manifest_sha256"] = _manifest_sha256(full)
    (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    if path.exists():
        shutil.rmtree(path)
    tmp.replace(path)
    return path


def read_artifact(path: str | Path, kind: str | None = None,
                  lm: LoadedModel | None = None, *, allow_other_model: bool = False) -> Artifact:
    """Read and verify an artifact; with `lm`, refuse one made for another model."""
    path = Path(path)
    if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
        raise UserError(f"'{path}' is not a refusalkit artifact (needs {MANIFEST} and {TENSORS})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path / MANIFEST}' is not valid JSON ({json_error(exc)})") from exc
    if not isinstance(manifest, dict):
        raise UserError(f"'{path / MANIFEST}' is not a JSON object; recreate the artifact")
    _check_kind(path, manifest.get("format"), kind)
    if "manifest_sha256" in manifest and _manifest_sha256(manifest) != manifest["manifest_sha256"]:
        raise UserError(f"'{path / MANIFEST}' does not match its checksum (edited after it was "
                        "written); recreate the artifact")
    if _file_sha256(path / TENSORS) != manifest.get("tensors_sha256"):
        raise UserError(f"'{path / TENSORS}' does not match its manifest checksum (corrupt or "
                        "edited); recreate the artifact")
    tensors = load_file(str(path / TENSORS))
    listed = manifest.get("tensor_names")
    if listed is not None and sorted(listed) != sorted(tensors):
        raise UserError(f"'{path}': the manifest's tensor list does not match "
                        f"{TENSORS}; recreate the artifact")
    if lm is not None:
        check_model(manifest.get("model", {}), lm, path, allow_other_model=allow_other_model)
    return Artifact(tensors, manifest)


def _check_kind(path: Path, found: Any, kind: str | None) -> None:
    """Refuse an artifact of another kind; a directions artifact given for a profile gets the
    command that turns one into the other."""
    if kind is None or found == kind:
        return
    if found == DIRECTIONS_FORMAT and kind == PROFILE_FORMAT:
        raise UserError(f"'{path}' holds refusal directions (from refusalkit extract), not a "
                        f"steering profile; make one with: refusalkit profile {path} --layers "
                        "L1-L2 --alpha -1 --relative --out PROFILE")
    raise UserError(f"'{path}' holds a {found!r} artifact, not {kind!r}")


def need_tensor(art: Artifact, name: str, path: str | Path) -> torch.Tensor:
    """A tensor the manifest names, or one line saying the artifact is inconsistent."""
    if name not in art.tensors:
        raise UserError(f"'{path}': the manifest names tensor '{name}', which {TENSORS} does "
                        "not hold (manifest edited?); recreate the artifact")
    return art.tensors[name]


def check_model(rec: Mapping[str, Any], lm: LoadedModel, path: str | Path,
                *, allow_other_model: bool = False) -> None:
    if rec.get("hidden_size") != lm.hidden_size:
        raise UserError(
            f"'{path}' was made for hidden size {rec.get('hidden_size')} "
            f"({rec.get('name')}), but '{lm.name}' has {lm.hidden_size}"
        )
    if rec.get("fingerprint") != lm.fingerprint and not allow_other_model:
        raise UserError(
            f"'{path}' was made for model '{rec.get('name')}' (fingerprint "
            f"{str(rec.get('fingerprint'))[:12]}), not '{lm.name}' "
            f"({lm.fingerprint[:12]}); pass --allow-other-model to use it anyway"
        )


@dataclass
class DirectionSet:
    """Named refusal directions per layer: directions[name] is [len(layers), d]."""

    directions: dict[str, torch.Tensor]
    layers: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def vector(self, name: str, layer: int) -> torch.Tensor:
        if name not in self.directions:
            raise UserError(f"no direction named '{name}'; have {', '.join(self.directions)}")
        if layer not in self.layers:
            raise UserError(f"direction '{name}' has no layer {layer}; have {self.layers}")
        return self.directions[name][self.layers.index(layer)]


def save_directions(ds: DirectionSet, path: str | Path, lm: LoadedModel) -> Path:
    tensors = {f"direction.{name}": t for name, t in ds.directions.items()}
    manifest = {"model": model_record(lm), "layers": list(ds.layers),
                "names": list(ds.directions), **ds.meta}
    return write_artifact(path, DIRECTIONS_FORMAT, tensors, manifest)


def load_directions(path: str | Path, lm: LoadedModel | None = None,
                    *, allow_other_model: bool = False) -> DirectionSet:
    art = read_artifact(path, DIRECTIONS_FORMAT, lm, allow_other_model=allow_other_model)
    m = art.manifest
    dirs = {name: need_tensor(art, f"direction.{name}", path) for name in m["names"]}
    for name, t in dirs.items():
        if t.ndim != 2 or t.shape[0] != len(m["layers"]):
            raise UserError(f"'{path}': direction '{name}' has {t.shape[0]} layers but the "
                            f"manifest lists {len(m['layers'])}; recreate the artifact")
    meta = {k: v for k, v in m.items() if k not in ("layers", "names")}
    return DirectionSet(dirs, list(m["layers"]), meta)
