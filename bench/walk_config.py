"""How far the steer config travels (issue 16's "walk of cfg"), measured statically.

    python bench/walk_config.py .            # this checkout
    git worktree add /tmp/old REV && python bench/walk_config.py /tmp/old

From `refusalkit.commands.steer`, follow the package's imports (lazy ones included) and list
each reachable module whose functions take a `cfg` (or SteerConfig-typed) parameter or read
`cfg.<field>`: the files
the whole config enters, rather than the typed values cut from it (Splits, Mode, TrialParams).
Climbs back up the import graph need an import cycle; tests/test_imports.py keeps those at 0.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

START = "refusalkit.commands.steer"


def module_path(src: Path, name: str) -> Path | None:
    for p in (src / (name.replace(".", "/") + ".py"), src / name.replace(".", "/") / "__init__.py"):
        if p.exists():
            return p
    return None


def imports(src: Path, name: str, path: Path) -> set[str]:
    """Package modules `name` imports anywhere in its body (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("refusalkit") and module_path(src, m)}


def takes_config(arg: ast.arg) -> bool:
    return arg.arg == "cfg" or "SteerConfig" in (ast.unparse(arg.annotation)
                                                 if arg.annotation else "")


def walk(root: Path) -> dict[str, tuple[int, int]]:
    """Module -> (functions taking cfg, cfg.<field> reads), for modules the config enters."""
    src = root / "src"
    seen: set[str] = set()
    todo = [START]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports(src, m, module_path(src, m))  # type: ignore[arg-type]
    entered = {}
    for m in sorted(seen):
        tree = ast.parse(module_path(src, m).read_text())  # type: ignore[union-attr]
        fns = sum(isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                  and any(takes_config(a) for a in f.args.args + f.args.kwonlyargs)
                  for f in ast.walk(tree))
        reads = sum(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                    and n.value.id == "cfg" for n in ast.walk(tree))
        if fns or reads:
            entered[m] = (fns, reads)
    print(f"{len(seen)} modules reachable from {START}")
    return entered


def main() -> None:
    entered = walk(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
    for m, (fns, reads) in entered.items():
        print(f"{m:40s} functions taking cfg {fns:3d}   cfg.<field> reads {reads:3d}")
    print(f"files entered {len(entered)}, functions taking cfg "
          f"{sum(f for f, _ in entered.values())}, reads {sum(r for _, r in entered.values())}")


if __name__ == "__main__":
    main()
