"""Small things a new user tripped over (issue 17 §4), each pinned by a test: global flags
after the command, edited manifests, JSON error positions, key suggestions, help texts, bare
`refusalkit`, loading bars, the server's model and steering docs, file modes, MODELS.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny

from refusalkit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "refusalkit"
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, cwd=REPO, env=ENV,
                          timeout=600)


def one_line_error(proc: subprocess.CompletedProcess[str], match: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and match in lines[0], proc.stderr
    return lines[0]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ command line


def test_global_flags_work_after_the_command() -> None:
    proc = cli("models", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {r["name"] for r in json.loads(proc.stdout)} >= {"qwen2.5-coder-0.5b"}
    assert cli("models", "-q").returncode == 0


def test_hoisting_leaves_own_options_and_values_alone() -> None:
    import typer

    from refusalkit.cli import app, hoist_global_flags

    group = typer.main.get_command(app)
    ctx = group.make_context("refusalkit", ["models"], resilient_parsing=True)

    def hoist(*args: str) -> list[str]:
        return hoist_global_flags(group, ctx, list(args))

    assert hoist("models", "--json") == ["--json", "models"]
    assert hoist("export", "abliterated", "-q", "--model", "m") == [
        "-q", "export", "abliterated", "--model", "m"]
    assert hoist("export", "--json", "abliterated") == ["--json", "export", "abliterated"]
    assert hoist("judge-eval", "--json") == ["judge-eval", "--json"]  # its own --json
    assert hoist("extract", "--set", "--json") == ["extract", "--set", "--json"]  # a value
    assert hoist("extract", "--", "--debug") == ["extract", "--", "--debug"]
    assert hoist("nonsense", "--json") == ["nonsense", "--json"]


def test_bare_refusalkit_prints_help_without_an_error_line() -> None:
    proc = cli()
    assert proc.returncode == 0
    assert "Usage: refusalkit" in proc.stdout and "Commands:" in proc.stdout
    assert "error" not in proc.stderr


def test_extract_help_keeps_defaults_and_shows_no_bool_types() -> None:
    text = cli("extract", "--help").stdout
    assert "[default: qwen2.5-coder-0.5b]" in text and "[default: 0.01]" in text
    assert "Model spec ." not in text and "<bool>" not in text
    assert re.search(r"--resume\s+Continue", text)  # a flag shows no type at all


def test_config_key_suggestion_ranks_the_swap_first() -> None:
    from refusalkit.config import load_config, suggest
    from refusalkit.steer.config import SteerConfig

    assert suggest("modle", ["mode", "model", "seed"]) == ["model", "mode"]
    assert suggest("batch_sise", ["positive", "batch_size"]) == ["batch_size"]
    assert suggest("zzz", ["model"]) == []
    with pytest.raises(UserError, match=r"unknown key 'modle' \(did you mean 'model'\?\)"):
        load_config(None, SteerConfig, {"modle": "x"})
    one_line_error(cli("steer", "--set", "modle=x", "--print-config"),
                   "(did you mean 'model'?)")


# ------------------------------------------------------------------ artifacts and JSON


@pytest.fixture
def profile_dir(tmp_path: Path) -> Path:
    from refusalkit.interventions import Profile, addition, save_profile

    lm = build_tiny("llama")
    save_profile(Profile((addition({1: torch.ones(64)}, -1.0),)), tmp_path / "prof", lm)
    return tmp_path / "prof"


def _edit_layers(prof: Path, layers: list[int], *, drop_checksum: bool) -> None:
    m = json.loads((prof / "manifest.json").read_text())
    m["ops"][0]["layers"] = layers
    if drop_checksum:  # as an artifact from before the manifest checksum would be
        del m["manifest_sha256"]
    (prof / "manifest.json").write_text(json.dumps(m))


def test_a_manifest_edited_to_a_missing_layer_is_one_line(profile_dir: Path) -> None:
    from refusalkit.interventions import load_profile

    assert load_profile(profile_dir).layers == [1]
    _edit_layers(profile_dir, [99], drop_checksum=False)
    with pytest.raises(UserError, match="does not match its checksum"):
        load_profile(profile_dir)
    _edit_layers(profile_dir, [99], drop_checksum=True)
    with pytest.raises(UserError, match=r"names tensor 'op0\.layer99'"):
        load_profile(profile_dir)
    proc = cli("export", "gguf-control-vector", "--profile", str(profile_dir), "--out",
               str(profile_dir.parent / "cv.gguf"))
    one_line_error(proc, "names tensor 'op0.layer99', which tensors.safetensors does not hold")


def test_the_checksum_covers_the_tensor_list(profile_dir: Path) -> None:
    from refusalkit.interventions import load_profile

    m = json.loads((profile_dir / "manifest.json").read_text())
    assert m["tensor_names"] == ["op0.layer1"] and m["manifest_sha256"]
    m["tensor_names"] = ["op0.layer1", "op0.layer2"]
    (profile_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="does not match its checksum"):
        load_profile(profile_dir)
    del m["manifest_sha256"]
    (profile_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="tensor list does not match"):
        load_profile(profile_dir)


def test_json_errors_keep_their_position(profile_dir: Path, tmp_path: Path) -> None:
    from refusalkit.interventions import load_profile
    from refusalkit.prompts import load_prompts

    (profile_dir / "manifest.json").write_text('{\n  "format": "refusalkit.profile/v1')
    with pytest.raises(UserError, match=r"Unterminated string starting at line 2, column 13"):
        load_profile(profile_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "x", oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON \(.* at column 17\)"):
        load_prompts(str(bad))


# ------------------------------------------------------------------ loading bars


def test_loading_shows_no_library_bars_and_restores_their_switches(tmp_path, capfd) -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from refusalkit.models import load_model, quiet_loading

    lm = build_tiny("llama")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        original = gguf_utils.tqdm
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF"):
            pass
        assert "Converting" in capfd.readouterr().err  # the bar this test must not see
        with quiet_loading():
            for _ in gguf_utils.tqdm(range(272), desc="Converting and de-quantizing GGUF"):
                pass
            assert not hf_logging.is_progress_bar_enabled()
        load_model(str(tmp_path / "m"))
        err = capfd.readouterr().err
        assert "Converting" not in err and "Loading weights" not in err
        assert gguf_utils.tqdm is original and hf_logging.is_progress_bar_enabled()
    finally:
        if not was_on:
            hf_logging.disable_progress_bar()


# ------------------------------------------------------------------ server


def test_server_names_the_model_it_serves(caplog) -> None:
    from fastapi.testclient import TestClient

    from refusalkit.serve import create_app

    app = create_app(build_tiny("llama"), None, model_name="served-one")
    body = {"messages": [{"role": "user", "content": "tell me about the weather"}],
            "max_tokens": 2}
    with TestClient(app) as client:
        same = client.post("/v1/chat/completions", json={**body, "model": "served-one"})
        other = client.post("/v1/chat/completions", json={**body, "model": "gpt-4o"})
        streamed = client.post("/v1/chat/completions",
                               json={**body, "model": "gpt-4o", "stream": True})
    assert same.status_code == 200 and "warning" not in same.json()
    assert "x-refusalkit-warning" not in same.headers
    got = other.json()
    assert other.status_code == 200 and got["model"] == "served-one"
    assert got["warning"] == "this server serves 'served-one' only; the request named 'gpt-4o'"
    assert "served-one" in other.headers["x-refusalkit-warning"]
    assert "served-one" in streamed.headers["x-refusalkit-warning"]
    logged = [r for r in caplog.records if "a request named model 'gpt-4o'" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelname == "WARNING"  # once per name


def test_the_steering_field_is_documented_in_serve_help_and_readme() -> None:
    text = cli("serve", "--help").stdout
    assert '"steering": {"scale": 0.5}' in text and '"steering": {"enabled": false}' in text
    assert "X-Refusalkit-Warning" in text
    readme = (REPO / "README.md").read_text()
    assert 'extra_body={"steering": {"scale": 0.5}}' in readme
    assert "X-Refusalkit-Warning" in readme
    assert "refusalkit profile dirs" in readme and "refusalkit extract" in readme


# ------------------------------------------------------------------ files


def test_abliterated_checkpoint_and_artifacts_respect_the_umask(tmp_path: Path) -> None:
    from refusalkit.artifacts import DirectionSet, save_directions
    from refusalkit.export import export_abliterated
    from refusalkit.interventions import Profile, ablation

    lm = build_tiny("llama")
    r = torch.nn.functional.normalize(torch.randn(64), dim=0)
    export_abliterated(lm, Profile((ablation(r, list(range(lm.n_layers))),)), tmp_path / "ck")
    want = 0o666 & ~_umask()
    assert (tmp_path / "ck" / "model.safetensors").stat().st_mode & 0o777 == want
    save_directions(DirectionSet({"refusal": r[None]}, [1]), tmp_path / "d", lm)
    assert (tmp_path / "d" / "tensors.safetensors").stat().st_mode & 0o777 == want


def test_packaging_points_at_a_models_page_that_lists_the_packaged_models() -> None:
    from refusalkit.models import PACKAGED

    pyproject = (REPO / "pyproject.toml").read_text()
    refs = re.findall(r"[\w./-]+\.md\b", pyproject)
    assert refs and all((REPO / ref).is_file() for ref in refs), refs
    page = (REPO / "docs" / "MODELS.md").read_text()
    for pm in PACKAGED.values():
        assert f"`{pm.name}`" in page and pm.sha256 in page and f"{pm.size:,}" in page
