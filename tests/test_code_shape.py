"""The package's shape targets (DESIGN.md, issue 11): short functions, one-concept classes.

No function or method in ``bgflow_gate/`` is longer than 50 lines and no class longer than
300, counted from the ``def`` / ``class`` line to the last line of the body (docstring
included), as ``ast`` reports them.  Run as a script to list the offenders::

    python tests/test_code_shape.py
"""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "bgflow_gate"
MAX_FUNCTION_LINES = 50
MAX_CLASS_LINES = 300


def oversized(package: Path = PACKAGE) -> list[str]:
    """``"path:line kind name (n lines)"`` for every function over 50 and class over 300 lines."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kind, limit = "function", MAX_FUNCTION_LINES
            elif isinstance(node, ast.ClassDef):
                kind, limit = "class", MAX_CLASS_LINES
            else:
                continue
            n_lines = node.end_lineno - node.lineno + 1
            if n_lines > limit:
                where = path.relative_to(package.parent)
                found.append(f"{where}:{node.lineno} {kind} {node.name} ({n_lines} lines)")
    return found


def _lines(prefix: str, n: int) -> str:
    return "\n".join(f"    {prefix}{i} = {i}" for i in range(n))


def test_the_checker_reports_a_51_line_function_and_a_301_line_class_but_not_50_and_300(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "funcs.py").write_text(f"def long():\n{_lines('x', 50)}\n\n\ndef ok():\n{_lines('y', 49)}\n")
    (package / "classes.py").write_text(f"class Big:\n{_lines('x', 300)}\n\n\nclass Ok:\n{_lines('y', 299)}\n")
    assert oversized(package) == [
        "pkg/classes.py:1 class Big (301 lines)",
        "pkg/funcs.py:1 function long (51 lines)",
    ]


def test_no_function_over_50_lines_and_no_class_over_300_lines_in_the_package():
    assert oversized() == []


def test_the_trainer_module_stays_under_300_lines():
    assert len((PACKAGE / "training" / "trainer.py").read_text().splitlines()) < 300


if __name__ == "__main__":
    print("\n".join(oversized()) or "no function over 50 lines, no class over 300 lines")
