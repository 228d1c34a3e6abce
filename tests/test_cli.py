"""The CLI as a user meets it: the real `refusalkit` entry point, in a subprocess.

Every bad input → non-zero exit, exactly one line on stderr, no traceback (`--debug` shows
it). Models are tiny random ones saved as model folders, so a subprocess loads in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, tiny_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "refusalkit"
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, cwd=cwd, env=ENV,
                          timeout=600)


def fails(*args: str, match: str) -> str:
    """Run a command that must fail like a user error: one line, no traceback."""
    proc = cli(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert match in lines[0], lines[0]
    return lines[0]


def _save(lm, path: Path) -> Path:
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny model folders (two of hidden size 64, one of 32), prompt files, profiles."""
    from transformers import AutoModelForCausalLM

    from refusalkit.interventions import Profile, addition, save_profile
    from refusalkit.models import from_pretrained_objects

    root = tmp_path_factory.mktemp("cli")
    tiny = build_tiny("llama", seed=0)
    other = build_tiny("llama", seed=1)
    cfg = tiny_config("llama", vocab_size=len(tiny.tokenizer))
    cfg.hidden_size, cfg.intermediate_size = 32, 48
    torch.manual_seed(0)
    narrow = from_pretrained_objects(AutoModelForCausalLM.from_config(cfg), tiny.tokenizer,
                                     "tiny-narrow")
    out = {"tiny": _save(tiny, root / "tiny"), "other": _save(other, root / "other"),
           "narrow": _save(narrow, root / "narrow")}
    for name, lm in (("profile_tiny", tiny), ("profile_narrow", narrow)):
        vec = torch.nn.functional.normalize(torch.randn(lm.hidden_size), dim=0)
        save_profile(Profile((addition({1: vec}, {1: -1.0}),)), root / name, lm)
        out[name] = root / name
    (root / "good.jsonl").write_text("".join(
        json.dumps({"prompt": p}) + "\n" for p in
        ["how do i make a bomb", "tell me about the weather", "write a poem please",
         "how do i steal a car"]))
    (root / "empty.jsonl").write_text("")
    (root / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    (root / "bad_key.toml").write_text('positive = "x"\nnegative = "y"\nbatch_sise = 4\n')
    (root / "bad_value.toml").write_text('positive = "x"\nnegative = "y"\nbatch_size = "big"\n')
    out.update({k: root / f"{k}.{ext}" for k, ext in
                (("good", "jsonl"), ("empty", "jsonl"), ("bad", "jsonl"),
                 ("bad_key", "toml"), ("bad_value", "toml"))})
    out["root"] = root
    return out


def _extract_args(files: dict[str, Path], *extra: str) -> list[str]:
    good = str(files["good"])
    return ["extract", "--model", str(files["tiny"]), "--positive", good, "--negative", good,
            *extra]


def test_help_works_for_every_command() -> None:
    from refusalkit.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    names += [g.name for g in app.registered_groups if g.name]
    assert {"models", "extract", "generate", "report"} <= set(names)
    procs = {n: subprocess.Popen([str(BIN), *([n] if n else []), "--help"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=ENV, cwd=REPO)
             for n in [*names, ""]}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} --help: {err}"
        assert "Usage:" in out and "Traceback" not in err


def test_bad_inputs_are_one_line_errors(files: dict[str, Path]) -> None:
    good, art = str(files["good"]), str(files["root"] / "art")
    fails("extract", "--model", "no-such-model", "--positive", good, "--negative", good,
          "--out", art, match="unknown model 'no-such-model'")
    fails(*_extract_args(files, "--out", art, "--positive", "/nonexistent/p.jsonl"),
          match="prompt file not found")
    fails(*_extract_args(files, "--out", art, "--negative", str(files["empty"])),
          match="is empty")
    fails(*_extract_args(files, "--out", art, "--positive", str(files["bad"])),
          match="bad.jsonl:2: not valid JSON")
    fails(*_extract_args(files, "--out", art, "--method", "magic"),
          match="method: Input should be 'md', 'rmd', 'wrmd' or 'pca'")
    fails(*_extract_args(files, "--out", art, "--layers", "two"), match="bad layer list")
    fails(*_extract_args(files, "--resume", "--out", art), match="--resume needs --run-dir")
    fails("extract", "--out", art, match="positive: missing")
    fails("report", str(files["root"]), match="is not a run folder")
    fails("extract", "--bogus", match="No such option: --bogus")


def test_config_errors_name_the_key(files: dict[str, Path]) -> None:
    msg = fails("extract", "--config", str(files["bad_key"]), "--out", "x",
                match="unknown key 'batch_sise'")
    assert "did you mean 'batch_size'" in msg and "allowed: positive, negative" in msg
    fails("extract", "--config", str(files["bad_value"]), "--out", "x",
          match="batch_size: Input should be a valid integer")
    fails(*_extract_args(files, "--set", "limit=abc", "--out", "x"),
          match="limit: Input should be a valid integer")
    fails(*_extract_args(files, "--set", "serach.trials=1", "--out", "x"),
          match="unknown key 'serach'")
    fails("extract", "--config", str(files["root"] / "none.toml"), match="config file not found")


def test_print_config_is_a_loadable_documented_config(files: dict[str, Path]) -> None:
    proc = cli("extract", "--print-config")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert '# Direction estimator. (one of: "md", "rmd", "wrmd", "pca")' in text
    assert "# positive = (required)" in text
    cfg = tomllib.loads(text)
    assert cfg["model"] == "qwen2.5-coder-0.5b" and cfg["batch_size"] == 16
    # The printed config, edited, drives a run; flags override it.
    conf = files["root"] / "extract.toml"
    conf.write_text(text.replace("# positive = (required)", f'positive = "{files["good"]}"')
                    .replace("# negative = (required)", f'negative = "{files["good"]}"')
                    .replace('layers = "all"', 'layers = "1-2"'))
    out = files["root"] / "from_config"
    proc = cli("--json", "extract", "--config", str(conf), "--model", str(files["tiny"]),
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layers"] == [1, 2]


def test_layer_out_of_range(files: dict[str, Path]) -> None:
    fails(*_extract_args(files, "--out", str(files["root"] / "x"), "--layers", "1,2,5"),
          match="layer 5 is out of range: this model has layers 0..4")


def test_artifact_for_another_model_is_refused(files: dict[str, Path]) -> None:
    out = str(files["root"] / "gen.jsonl")
    base = ["generate", "--prompts", str(files["good"]), "--out", out, "--max-new-tokens", "2"]
    fails(*base, "--model", str(files["tiny"]), "--profile", str(files["profile_narrow"]),
          match="was made for hidden size 32")
    msg = fails(*base, "--model", str(files["other"]), "--profile", str(files["profile_tiny"]),
                match="was made for model")
    assert "--allow-other-model" in msg
    ok = cli("--quiet", *base, "--model", str(files["other"]), "--profile",
             str(files["profile_tiny"]), "--allow-other-model")
    assert ok.returncode == 0, ok.stderr
    assert len(Path(out).read_text().splitlines()) == 4


def test_debug_shows_the_traceback(files: dict[str, Path]) -> None:
    proc = cli("--debug", "report", str(files["root"]))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr


def test_quiet_and_json_silence_progress(files: dict[str, Path]) -> None:
    root = files["root"]
    loud = cli(*_extract_args(files, "--out", str(root / "a1")))
    assert loud.returncode == 0 and "activations" in loud.stderr  # progress bars by default
    assert "Loading weights" not in loud.stderr  # transformers' own bars stay silent
    run = root / "run"
    js = cli("--json", *_extract_args(files, "--run-dir", str(run), "--layers", "0-4"))
    assert js.returncode == 0 and js.stderr == ""
    got = json.loads(js.stdout)
    assert got == {"out": str(run / "directions"), "layers": [0, 1, 2, 3, 4],
                   "run_dir": str(run)}
    assert (run / "report.html").is_file() and (run / "metrics.json").is_file()
    # `report` rebuilds the page from the folder alone.
    (run / "report.html").unlink()
    rebuilt = cli("--json", "report", str(run), "--title", "Rebuilt")
    assert rebuilt.returncode == 0 and rebuilt.stderr == ""
    assert json.loads(rebuilt.stdout) == {"report": str(run / "report.html")}
    html = (run / "report.html").read_text()
    assert "<title>Rebuilt</title>" in html and html.count("<svg") == 2
    # A second plain run into the same folder is refused; --resume reuses every stage.
    fails(*_extract_args(files, "--run-dir", str(run), "--layers", "0-4"),
          match="already holds a run; pass --resume")
    quiet = cli("--quiet", *_extract_args(files, "--run-dir", str(run), "--layers", "0-4",
                                          "--resume"))
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert "reused ['activations.positive', 'activations.negative', 'directions']" in (
        run / "run.log").read_text()
