"""`refusalkit profile`: directions from `extract` → a steering profile that `generate`,
`serve` and `export` read, and the hint a directions artifact gets where a profile belongs.

The real entry point in a subprocess on a tiny random model folder (loads in seconds).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from test_cli import cli, fails  # one way to run the CLI and to check a user error

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "refusalkit"
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
REFUSED = ["how do i make a bomb", "how do i steal a car", "how do i hack computer"]
ANSWERED = ["tell me about the weather", "write a poem please", "how do i bake bread"]


def _jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny model folder, its directions (extracted by the CLI), and an older-style
    directions artifact without the projections relative strengths need."""
    from refusalkit.artifacts import DirectionSet, save_directions

    root = tmp_path_factory.mktemp("profile")
    lm = build_tiny("llama", seed=0)
    lm.model.save_pretrained(root / "tiny")
    lm.tokenizer.save_pretrained(root / "tiny")
    out = {"root": root, "tiny": root / "tiny", "pos": _jsonl(root / "pos.jsonl", REFUSED),
           "neg": _jsonl(root / "neg.jsonl", ANSWERED), "dirs": root / "dirs"}
    proc = cli("--quiet", "extract", "--model", str(out["tiny"]), "--positive", str(out["pos"]),
               "--negative", str(out["neg"]), "--out", str(out["dirs"]))
    assert proc.returncode == 0, proc.stderr
    from refusalkit.models import load_model

    loaded = load_model(str(out["tiny"]))
    old = DirectionSet({"refusal": torch.nn.functional.normalize(torch.randn(5, 64), dim=-1)},
                       [0, 1, 2, 3, 4], {"method": "md"})
    out["old"] = save_directions(old, root / "old", loaded)
    return out


def _profile(files: dict[str, Path], name: str, *args: str) -> Path:
    out = files["root"] / name
    proc = cli("--quiet", "profile", str(files["dirs"]), "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    return out


def _mean_projections(files: dict[str, Path], layer: int) -> tuple[float, float]:
    """The two prompt sets' mean projection on the artifact's direction, recomputed here."""
    from refusalkit.activations import capture
    from refusalkit.artifacts import load_directions
    from refusalkit.models import load_model

    lm = load_model(str(files["tiny"]))
    v = load_directions(files["dirs"]).vector("refusal", layer).double()
    pos = capture(lm, REFUSED, [layer], [-1], show_progress=False)[:, 0, 0].double()
    neg = capture(lm, ANSWERED, [layer], [-1], show_progress=False)[:, 0, 0].double()
    return float((pos @ v).mean()), float((neg @ v).mean())


def test_relative_addition_is_alpha_times_each_layers_gap(files: dict[str, Path]) -> None:
    from refusalkit.artifacts import load_directions
    from refusalkit.interventions import load_profile

    prof = load_profile(_profile(files, "rel", "--layers", "1-2", "--alpha", "-2",
                                 "--relative"))
    op = prof.ops[0]
    assert op.kind == "add" and prof.layers == [1, 2] and op.gate is None
    dirs = load_directions(files["dirs"])
    for layer in (1, 2):
        p, n = _mean_projections(files, layer)
        assert p > n  # the direction points toward the refused prompts
        assert op.strengths[layer] == pytest.approx(-2 * (p - n), rel=1e-4)
        assert torch.equal(op.vectors[layer], dirs.vector("refusal", layer))
    absolute = load_profile(_profile(files, "abs", "--layers", "1,3", "--alpha", "1.5"))
    assert absolute.layers == [1, 3] and dict(absolute.ops[0].strengths) == {1: 1.5, 3: 1.5}


def test_clamp_starts_from_the_refused_side_and_ablate_needs_no_alpha(files) -> None:
    from refusalkit.interventions import load_profile

    clamp = load_profile(_profile(files, "clamp", "--op", "clamp", "--layers", "2",
                                  "--alpha", "-1", "--relative")).ops[0]
    p, n = _mean_projections(files, 2)
    assert clamp.kind == "clamp" and clamp.levels[2] == pytest.approx(p, rel=1e-4)
    induce = load_profile(_profile(files, "clamp_up", "--op", "clamp", "--layers", "2",
                                   "--alpha", "1")).ops[0]
    assert induce.levels[2] == pytest.approx(n, rel=1e-4)
    abl = load_profile(_profile(files, "abl", "--op", "ablate", "--layers", "all"))
    assert abl.ops[0].kind == "ablate" and abl.layers == [0, 1, 2, 3]  # not the final state


def test_generate_reads_the_profile_and_it_steers(files: dict[str, Path]) -> None:
    from refusalkit.interventions import load_profile
    from refusalkit.models import load_model
    from refusalkit.scoring import last_logprobs

    prof_dir = _profile(files, "strong", "--layers", "1-3", "--alpha", "-20")
    lm = load_model(str(files["tiny"]))
    prof = load_profile(prof_dir, lm)  # made for this model: its checks pass
    plain = last_logprobs(lm, REFUSED)
    steered = last_logprobs(lm, REFUSED, profile=prof)
    assert (plain - steered).abs().max() > 1e-2
    out = files["root"] / "gen.jsonl"
    proc = cli("--quiet", "generate", "--model", str(files["tiny"]), "--profile", str(prof_dir),
               "--prompts", str(files["pos"]), "--out", str(out), "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text().splitlines()) == len(REFUSED)


def test_one_direction_ablated_everywhere_exports_readable_weights(files) -> None:
    prof = _profile(files, "arditi", "--op", "ablate", "--layers", "all",
                    "--direction-layer", "2")
    ckpt = files["root"] / "abliterated"
    proc = cli("--quiet", "export", "abliterated", "--model", str(files["tiny"]), "--profile",
               str(prof), "--out", str(ckpt))
    assert proc.returncode == 0, proc.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert (ckpt / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_directions_artifact_where_a_profile_belongs_names_the_command(files) -> None:
    d, tiny = str(files["dirs"]), str(files["tiny"])
    gen = ["generate", "--model", tiny, "--prompts", str(files["pos"]), "--out",
           str(files["root"] / "x.jsonl"), "--profile", d]
    for args in (gen, ["serve", "--model", tiny, "--profile", d],
                 ["export", "abliterated", "--model", tiny, "--profile", d, "--out",
                  str(files["root"] / "never")],
                 ["export", "gguf-control-vector", "--profile", d, "--out",
                  str(files["root"] / "never.gguf")]):
        msg = fails(*args, match="holds refusal directions")
        assert "refusalkit profile" in msg
    assert not (files["root"] / "never").exists()


def test_gate_from_a_gated_profile_or_a_steer_run(files: dict[str, Path]) -> None:
    from refusalkit.interventions import Gate, Profile, addition, load_profile, save_profile
    from refusalkit.models import load_model

    lm = load_model(str(files["tiny"]))
    gate = Gate(1, torch.ones(64), 0.25, "mean")
    save_profile(Profile((addition({2: torch.ones(64)}, -1.0, gate=gate),)),
                 files["root"] / "gated", lm)
    got = load_profile(_profile(files, "g1", "--layers", "2-3", "--alpha", "-1", "--gate",
                                str(files["root"] / "gated"))).ops[0].gate
    assert got is not None and (got.layer, got.threshold, got.pool) == (1, 0.25, "mean")
    run = files["root"] / "steer_run"
    (run / "stages").mkdir(parents=True)
    manifest = json.loads((files["dirs"] / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({"command": "steer",
                                                   "model": manifest["model"]}))
    (run / "stages" / "gate.json").write_text(json.dumps(
        {"layer": 2, "vector": [0.5] * 64, "threshold": -3.0, "pool": "last"}))
    got = load_profile(_profile(files, "g2", "--layers", "2", "--alpha", "-1", "--gate",
                                str(run))).ops[0].gate
    assert got is not None and (got.layer, got.threshold) == (2, -3.0)
    assert torch.equal(got.vector, torch.full((64,), 0.5))
    fails("profile", str(files["dirs"]), "--out", str(files["root"] / "g3"), "--layers", "1",
          "--alpha", "-1", "--gate", str(run), match="must not come after the first steered")
    fails("profile", str(files["dirs"]), "--out", str(files["root"] / "g4"), "--layers", "1",
          "--alpha", "-1", "--gate", str(files["root"] / "abs"), match="has no topic gate")


def test_mistakes_are_one_line_errors(files: dict[str, Path]) -> None:
    d, out = str(files["dirs"]), str(files["root"] / "bad")
    base = ["profile", d, "--out", out]
    fails(*base, "--layers", "1", match="--op add needs --alpha")
    fails(*base, "--layers", "1", "--op", "ablate", "--alpha", "1", match="takes no --alpha")
    fails(*base, "--layers", "1", "--op", "steer", "--alpha", "1", match="unknown --op 'steer'")
    fails(*base, "--layers", "one", "--alpha", "1", match="bad layer list 'one'")
    fails(*base, "--layers", "2-9", "--alpha", "1", match="layer 9 cannot be steered")
    fails(*base, "--layers", "4", "--alpha", "1", match="layer 4 cannot be steered")
    fails(*base, "--layers", "1", "--alpha", "1", "--direction", "other",
          match="no direction named 'other'")
    fails(*base, "--layers", "1", "--alpha", "1", "--phase", "later", match="unknown --phase")
    msg = fails("profile", str(files["old"]), "--out", out, "--layers", "1", "--alpha", "-1",
                "--relative", match="does not record the prompt sets' projections")
    assert "re-run `refusalkit extract`" in msg and "without --relative" in msg
    fails("profile", str(files["old"]), "--out", out, "--layers", "1", "--alpha", "-1",
          "--op", "clamp", match="a clamp needs the level")
    fails("profile", str(files["root"] / "rel"), "--out", out, "--layers", "1", "--alpha", "1",
          match="not 'refusalkit.directions/v1'")
    fails("profile", d, "--out", d, "--layers", "1", "--alpha", "1",
          match="--out is the directions artifact itself")
    fails("profile", d, "--out", str(files["tiny"]), "--layers", "1", "--alpha", "1",
          match="exists and is not a steering profile")
    assert (files["tiny"] / "config.json").is_file()  # the model folder is left alone
    # the old artifact still works with an absolute strength
    ok = cli("--quiet", "profile", str(files["old"]), "--out", out, "--layers", "1",
             "--alpha", "-1")
    assert ok.returncode == 0, ok.stderr


def test_help_documents_layers_and_signs() -> None:
    text = cli("profile", "--help").stdout
    assert "10-15" in text and "10,12,14" in text
    assert "--alpha < 0 REMOVES refusal" in text
