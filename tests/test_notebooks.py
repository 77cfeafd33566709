"""The colabs run top to bottom on a CPU and show what they claim.

Each notebook is executed with nbclient in a kernel of the interpreter running the
tests, started with colabs/ as the working directory, as a user opening it there would;
the setup cell changes into the repository root, from which the kernel then imports. Both
notebooks run at the same time (one kernel each): together they need about 70
CPU-seconds, most of it the one-epoch pre-training the visualization notebook starts,
and the data notebook fits on the core that the training leaves idle, so the module
takes well under a minute and a half of wall time on two cores.
"""

import asyncio
import json
import os
import re
import sys

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
import nbclient
import nbformat
import pytest

from tests import scriptrun

COLABS = os.path.join(scriptrun.ROOT, "colabs")
NOTEBOOKS = ("data_prep.ipynb", "visualization_paws_projections.ipynb")
TIMEOUT = 600  # seconds per cell: generous, for a loaded machine


def kernel_manager(directory):
  """A kernel manager whose "python3" kernel is this interpreter, whatever specs are installed."""
  spec_dir = os.path.join(directory, "kernels", "python3")
  os.makedirs(spec_dir, exist_ok=True)
  with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
    json.dump(
      {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3",
        "language": "python",
      },
      f,
    )
  specs = KernelSpecManager(kernel_dirs=[os.path.join(directory, "kernels")])
  return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def run_notebooks(names, directory, env):
  """Executes colabs/<name> for every name concurrently, each in colabs/ with environment `env`.

  Returns {name: executed notebook, or the exception its execution raised}.
  """
  clients = {}
  for name in names:
    notebook = nbformat.read(os.path.join(COLABS, name), as_version=4)
    clients[name] = nbclient.NotebookClient(
      notebook,
      timeout=TIMEOUT,
      kernel_name="python3",
      km=kernel_manager(str(directory)),
      resources={"metadata": {"path": COLABS}},
    )

  async def execute_all():
    return await asyncio.gather(*(client.async_execute(env=env) for client in clients.values()), return_exceptions=True)

  return dict(zip(clients, asyncio.run(execute_all())))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """Both notebooks executed; the visualization one with its workdir in a temporary folder."""
  directory = tmp_path_factory.mktemp("notebooks")
  workdir = directory / "run"
  results = run_notebooks(NOTEBOOKS, directory, dict(os.environ, PAWS_WORKDIR=str(workdir)))

  def result(name):
    if isinstance(results[name], BaseException):
      raise results[name]
    return results[name]

  return result, workdir


def text_output(notebook):
  """All stream and text/plain output of the notebook, in order."""
  parts = []
  for cell in notebook.cells:
    for output in cell.get("outputs", []):
      if output.get("output_type") == "stream" and output.get("name") == "stdout":
        parts.append(output["text"])
      elif "data" in output and "text/plain" in output["data"]:
        parts.append(output["data"]["text/plain"])
  return "\n".join(parts)


def image_outputs(notebook):
  return [
    output for cell in notebook.cells for output in cell.get("outputs", []) if "image/png" in output.get("data", {})
  ]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_stored_without_outputs(name):
  notebook = nbformat.read(os.path.join(COLABS, name), as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None


def test_data_prep_notebook(executed):
  get, _ = executed
  notebook = get("data_prep.ipynb")
  text = text_output(notebook)
  assert f"repository root: {os.path.realpath(scriptrun.ROOT)}" in text  # found from colabs/ and changed into
  # digits preset: 10 classes per batch, its support images per class, 2 large + small views of 4 images.
  per_class = scriptrun.config_with().pretrain.images_per_class
  assert "views: [(4, 16, 16, 3), (4, 16, 16, 3), (4, 10, 10, 3)" in text
  assert f"supports: (2, {10 * per_class}, 16, 16, 3)" in text  # [views, rows interleaved by class, ...]
  rows = re.findall(r"^\s*(\d+) \|((?: +\d+){10}) \|((?: \d+){10})$", text, flags=re.MULTILINE)
  assert len(rows) == 4, text
  for _, counts, order in rows:
    assert [int(n) for n in counts.split()] == [per_class] * 10
    assert sorted(int(c) for c in order.split()) == list(range(10))
  assert f"each class exactly {per_class} times per batch, interleaved by class: True" in text
  assert len(image_outputs(notebook)) == 2  # the views grid and the support batch


def test_visualization_notebook_trains_evaluates_and_plots(executed):
  get, workdir = executed
  notebook = get("visualization_paws_projections.ipynb")
  text = text_output(notebook)
  assert (workdir / "encoder" / "encoder.json").exists()  # trained on the fly
  match = re.search(r"soft-NN top-1: (\d+\.\d+) %", text)
  assert match, text
  assert "pretrained encoder" in text
  assert (workdir / "pca_projection.png").exists()
  assert len(image_outputs(notebook)) == 1
  # The notebook's number is nn_eval.py's on the same workdir, even when the script is told to use a
  # mixed policy: evaluation always embeds in float32.
  evaluation = scriptrun.run(
    "nn_eval.py",
    "--config=config.py:digits",
    "--config.run.precision=mixed_bfloat16",
    f"--workdir={workdir}",
    "--encoder=pretrained",
  )
  assert evaluation.returncode == 0, evaluation.stderr[-2000:]
  with open(workdir / "eval.json") as f:
    assert float(match.group(1)) == pytest.approx(json.load(f)["top1"], abs=0.005)
