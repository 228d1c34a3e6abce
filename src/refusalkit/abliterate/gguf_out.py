"""The abliterated model as a GGUF file, for llama.cpp and the tools built on it.

The `gguf` package has no Hugging Face → GGUF converter (that lives in llama.cpp's scripts),
but it can copy a GGUF file with some tensors replaced. So this works where the model was
loaded from a GGUF file (every packaged model, or a `.gguf` spec): every tensor the kernel
leaves alone is copied byte for byte (its quantisation kept), every residual writer it
changes is written as F16 from the folded weights, and with an embedding weight the token
embedding too (plus the original embedding as `output.weight` when the file ties them).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from refusalkit.errors import UserError
from refusalkit.kernels import Kernel, folded, touched
from refusalkit.models import PACKAGED, LoadedModel, assemble_packaged


def source_gguf(lm: LoadedModel) -> Path:
    """The GGUF file `lm` was loaded from, or a UserError saying why there is none."""
    if lm.name in PACKAGED:
        return assemble_packaged(PACKAGED[lm.name])[0]
    path = Path(lm.name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise UserError(f"--gguf needs a model loaded from a GGUF file (a packaged model or a "
                    f".gguf path); '{lm.name}' is not one — convert the saved checkpoint with "
                    "llama.cpp's convert_hf_to_gguf.py instead")


def write_gguf(lm: LoadedModel, kernel: Kernel, directions: torch.Tensor, out: Path) -> Path:
    """Write `out` (atomically) from the model's source GGUF with the kernel folded in."""
    import gguf

    src = source_gguf(lm)
    reader = gguf.GGUFReader(str(src))
    arch_name = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        raise UserError(f"gguf {gguf.__version__} does not know architecture '{arch_name}'")
    names = gguf.get_tensor_name_map(arch, lm.n_layers)
    present = {t.name for t in reader.tensors}
    with folded(lm, kernel, directions):
        new: dict[str, np.ndarray] = {}
        ids = {id(p) for p in touched(lm, kernel)}
        changed = {n: p for n, p in lm.model.named_parameters() if id(p) in ids}
        for hf_name, p in changed.items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None or name not in present:
                raise UserError(f"cannot place '{hf_name}' in the GGUF file ({src.name}); "
                                "write the Hugging Face checkpoint and convert it instead")
            new[name] = p.detach().float().cpu().numpy().astype(np.float16)
    add_output = kernel.embed and "output.weight" not in present
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch=arch_name, endianess=reader.endianess)
    try:
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        tensors = list(reader.tensors)
        for t in tensors:
            if t.name in new:
                a = new[t.name]
                writer.add_tensor_info(t.name, a.shape, a.dtype, a.nbytes,
                                       gguf.GGMLQuantizationType.F16)
            else:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes,
                                       t.tensor_type)
        embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
        if add_output and embd is not None:  # tied in the file: keep the output unchanged
            writer.add_tensor_info("output.weight", embd.data.shape, embd.data.dtype,
                                   embd.data.nbytes, embd.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(new.get(t.name, t.data), tensor_endianess=reader.endianess)
        if add_output and embd is not None:
            writer.write_tensor_data(embd.data, tensor_endianess=reader.endianess)
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out
