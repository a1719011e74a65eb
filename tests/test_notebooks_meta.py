"""The stored notebooks are what `make notebooks` writes: executed top to bottom, clean, nbval-comparable.

nbval re-runs them and compares outputs; these checks catch what it cannot: a notebook saved half run or
out of order, with the wrong kernel, or with outputs that could never compare equal on another machine.
"""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
UNSTABLE = re.compile(r"0x[0-9a-f]{6,}|<matplotlib\.|device='cuda|grad_fn=")  # addresses, plot handles, devices


def code_cells(path: Path) -> list[dict]:
    return [cell for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"]


def text_of(output: dict) -> str:
    text = output.get("text") or output.get("data", {}).get("text/plain", "")
    return "".join(text) if isinstance(text, list) else text


def test_the_notebooks_are_there():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_axial_shift.ipynb", "02_asmlp_block.ipynb", "03_backbone.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_executed_in_order_with_the_project_kernel(path):
    assert json.loads(path.read_text())["metadata"]["kernelspec"]["name"] == "asmlp_min"
    counts = [cell["execution_count"] for cell in code_cells(path)]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: not run top to bottom; `make notebooks`"
    timed = [i for i, cell in enumerate(code_cells(path)) if "execution" in cell["metadata"]]
    assert not timed, f"{path.name}: code cells {timed} store execution timestamps; `make notebooks` leaves them out"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_clean_and_comparable(path):
    cells = code_cells(path)
    assert "warnings.filterwarnings" in "".join(cells[0]["source"]), "filter warnings in the first cell"
    for i, cell in enumerate(cells):
        for output in cell["outputs"]:
            where = f"{path.name}, code cell {i}"
            assert output["output_type"] != "error", f"{where}: stored with an error"
            assert output.get("name") != "stderr", f"{where}: writes to stderr: {text_of(output)[:200]!r}"
            assert not {"image/svg+xml", "application/pdf"} & set(output.get("data", {})), f"{where}: keep PNG"
            text = text_of(output)
            assert not UNSTABLE.search(text), f"{where}: output differs run to run: {text[:200]!r}"
            assert "\r" not in text, f"{where}: progress bar in the output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_only_collapsed_solutions_are_skipped(path):
    """nbval does not run a cell marked NBVAL_SKIP: that is for an exercise's solution, stored collapsed (code and
    output), never a check."""
    for i, cell in enumerate(code_cells(path)):
        if "NBVAL_SKIP" in "".join(cell["source"]):
            collapsed = cell["metadata"].get("jupyter", {})
            where = f"{path.name}, code cell {i}"
            assert collapsed.get("source_hidden"), f"{where}: NBVAL_SKIP outside a collapsed solution"
            # its stored output ("correct: 28,464") would give the answer away under the collapsed code
            assert collapsed.get("outputs_hidden"), f"{where}: a solution's output is shown"
