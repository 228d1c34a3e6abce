"""TOML configs: validation errors are one line naming the key; defaults document themselves."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from refusalkit.config import ConfigModel, cli_overrides, load_config, parse_set, render_config
from refusalkit.errors import UserError


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Search(ConfigModel):
    """Hyper-parameter search."""

    trials: int = Field(40, ge=1, description="Number of Optuna trials.")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler.")
    kl_budget: float = 0.1
    """KL budget (documented by an attribute docstring)."""


class Steer(ConfigModel):
    """Steering run."""

    model: str = Field("qwen2.5-coder-0.5b", description="Model spec.")
    target: str = Field("harmful_test", description="Prompts to stop refusing.")
    layers: list[int] | None = Field(None, description="Layers to steer (default: search).")
    color: Color = Color.RED
    weights: dict[str, float] = Field(default_factory=lambda: {"kl": 1.0, "refusal": 2.0})
    search: Search = Field(default_factory=Search)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str, overrides: dict | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_config(_write(tmp_path, text), Steer, overrides)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("config error: ")
    return msg


def test_loads_file_and_applies_overrides(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, 'model = "m"\n[search]\ntrials = 5\n'), Steer,
                      {"search.sampler": "random", "layers": [3, 4], "target": None})
    assert cfg.model == "m" and cfg.search.trials == 5 and cfg.search.sampler == "random"
    assert cfg.layers == [3, 4] and cfg.target == "harmful_test"  # None = flag not given
    assert load_config(None, Steer) == Steer()


def test_unknown_keys_name_the_key_and_what_is_allowed(tmp_path: Path) -> None:
    msg = _error(tmp_path, "serach = 1\n")
    assert "unknown key 'serach'" in msg and "did you mean 'search'" in msg
    assert "allowed: model, target, layers, color, weights, search" in msg
    msg = _error(tmp_path, "[search]\ntrails = 3\n")
    assert "unknown key 'trails' in [search]" in msg
    assert "allowed: trials, sampler, kl_budget" in msg


def test_wrong_values_name_the_dotted_key(tmp_path: Path) -> None:
    msg = _error(tmp_path, '[search]\ntrials = "abc"\n')
    assert msg.startswith("config error: search.trials: Input should be a valid integer")
    assert '(got "abc")' in msg
    assert "search.trials: Input should be greater than or equal to 1 (got 0)" in _error(
        tmp_path, "[search]\ntrials = 0\n")
    assert "search.sampler: Input should be 'tpe' or 'random'" in _error(
        tmp_path, '[search]\nsampler = "grid"\n')
    assert "color: Input should be 'red' or 'blue'" in _error(tmp_path, 'color = "green"\n')
    assert "layers[1]: Input should be a valid integer" in _error(tmp_path, 'layers = [1, "x"]\n')
    both = _error(tmp_path, 'model = 3\n[search]\ntrials = "x"\n')
    assert "model:" in both and "search.trials:" in both  # all problems, still one line


def test_file_problems_are_one_line(tmp_path: Path) -> None:
    assert "is not valid TOML" in _error(tmp_path, "model = [\n")
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.toml", Steer)
    with pytest.raises(UserError, match="search is a value, not a section"):
        load_config(_write(tmp_path, "search = 3\n"), Steer, {"search.trials": 2})


def test_parse_set_reads_toml_values() -> None:
    got = parse_set(["search.trials=20", "layers=[1, 2]", "model=qwen", 'target="a=b"',
                     "search.kl_budget=0.5", "flag=true"])
    assert got == {"search.trials": 20, "layers": [1, 2], "model": "qwen", "target": "a=b",
                   "search.kl_budget": 0.5, "flag": True}
    with pytest.raises(UserError, match=r"key\.sub=value"):
        parse_set(["novalue"])
    cfg = load_config(None, Steer, parse_set(["search.trials=7"]))
    assert cfg.search.trials == 7
    with pytest.raises(UserError, match=r"search\.trials: .*\(got \"abc\"\)"):
        load_config(None, Steer, parse_set(["search.trials=abc"]))


def test_flags_beat_set_and_unset_flags_do_not_count() -> None:
    got = cli_overrides(["search.trials=3", "model=a"], {"search.trials": 9, "model": None})
    assert got == {"search.trials": 9, "model": "a"}
    assert load_config(None, Steer, got).search.trials == 9


def test_default_config_documents_itself_and_round_trips(tmp_path: Path) -> None:
    text = render_config(Steer)
    assert text.startswith("# Steering run.")
    assert "# Model spec.\nmodel = \"qwen2.5-coder-0.5b\"" in text
    assert "# layers = (unset)" in text  # None cannot be written in TOML: commented out
    assert "# Optuna sampler. (one of: \"tpe\", \"random\")" in text
    assert "# KL budget (documented by an attribute docstring)." in text
    assert "[search]" in text and 'weights = { kl = 1.0, refusal = 2.0 }' in text
    assert load_config(_write(tmp_path, text), Steer) == Steer()
    custom = Steer(layers=[2], search=Search(trials=3))
    assert load_config(_write(tmp_path, custom.to_toml()), Steer) == custom
    assert Steer.load(None, {"search.trials": 9}).search.trials == 9


def test_required_fields_are_reported(tmp_path: Path) -> None:
    class Needs(ConfigModel):
        positive: str = Field(description="Refused prompts.")

    assert "# positive = (required)" in render_config(Needs)
    with pytest.raises(UserError, match="positive: missing"):
        load_config(None, Needs)


def test_assignment_is_validated() -> None:
    cfg = Steer()
    with pytest.raises(ValueError):
        cfg.search.trials = "many"  # type: ignore[assignment]
