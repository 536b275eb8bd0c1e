"""Lines per file and per function, for docs/contributing.md: `python -m tests.code_size [DIR ...]`.

Lines are physical lines (blank and comment lines included); a function's size runs from its `def`
(decorators excluded) to its last line, nested functions counted in their parent too.
"""
from __future__ import annotations

import ast
import statistics
import sys
from pathlib import Path


def sizes(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    files, funcs = {}, {}
    for f in sorted(root.rglob("*.py")):
        text = f.read_text()
        rel = str(f.relative_to(root.parent))
        files[rel] = text.count("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs[f"{rel}:{node.lineno} {node.name}"] = node.end_lineno - node.lineno + 1
    return files, funcs


def summary(name: str, counts: dict[str, int], limit: int) -> str:
    v = sorted(counts.values())
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    return (f"{name}: {len(v)}, {sum(v):,} lines; median {statistics.median(v):.0f}, mean {statistics.mean(v):.1f}, "
            f"max {v[-1]}; over {limit}: {sum(x > limit for x in v)}\n"
            + "".join(f"    {n:>5}  {k}\n" for k, n in top))


def main(argv: list[str]) -> None:
    for d in argv or ["pagedserve", "tests"]:
        files, funcs = sizes(Path(d).resolve())
        print(f"## {d}\n" + summary("files", files, 400) + summary("functions", funcs, 50))


if __name__ == "__main__":
    main(sys.argv[1:])
