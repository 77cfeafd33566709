"""run.data_service: the training input built on tf.data service workers is the input built on the trainer.

A dispatcher and two workers on localhost (utils/data/service.py's start_dispatcher / start_worker) serve PAWS
pre-training pipelines of tests/distributed_train_check.py's tiny config, and every element every replica
receives is compared bit for bit with the local pipeline's: in-memory images, one replica, from step 0 across a
chunk boundary (a few steps per chunk); a folder of PNG files streamed (unlabeled images and supports from two
index sources, which must stay aligned: the same step on the same worker), two replicas (MirroredStrategy over
two logical CPUs), resumed at step 5. Then a short training run (utils/train/fit.py) through the service logs
exactly the local run's losses.
Everything runs in one subprocess (`python -m tests.test_data_service OUTPUT.json` from the repository root): the
logical CPUs must be configured before TensorFlow initialises.
"""

import json
import os
import subprocess
import sys

if __name__ == "__main__":  # the subprocess: before TensorFlow starts
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

import config as presets
from utils import config_rules
from utils.data import sampling
from utils.data import service as data_service
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8  # the tiny data has 6 steps per epoch: the stream crosses an epoch
RESUME_AT = 5
STEPS_PER_CHUNK = 5  # from 0: chunks 0-4 and 5-7 (the folder's: one chunk, building it takes seconds)
TRAIN_STEPS = 3


def test_chunks_are_cut_at_multiples_of_their_size():
  assert data_service._chunks(0, 8, 5) == [(0, 5), (5, 8)]
  assert data_service._chunks(3, 8, 5) == [(3, 5), (5, 8)]
  assert data_service._chunks(5, 10, 5) == [(5, 10)]
  assert data_service._chunks(7, 7, 5) == []


def test_the_address_is_empty_or_grpc_host_and_port():
  config = presets.get_config("digits")
  for address in ("", "grpc://head:5050", "grpc://10.0.0.2:5050"):
    config.run.data_service = address
    config_rules.validate_config(config)
  for address in ("head:5050", "grpc://head", "http://head:5050"):
    config.run.data_service = address
    with pytest.raises(UserError, match="run.data_service"):
      config_rules.validate_config(config)


def test_the_command_line_needs_the_worker_list_and_the_dispatcher(capsys):
  for argv, flag in ((["dispatcher", "--port=5050"], "--workers"), (["worker", "--port=5051"], "--dispatcher")):
    with pytest.raises(SystemExit):
      data_service.main(argv)
    assert f"the following arguments are required: {flag}" in capsys.readouterr().err


def test_a_pipeline_that_calls_python_is_refused_before_anything_is_sent():
  def make_dataset(replicas, start_step):
    steps = lambda: ((step, np.arange(2)) for step in range(start_step, 4))
    signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([2], tf.int64))
    return sampling.index_dataset(steps, signature).map(lambda step, x: tf.py_function(lambda v: v, [x], tf.int64))

  # No dispatcher listens there: the check comes first.
  with pytest.raises(UserError, match=r"run.data_service: this input calls Python \(EagerPyFunc\)"):
    data_service.remote_dataset("grpc://localhost:1", make_dataset, sampling.ONE_DEVICE, 0, 4)


def test_an_address_where_no_dispatcher_answers_is_refused_at_once():
  def make_dataset(replicas, start_step):
    steps = lambda: ((step, np.arange(2)) for step in range(start_step, 4))
    return sampling.index_dataset(steps, (tf.TensorSpec([], tf.int64), tf.TensorSpec([2], tf.int64)))

  address = f"grpc://localhost:{_free_port()}"
  with pytest.raises(UserError, match=f"no tf.data service dispatcher answers at {address}"):
    data_service.remote_dataset(address, make_dataset, sampling.ONE_DEVICE, 0, 4)


def test_index_plan_in_the_graph_holds_the_steps_padded_and_a_shard_hint():
  steps = lambda: ((step, np.full([3], step * 10)) for step in range(2, 100))
  signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([3], tf.int64))
  with sampling.indices_in_graph(stop=5, rows=6):
    dataset = sampling.index_dataset(steps, signature)
  assert not data_service.python_ops(dataset)
  graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
  constants = [tf.make_ndarray(node.attr["value"].tensor) for node in graph.node if node.op == "Const"]
  # Steps 2, 3, 4, then the last one again as padding (dropped after the hint, never built).
  assert any(np.array_equal(c, [2, 3, 4, 4, 4, 4]) for c in constants)
  assert any(np.array_equal(c, np.repeat([[20], [30], [40], [40], [40], [40]], 3, axis=1)) for c in constants)
  assert sum(node.op == "ShardDataset" for node in graph.node) == 1
  with pytest.raises(tf.errors.FailedPreconditionError, match="SHARD_HINT"):  # only a worker can read it
    next(iter(dataset))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Everything the service serves, and the local references, from one subprocess (one TensorFlow start)."""
  output = tmp_path_factory.mktemp("service") / "results.json"
  completed = subprocess.run(
    [sys.executable, "-m", "tests.test_data_service", str(output)],
    cwd=ROOT,
    env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert completed.returncode == 0, completed.stderr[-4000:]
  return json.loads(output.read_text())


@pytest.mark.parametrize("case", ["one_replica_from_0", "folder_two_replicas_resumed"])
def test_every_replica_gets_the_local_batches_bit_for_bit(results, case):
  checked = results[case]
  assert checked["elements"] == checked["expected_elements"]
  assert checked["unequal"] == []


def test_training_through_the_service_logs_the_local_losses(results):
  local, remote = results["train"]["local"], results["train"]["service"]
  assert [record["step"] for record in local] == list(range(1, TRAIN_STEPS + 1))
  assert remote == local  # every metric of every step, exactly


# --- The subprocess --------------------------------------------------------------------------------------


def _tiny_setup(check, num_replicas):
  """The tiny config, 24 random 8 x 8 images of 4 classes (16 labeled), and its PawsPlan."""
  config = check.tiny_config()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=[24, 8, 8, 3], dtype=np.uint8)
  labels = np.arange(24) % 4
  plan = sampling.PawsPlan(np.arange(16), labels, len(images), config.pretrain, config.seed, num_replicas)
  return config, images, plan


def _make_dataset(config, images, plan, total_steps):
  from utils.data import pipelines  # pylint: disable=g-import-not-at-top

  return lambda replicas, start_step: pipelines.pretrain_dataset(
    images, plan, config.data, config.pretrain, start_step=start_step, total_steps=total_steps, replicas=replicas
  )


def _per_replica(strategy, make, count):
  """The first `count` elements of the distributed dataset: for each, every replica's arrays, flattened."""
  iterator = iter(sampling.distribute(strategy, make))
  elements = []
  for _ in range(count):
    element = next(iterator)
    elements.append([t.numpy() for v in tf.nest.flatten(element) for t in strategy.experimental_local_results(v)])
  return elements


def _folder_dataset(check, num_replicas, root):
  """The streamed pre-training pipeline (images read from files) on a tiny folder of PNG files."""
  from tests.test_sources import small_folder  # pylint: disable=g-import-not-at-top
  from utils.data import sources  # pylint: disable=g-import-not-at-top

  config = check.tiny_config()
  with config.unlocked():
    config.data.dataset = "folder"
  source = sources.open_source(config.data, small_folder(root, size=(12, 10)))  # 3 classes x 4 images
  plan = sampling.PawsPlan(
    np.arange(12), source.train_labels, source.num_unlabeled, config.pretrain, config.seed, num_replicas
  )
  return lambda replicas, start_step: source.pretrain_dataset(
    plan, config.data, config.pretrain, start_step=start_step, total_steps=STEPS, replicas=replicas
  )


def _compare(strategy, check, address, start_step, folder=None, steps_per_chunk=STEPS_PER_CHUNK):
  if folder:
    make = _folder_dataset(check, strategy.num_replicas_in_sync, folder)
  else:
    config, images, plan = _tiny_setup(check, strategy.num_replicas_in_sync)
    make = _make_dataset(config, images, plan, STEPS)
  local = _per_replica(strategy, lambda replicas: make(replicas, 0), STEPS)[start_step:]
  remote = _per_replica(
    strategy,
    lambda replicas: data_service.remote_dataset(address, make, replicas, start_step, STEPS, steps_per_chunk),
    STEPS - start_step,
  )
  unequal = [
    [step, index]
    for step, (a, b) in enumerate(zip(local, remote))
    for index, (x, y) in enumerate(zip(a, b))
    if not np.array_equal(x, y)
  ]
  return {"elements": len(remote), "expected_elements": len(local), "unequal": unequal}


def _train(strategy, check, folder, address):
  """TRAIN_STEPS steps of fit.fit from fixed initial weights; returns the logged records."""
  import tf_keras  # pylint: disable=g-import-not-at-top

  from utils.model import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  from utils.train import fit, optim, steps  # pylint: disable=g-import-not-at-top
  from utils.train import loop as train_loop  # pylint: disable=g-import-not-at-top
  from utils.workdir import Workdir  # pylint: disable=g-import-not-at-top

  config, images, plan = _tiny_setup(check, strategy.num_replicas_in_sync)
  with config.unlocked():
    config.run.data_service = address
    config.run.log_every = 1
  p = config.pretrain
  schedule = optim.warmup_cosine_schedule(p.start_lr, p.lr, p.final_lr, 1, TRAIN_STEPS)
  initial = _train.__dict__.setdefault("initial", [])

  def make_model():
    model = encoder_lib.build_for_strategy(config, strategy)
    if not initial:
      initial.extend(model.get_weights())
    model.set_weights(initial)
    return model

  tf_keras.mixed_precision.set_global_policy("float32")
  stage = fit.Stage(
    name="pretrain",
    title="PAWS pre-training",
    plot_keys=("ce", "me_max", "loss"),
    total_steps=TRAIN_STEPS,
    steps_per_epoch=TRAIN_STEPS,
    images_per_step=p.batch_size,
    schedule=schedule,
    make_model=make_model,
    make_optimizer=lambda: optim.build_lars(schedule, p.momentum, p.weight_decay, p.lars_eta),
    make_dataset=_make_dataset(config, images, plan, TRAIN_STEPS),
    make_steps=lambda state: steps.paws_steps(config, strategy, state.model, state.optimizer, False),
  )
  workdir = Workdir(folder)
  os.makedirs(folder)
  fit.fit(stage, strategy, config.run, workdir, workdir)
  records = train_loop.read_log(os.path.join(folder, "pretrain_log.jsonl"), "step")
  return [{key: value for key, value in record.items() if key != "img/s"} for record in records]


def main(output):
  from tests import distributed_train_check as check  # pylint: disable=g-import-not-at-top  (2 logical CPUs)

  ports = [_free_port(), _free_port()]
  workers = [f"localhost:{port}" for port in ports]
  dispatcher = data_service.start_dispatcher(0, workers)
  servers = [data_service.start_worker(dispatcher.target.split("://")[1], p, w, 100) for p, w in zip(ports, workers)]
  address = dispatcher.target
  one = tf.distribute.OneDeviceStrategy("/cpu:0")
  two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  folder = os.path.dirname(output)
  results = {
    "one_replica_from_0": _compare(one, check, address, 0),
    "folder_two_replicas_resumed": _compare(two, check, address, RESUME_AT, os.path.join(folder, "images"), STEPS),
    "train": {
      "local": _train(one, check, os.path.join(folder, "local"), ""),
      "service": _train(one, check, os.path.join(folder, "service"), address),
    },
  }
  with open(output, "w") as f:
    json.dump(results, f)
  # Shutting the servers down waits for their heartbeats to time out (tens of seconds): nothing is left to do.
  del servers
  os._exit(0)


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


if __name__ == "__main__":
  main(sys.argv[1])
