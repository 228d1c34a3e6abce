"""Exports: abliterated HF checkpoints (exact vs hook ablation) and llama.cpp control vectors."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_same_up_to_float32, build_tiny
from typer.testing import CliRunner

from refusalkit.cli import app
from refusalkit.errors import UserError
from refusalkit.export import (
    ablation_direction,
    control_vectors,
    export_abliterated,
    export_control_vector,
    import_control_vector,
    read_control_vector,
)
from refusalkit.interventions import (
    Op,
    Profile,
    ablation,
    addition,
    clamping,
    load_profile,
    save_profile,
)
from refusalkit.interventions import steer as steer_hooks
from refusalkit.models import load_model
from refusalkit.scoring import last_logprobs


def _unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _logits(model, tok, prompts: list[str]) -> torch.Tensor:
    """Logits at every real (non-padding) position, concatenated: [tokens, vocab]."""
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        logits = model(**batch).logits.float()
    return logits[batch["attention_mask"].bool()]


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=True)


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny random model saved as an ordinary HF folder, so the CLI can load it by path."""
    lm = build_tiny("qwen2", seed=3)
    folder = tmp_path / "tiny-model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------- abliterated checkpoints

def test_abliterated_cli_on_tiny_matches_hook_ablation(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = load_model(tiny_folder, device="cpu")
    r = _unit(lm.hidden_size, 1) * 3.0  # not unit: the export normalises like the hooks do
    # per-layer copies: save_profile cannot write one tensor shared by several layers
    profile = Profile((ablation({layer: r.clone() for layer in range(lm.n_layers)},
                                list(range(lm.n_layers))),))
    save_profile(profile, tmp_path / "abl", lm)
    prompts = [lm.format("how do i bake bread"), lm.format("write a poem")]
    with steer_hooks(lm, profile):
        expected = _logits(lm.model, lm.tokenizer, prompts)
    out = tmp_path / "abliterated"
    result = _invoke(["export", "abliterated", "--model", tiny_folder, "--profile",
                      str(tmp_path / "abl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    tok.padding_side = "left"
    assert tok.chat_template == lm.tokenizer.chat_template
    got = _logits(model, tok, prompts)
    # measured (OMP_NUM_THREADS=1 and 2 alike): max |diff| 1.8e-7 on logits up to 0.48
    # (3.7e-7 relative), while the ablation moves them by 0.16
    assert_same_up_to_float32(got, expected, _logits(lm.model, lm.tokenizer, prompts))
    stamp = json.loads((out / "refusalkit-export.json").read_text())
    assert stamp["source_model"]["fingerprint"] == lm.fingerprint
    # refusing to clobber a folder that is not an export
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = _invoke(["export", "abliterated", "--model", tiny_folder, "--profile",
                      str(tmp_path / "abl"), "--out", str(tmp_path / "mine")])
    assert isinstance(result.exception, UserError)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.real
def test_abliterated_smol_matches_hook_ablation(smol, fresh_smol, tmp_path):
    from transformers import AutoModelForCausalLM

    r = _unit(smol.hidden_size, 5)
    profile = Profile((ablation(r, list(range(smol.n_layers))),))
    prompts = [smol.format("How do I pick a lock?"), smol.format("Name three colours.")]
    with steer_hooks(smol, profile):
        expected = _logits(smol.model, smol.tokenizer, prompts)
    out = export_abliterated(fresh_smol, profile, tmp_path / "smol-abl")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.tie_word_embeddings is False  # the head keeps the full stream
    got = _logits(model, smol.tokenizer, prompts)
    # measured (OMP_NUM_THREADS=1 and 2 alike): max |diff| 9.6e-5 on logits up to 40.3
    # (2.4e-6 relative; 1.0e-4 on issue 17's fresh machine), while the ablation moves them by 6.9
    assert_same_up_to_float32(got, expected, _logits(smol.model, smol.tokenizer, prompts))


def test_abliteration_refuses_what_weights_cannot_express(tiny):
    r = _unit(tiny.hidden_size, 0)
    all_layers = list(range(tiny.n_layers))
    with pytest.raises(UserError, match="adds a vector"):
        ablation_direction(tiny, Profile((addition({1: r}, 1.0),)))
    with pytest.raises(UserError, match="ablates 2 of 4 layers"):
        ablation_direction(tiny, Profile((ablation(r, [1, 2]),)))
    two = {layer: r if layer < 2 else _unit(tiny.hidden_size, 9) for layer in all_layers}
    with pytest.raises(UserError, match="different direction at layer 2"):
        ablation_direction(tiny, Profile((ablation(two, all_layers),)))
    with pytest.raises(UserError, match="prompt phase"):
        ablation_direction(tiny, Profile((ablation(r, all_layers, phase="prompt"),)))
    flipped = {layer: r * (-1) ** layer for layer in all_layers}  # sign does not matter
    assert torch.allclose(ablation_direction(tiny, Profile((ablation(flipped, all_layers),))),
                          r, atol=1e-6)


# ---------------------------------------------------------------- control vectors

def _additive(d: int) -> Profile:
    v2, v3 = _unit(d, 2) * 4, _unit(d, 3) * 4
    return Profile((addition({2: v2, 3: v3}, {2: 0.5, 3: -2.0}),
                    addition({3: v2.clone()}, 1.0)), scale=1.5)


def test_control_vector_round_trip(tiny, tmp_path):
    profile = _additive(tiny.hidden_size)
    path = export_control_vector(profile, tmp_path / "cv.gguf", model_hint="llama")
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]  # layer L -> direction.L-1
    (op1, op2), s = profile.ops, 1.5
    want = {"direction.1": s * 0.5 * op1.vectors[2],
            "direction.2": s * (-2.0 * op1.vectors[3] + op2.vectors[3])}
    for name, vec in want.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_allclose(tensors[name], vec.numpy(), rtol=1e-6, atol=1e-6)
    imported = import_control_vector(path, tiny)
    assert imported.layers == [2, 3]
    prompts = ["how do i bake bread", "tell me about the weather"]
    np.testing.assert_allclose(last_logprobs(tiny, prompts, profile=imported).numpy(),
                               last_logprobs(tiny, prompts, profile=profile).numpy(), atol=1e-5)
    half = import_control_vector(path, tiny, strength=0.5)
    np.testing.assert_allclose(
        last_logprobs(tiny, prompts, profile=half).numpy(),
        last_logprobs(tiny, prompts, profile=profile.scaled(0.75)).numpy(), atol=1e-5)


def test_control_vector_refusals(tiny, tmp_path):
    d = tiny.hidden_size
    r = _unit(d, 0)
    with pytest.raises(UserError, match="ablates a direction"):
        control_vectors(Profile((ablation(r, [2]),)))
    with pytest.raises(UserError, match="clamps a projection"):
        control_vectors(Profile((clamping({2: r}, {2: -1.0}, {2: 0.5}),)))
    with pytest.raises(UserError, match="profile layer 1 cannot be expressed"):
        control_vectors(Profile((addition({1: r, 2: r}, 1.0),)))
    with pytest.raises(UserError, match="generation phase"):
        control_vectors(Profile((addition({2: r}, 1.0, phase="generation"),)))
    with pytest.raises(UserError, match="no additions"):
        control_vectors(Profile(()))
    # a file whose last direction steers the final block's output has no refusalkit layer
    last = Profile((Op("add", {tiny.n_layers: r}, {}),))
    path = export_control_vector(last, tmp_path / "last.gguf")
    with pytest.raises(UserError, match=r"direction\.3 steers the output of block 3"):
        import_control_vector(path, tiny)
    big = export_control_vector(Profile((addition({2: torch.ones(d + 1)}, 1.0),)),
                                tmp_path / "big.gguf")
    with pytest.raises(UserError, match="hidden size"):
        import_control_vector(big, tiny)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a readable GGUF"):
        read_control_vector(tmp_path / "junk.gguf")


def test_control_vector_cli_round_trip_and_one_line_refusal(tiny_folder, tmp_path):
    lm = load_model(tiny_folder, device="cpu")
    profile = _additive(lm.hidden_size)
    save_profile(profile, tmp_path / "add", lm)
    cv = tmp_path / "out" / "refusal.gguf"
    result = _invoke(["--json", "export", "gguf-control-vector", "--profile",
                      str(tmp_path / "add"), "--out", str(cv)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["directions"] == [1, 2]
    assert read_control_vector(cv)[0]["model_hint"] == tiny_folder  # the profile's model name
    result = _invoke(["import", "control-vector", str(cv), "--model", tiny_folder, "--out",
                      str(tmp_path / "imported")])
    assert result.exit_code == 0, result.output
    back = load_profile(tmp_path / "imported", lm)
    assert back.meta["source"]["format"] == "llama.cpp control vector"
    prompts = ["write poem"]
    np.testing.assert_allclose(last_logprobs(lm, prompts, profile=back).numpy(),
                               last_logprobs(lm, prompts, profile=profile).numpy(), atol=1e-5)
    # an ablation profile cannot become a control vector: one line on stderr, exit 2
    save_profile(Profile((ablation(_unit(lm.hidden_size, 0), [2]),)), tmp_path / "abl", lm)
    proc = subprocess.run(
        [sys.executable, "-c", "from refusalkit.cli import run; run()", "export",
         "gguf-control-vector", "--profile", str(tmp_path / "abl"), "--out",
         str(tmp_path / "x.gguf")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: the profile ablates")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.real
def test_control_vector_import_on_smol(smol, tmp_path):
    v = _unit(smol.hidden_size, 11) * 6
    profile = Profile((addition({10: v, 14: v}, {10: 1.0, 14: -0.5}),))
    path = export_control_vector(profile, tmp_path / "smol.gguf", model_hint="llama")
    meta, vectors = read_control_vector(path)
    assert meta == {"model_hint": "llama", "layer_count": 2} and list(vectors) == [9, 13]
    imported = import_control_vector(path, smol)
    prompt = ["Tell me a joke about cats."]
    base = last_logprobs(smol, prompt)
    a = last_logprobs(smol, prompt, profile=profile)
    b = last_logprobs(smol, prompt, profile=imported)
    assert (a - b).abs().max() < 1e-4
    assert (a - base).abs().max() > 1e-2
