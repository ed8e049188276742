"""Every notebook in notebooks/ runs headless on CPU without a cell error (nbclient), offline,
and produces its figures and printouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 240

# What each notebook must show: (substring of some stream output, number of PNG figures).
EXPECT = {
    "01_quickstart.ipynb": (["forward passes:", "step  0:", "answers:"], 3),
    "02_bring_your_checkpoint.ipynb": (
        ["converted parameters: 4.6M", "| controller | NFE | answer |",
         "| low_confidence k=1 | 32 | '1 4 7 9' |", "identical to the downloaded ones: True"], 1),
    "03_controllers.ipynb": (["llada k=1", "acc ", "records,", "TSPD answer:"], 4),
    "04_batch_and_meshes.ipynb": (["identical tokens on 8 devices"], 0),
}


def _outputs(nb):
    text, pngs = [], 0
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                text.append(o.get("text", ""))
            elif "image/png" in o.get("data", {}):
                pngs += 1
            elif "text/plain" in o.get("data", {}):
                text.append(o["data"]["text/plain"])
    return "".join(text), pngs


def test_every_notebook_is_checked() -> None:
    assert {p.name for p in NOTEBOOKS} <= set(EXPECT), "add the new notebook to EXPECT"
    assert "01_quickstart.ipynb" in {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch) -> None:
    # The kernel inherits this environment: tiny checkpoint, few bench instances, headless
    # plots, and no simulated-device flag leaking in from the test process.
    monkeypatch.setenv("DLLM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("DLLM_NOTEBOOK_BENCH_N", "2")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()   # raises CellExecutionError on the first failing cell
    text, pngs = _outputs(nb)
    wanted, figures = EXPECT[path.name]
    for w in wanted:
        assert w in text, f"{path.name}: no output containing {w!r}"
    assert pngs >= figures, f"{path.name}: {pngs} figures, expected {figures}"
