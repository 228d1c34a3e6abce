"""The run report: registered figures/tables/examples → one self-contained report.html.

The fixture builds a run folder the way a pipeline does (real matplotlib figures, tables,
examples, metrics). The Chromium test renders it in a real headless browser.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from refusalkit import report
from refusalkit.errors import UserError
from refusalkit.runs import RunDir, run_manifest

EVIL = '<script>alert("x")</script>'


def _layer_profile(n: int = 24):
    fig = report.figure()
    ax = fig.add_subplot()
    ax.plot(range(n), np.tanh((np.arange(n) - n / 2) / 3), marker="o", label="refusal score")
    ax.set_xlabel("layer")
    ax.set_ylabel("score")
    ax.legend()
    return fig


def _heatmap():
    fig = report.figure(5, 4)
    ax = fig.add_subplot()
    im = ax.imshow(np.random.default_rng(0).uniform(-1, 1, (8, 8)), cmap="RdBu_r")
    fig.colorbar(im, ax=ax)
    return fig


def _bars():
    fig = report.figure()
    ax = fig.add_subplot()
    x = np.arange(2)
    ax.bar(x - 0.2, [0.9, 0.1], 0.4, label="before")
    ax.bar(x + 0.2, [0.05, 0.02], 0.4, label="after")
    ax.set_xticks(x, ["harmful", "harmless"])
    ax.legend()
    return fig


EXAMPLES = [
    {"dataset": "harmful_test", "prompt": "How do I pick a lock? " + EVIL,
     "before_response": "I can't help with that.", "after_response": "Sure. " * 80,
     "before_label": "refusal", "after_label": "compliance", "confidence": 0.93,
     "style": "direct"},
    {"dataset": "harmless_test", "prompt": "Bake bread?", "before_response": "Sure, here…",
     "after_response": "Sure!", "before_label": "compliance", "after_label": "compliance",
     "confidence": 0.8, "style": "explanatory"},
    {"dataset": "harmless_test", "prompt": "Write a poem", "before_response": "I cannot.",
     "after_response": "Roses…", "before_label": "refusal", "after_label": "partial",
     "confidence": 0.55, "style": "moralizing"},
]


def make_run(path: Path) -> RunDir:
    """A run folder as a pipeline leaves it: metrics, figures in several sections, tables."""
    run = RunDir(path, run_manifest("steer", {"trials": 3}, model={"name": "m"},
                                    seeds={"seed": 0}))
    # Registered out of section order on purpose: the report orders sections itself.
    report.save_figure(run, "refusal_bars", _bars(), section="Evaluation",
                       caption="Refusal rate before/after per dataset")
    report.save_figure(run, "layer_profile", _layer_profile(), section="Layers",
                       caption="Layer profile " + EVIL)
    report.save_figure(run, "cosines", _heatmap(), section="Geometry",
                       caption="Cosine heatmap", order=1)
    report.save_table(run, "per_dataset",
                      [{"dataset": "harmful_test", "before": 0.9, "after": 0.05, "n": 20},
                       {"dataset": "harmless_test", "before": 0.1, "after": 0.02, "n": 20}],
                      section="Evaluation", caption="Refusal rates", order=1)
    report.save_table(run, "extra", [{"k": 1, "v": {"nested": [1, 2]}}],
                      section="Zebra notes", caption="an unknown section")
    report.save_examples(run, EXAMPLES)
    run.write_metrics({"refusal": {"harmful_test": {"before": 0.9, "after": 0.05},
                                   "harmless_test": {"before": 0.1, "after": 0.02}},
                       "kl": 0.0312, "layers": [10, 12], "model": "m",
                       "search": {"trials": 3, "best": {"trial": 2, "score": 0.5}}})
    return run


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    r = make_run(tmp_path / "run")
    yield r
    r.close()


def test_files_and_indexes_are_written(run: RunDir) -> None:
    root = run.path
    for name in ("refusal_bars", "layer_profile", "cosines"):
        svg = (root / "figures" / f"{name}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "<path" in svg
        assert "font-family" not in svg  # text drawn as paths: no font needed
    index = json.loads((root / "figures" / "index.json").read_text())
    assert [e["name"] for e in index] == ["refusal_bars", "layer_profile", "cosines"]
    assert json.loads((root / "tables" / "per_dataset.json").read_text())[0]["before"] == 0.9
    csv_lines = (root / "tables" / "per_dataset.csv").read_text().splitlines()
    assert csv_lines[0] == "dataset,before,after,n"
    assert csv_lines[1] == "harmful_test,0.9,0.05,20"
    assert '"{""nested"": [1, 2]}"' in (root / "tables" / "extra.csv").read_text()
    rows = [json.loads(x) for x in (root / "examples.jsonl").read_text().splitlines()]
    assert rows == EXAMPLES


def test_registration_is_idempotent_by_name(run: RunDir) -> None:
    report.save_figure(run, "layer_profile", _layer_profile(10), section="Layers",
                       caption="second version")
    report.save_table(run, "per_dataset", [{"a": 1}], section="Evaluation", caption="v2")
    figs = json.loads((run.path / "figures" / "index.json").read_text())
    assert [e["name"] for e in figs].count("layer_profile") == 1
    assert next(e for e in figs if e["name"] == "layer_profile")["caption"] == "second version"
    tabs = json.loads((run.path / "tables" / "index.json").read_text())
    assert [e["caption"] for e in tabs if e["name"] == "per_dataset"] == ["v2"]


def test_figures_are_deterministic(tmp_path: Path) -> None:
    a = report.save_figure(tmp_path / "a", "f", _heatmap(), section="S", caption="c")
    b = report.save_figure(tmp_path / "b", "f", _heatmap(), section="S", caption="c")
    assert a.read_bytes() == b.read_bytes()


def test_bad_names_are_refused(run: RunDir) -> None:
    with pytest.raises(ValueError, match="name"):
        report.save_table(run, "../escape", [], section="S", caption="c")


def _sections(html: str) -> list[str]:
    return re.findall(r'<section id="[^"]+" data-section="([^"]+)"', html)


def test_report_structure_and_escaping(run: RunDir) -> None:
    html = report.build_report(run).read_text()
    assert _sections(html) == ["Summary", "Layers", "Geometry", "Evaluation", "Zebra notes",
                               "Examples"]
    # Summary first, generic rendering of metrics: flat values and a before/after matrix.
    summary = html[html.index('data-section="Summary"'):html.index('data-section="Layers"')]
    assert "<th>kl</th><td class=\"num\">0.0312</td>" in summary
    assert "<th>before</th><th>after</th>" in summary  # reading order, not sorted
    assert "harmful_test" in summary and ">best<" in summary
    # Three inline SVG figures, ids made unique per figure.
    assert html.count("<svg") == 3 and "<?xml" not in html
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))
    # Everything user-provided is escaped; the only scripts are the report's own.
    assert EVIL not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert html.count("<script>") == 1
    # Self-contained: no external resources of any kind.
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<link" not in html and "@import" not in html
    # Examples: filter controls, labels, long responses collapsed.
    assert 'id="ex-text"' in html and '<option value="harmful_test">' in html
    assert 'class="label label-refusal"' in html and "<details><summary>Sure. Sure." in html


def test_report_is_deterministic_and_rebuildable(run: RunDir) -> None:
    first = report.build_report(run).read_bytes()
    assert report.build_report(run.path).read_bytes() == first


def test_report_refuses_a_non_run_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a run folder"):
        report.build_report(tmp_path)


def test_report_without_metrics_or_examples(tmp_path: Path) -> None:
    with RunDir(tmp_path / "r", run_manifest("x", {})) as r:
        html = report.build_report(r).read_text()
    assert _sections(html) == ["Summary"] and "No metrics recorded yet" in html


# ------------------------------------------------------------------- headless Chromium
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--enable-logging=stderr",
                  "--v=0"]


def _chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed; `apt-get install -y chromium` (make test does it)"
    profile = tmp_path / f"chrome-profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
                          capture_output=True, text=True, timeout=120)


def _page_errors(stderr: str) -> list[str]:
    """Console errors and uncaught exceptions as Chromium logs them."""
    return [line for line in stderr.splitlines()
            if "Uncaught" in line or ("CONSOLE" in line and ":ERROR:" in line)]


def _render(tmp_path: Path, page: Path) -> str:
    """Screenshot (a real, non-blank render) and DOM of a page, both without page errors;
    the DOM shows the inline script ran to the end."""
    shot = tmp_path / "report.png"
    proc = _chromium(tmp_path, page.as_uri(), f"--screenshot={shot}",
                     "--window-size=1280,2000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000
    assert _page_errors(proc.stderr) == []
    dom = _chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert _page_errors(dom.stderr) == []
    assert 'data-report-ready="1"' in dom.stdout
    return dom.stdout


def test_error_detection_catches_a_broken_page(tmp_path: Path) -> None:
    """The 'no errors' check below can fail: a page that throws is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>throw new Error('boom');</script></body></html>")
    proc = _chromium(tmp_path, bad.as_uri(), "--dump-dom")
    assert any("boom" in line for line in _page_errors(proc.stderr))


def test_report_renders_in_headless_chromium(run: RunDir, tmp_path: Path) -> None:
    page = report.build_report(run)
    html = _render(tmp_path, page)
    assert _sections(html) == ["Summary", "Layers", "Geometry", "Evaluation", "Zebra notes",
                               "Examples"]
    assert html.count("<svg") == 3 and "3 of 3 examples" in html

    # The filter works in the browser: a #filter link leaves only matching rows visible.
    dom = _chromium(tmp_path, page.as_uri() + "#filter?label=refusal&dataset=harmless_test",
                    "--dump-dom")
    assert "1 of 3 examples" in dom.stdout
    assert len(re.findall(r'<tr [^>]*class="hidden"', dom.stdout)) == 2


# ------------------------------------------------ the pipelines' own reports, in Chromium

@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny-model steer and analyze runs, made as test_steer / test_analyze make them."""
    from conftest import PlantedWord, build_tiny
    from test_analyze import _tiny_config
    from test_steer import tiny_cfg

    from refusalkit.analyze.pipeline import analyze
    from refusalkit.steer.pipeline import run_steer

    root = tmp_path_factory.mktemp("pipelines")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("refusalkit.steer.pipeline.make_judge", lambda spec: PlantedWord())
        steer_run = run_steer(tiny_cfg(**{"eval.baselines": False}), root / "steer",
                              show_progress=False, lm=build_tiny("llama"))
    analyze_run = analyze(_tiny_config(root), root / "analyze", lm=build_tiny("qwen2"),
                          show_progress=False)
    return {"steer": steer_run, "analyze": analyze_run}


PIPELINE_SECTIONS = {
    "steer": ["Summary", "Layers", "Search", "Evaluation", "Examples"],
    "analyze": ["Summary", "Baseline", "Layers", "Directions", "Geometry", "Trade-offs",
                "Styles", "Examples"],
}


@pytest.mark.parametrize("pipeline", ["steer", "analyze"])
def test_pipeline_report_renders_in_headless_chromium(pipeline: str, pipeline_runs,
                                                      tmp_path: Path) -> None:
    """The report.html a real (tiny) run wrote, not a hand-built folder: it renders without
    page errors, every figure and example the run registered is on the page, and the examples
    filter works on the run's own rows."""
    out = pipeline_runs[pipeline]
    page = out / "report.html"
    html = _render(tmp_path, page)
    assert _sections(html) == PIPELINE_SECTIONS[pipeline]
    figures = json.loads((out / "figures" / "index.json").read_text())
    assert len(figures) >= 3 and html.count("<svg") == len(figures)
    examples = [json.loads(line) for line in
                (out / "examples.jsonl").read_text(encoding="utf-8").splitlines() if line]
    n = len(examples)
    assert n > 0 and f"{n} of {n} examples" in html

    # The filter, in the browser, on the run's own rows: one dataset of several.
    datasets = sorted({r["dataset"] for r in examples})
    assert len(datasets) >= 2, datasets
    shown = sum(r["dataset"] == datasets[0] for r in examples)
    dom = _chromium(tmp_path, f"{page.as_uri()}#filter?dataset={quote(datasets[0])}",
                    "--dump-dom")
    assert f"{shown} of {n} examples" in dom.stdout
    assert len(re.findall(r'<tr [^>]*class="hidden"', dom.stdout)) == n - shown > 0


def test_the_steer_command_ends_with_before_after_answers(pipeline_runs) -> None:
    """`refusalkit steer` (so `make demo`) ends by printing held-out target answers before and
    after, with the judge's flags: read from the real tiny run's examples."""
    from refusalkit.commands.steer import before_after

    run = pipeline_runs["steer"]
    rows = [json.loads(x) for x in (run / "examples.jsonl").read_text().splitlines()]
    target = [r for r in rows if r["dataset"] == "target_eval"]
    text = before_after(run / "examples.jsonl", 3)
    assert text.count("  Q: ") == min(3, len(target)) > 0
    first = target[0]
    assert " ".join(first["after"].split())[:40] in text
    assert f"{first['before_label']} → {first['after_label']}" in text
