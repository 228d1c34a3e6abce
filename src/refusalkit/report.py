"""The run report: figures and tables registered by pipelines, rendered into one HTML file.

Pipelines call `save_figure` / `save_table` / `save_examples` as they go; each writes its file
atomically and registers it in an index (idempotent by name), so a resumed run overwrites
rather than duplicates. `build_report` turns a run folder into `report.html`: one
self-contained page (inline SVG, CSS and JS, no network) that opens in any browser. It only
reads files, so `refusalkit report RUN_DIR` can rebuild it at any time.

Usage in a pipeline::

    fig = report.figure()                       # a pyplot-free matplotlib Figure
    fig.add_subplot().plot(layers, scores)
    report.save_figure(run, "layer_profile", fig, section="Layers", caption="…")
    report.save_table(run, "per_dataset", rows, section="Evaluation", caption="…")
    report.save_examples(run, [{"dataset": …, "prompt": …, "before_response": …,
                                "after_response": …, "after_label": …}, …])
    run.write_metrics({...}); report.build_report(run)

Sections appear in SECTION_ORDER, then unknown ones in order of first registration; within a
section items sort by `order`, figures before tables on ties.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Mapping, Sequence
from html import escape
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusalkit.errors import UserError
from refusalkit.runs import MANIFEST, atomic_write_json, atomic_write_text, locked, taken_from

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from refusalkit.runs import RunDir

FIGURES = "figures"
TABLES = "tables"
EXAMPLES = "examples.jsonl"
METRICS = "metrics.json"
REPORT = "report.html"
SECTION_ORDER = ("Summary", "Baseline", "Layers", "Directions", "Geometry", "Search",
                 "Evaluation", "Trade-offs", "Styles", "Examples")
EXAMPLE_COLUMNS = ("dataset", "category", "prompt", "before_response", "before_label",
                   "after_response", "after_label", "confidence", "style")
LONG_TEXT = 240  # characters shown before a long cell collapses
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _root(run_dir: str | Path | RunDir) -> Path:
    path = getattr(run_dir, "path", run_dir)
    return Path(path)  # type: ignore[arg-type]


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"report item name {name!r} must be letters, digits, '_', '.', '-'")


def figure(width: float = 6.4, height: float = 3.6) -> Figure:
    """A matplotlib Figure that needs no pyplot (no global figure state, no GUI backend)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _register(index: Path, entry: dict[str, Any]) -> None:
    """Add or replace `entry` (by name) in a JSON index, under a lock, written atomically."""
    with locked(index.with_name(".index.lock")):
        items = json.loads(index.read_text()) if index.is_file() else []
        for i, old in enumerate(items):
            if old["name"] == entry["name"]:
                items[i] = entry
                break
        else:
            items.append(entry)
        atomic_write_json(index, items)


def save_figure(run_dir: str | Path | RunDir, name: str, fig: Figure, *, section: str,
                caption: str, order: int = 0) -> Path:
    """Write `figures/NAME.svg` (text as paths: no fonts needed to view it) and register it."""
    import matplotlib

    _check_name(name)
    root = _root(run_dir)
    buf = io.StringIO()
    # A fixed hash salt and no date make the SVG identical for identical data.
    with matplotlib.rc_context({"svg.hashsalt": name, "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    if "matplotlib.pyplot" in sys.modules:  # a pyplot figure would otherwise stay alive
        sys.modules["matplotlib.pyplot"].close(fig)
    path = atomic_write_text(root / FIGURES / f"{name}.svg", buf.getvalue())
    _register(root / FIGURES / "index.json",
              {"name": name, "file": f"{name}.svg", "section": section, "caption": caption,
               "order": order})
    return path


def _csv_cell(value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return "" if value is None else value


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows:
        cols.update(dict.fromkeys(row))
    return list(cols)


def save_table(run_dir: str | Path | RunDir, name: str, rows: list[dict[str, Any]], *,
               section: str, caption: str, order: int = 0) -> Path:
    """Write `tables/NAME.json` and `tables/NAME.csv` and register the table."""
    _check_name(name)
    root = _root(run_dir)
    rows = [dict(r) for r in rows]
    # Column order is the caller's (not sorted), so the report shows columns as intended.
    path = atomic_write_text(root / TABLES / f"{name}.json",
                             json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    atomic_write_text(root / TABLES / f"{name}.csv", buf.getvalue())
    _register(root / TABLES / "index.json",
              {"name": name, "file": f"{name}.json", "section": section, "caption": caption,
               "order": order})
    return path


def save_examples(run_dir: str | Path | RunDir, rows: list[dict[str, Any]]) -> Path:
    """Write `examples.jsonl` (replacing it): example responses for the browsable table."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_text(_root(run_dir) / EXAMPLES, text)


# ---------------------------------------------------------------------------- rendering
def _fmt(value: Any) -> str:
    """A cell's text: floats to 4 significant digits, containers as compact JSON."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple) and all(_scalar(v) for v in value):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _cell(value: Any, cls: str = "") -> str:
    text = _fmt(value)
    num = isinstance(value, int | float) and not isinstance(value, bool)
    classes = " ".join(c for c in (cls, "num" if num else "") if c)
    attr = f' class="{classes}"' if classes else ""
    if len(text) > LONG_TEXT:
        short = escape(text[:LONG_TEXT].rstrip())
        return (f"<td{attr}><details><summary>{short}…</summary>"
                f"<div class=\"full\">{escape(text)}</div></details></td>")
    return f"<td{attr}>{escape(text)}</td>"


def _rows_table(rows: Sequence[Mapping[str, Any]], cls: str = "data") -> str:
    cols = _columns(rows)
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in cols) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv_table(items: Mapping[str, Any]) -> str:
    body = "".join(f"<tr><th>{escape(str(k))}</th>{_cell(v)}</tr>" for k, v in items.items())
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _is_matrix(value: Mapping[str, Any]) -> bool:
    """A dict of flat dicts (e.g. dataset → {before, after}): one table, rows × columns."""
    return bool(value) and all(
        isinstance(v, Mapping) and v and all(_scalar(x) for x in v.values())
        for v in value.values())


_FIRST = ("n", "count", "before", "after", "delta", "change")


def _before_after(row: Mapping[str, Any]) -> dict[str, Any]:
    """metrics.json has sorted keys; put before/after-style columns first, in reading order."""
    first = [k for k in _FIRST if k in row]
    return {k: row[k] for k in first + [k for k in row if k not in first]}


def render_mapping(data: Mapping[str, Any], depth: int = 0) -> str:
    """Flat values as a key/value table; nested dicts as titled sub-tables, recursively."""
    flat = {k: v for k, v in data.items()
            if _scalar(v) or (isinstance(v, list) and all(_scalar(x) for x in v))}
    parts = [_kv_table(flat)] if flat else []
    tag = f"h{min(6, 3 + depth)}"
    for key, value in data.items():
        if key in flat:
            continue
        parts.append(f'<{tag} class="sub">{escape(str(key))}</{tag}>')
        if isinstance(value, Mapping) and _is_matrix(value):
            rows = [{"": k, **_before_after(v)} for k, v in value.items()]
            parts.append(_rows_table(rows, "data matrix"))
        elif isinstance(value, Mapping):
            parts.append(f'<div class="nested">{render_mapping(value, depth + 1)}</div>')
        elif isinstance(value, list) and all(isinstance(x, Mapping) for x in value):
            parts.append(_rows_table(value))
        else:
            parts.append(f"<pre>{escape(_fmt(value))}</pre>")
    return "\n".join(parts)


def _scoped_svg(svg: str, prefix: str) -> str:
    """Inline-ready SVG: drop the XML prolog and prefix ids so figures cannot clash."""
    svg = svg[svg.find("<svg"):]
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    if not ids:
        return svg

    def sub(m: re.Match[str]) -> str:
        ident = m.group(2)
        return f"{m.group(1)}{prefix}-{ident}" if ident in ids else m.group(0)

    svg = re.sub(r'(\bid=")([^"]+)(?=")', sub, svg)
    return re.sub(r'((?:href="|url\()#)([^")]+)(?=[")])', sub, svg)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _section_order(names: Sequence[str]) -> list[str]:
    known = {s.lower(): i for i, s in enumerate(SECTION_ORDER)}
    first_seen = {n: i for i, n in reversed(list(enumerate(names)))}
    uniq = list(dict.fromkeys(names))
    return sorted(uniq, key=lambda n: (known.get(n.lower(), len(known)), first_seen[n]))


def _read_index(root: Path, folder: str) -> list[dict[str, Any]]:
    index = root / folder / "index.json"
    if not index.is_file():
        return []
    items = json.loads(index.read_text())
    return [it for it in items if (root / folder / it["file"]).is_file()]


def _load_examples(root: Path) -> list[dict[str, Any]]:
    path = root / EXAMPLES
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _label_cell(value: Any) -> str:
    text = _fmt(value)
    return f'<td><span class="label label-{_slug(text)}">{escape(text)}</span></td>'


def _examples_html(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in EXAMPLE_COLUMNS if any(c in r for r in rows)]
    cols += [c for c in _columns(rows) if c not in cols]
    datasets = sorted({str(r.get("dataset", "")) for r in rows} - {""})
    labels = sorted({str(r[c]) for r in rows for c in cols if c.endswith("label") and r.get(c)})
    opts = "".join(f'<option value="{escape(d)}">{escape(d)}</option>' for d in datasets)
    lopts = "".join(f'<option value="{escape(x)}">{escape(x)}</option>' for x in labels)
    controls = (
        '<div class="filters">'
        '<input type="search" id="ex-text" placeholder="Filter examples by any text…">'
        f'<select id="ex-dataset"><option value="">all datasets</option>{opts}</select>'
        f'<select id="ex-label"><option value="">any label</option>{lopts}</select>'
        f'<span id="ex-count">{len(rows)} examples</span></div>')
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        rlabels = " ".join(str(r[c]) for c in cols if c.endswith("label") and r.get(c))
        cells = "".join(_label_cell(r.get(c)) if c.endswith("label") and r.get(c) is not None
                        else _cell(r.get(c)) for c in cols)
        body.append(f'<tr data-dataset="{escape(str(r.get("dataset", "")))}" '
                    f'data-labels="{escape(rlabels)}">{cells}</tr>')
    return (f'{controls}<div class="scroll"><table class="data examples" id="examples">'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _run_details(manifest: Mapping[str, Any]) -> str:
    if not manifest:
        return ""
    return ('<details class="run-details"><summary>Run details (manifest)</summary>'
            f"{render_mapping(manifest)}</details>")


def _wall_time(root: Path) -> str:
    """The run's stage times (timings.json), summed: the wall time a reader asks about."""
    path = root / "timings.json"
    if not path.is_file():
        return ""
    stages = {k: float(v) for k, v in json.loads(path.read_text()).items()
              if k != "total_this_process" and isinstance(v, int | float)}
    if not stages:
        return ""
    top = sorted(stages.items(), key=lambda kv: -kv[1])[:4]
    slow = ", ".join(f"{k} {v / 60:.1f}" for k, v in top)
    borrowed = taken_from(root)  # stages copied from an earlier run (--reuse-from)
    note = ("" if not borrowed else " Not counted: " + ", ".join(
        f"{k} (taken from {v})" for k, v in sorted(borrowed.items())) + ", computed by an "
        "earlier run with the same inputs.")
    return (f'<p class="wall-time">Wall time: {sum(stages.values()) / 60:.1f} min over '
            f"{len(stages)} stages (slowest, min: {escape(slow)}).{escape(note)}</p>")


def _asset(name: str) -> str:
    return resources.files("refusalkit").joinpath("data", "report", name).read_text("utf-8")


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def build_report(run_dir: str | Path | RunDir, title: str | None = None) -> Path:
    """Render `report.html` from the run folder's metrics, figures, tables and examples."""
    root = _root(run_dir)
    if not is_run_dir(root):
        raise UserError(f"'{root}' is not a run folder (no {MANIFEST}); give the folder a "
                        "refusalkit command wrote with --run-dir/--out")
    manifest = json.loads((root / MANIFEST).read_text())
    metrics = json.loads((root / METRICS).read_text()) if (root / METRICS).is_file() else {}
    figures = _read_index(root, FIGURES)
    tables = _read_index(root, TABLES)
    examples = _load_examples(root)
    title = title or str(manifest.get("title") or f"refusalkit {manifest.get('command', 'run')}"
                         f" — {root.resolve().name}")

    items: dict[str, list[tuple[tuple[int, int, int], str]]] = {}
    seen: list[str] = []
    for pos, fig in enumerate(figures):
        svg = (root / FIGURES / fig["file"]).read_text(encoding="utf-8")
        html = (f'<figure class="fig" id="fig-{escape(fig["name"])}">'
                f'{_scoped_svg(svg, "f" + _slug(fig["name"]))}'
                f'<figcaption>{escape(fig["caption"])}</figcaption></figure>')
        items.setdefault(fig["section"], []).append(((fig.get("order", 0), 0, pos), html))
        seen.append(fig["section"])
    for pos, tab in enumerate(tables):
        rows = json.loads((root / TABLES / tab["file"]).read_text())
        csv_name = escape(tab["file"].removesuffix(".json") + ".csv")
        html = (f'<div class="table" id="table-{escape(tab["name"])}">'
                f'<div class="scroll">{_rows_table(rows)}</div>'
                f'<p class="caption">{escape(tab["caption"])} '
                f'<span class="file">(tables/{csv_name})</span></p></div>')
        items.setdefault(tab["section"], []).append(((tab.get("order", 0), 1, pos), html))
        seen.append(tab["section"])

    sections: list[tuple[str, str]] = []
    summary_items = "".join(h for _, h in sorted(items.pop("Summary", []), key=lambda t: t[0]))
    raw = render_mapping(metrics) if metrics else "<p>No metrics recorded yet.</p>"
    if summary_items and metrics:  # the pipeline wrote a summary: the raw dump goes below
        raw = ('<details class="raw-metrics"><summary>All metrics (metrics.json)</summary>'
               f"{raw}</details>")
        summary_items = summary_items + _wall_time(root)
    sections.append(("Summary", summary_items + raw + _run_details(manifest)))
    for name in _section_order([s for s in seen if s in items]):
        body = "".join(h for _, h in sorted(items[name], key=lambda t: t[0]))
        if name.lower() == "examples" and examples:
            body += _examples_html(examples)
            examples = []
        sections.append((name, body))
    if examples:
        sections.append(("Examples", _examples_html(examples)))

    nav = "".join(f'<a href="#sec-{_slug(n)}">{escape(n)}</a>' for n, _ in sections)
    body = "".join(f'<section id="sec-{_slug(n)}" data-section="{escape(n)}">'
                   f"<h2>{escape(n)}</h2>{html}</section>" for n, html in sections)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_asset('report.css')}</style></head>"
        f'<body><header><h1>{escape(title)}</h1><nav>{nav}</nav></header>'
        f"<main>{body}</main><script>{_asset('report.js')}</script></body></html>\n")
    return atomic_write_text(root / REPORT, page)
