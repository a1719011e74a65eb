"""The measured house limits of STYLE.md: package modules under 400 lines, functions under 60, no line over 120
characters (tests included); and the README's Windows test command, which repeats the Makefile's."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = sorted((ROOT / "asmlp_min").rglob("*.py"))
TESTS = sorted((ROOT / "tests").glob("*.py"))


def test_no_line_is_over_120_characters():
    long = [f"{path.relative_to(ROOT)}:{number} ({len(line)})" for path in PACKAGE + TESTS
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 120]
    assert not long, f"lines over 120 characters: {long}"


def test_package_modules_are_under_400_lines_and_their_functions_under_60():
    big = [f"{path.relative_to(ROOT)} ({n})" for path in PACKAGE
           if (n := len(path.read_text(encoding="utf-8").splitlines())) >= 400]
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for path in PACKAGE for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 59]
    assert not big and not long, f"modules of 400 lines or more: {big}; functions of 60 lines or more: {long}"


def test_the_readmes_windows_commands_run_what_make_test_runs():
    """Windows has no make: the README spells out the Makefile's test command, which must not drift from it."""
    make, readme = (ROOT / "Makefile").read_text(encoding="utf-8"), (ROOT / "README.md").read_text(encoding="utf-8")
    nbval = re.search(r"^NBVAL\s*:=\s*(.+)$", make, re.M)[1].strip()
    pytest_flags = re.search(r"^PYTEST\s*:=.*-m pytest (.+)$", make, re.M)[1].strip().replace("$(JOBS)", "2")
    assert f".venv\\Scripts\\python -m pytest {pytest_flags} {nbval} notebooks tests" in readme
    assert "$(PYTEST) $(NBVAL) notebooks tests" in make
