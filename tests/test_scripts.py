"""The three entry scripts end to end on tiny digits settings, as subprocesses."""

import json
import os

import numpy as np
import pytest

from tests import scriptrun
from utils.data import datasets, splits
from utils.train import loop as train_loop

# Five epochs: enough for the encoder to beat a random one clearly (random initialisations score 20-31 %,
# chance is 10 %; this setting reached 68 % here), still about half a minute of CPU.
ARGS = [*scriptrun.TINY, "--config.pretrain.epochs=5"]
ACCURACY_FLOOR = 45.0


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("digits"))
  pretrain = scriptrun.run("paws_train.py", *ARGS, f"--workdir={workdir}")
  assert pretrain.returncode == 0, pretrain.stderr[-3000:]
  pretrained = scriptrun.run("nn_eval.py", *ARGS, f"--workdir={workdir}", "--encoder=pretrained")
  assert pretrained.returncode == 0, pretrained.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    pretrained_top1 = json.load(f)["top1"]
  finetune = scriptrun.run("fine_tune.py", *ARGS, f"--workdir={workdir}")
  assert finetune.returncode == 0, finetune.stderr[-3000:]
  evaluation = scriptrun.run("nn_eval.py", *ARGS, f"--workdir={workdir}")
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  return workdir, pretrain, finetune, evaluation, pretrained_top1


# What TensorFlow's native code prints at start on a machine without a GPU (utils/native_logs.py keeps it out).
START_UP_NOISE = (
  "failed call to cuInit",
  "All log messages before absl::InitializeLog()",
  "Compiled cluster using XLA",
)


def test_a_cpu_run_prints_no_native_start_up_noise(pipeline_run):
  *_, pretrain, finetune, evaluation, _ = pipeline_run
  for result in (pretrain, finetune, evaluation):
    output = result.stdout + result.stderr
    assert [noise for noise in START_UP_NOISE if noise in output] == [], output[-2000:]
  assert "soft-NN top-1" in evaluation.stdout  # the real output is still there


def test_pretraining_outputs(pipeline_run):
  workdir, pretrain, *_ = pipeline_run
  steps = [r["step"] for r in train_loop.read_log(os.path.join(workdir, "pretrain_log.jsonl"), "step")]
  assert steps == list(range(1, 51))  # 5 epochs x (1347 // 128) steps, logged every step
  epochs = train_loop.read_log(os.path.join(workdir, "pretrain_log.jsonl"), "epoch")
  assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5]
  # The PAWS loss falls: the last epoch's mean is well below the first's (0.06 -> about -0.8 here).
  assert epochs[-1]["loss"] < epochs[0]["loss"] - 0.3
  assert all(np.isfinite(r["loss"]) and r["me_max"] <= 0 for r in epochs)
  labeled = np.load(os.path.join(workdir, "labeled_indices.npy"))
  assert len(labeled) == 40 and len(np.unique(labeled)) == 40
  with open(os.path.join(workdir, "labeled_indices.txt")) as f:
    assert [int(line) for line in f] == list(labeled)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["pretrain"]["epochs"] == 5
  for name in ("pretrain_loss.png", "encoder/encoder.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert "labeled subset: 40 images" in pretrain.stdout


def test_finetune_and_eval_outputs(pipeline_run):
  workdir, _, finetune, evaluation, pretrained_top1 = pipeline_run
  steps = [r["step"] for r in train_loop.read_log(os.path.join(workdir, "finetuned", "finetune_log.jsonl"), "step")]
  assert steps == [1, 2, 3]  # 3 epochs of 4 labeled images per class // 4 per batch
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  assert result["encoder"] == "finetuned"
  assert result["num_support"] == 40 and result["num_test"] == 450
  assert len(result["per_class"]) == 10
  assert result["top1"] == pytest.approx(np.mean(result["per_class"]), abs=2.0)  # near-balanced test set
  assert f"{result['top1']:.2f} %" in evaluation.stdout
  # Weighted k-NN and the linear probe of the same embeddings beside soft-NN (tests/test_knn_linear_probe.py).
  assert result["knn_k"] == 20 and result["knn_temperature"] == 0.07
  assert result["linear_probe_C"] == 1.0 and 0 < result["linear_probe_iterations"] < result["linear_probe_max_iter"]
  for name, line in (("knn_top1", "k-NN top-1 (cosine, k = 20"), ("linear_probe_top1", "linear-probe top-1")):
    assert 10.0 < result[name] <= 100.0  # above chance
    assert line in evaluation.stdout and f"{result[name]:.2f} %" in evaluation.stdout
  # Well above chance (10 %) and above what a random initialisation gives (20-31 %).
  assert pretrained_top1 >= ACCURACY_FLOOR and result["top1"] >= ACCURACY_FLOOR
  for name in ("confusion_matrix.png", "pca_projection.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0


def test_rerun_of_finished_pretraining_resumes_at_the_end(pipeline_run):
  workdir = pipeline_run[0]
  again = scriptrun.run("paws_train.py", *ARGS, f"--workdir={workdir}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "at step 50" in again.stdout


def test_evaluation_is_float32_whatever_the_training_precision(pipeline_run):
  """The reference evaluates in fp32; a mixed policy on the command line must not change the result."""
  workdir = pipeline_run[0]
  with open(os.path.join(workdir, "eval.json")) as f:
    float32_result = json.load(f)
  mixed = scriptrun.run("nn_eval.py", *ARGS, "--config.run.precision=mixed_bfloat16", f"--workdir={workdir}")
  assert mixed.returncode == 0, mixed.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    mixed_result = json.load(f)
  assert mixed_result["precision"] == "float32"
  assert mixed_result["top1"] == float32_result["top1"]
  assert mixed_result["per_class"] == float32_result["per_class"]


def test_changed_config_in_existing_workdir_is_refused(pipeline_run):
  line = scriptrun.fails_cleanly(
    "paws_train.py", *ARGS, "--config.pretrain.tau=0.2", error="changed_config", workdir=pipeline_run[0]
  )
  assert "pretrain.tau" in line


def test_other_labeled_subset_in_existing_workdir_is_refused(pipeline_run, tmp_path):
  workdir = pipeline_run[0]
  other = splits.select_labeled_indices(datasets.load_digits()[1], 4, seed=7)
  assert not np.array_equal(other, np.load(os.path.join(workdir, "labeled_indices.npy")))
  split = tmp_path / "other_split.txt"
  split.write_text("".join(f"{i}\n" for i in other))
  scriptrun.fails_cleanly(
    "paws_train.py", *ARGS, f"--split_file={split}", error="changed_labeled_subset", workdir=workdir
  )


@pytest.mark.parametrize("script", ["nn_eval.py", "fine_tune.py"])
def test_incompatible_model_config_is_refused(pipeline_run, script):
  line = scriptrun.fails_cleanly(
    script, *ARGS, "--config.model.depth=16", error="model_config", workdir=pipeline_run[0]
  )
  assert "model.depth" in line
