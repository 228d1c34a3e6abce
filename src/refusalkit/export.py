"""Steering in the formats people deploy: abliterated HF checkpoints and llama.cpp control vectors.

Abliterated checkpoint: a profile that ablates one direction at every layer is exactly weight
orthogonalisation (`interventions.orthogonalize`), so it can be folded into the weights and
saved as an ordinary Hugging Face folder (config, safetensors, tokenizer with chat template)
that plain `transformers` — or any converter — loads with no refusalkit code.

Control vector: llama.cpp's GGUF control-vector format (architecture "controlvector", one F32
tensor "direction.{k}" per steered layer, keys controlvector.model_hint and
controlvector.layer_count; repeng writes the same). llama.cpp adds `direction.{k}` to the
*output* of its 0-based block k (`build_cvec` after the block's last residual add), at every
position, for k >= 1 (`direction.0` is rejected and block 0's output is never steered).
refusalkit's layer L is the *input* of block L, i.e. the output of block L-1, so

    refusalkit resid_pre layer L  <->  llama.cpp direction.{L-1}     (L >= 2)

Profile layers 0 and 1 cannot be expressed; on import, `direction.{n_layers-1}` (the output
of the last block) has no refusalkit layer. Strengths and the profile scale are folded into
the vectors (llama.cpp's own --control-vector-scaled multiplies on top). Ablation is a
projection that depends on the activations, so it has no control-vector form.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refusalkit.artifacts import model_record
from refusalkit.errors import UserError
from refusalkit.interventions import Profile, addition, orthogonalize
from refusalkit.models import LoadedModel
from refusalkit.operators import operator
from refusalkit.runs import umask_mode

ARCH = "controlvector"
EXPORT_STAMP = "refusalkit-export.json"
LAYER_OFFSET = 1  # refusalkit layer L = llama.cpp direction.{L - LAYER_OFFSET}


# ---------------------------------------------------------------- abliterated checkpoint

def ablation_direction(lm: LoadedModel, profile: Profile) -> torch.Tensor:
    """The one direction a profile ablates at every layer, or a UserError saying why the
    profile cannot be folded into weights."""
    if not profile.ops:
        raise UserError("the profile has no operators; nothing to fold into the weights")
    vectors: dict[int, list[torch.Tensor]] = {}
    for op in profile.ops:
        if op.kind != "ablate":
            verb = "adds a vector" if op.kind == "add" else f"has a '{op.kind}' operator"
            raise UserError(
                f"the profile {verb}; only directional ablation can be folded into "
                "weights — serve it with 'refusalkit serve --profile' or export additions with "
                "'refusalkit export gguf-control-vector'")
        if op.phase != "both":
            raise UserError(
                f"the profile ablates only in the {op.phase} phase; weights act on every token, "
                "so only phase 'both' can be folded into them")
        for layer, v in op.vectors.items():
            vectors.setdefault(layer, []).append(v.detach().double().cpu())
    missing = sorted(set(range(lm.n_layers)) - set(vectors))
    if missing:
        raise UserError(
            f"the profile ablates {len(vectors)} of {lm.n_layers} layers (missing e.g. layer "
            f"{missing[0]}); orthogonalised weights remove the direction at every layer, so "
            "only an ablation at all layers can be exported")
    ref = vectors[min(vectors)][0]
    ref = ref / ref.norm().clamp_min(1e-12)
    for layer, vs in sorted(vectors.items()):
        for v in vs:
            if abs(float(v @ ref) / max(float(v.norm()), 1e-12)) < 1 - 1e-6:
                raise UserError(
                    f"the profile ablates a different direction at layer {layer} than at layer "
                    f"{min(vectors)}; orthogonalised weights fold in one direction for all "
                    "layers, so only a single-direction ablation can be exported")
    return ref.float()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's values as little-endian float32 (what stamps record)."""
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().astype("<f4")
                          .tobytes()).hexdigest()


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"'{out}' exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or (out / EXPORT_STAMP).is_file()):
        raise UserError(f"'{out}' is a non-empty folder that is not a refusalkit export; "
                        "choose an empty or new folder (or pass --force to replace it)")


def export_abliterated(lm: LoadedModel, profile: Profile, out: str | Path,
                       *, overwrite: bool = False) -> Path:
    """Fold the profile's ablation into `lm`'s weights (in place!) and save a HF checkpoint."""
    direction = ablation_direction(lm, profile)
    out = Path(out)
    _prepare_out_dir(out, overwrite)
    orthogonalize(lm, direction.to(lm.device))
    stamp = {"format": "refusalkit.abliterated/v1", "source_model": model_record(lm),
             "direction_sha256": tensor_sha256(direction),
             "profile": {k: v for k, v in profile.meta.items() if k != "model"}}
    return write_checkpoint(lm, out, stamp)


def write_checkpoint(lm: LoadedModel, out: str | Path, stamp: dict[str, Any],
                     files: dict[str, str] | None = None) -> Path:
    """Save `lm` as it is now as a plain Hugging Face folder (config, generation config,
    model.safetensors, tokenizer), with `stamp` as refusalkit-export.json and any extra text
    `files` (e.g. a model card). The folder is written next to `out` and renamed over it at
    the end, so an interrupted export never leaves a half-written checkpoint."""
    from safetensors.torch import save_model

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config = lm.model.config
        if hasattr(config, "quantization_config"):  # GGUF-loaded: the weights are plain now
            del config.quantization_config
        config.save_pretrained(tmp)
        lm.model.generation_config.save_pretrained(tmp)
        # save_pretrained refuses GGUF-loaded models; the tensors are ordinary, so write them.
        save_model(lm.model, str(tmp / "model.safetensors"))
        umask_mode(tmp / "model.safetensors")
        lm.tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True,
                                                   default=str) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


# ---------------------------------------------------------------- control vectors

def control_vectors(profile: Profile) -> dict[int, torch.Tensor]:
    """llama.cpp direction index -> vector, strengths and scale folded in (float32)."""
    acc: dict[int, torch.Tensor] = {}
    for op in profile.ops:
        reason = operator(op.kind).not_a_control_vector
        if reason is not None:
            raise UserError(reason)
        if op.gate is not None:
            raise UserError(
                "the profile is gated (it steers only prompts its topic detector opens for); a "
                "llama.cpp control vector steers every prompt, so it cannot carry the gate — "
                "serve the profile with 'refusalkit serve' instead")
        if op.phase != "both":
            raise UserError(
                f"the profile adds only in the {op.phase} phase; llama.cpp adds control vectors "
                "at every position (prompt and generated), so only phase 'both' can be exported")
        for layer, v in op.vectors.items():
            if layer < 1 + LAYER_OFFSET:
                raise UserError(
                    f"profile layer {layer} cannot be expressed: refusalkit layer L is "
                    "llama.cpp's direction.{L-1} and llama.cpp never steers before the output of "
                    "block 1, so only layers >= 2 can be exported")
            k = layer - LAYER_OFFSET
            add = profile.scale * op.strength(layer) * v.detach().double().cpu()
            acc[k] = acc[k] + add if k in acc else add
    if not acc:
        raise UserError("the profile has no additions; nothing to export as a control vector")
    sizes = {v.numel() for v in acc.values()}
    if len(sizes) != 1:
        raise UserError(f"the profile's vectors have different sizes {sorted(sizes)}")
    return {k: acc[k].float() for k in sorted(acc)}


def export_control_vector(profile: Profile, out: str | Path, *, model_hint: str = "") -> Path:
    """Write a llama.cpp control-vector GGUF (atomically: temp file, then rename)."""
    import gguf

    vectors = control_vectors(profile)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"'{out}' is a folder; give a file name such as refusal.gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch=ARCH)
    try:
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(vectors))
        for k, v in vectors.items():
            writer.add_tensor(f"direction.{k}", v.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(out)
    return out


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def read_control_vector(path: str | Path) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """(metadata, {direction index: vector}) of a control-vector GGUF, checked as llama.cpp
    checks it; repeated indices are summed, as llama.cpp does."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"control vector file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise UserError(f"'{path}' is not a readable GGUF file ({exc})") from exc
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise UserError(f"'{path}' is a GGUF file of architecture {arch!r}, not a control "
                        f"vector ({ARCH!r})")
    vectors: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if m is None or int(m[1]) == 0:
            raise UserError(f"'{path}': tensor '{t.name}' is not a valid control-vector tensor "
                            "(expected direction.N with N >= 1)")
        data = np.asarray(t.data)
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or data.ndim != 1:
            raise UserError(f"'{path}': tensor '{t.name}' must be a 1-D F32 vector "
                            f"(is {t.tensor_type.name} with shape {tuple(data.shape)})")
        vec = torch.from_numpy(data.astype(np.float32).copy())
        k = int(m[1])
        vectors[k] = vectors[k] + vec if k in vectors else vec
    if not vectors:
        raise UserError(f"'{path}' holds no direction tensors")
    if len({v.numel() for v in vectors.values()}) != 1:
        raise UserError(f"'{path}': direction tensors have different lengths")
    meta = {"model_hint": _field(reader, f"{ARCH}.model_hint"),
            "layer_count": _field(reader, f"{ARCH}.layer_count")}
    return meta, dict(sorted(vectors.items()))


def import_control_vector(path: str | Path, lm: LoadedModel, strength: float = 1.0) -> Profile:
    """A refusalkit addition profile equivalent to loading the file in llama.cpp with
    `--control-vector-scaled FILE strength`."""
    meta, vectors = read_control_vector(path)
    d = next(iter(vectors.values())).numel()
    if d != lm.hidden_size:
        raise UserError(f"'{path}' has vectors of size {d}, but '{lm.name}' has hidden size "
                        f"{lm.hidden_size}")
    by_layer: dict[int, torch.Tensor] = {}
    for k, v in vectors.items():
        layer = k + LAYER_OFFSET
        if layer >= lm.n_layers:
            raise UserError(
                f"'{path}': direction.{k} steers the output of block {k}, but refusalkit "
                f"profiles act on block inputs 0..{lm.n_layers - 1} of '{lm.name}'; only "
                f"direction.1..direction.{lm.n_layers - 2} can be imported")
        by_layer[layer] = v
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    source = {"format": "llama.cpp control vector", "file": Path(path).name, "sha256": digest,
              "model_hint": meta["model_hint"], "layer_offset": LAYER_OFFSET}
    return Profile((addition(by_layer, float(strength)),), meta={"source": source})
