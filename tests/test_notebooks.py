"""The notebooks run top to bottom on CPU (as in a fresh Colab CPU runtime),
and are committed without outputs.

Each notebook asserts its own results (the loss goes down, the meshes agree,
the confusion matrix counts every example); an exception in any cell fails here.
As with papermill, the cell tagged ``parameters`` (run length) is followed by
one with CI's shorter values, so the suite stays within its time budget.
"""
import glob
import os
import time

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
CI_PARAMETERS = {
    "quickstart.ipynb": "TRAIN_STEPS = 8",
    "finetune_bert.ipynb": "PRETRAIN_STEPS = 4\nFINETUNE_STEPS = 8",
    "t5_seq2seq.ipynb": "TRAIN_STEPS = 6",
}


def with_ci_parameters(notebook, name):
  """The notebook with CI's values in a cell after its ``parameters`` cell."""
  if name not in CI_PARAMETERS:
    return notebook
  tagged = [i for i, cell in enumerate(notebook.cells)
            if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name}: one cell must be tagged 'parameters'"
  defaults = notebook.cells[tagged[0]].source
  for line in CI_PARAMETERS[name].splitlines():
    assert line.split(" = ")[0] + " = " in defaults, f"{name} has no parameter {line}"
  notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(CI_PARAMETERS[name]))
  return notebook


def test_the_four_notebooks_exist():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert names >= {"quickstart.ipynb", "finetune_bert.ipynb", "t5_seq2seq.ipynb",
                   "sharding.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  import nbclient  # pylint: disable=import-outside-toplevel
  notebook = with_ci_parameters(nbformat.read(path, as_version=4), os.path.basename(path))
  start = time.perf_counter()
  # The kernel inherits this environment; TMPDIR keeps each notebook's workdirs here.
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  if os.path.basename(path) == "sharding.ipynb":  # 8 devices, though the suite sets XLA_FLAGS.
    printed = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "cpu 8 devices" in printed and "skipping" not in printed  # XLA flags kept.
  print(f"{os.path.basename(path)} ran in {time.perf_counter() - start:.0f} s")
