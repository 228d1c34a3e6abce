"""Prompt sets: shared datasets by name, local JSONL/CSV/TXT files, packaged sets, HF datasets.

A spec is one of:
- a name of a file in the shared datasets folder (`harmful_train`, `xstest`, …), found in
  $REFUSALKIT_DATA, ./shared/datasets or ../shared/datasets;
- `builtin:NAME` for a small set shipped inside the package;
- a path to a .jsonl (field `prompt`, or --field), .csv (column `prompt`) or .txt (one a line);
- `hf:org/name[:split]` for a Hugging Face dataset (needs the network).
Filters `field=value` select rows and `field!=value` leave rows out, joined by `&`, e.g.
`xstest?label=safe` or `builtin:ordinary_zh?split=fit&kind!=cooking`. `part=k/n` then keeps
every n-th row from the k-th (0-based), so one public set gives disjoint fit, dev and held-out
parts (`xstest?label=unsafe&part=0/3`) that are spread over its ordering.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from refusalkit.errors import UserError

CJK = re.compile(r"[\u4e00-\u9fff]")


def cjk_share(text: str) -> float:
    """Share of a text's letters that are Chinese characters: a prompt's language, as the
    gate and the judge tell Chinese from the rest."""
    letters = [c for c in text if c.isalpha()]
    return sum(bool(CJK.match(c)) for c in letters) / len(letters) if letters else 0.0


@dataclass(frozen=True)
class PromptSet:
    name: str
    rows: tuple[dict[str, Any], ...]

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, **equals: str) -> PromptSet:
        rows = tuple(r for r in self.rows if all(str(r.get(k)) == v for k, v in equals.items()))
        suffix = "&".join(f"{k}={v}" for k, v in equals.items())
        return PromptSet(f"{self.name}?{suffix}" if suffix else self.name, rows)

    def take(self, n: int, seed: int | None = None, offset: int = 0) -> PromptSet:
        """n rows from `offset`, optionally in a seeded shuffled order (deterministic)."""
        rows = list(self.rows)
        if seed is not None:
            import random

            random.Random(seed).shuffle(rows)
        return PromptSet(self.name, tuple(rows[offset : offset + n]))


def data_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("REFUSALKIT_DATA"):
        dirs.append(Path(os.environ["REFUSALKIT_DATA"]))
    here = Path.cwd()
    dirs += [here / "shared" / "datasets", here.parent / "shared" / "datasets"]
    root = Path(__file__).resolve().parents[2]  # the checkout, for editable installs
    dirs += [root / "shared" / "datasets", root.parent / "shared" / "datasets"]
    return dirs


def read_jsonl(path: str | Path, required: Sequence[str] = ("prompt",),
               what: str = "input file") -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a JSONL file whose rows must have text fields `required`;
    any problem is one UserError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            where = exc.msg.removesuffix(" at")
            raise UserError(f"{path}:{n}: not valid JSON ({where} at column {exc.colno})"
                            ) from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: row is not a JSON object")
        for key in required:
            if not isinstance(row.get(key), str):
                raise UserError(f"{path}:{n}: row has no text field '{key}'")
        rows.append((n, row))
    return rows


def _read_file(path: Path, field: str = "prompt") -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix == ".jsonl":
        rows = [{**row, "prompt": row[field]} for _, row in read_jsonl(path, (field,))]
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or field not in reader.fieldnames:
                raise UserError(f"{path}: no '{field}' column (columns: {reader.fieldnames})")
            rows = [{**r, "prompt": r[field]} for r in reader if r[field]]
    elif suffix == ".txt":
        rows = [{"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    else:
        raise UserError(
            f"{path}: unsupported prompt file type '{suffix}'; use .jsonl, .csv or .txt"
        )
    return rows


def load_prompts(spec: str, *, field: str = "prompt", limit: int | None = None) -> PromptSet:
    """Load a prompt set from a spec (see module docstring); never returns an empty set."""
    base, _, query = spec.partition("?")
    parts = [part for part in query.split("&") if "=" in part]
    # `field!=value` leaves rows out (e.g. one kind of an everyday set that is on a topic)
    unless = [tuple(part.split("!=", 1)) for part in parts if "!=" in part]
    filters = dict(part.split("=", 1) for part in parts if "!=" not in part)
    part = _part(filters.pop("part", None), spec)
    if base.startswith("builtin:"):
        name = base.removeprefix("builtin:")
        res = resources.files("refusalkit") / "data" / "prompts" / f"{name}.jsonl"
        if not res.is_file():
            raise UserError(f"no builtin prompt set '{name}'")
        with resources.as_file(res) as p:
            rows = _read_file(p, field)
    elif base.startswith("hf:"):
        rows = _read_hf(base.removeprefix("hf:"), field)
    elif Path(base).suffix.lower() in (".jsonl", ".csv", ".txt"):
        rows = _read_file(Path(base).expanduser(), field)
    else:
        for d in data_dirs():
            if (d / f"{base}.jsonl").is_file():
                rows = _read_file(d / f"{base}.jsonl", field)
                break
        else:
            raise UserError(
                f"unknown prompt set '{base}': not a file and not in the shared datasets "
                "folder (set REFUSALKIT_DATA to the folder holding the .jsonl files)"
            )
    ps = PromptSet(spec, tuple(rows)).where(**filters)
    ps = PromptSet(spec, tuple(r for r in ps.rows
                               if all(str(r.get(k)) != v for k, v in unless)))
    if part is not None:
        ps = PromptSet(spec, ps.rows[part[0]::part[1]])
    if limit is not None:
        ps = ps.take(limit)
    if not ps.rows:
        raise UserError(f"prompt set '{spec}' is empty")
    return ps


def _part(value: str | None, spec: str) -> tuple[int, int] | None:
    """`k/n` as (k, n), checked: a typo must not silently select another share of a set."""
    if value is None:
        return None
    k, _, n = value.partition("/")
    if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        raise UserError(f"prompt set '{spec}': part={value} must be k/n with 0 <= k < n "
                        "(e.g. part=0/3 for the first of three interleaved parts)")
    return int(k), int(n)


def _read_hf(name: str, field: str) -> list[dict[str, Any]]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise UserError("reading hf: datasets needs `pip install datasets`") from None
    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as exc:  # the hub client raises many types; all mean "not reachable"
        raise UserError(f"could not load Hugging Face dataset '{repo}': {exc}") from None
    return [{**r, "prompt": r[field]} for r in ds]


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
