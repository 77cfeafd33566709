"""Two mirrored replicas train exactly like one device on the global batch (METHOD.md section 2).

Each replica receives its share of the global batch (utils/data/pipelines.py; here
tests/replica_input.py); utils.steps.paws_steps all-gathers the support
embeddings, all-reduces p-bar inside the PAWS loss, divides the loss by the
number of replicas and uses synchronized BatchNorm. The update must then equal
the single-device update on the whole batch.

tests/distributed_train_check.py runs, in a subprocess (the two logical CPUs
must be configured before TensorFlow starts), two PAWS steps of a tiny
WRN-10-1 from the same initial weights on the same global batch:
  single          OneDeviceStrategy, synchronized_bn=False: the reference;
  single_unfused  the same, every BatchNorm on tf_keras' non-fused kernel;
  mirrored        MirroredStrategy over two logical CPUs, synchronized_bn=True.

The global batch is chosen (distributed_train_check.DATA_SEED) so that no
BatchNorm output, all of which feed a ReLU, lies within 1e-5 of the kink in
either step; test_inputs_keep_clear_of_relu_kinks checks it. Otherwise an entry
within float rounding of 0 gets slope 0 in one run and 1 in the other, and in a
batch this small that one entry moves the trunk gradients by percents (the
first seed tried had an entry at 1.5e-7 and failed that way). This is float
noise at a measure-zero point, not a distribution error.

Tolerances (float32; observed differences are about 10x below them):
  metrics          relative 1e-5 (for loss = ce + me_max, relative to |ce| + |me_max|);
  weights          rtol 1e-5, atol 1e-5 on the values, and on the updates
                   (after - initial) rtol 1e-4, atol 1e-4 * max|update| + 1e-6.
                   The update check matters: LARS scales conv/dense kernel
                   updates to about 1e-4 of the weight (2e-5 to 3e-4 here), so
                   atol 1e-5 on the values alone would hardly see them, and
                   makes them independent of the gradient's scale; the BN
                   gamma/beta and the last bias (no LARS, raw learning rate,
                   updates 1e-2 to 1e-1) carry that scale, so e.g. a missing
                   1 / num_replicas doubles their update and fails. The 1e-6
                   floor covers the biases that feed a BatchNorm: their true
                   gradient is 0 and their updates are float noise of ~1e-7.
  BN moving stats  rtol 1e-5, atol 1e-5.

One difference does not come from this project: for BatchNorm on 4-D (conv)
inputs, tf_keras' fused kernel, used on one device, feeds the moving variance
with the unbiased batch variance (times n / (n - 1), n = values per channel),
while its synchronized BatchNorm, which is never fused, feeds the biased one.
So against the single-device reference the conv layers' moving variances agree
only up to that factor; against the non-fused single-device run they agree
exactly, which shows that this estimator is the only difference. The smallest n
here is 32 (final_bn on the small crops: 8 rows x 2 x 2), a 3 % effect; with
the CIFAR-10 shapes n >= 38 400 (1536 small crops x 5 x 5), under 3e-5.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests import scriptrun
from utils.train import loop as train_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (1, 2)
METRICS = ("loss", "ce", "me_max")
# Fewest values per channel any conv BatchNorm normalises over in one call.
MIN_VALUES_PER_CHANNEL = 32


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  output = tmp_path_factory.mktemp("distributed") / "runs.npz"
  environment = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  environment.pop("TF_CONFIG", None)
  completed = subprocess.run(
    [sys.executable, "-m", "tests.distributed_train_check", str(output)],
    cwd=ROOT,
    env=environment,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  with np.load(output) as data:
    return dict(data)


def indices(runs):
  return sorted(key.split("/")[-1] for key in runs if key.startswith("names/"))


def variables(runs, step, run, kind):
  """{index: value} of the trainable or moving variables of one run after `step`."""
  prefix = f"step{step}/{run}/{kind}/"
  return {key[len(prefix) :]: value for key, value in runs.items() if key.startswith(prefix)}


def name(runs, index):
  return str(runs[f"names/{index}"])


def is_conv_variance(runs, index):
  return bool(runs[f"conv_bn/{index}"]) and "moving_variance" in name(runs, index)


def test_runs_are_complete(runs):
  for step in STEPS:
    for run in ("single", "single_unfused", "mirrored0", "mirrored1"):
      assert len(variables(runs, step, run, "trainable")) == 42  # 12 conv/dense kernels + biases, 9 BN gamma + beta
      assert len(variables(runs, step, run, "moving")) == 18  # 9 BatchNorm layers
  assert sum(is_conv_variance(runs, index) for index in indices(runs)) == 7  # all trunk BNs


def test_inputs_keep_clear_of_relu_kinks(runs):
  # Precondition of every comparison below (see distributed_train_check.relu_margin):
  # no BatchNorm output, all of which feed a ReLU, within 1e-5 of the kink in
  # either step. If this fails (other TensorFlow numerics, other config), pick
  # another DATA_SEED there; the other failures would then say nothing.
  assert runs["relu_margin"].min() >= 1e-5, runs["relu_margin"]


@pytest.mark.parametrize("step", STEPS)
def test_metrics_equal_the_single_device_values(runs, step):
  reference = {metric: float(runs[f"step{step}/single/metric/{metric}"]) for metric in METRICS}
  for run in ("single_unfused", "mirrored"):
    for metric in METRICS:
      # loss = ce + me_max nearly cancel (both about 1): its tolerance is
      # relative to the size of the terms, not to the small sum.
      scale = abs(reference["ce"]) + abs(reference["me_max"]) if metric == "loss" else abs(reference[metric])
      np.testing.assert_allclose(
        runs[f"step{step}/{run}/metric/{metric}"],
        reference[metric],
        rtol=0,
        atol=1e-5 * scale,
        err_msg=f"{metric} of {run} after step {step}",
      )


@pytest.mark.parametrize("step", STEPS)
def test_replicas_hold_identical_copies(runs, step):
  for kind in ("trainable", "moving"):
    first = variables(runs, step, "mirrored0", kind)
    second = variables(runs, step, "mirrored1", kind)
    for index in first:
      np.testing.assert_array_equal(first[index], second[index], err_msg=name(runs, index))


@pytest.mark.parametrize("step", STEPS)
def test_trainable_weights_equal_the_single_device_update(runs, step):
  reference = variables(runs, step, "single", "trainable")
  mirrored = variables(runs, step, "mirrored0", "trainable")
  moved = 0
  for index, expected in reference.items():
    message = f"{name(runs, index)} after step {step}"
    np.testing.assert_allclose(mirrored[index], expected, rtol=1e-5, atol=1e-5, err_msg=message)
    initial = runs[f"step0/initial/{index}"]
    expected_update = expected - initial
    scale = np.abs(expected_update).max()
    np.testing.assert_allclose(
      mirrored[index] - initial, expected_update, rtol=1e-4, atol=1e-4 * scale + 1e-6, err_msg=message
    )
    moved += scale > 1e-6
  # The steps really change the network: all 12 kernels, 18 BN gamma/beta and
  # the last dense bias (the biases feeding a BN get ~0 gradient and stay put).
  assert moved >= 31


@pytest.mark.parametrize("step", STEPS)
def test_bn_moving_statistics_equal_the_non_fused_single_device_run(runs, step):
  reference = variables(runs, step, "single_unfused", "moving")
  mirrored = variables(runs, step, "mirrored0", "moving")
  for index, expected in reference.items():
    assert np.abs(expected - runs[f"step0/initial/{index}"]).max() > 1e-3, name(runs, index)  # really updated
    np.testing.assert_allclose(
      mirrored[index], expected, rtol=1e-5, atol=1e-5, err_msg=f"{name(runs, index)} after step {step}"
    )


@pytest.mark.parametrize("step", STEPS)
def test_bn_moving_statistics_against_the_single_device_reference(runs, step):
  reference = variables(runs, step, "single", "moving")
  mirrored = variables(runs, step, "mirrored0", "moving")
  for index, expected in reference.items():
    message = f"{name(runs, index)} after step {step}"
    if not is_conv_variance(runs, index):
      # Moving means everywhere, and moving variances of the heads' BNs (2-D
      # inputs, never fused): equal.
      np.testing.assert_allclose(mirrored[index], expected, rtol=1e-5, atol=1e-5, err_msg=message)
    else:
      # Fused (unbiased) against synchronized (biased) batch variance: every
      # moving-average term shrinks by (n - 1) / n with n >= 32, so the ratio
      # lies in [31/32, 1] up to float error.
      ratio = mirrored[index] / expected
      low = (MIN_VALUES_PER_CHANNEL - 1) / MIN_VALUES_PER_CHANNEL
      assert ratio.min() >= low - 1e-5 and ratio.max() <= 1 + 1e-5, (message, ratio.min(), ratio.max())


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


@pytest.mark.slow
def test_two_worker_processes_train_in_lockstep(tmp_path):
  """MultiWorkerMirroredStrategy from TF_CONFIG: two local processes, one replica each, one shared workdir.

  The chief (worker 0) writes the config, log and plots and prints; worker 1 prints nothing and keeps only
  its checkpoints, encoder and labeled subset in workdir/workers/worker1. Both must save the same encoder,
  and the first loss (before any update) must be the single-process loss of the same global batch. Later
  steps are not compared: float noise at ReLU kinks (see above) grows over several updates."""
  args = scriptrun.TINY + ["--config.pretrain.epochs=1", "--config.run.precision=float32"]
  cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
  workers = [
    scriptrun.start(
      "paws_train.py",
      *args,
      f"--workdir={tmp_path}/shared",
      log_path=str(tmp_path / f"worker{index}.log"),
      extra_env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})},
    )
    for index in range(2)
  ]
  single = scriptrun.run("paws_train.py", *args, f"--workdir={tmp_path}/single")
  assert single.returncode == 0, single.stderr[-3000:]
  for index, worker in enumerate(workers):
    assert worker.wait(timeout=600) == 0, (tmp_path / f"worker{index}.log").read_text()[-3000:]
  logs = [
    [
      (r["step"], r["loss"], r["ce"], r["me_max"])
      for r in train_loop.read_log(str(path / "pretrain_log.jsonl"), "step")
    ]
    for path in (tmp_path / "shared", tmp_path / "single")
  ]
  assert [r[0] for r in logs[0]] == list(range(1, 11))
  np.testing.assert_allclose(logs[0][0][1:], logs[1][0][1:], rtol=1e-4)
  worker = tmp_path / "shared" / "workers" / "worker1"
  assert sorted(os.listdir(worker)) == ["checkpoints", "encoder", "labeled_indices.npy", "labeled_indices.txt"]
  assert "pre-training done" in (tmp_path / "worker0.log").read_text()
  assert "pre-training done" not in (tmp_path / "worker1.log").read_text()  # printed once per job
  readers = [tf.train.load_checkpoint(str(path / "encoder" / "weights")) for path in (tmp_path / "shared", worker)]
  keys = sorted(readers[0].get_variable_to_shape_map())
  assert keys == sorted(readers[1].get_variable_to_shape_map())
  for key in keys:
    np.testing.assert_array_equal(readers[0].get_tensor(key), readers[1].get_tensor(key))


def start_workers(cluster, args, workdir, log_prefix):
  """Starts one paws_train.py process per worker of `cluster` (TF_CONFIG), output to log_prefix<index>.log."""
  return [
    scriptrun.start(
      "paws_train.py",
      *args,
      f"--workdir={workdir}",
      log_path=f"{log_prefix}{index}.log",
      extra_env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})},
    )
    for index in range(len(cluster["worker"]))
  ]


@pytest.mark.slow
def test_a_killed_worker_stops_the_other_and_a_restart_resumes_exactly(tmp_path):
  """A preempted VM: worker 0 (the chief) is SIGKILLed mid-epoch. Worker 1 must stop within
  run.collective_timeout (plus a margin for two processes on two shared cores) with one error line naming
  worker 0 and its last checkpoint, not wait in a collective for ever. The chief's copy of that checkpoint
  is then removed, as if it had been killed while writing it (its first): on restart it starts from scratch
  while worker 1 restores the checkpoint, and both must continue from worker 1's (devices.align_workers).

  The losses the chief logs after the resume must be those the killed run logged for the same steps, before
  it was killed: that run was uninterrupted up to there. The comparison is with the same run, as in
  tests/test_faults.py; a separate uninterrupted two-worker run agreed too when tried (rel 1e-4), but costs
  a third cluster start."""
  timeout = 5.0
  args = scriptrun.TINY + [
    "--config.run.checkpoint_every=1000",  # 2 epochs of 10 steps: checkpoints at the epoch ends only
    "--config.run.precision=float32",
    f"--config.run.collective_timeout={timeout}",
  ]
  cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
  shared, logs = tmp_path / "shared", str(tmp_path / "worker")
  workers = start_workers(cluster, args, shared, logs)
  metrics_log = str(shared / "pretrain_log.jsonl")
  while not (os.path.exists(metrics_log) and any(r["step"] >= 15 for r in train_loop.read_log(metrics_log, "step"))):
    assert all(worker.poll() is None for worker in workers), scriptrun.read_text(f"{logs}0.log")[-3000:]
    time.sleep(0.05)
  workers[0].send_signal(signal.SIGKILL)
  killed = time.perf_counter()
  status = workers[1].wait(timeout=timeout + 60)
  waited = time.perf_counter() - killed
  workers[0].wait()
  output = scriptrun.read_text(f"{logs}1.log")
  assert status == 2, output[-3000:]
  assert waited < timeout + 15, waited
  lines = [line for line in output.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
  assert scriptrun.ERRORS["worker_lost"] in lines[0] and "lost worker 0 " in lines[0], lines[0]
  checkpoint = shared / "workers" / "worker1" / "checkpoints" / "ckpt-10"
  assert f"the last checkpoint is {checkpoint}: restart every worker" in lines[0], lines[0]

  shutil.rmtree(shared / "checkpoints")  # the chief's ckpt-10, as if it was killed while writing it
  restarted = start_workers(cluster, args, shared, str(tmp_path / "restarted"))
  for index, worker in enumerate(restarted):
    assert worker.wait(timeout=600) == 0, scriptrun.read_text(f"{tmp_path}/restarted{index}.log")[-3000:]
  assert "resuming from another worker's newer checkpoint at step 10" in scriptrun.read_text(
    f"{tmp_path}/restarted0.log"
  )
  records = train_loop.read_log(metrics_log, "step")
  steps = [r["step"] for r in records]
  resumed = len(steps) - 1 - steps[::-1].index(11)
  assert steps[resumed:] == list(range(11, 21))
  before_the_kill = {r["step"]: r for r in records[:resumed] if r["step"] > 10}
  assert len(before_the_kill) >= 5
  for record in records[resumed:]:
    if record["step"] in before_the_kill:
      for metric in METRICS:
        expected = before_the_kill[record["step"]][metric]
        assert record[metric] == pytest.approx(expected, rel=1e-4, abs=1e-5), (metric, record)


@pytest.mark.slow
def test_a_worker_lost_while_saving_the_encoder_is_one_error_line(tmp_path):
  """Worker 1 is SIGKILLed as it starts saving its encoder after the last step; the chief's save (reading the
  synchronised BatchNorm statistics is a collective) must end in the one lost-worker line, naming worker 1 and
  the final checkpoint, not in a traceback."""
  args = [*scriptrun.TINY, "--config.pretrain.epochs=1", "--config.run.collective_timeout=5"]
  cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
  shared = tmp_path / "shared"
  workers = [
    scriptrun.start(
      *(("paws_train.py",) if index == 0 else ("tests.kill_at_checkpoint", "encoder", "1", "paws_train.py")),
      *args,
      f"--workdir={shared}",
      log_path=str(tmp_path / f"worker{index}.log"),
      extra_env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})},
    )
    for index in range(2)
  ]
  statuses = [worker.wait(timeout=600) for worker in workers]
  output = scriptrun.read_text(tmp_path / "worker0.log")
  assert statuses == [2, -signal.SIGKILL], output[-3000:]  # worker 1 prints nothing (the chief prints)
  lines = [line for line in output.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
  assert scriptrun.ERRORS["worker_lost"] in lines[0] and "lost worker 1 " in lines[0], lines[0]
  assert f"stopped at step 10, the last checkpoint is {shared / 'checkpoints' / 'ckpt-10'}" in lines[0], lines[0]
