"""TOML configs validated by pydantic, with one-line errors and self-documenting defaults.

Pipelines define their config as `ConfigModel` subclasses (unknown keys are errors, every
field has a description). `load_config(path, Model, overrides)` reads a TOML file, applies
dotted overrides from flags (`--set search.trials=20` or typed flags), and validates; any
mistake becomes a `UserError` naming the key and what is allowed. `render_config(Model)`
prints the defaults as TOML with the field descriptions as comments, so
`refusalkit steer --print-config > steer.toml` gives a documented starting point.
"""

from __future__ import annotations

import difflib
import enum
import json
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticUndefined, to_jsonable_python

from refusalkit.errors import UserError

M = TypeVar("M", bound=BaseModel)


class ConfigModel(BaseModel):
    """Base for every config section: unknown keys are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              validate_default=True, use_attribute_docstrings=True)

    @classmethod
    def load(cls: type[M], path: str | Path | None = None,
             overrides: Mapping[str, Any] | None = None) -> M:
        return load_config(path, cls, overrides)

    @classmethod
    def default_toml(cls) -> str:
        return render_config(cls)

    def to_toml(self) -> str:
        """This config as TOML (with comments), e.g. to save the effective config of a run."""
        return render_config(type(self), self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field that has a default, as JSON values (nested sections as dicts): what a
        run made before a field existed is compared with (runs.RunDir)."""
        out: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            if info.is_required():
                continue
            value = info.get_default(call_default_factory=True)
            out[name] = (value.model_dump(mode="json") if isinstance(value, BaseModel)
                         else to_jsonable_python(value))
        return out


# ------------------------------------------------------------------------------ loading
def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """`--set key.sub=value` flags → {dotted key: value}; values are read as TOML values
    (`20`, `0.5`, `true`, `[1, 2]`, `"text"`), or as a plain string when they are not."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"config error: --set '{item}' should look like key.sub=value")
        try:
            out[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw.strip()
    return out


def cli_overrides(sets: Iterable[str], flags: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides from a command line: `--set key=value` items, then typed flags (dotted keys)
    that were given (None = not given). A flag beats a --set of the same key."""
    return {**parse_set(sets), **{k: v for k, v in flags.items() if v is not None}}


def _apply(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise UserError(f"config error: {where} is a value, not a section; cannot set "
                            f"{dotted}")
        node = child
    node[parts[-1]] = value


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config error: config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config error: {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"config error: {path} is not UTF-8 text") from None


def load_config(path: str | Path | None, model: type[M],
                overrides: Mapping[str, Any] | None = None) -> M:
    """TOML file (or defaults when `path` is None) + dotted overrides → validated `model`.

    Overrides whose value is None are skipped, so typed CLI flags that were not given can be
    passed straight through.
    """
    data = read_toml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _apply(data, key, value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_error(exc, model)) from None


# ------------------------------------------------------------------------------- errors
def _edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insert, delete, substitute, swap neighbours (1 each)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def suggest(name: str, allowed: Iterable[str]) -> list[str]:
    """Likely intended keys, best first. Ranked by edit distance counting a swap of two
    letters as one edit, then by length difference: 'modle' → 'model' (a swap) before
    'mode' (a deletion), where difflib's ratio prefers the shorter 'mode'."""
    allowed = list(allowed)
    close = set(difflib.get_close_matches(name, allowed, n=3))
    limit = max(1, len(name) // 3)
    close |= {a for a in allowed if _edit_distance(name, a) <= limit}
    return sorted(close, key=lambda a: (_edit_distance(name, a), abs(len(a) - len(name)),
                                        -difflib.SequenceMatcher(None, name, a).ratio(), a))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, list, dict, …)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += _models_in(arg)
    return out


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the last key of `loc` (best effort)."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if current is None:
            return None
        if isinstance(part, str) and part in current.model_fields:
            found = _models_in(current.model_fields[part].annotation)
            current = found[0] if found else None
        # list indices, dict keys and union tags keep the current model
    return current


def _dotted(loc: Iterable[Any]) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


def _clip(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "…"


def format_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line for all validation errors: each names its dotted key and what is allowed."""
    parts = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function")))
        key = _dotted(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            allowed = list(owner.model_fields) if owner is not None else []
            name = str(loc[-1])
            hint = suggest(name, allowed)
            section = f" in [{_dotted(loc[:-1])}]" if len(loc) > 1 else ""
            msg = f"unknown key '{name}'{section}"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
            if allowed:
                msg += f" (allowed: {', '.join(allowed)})"
            parts.append(msg)
        elif err["type"] == "missing":
            parts.append(f"{key}: missing (required: set it in the config or with its flag)")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{key}: {msg} (got {_clip(err.get('input'))})")
    return "config error: " + "; ".join(parts)


# ----------------------------------------------------------------------------- rendering
def toml_value(value: Any) -> str:
    """A Python value as a TOML value (inline tables for dicts)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{" + (f" {items} " if items else "") + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _type_hint(annotation: Any) -> str:
    """A short 'allowed values' note for Literal/Enum fields."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return "one of: " + ", ".join(toml_value(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of: " + ", ".join(toml_value(m.value) for m in annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _type_hint(args[0])
    return ""


def _comment(text: str, indent: str = "") -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in text.strip().splitlines()]


def render_config(model: type[BaseModel], instance: BaseModel | None = None) -> str:
    """A documented TOML config: defaults (or `instance`'s values), descriptions as comments.

    Fields without a value (None or required) appear commented out, so the file always loads.
    """
    lines = _comment(model.__doc__ or "") if model.__doc__ else []
    _render_table(model, instance, [], lines)
    return "\n".join(lines).strip() + "\n"


def _field_value(model: type[BaseModel], name: str, instance: BaseModel | None) -> Any:
    if instance is not None:
        return getattr(instance, name)
    info = model.model_fields[name]
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return None if info.default is PydanticUndefined else info.default


def _render_table(model: type[BaseModel], instance: BaseModel | None, path: list[str],
                  lines: list[str]) -> None:
    sections = []
    for name, info in model.model_fields.items():
        value = _field_value(model, name, instance)
        if isinstance(value, BaseModel):
            sections.append((name, info, value))
            continue
        doc = info.description or ""
        hint = _type_hint(info.annotation)
        if doc or hint:
            lines.append("")
            lines += _comment(doc + (f" ({hint})" if hint else ""))
        if value is None:
            required = info.is_required() and instance is None
            lines.append(f"# {name} = " + ("(required)" if required else "(unset)"))
        else:
            lines.append(f"{_toml_key(name)} = {toml_value(value)}")
    for name, info, value in sections:
        sub = [*path, name]
        lines.append("")
        lines.append("")
        doc = info.description or type(value).__doc__ or ""
        lines += _comment(doc)
        lines.append(f"[{'.'.join(_toml_key(p) for p in sub)}]")
        _render_table(type(value), value, sub, lines)
