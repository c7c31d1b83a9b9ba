"""Every notebook in ``examples/`` runs top to bottom, with ``REFTLIB_FAST=1`` (short training).

The notebooks are discovered, not listed, so a new ``examples/*.ipynb`` is covered automatically. They
run in a Jupyter kernel of *this* interpreter: a kernelspec pointing at ``sys.executable`` is installed
into a temporary folder and put first on ``JUPYTER_PATH``, so whatever ``python3`` kernel the machine
has (another Python, another virtual environment) is never used. The execution tests are marked
``slow`` (each notebook loads the real offline SmolLM2 model); the structural checks are not.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the notebooks extra: nbformat")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
KERNEL_NAME = "reftlib-notebook-tests"
CELL_TIMEOUT_S = 600


def _ids(paths: list[Path]) -> list[str]:
    return [path.stem for path in paths]


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """The name of a kernelspec that runs ``sys.executable -m ipykernel_launcher`` (installed in tmp_path)."""
    kernelspec = pytest.importorskip("ipykernel.kernelspec", reason="the notebook tests need ipykernel")
    prefix = tmp_path / "jupyter-prefix"
    kernelspec.install(kernel_name=KERNEL_NAME, prefix=str(prefix), display_name="reftlib tests")
    data_dir = prefix / "share" / "jupyter"
    spec = json.loads((data_dir / "kernels" / KERNEL_NAME / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable, spec["argv"]
    monkeypatch.setenv("JUPYTER_PATH", str(data_dir))
    monkeypatch.setenv("REFTLIB_FAST", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One thread per kernel, like the test processes (conftest): CI runs two pytest workers on two cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return KERNEL_NAME


def _first_code_cell(nb) -> str:
    return next((cell.source for cell in nb.cells if cell.cell_type == "code"), "")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_valid_and_has_a_fast_mode(path: Path):
    """Valid nbformat, reads REFTLIB_FAST in its first code cell, and holds no saved error output."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert "REFTLIB_FAST" in _first_code_cell(nb), (
        f"{path.name}: read os.environ['REFTLIB_FAST'] in the first code cell and shrink the run when it is '1' "
        "(CI executes every notebook that way)"
    )
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", f"{path.name}: cell {index} has a saved error output"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path: Path, kernel: str):
    """Run every cell with REFTLIB_FAST=1 in a fresh kernel (working directory: examples/)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as exc:
        pytest.fail(f"{path.name} failed after {time.perf_counter() - start:.0f} s:\n{exc}", pytrace=False)
    errors = [cell for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: cells produced errors: {errors}"
