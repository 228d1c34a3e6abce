"""The Refusal Steering pipeline: every stage on a tiny model, the whole run on real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_tiny

from refusalkit.errors import UserError
from refusalkit.interventions import load_profile
from refusalkit.steer import run_steer
from refusalkit.steer_config import SteerConfig

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(**over) -> SteerConfig:
    return SteerConfig.load(REPO / "configs" / "tiny_steer.toml",
                            {"search.trials": 3, "judge.max_new_tokens": 4, **over})


def test_every_stage_runs_and_resume_reuses_them(tmp_path: Path) -> None:
    lm = build_tiny("llama")
    cfg = tiny_cfg()
    out = run_steer(cfg, tmp_path / "run", show_progress=False, lm=lm)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("target_refusal_before", "target_refusal_after", "safety_refusal_before",
                "safety_refusal_after", "overrefusal_before", "overrefusal_after",
                "kl_harmless", "perplexity_ratio", "baselines", "chosen_layers",
                "chosen_strengths", "search_generated_tokens"):
        assert key in metrics, key
    assert "md_steering" in metrics["baselines"]
    stages = {p.stem for p in (out / "stages").iterdir()}
    assert {"baseline", "activations", "directions", "layers", "search", "verify",
            "evaluate"} <= stages
    prof = load_profile(out / "profile", lm)
    assert prof.layers == metrics["chosen_layers"]
    assert (out / "report.html").is_file()
    before = (out / "metrics.json").read_bytes()
    timings = json.loads((out / "timings.json").read_text())
    out2 = run_steer(cfg, out, resume=True, show_progress=False, lm=lm)
    assert json.loads((out2 / "timings.json").read_text())["search"] == timings["search"]
    assert (out2 / "metrics.json").read_bytes() == before
    with pytest.raises(UserError, match="--resume"):
        run_steer(cfg, out, show_progress=False, lm=lm)


def test_remove_mode_without_refusals_is_a_clear_error(tmp_path: Path) -> None:
    lm = build_tiny("qwen2")
    cfg = tiny_cfg(mode="remove")
    with pytest.raises(UserError, match=r"does not refuse any target prompt|fewer than 2"):
        run_steer(cfg, tmp_path / "run", show_progress=False, lm=lm)
