#!/usr/bin/env python3
"""Execute the notebooks in ``notebooks/`` with nbclient, in this interpreter's kernel.

``python tools/notebooks.py run [--write] [NOTEBOOK...]`` executes each notebook (all of
``notebooks/*.ipynb`` by default) top to bottom and fails on the first cell that raises;
with ``--write`` the executed notebook, outputs and plots included, replaces the file.
``nox -s notebooks`` runs it inside the default kernel guest, so that the stored outputs
show real kTLS; ``tests/test_notebooks.py`` uses `execute` on the host and in the matrix.

The kernel is ipykernel's own kernel spec run by *this* interpreter (``sys.executable``),
never whatever ``python3`` kernel the machine has installed: the notebooks must see the
virtualenv's trio_ktls. Jupyter's, IPython's and matplotlib's writable folders go to a
temporary directory, because kernel guests see the repository and the home folder
read-only (and so that no user profile or startup file changes what a notebook shows).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

import nbformat
from jupyter_client.kernelspec import NATIVE_KERNEL_NAME, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT: Final = Path(__file__).resolve().parents[1]
NOTEBOOKS: Final = ROOT / "notebooks"
#: Seconds one cell may take: a guest runs about 10x slower than the host.
CELL_TIMEOUT: Final = 600
#: Seconds the kernel may take to start: importing IPython in an emulated guest, over
#: 9p, takes over a minute (nbclient's default, 60 s, is too short there).
STARTUP_TIMEOUT: Final = 600


def notebook_paths() -> list[Path]:
    """Every notebook of the project, in name order."""
    return sorted(NOTEBOOKS.glob("*.ipynb"))


@contextlib.contextmanager
def scratch_environment() -> Iterator[dict[str, str]]:
    """The kernels' environment, with every folder Jupyter, IPython or matplotlib writes
    to in a temporary directory (the connection file is written by this process, so the
    runtime folder is set here too, and restored afterwards). Notebooks executed in one
    share it: matplotlib builds its font cache once."""
    with tempfile.TemporaryDirectory(prefix="trio_ktls-notebooks-") as scratch:
        folders = {
            name: os.path.join(scratch, name.lower())
            for name in ("JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR")
        }
        saved = {name: os.environ.get(name) for name in folders}
        os.environ.update(folders)
        try:
            yield {**os.environ, **folders}
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def execute(
    path: Path, env: Mapping[str, str], *, timeout: int = CELL_TIMEOUT
) -> nbformat.NotebookNode:
    """Run ``path`` top to bottom in a fresh kernel (its folder as the working
    directory, ``env`` from `scratch_environment`) and return the executed notebook.
    Raises ``nbclient.exceptions.CellExecutionError`` naming the cell that failed."""
    notebook: nbformat.NotebookNode = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    # Only ipykernel's built-in spec, which runs sys.executable.
    specs = KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)
    manager = AsyncKernelManager(kernel_name=NATIVE_KERNEL_NAME, kernel_spec_manager=specs)
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=timeout,
        startup_timeout=STARTUP_TIMEOUT,
        # No per-cell timestamps: a re-run changes outputs, not every cell's metadata.
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    # cleanup_kc: shut the kernel down and close its channels (nbclient leaves a
    # kernel it did not create running otherwise).
    client.execute(env=dict(env), cleanup_kc=True)
    return notebook


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute notebooks (all by default)")
    run.add_argument("--write", action="store_true", help="store the executed notebooks")
    run.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args(argv)
    with scratch_environment() as env:
        for path in args.notebooks or notebook_paths():
            print(f"notebooks: executing {path.name}", flush=True)
            started = time.monotonic()
            executed = execute(path, env)
            print(f"notebooks: {path.name} ran in {time.monotonic() - started:.0f} s", flush=True)
            if args.write:
                nbformat.write(executed, path)  # type: ignore[no-untyped-call]
                print(f"notebooks: wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
