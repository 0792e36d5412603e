"""Every notebook in ``notebooks/`` runs top to bottom without an error (nbclient, in a
fresh ipykernel on this interpreter: ``tools/notebooks.py``).

On a host without kTLS they take the user-space path and say so. With kTLS (``nox -s
notebooks`` runs them in the 6.18 guest and stores the outputs) no notebook may fall back
to user space: each prints a line starting ``No kTLS here:`` when it does. They are not
part of the kernel matrix: each starts a Jupyter kernel, and under emulation one notebook
took minutes, enough to put the default line's guest past its time limit.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import notebooks

from .helpers import kernel_probe

#: What a notebook prints when the kernel could not take its connections.
FALLBACK_MARK = "No kTLS here:"

NOTEBOOKS = notebooks.notebook_paths()
#: With kTLS, no notebook may fall back to user space.
WITH_KTLS = kernel_probe().available


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    with notebooks.scratch_environment() as scratch:
        yield scratch


def _text_outputs(notebook: nbformat.NotebookNode) -> str:
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                texts.append(output.text)
            elif "data" in output:
                texts.append(output.data.get("text/plain", ""))
    return "\n".join(texts)


def test_there_are_notebooks() -> None:
    names = {path.name for path in NOTEBOOKS}
    assert names == {
        "what_can_this_kernel_do.ipynb",
        "anatomy_of_a_handoff.ipynb",
        "speed.ipynb",
        "key_updates.ipynb",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path: Path, env: dict[str, str]) -> None:
    # CellExecutionError names the cell and carries its traceback.
    executed = notebooks.execute(path, env)
    errors = [
        output
        for cell in executed.cells
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]
    assert not errors
    if WITH_KTLS:
        assert FALLBACK_MARK not in _text_outputs(executed)


def test_stored_notebooks_are_valid_and_executed() -> None:
    """What is committed opens in Jupyter and shows its outputs: every code cell ran."""
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.execution_count for cell in code), path.name
        assert not any(
            output.output_type == "error" for cell in code for output in cell.outputs
        ), path.name
