"""The notebooks in ``notebooks/`` run top to bottom on CPU, and are committed without outputs.

Each notebook is executed in a fresh Jupyter kernel of this interpreter (``nbclient``, the engine
``nbmake`` also uses); a cell that raises fails the test with the cell and its traceback. A cell
may run at most ``CELL_TIMEOUT`` seconds. Each notebook gets its own demo-model cache directory, so
parallel runs (``-n 2``) never build the demo checkpoint into the same place at once.

Also runnable on their own: ``pytest tests/test_notebooks.py`` or ``pytest --nbmake notebooks/``.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300   # seconds per cell; the notebooks' cells take 33 s, 15 s and 20 s on 2 CPU cores


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "fp8_and_kernels.ipynb", "sharding.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} carry outputs or execution counts; "
                       f"clear them: python tools/strip_notebooks.py {path.relative_to(ROOT)}")


def _kernel_manager():
    """A kernel manager for an ipykernel of *this* interpreter, whatever kernelspecs are installed."""
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())

    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env.pop("JAX_NUM_CPU_DEVICES", None)          # set for the mesh tests (conftest); notebooks choose
    env["DEEPSEEK_JAX_CACHE"] = str(tmp_path / "cache")
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env["JAX_PLATFORMS"] = "cpu"                  # CI runs them on CPU (a GPU runtime takes other paths)
    client = nbclient.NotebookClient(nb, km=_kernel_manager(), timeout=CELL_TIMEOUT, allow_errors=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    try:
        client.execute(env=env)
    except (CellExecutionError, CellTimeoutError) as e:
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(e))     # the traceback's terminal colours
        pytest.fail(f"{path.name}: {message}"[:20000], pytrace=False)
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
