"""Shape of the package's code that ruff does not check: no function in planner/ is longer than
MAX_FUNCTION_LINES (a function whose body has phases is that many functions)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "planner"
MAX_FUNCTION_LINES = 80


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function or method in `source` longer than `limit` lines,
    counted from its `def` line to its last line (decorators excluded, nested functions included in
    their parent and also counted alone)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append((node.name, node.lineno, length))
    return sorted(found, key=lambda f: f[1])


def test_long_functions_measures_def_to_last_line():
    source = "@decorator\ndef short():\n    return 1\n\n\ndef long():\n" + "    x = 1\n" * 4 + "    return x\n"
    assert long_functions(source, limit=5) == [("long", 6, 6)]
    assert long_functions(source, limit=6) == []


def test_no_function_in_planner_is_longer_than_the_limit():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for name, line, length in long_functions(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} {name} ({length} lines)")
    assert not offenders, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)
