"""The longest functions in trainer/, ui/ and app.py, by lines from `def` to the end of the body.

    .venv/bin/python bench/long_functions.py        # the ten longest; exit 1 when one is over 80 lines
    .venv/bin/python bench/long_functions.py 30     # the thirty longest
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80  # the team's hard limit for trainer/, ui/ and app.py


def source_files(root: Path = ROOT) -> list[Path]:
    files = sorted((root / "trainer").rglob("*.py")) + sorted((root / "ui").rglob("*.py"))
    return files + [root / "app.py"]


def function_lengths(root: Path = ROOT) -> list[tuple[int, str]]:
    """(lines, 'path:line name') for every function and method, longest first."""
    found: list[tuple[int, str]] = []
    for path in source_files(root):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - start + 1
                found.append((length, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return sorted(found, key=lambda item: (-item[0], item[1]))


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    lengths = function_lengths()
    for length, where in lengths[:count]:
        print(f"{length:5d}  {where}")
    over = [item for item in lengths if item[0] > LIMIT]
    print(f"{len(over)} function(s) over {LIMIT} lines")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
