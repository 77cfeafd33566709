"""The step loop (utils/train/loop.py): checkpoints, logs, signals, a full disk, a non-finite loss.

In-process tests drive `run_loop` with a tiny model and a Python stand-in for the compiled step; the
signal tests at the end send SIGTERM / SIGINT to a real `paws_train.py` run.
"""

import errno
import glob
import logging
import os
import signal
import time

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tests import scriptrun
from utils.errors import Interrupted, UserError
from utils.train import loop as train_loop
from utils.train import optim

RUN = ml_collections.ConfigDict(dict(steps_per_loop=1, log_every=1, checkpoint_every=2))


def tiny_state(directory):
  def make_encoder():
    model = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,))])
    model.build((None, 3))
    return model

  make_optimizer = lambda: optim.build_lars(0.1, momentum=0.9, weight_decay=0.0, eta=0.001)
  state = train_loop.create_train_state(tf.distribute.get_strategy(), make_encoder, make_optimizer)
  train_loop.restore(state, directory, keep=10)
  return state


def fake_steps(state, losses, on_call=None):
  """A stand-in for the compiled step: moves a weight, returns losses[step] for the step it takes."""

  def train_steps(iterator, num_steps):
    del iterator
    current = int(state.step.numpy())
    if on_call:
      on_call(current)
    state.model.weights[0].assign_add(tf.ones_like(state.model.weights[0]))
    return {"loss": tf.constant(losses[current + int(num_steps) - 1], tf.float32)}

  return train_steps


def checkpoint_steps(directory):
  return sorted(int(os.path.basename(p)[5:-6]) for p in glob.glob(os.path.join(directory, "ckpt-*.index")))


def test_loop_logs_every_step_and_checkpoints_at_cadence_and_epoch_ends(tmp_path):
  state = tiny_state(str(tmp_path / "ckpt"))
  loop = train_loop.Loop("pretrain", total_steps=5, steps_per_epoch=3, images_per_step=4, learning_rate=lambda s: 0.1)
  losses = [5.0, 4.0, 3.0, 2.0, 1.0]
  path = train_loop.run_loop(fake_steps(state, losses), None, state, loop, RUN, str(tmp_path), interactive=False)
  assert [r["loss"] for r in train_loop.read_log(path, "step")] == losses
  epochs = train_loop.read_log(path, "epoch")
  assert [r["loss"] for r in epochs] == [4.0, 1.5]  # means over steps 1-3 and 4-5
  assert checkpoint_steps(str(tmp_path / "ckpt")) == [2, 3, 4, 5]  # every 2 steps and at epoch ends


def test_after_epoch_metrics_join_the_epoch_record_once_its_checkpoint_is_saved(tmp_path):
  state = tiny_state(str(tmp_path / "ckpt"))
  seen = []

  def after_epoch(state, epoch):
    seen.append((epoch, int(state.step.numpy()), state.manager.latest_checkpoint.rsplit("-", 1)[-1]))
    return {"heldout_top1": 10.0 * epoch}

  loop = train_loop.Loop("finetune", 5, 3, 4, lambda s: 0.1, after_epoch)
  path = train_loop.run_loop(fake_steps(state, [5.0, 4.0, 3.0, 2.0, 1.0]), None, state, loop, RUN, str(tmp_path), False)
  assert seen == [(1, 3, "3"), (2, 5, "5")]
  epochs = train_loop.read_log(path, "epoch")
  assert [(r["epoch"], r["heldout_top1"], r["loss"]) for r in epochs] == [(1, 10.0, 4.0), (2, 20.0, 1.5)]


def test_a_log_file_gets_plain_lines_at_the_log_cadence_and_per_epoch(tmp_path, caplog):
  """Not a terminal: no progress bar (it would append every update to one line), one line per log_every steps
  and per epoch, each with the step, the metrics, the elapsed time and the ETA."""
  state = tiny_state(str(tmp_path / "ckpt"))
  loop = train_loop.Loop("pretrain", total_steps=5, steps_per_epoch=3, images_per_step=4, learning_rate=lambda s: 0.1)
  run = ml_collections.ConfigDict(dict(RUN.to_dict(), log_every=2))
  with caplog.at_level(logging.INFO):
    train_loop.run_loop(fake_steps(state, [5.0, 4.0, 3.0, 2.0, 1.0]), None, state, loop, run, None, interactive=False)
  lines = [record.getMessage() for record in caplog.records if record.pathname == train_loop.__file__]
  assert [line.split(":")[0] for line in lines] == [
    "epoch 1/2",
    "step 2/5",
    "epoch 1 done, step 3/5, means",
    "epoch 2/2",
    "step 4/5",
    "epoch 2 done, step 5/5, means",
  ]
  assert "loss 4, lr 0.1, img/s" in lines[1] and "elapsed " in lines[1] and "ETA " in lines[1]
  assert lines[2].startswith("epoch 1 done, step 3/5, means: loss 4, lr 0.1, elapsed")  # mean of 5, 4, 3
  assert lines[-1].endswith("ETA 0 s")
  assert not any("\r" in line or "[=" in line for line in lines)


@pytest.mark.parametrize("number,exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_at_the_current_step_then_stops(tmp_path, number, exit_code):
  directory = str(tmp_path / "ckpt")
  state = tiny_state(directory)
  loop = train_loop.Loop("pretrain", total_steps=10, steps_per_epoch=10, images_per_step=4, learning_rate=lambda s: 0.1)
  sent = lambda step: step == 2 and os.kill(os.getpid(), number)  # arrives while step 3 runs
  previous_handler = signal.getsignal(number)
  with pytest.raises(Interrupted, match="stopped at step 3 of 10") as raised:
    train_loop.run_loop(
      fake_steps(state, np.arange(10.0), sent), None, state, loop, RUN, str(tmp_path), interactive=False
    )
  assert raised.value.exit_code == exit_code
  assert signal.getsignal(number) is previous_handler  # the loop's handler is removed again
  assert checkpoint_steps(directory) == [2, 3]
  resumed = tiny_state(directory)
  assert int(resumed.step.numpy()) == 3
  np.testing.assert_array_equal(resumed.model.get_weights()[0], state.model.get_weights()[0])


def test_full_disk_while_saving_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  directory = str(tmp_path / "ckpt")
  state = tiny_state(directory)
  loop = train_loop.Loop("pretrain", total_steps=6, steps_per_epoch=6, images_per_step=4, learning_rate=lambda s: 0.1)
  original_save = state.manager.save

  def save(checkpoint_number):
    if checkpoint_number == 4:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return original_save(checkpoint_number=checkpoint_number)

  monkeypatch.setattr(state.manager, "save", save)
  weights_at_2 = {}
  record = lambda step: step == 2 and weights_at_2.setdefault("w", state.model.get_weights()[0].copy())
  with pytest.raises(UserError, match="No space left on device.*ckpt-2\\) is intact"):
    train_loop.run_loop(
      fake_steps(state, np.arange(6.0), record), None, state, loop, RUN, str(tmp_path), interactive=False
    )
  resumed = tiny_state(directory)
  assert int(resumed.step.numpy()) == 2
  np.testing.assert_array_equal(resumed.model.get_weights()[0], weights_at_2["w"])


def test_non_finite_loss_stops_without_saving(tmp_path):
  directory = str(tmp_path / "ckpt")
  state = tiny_state(directory)
  loop = train_loop.Loop("pretrain", total_steps=6, steps_per_epoch=6, images_per_step=4, learning_rate=lambda s: 0.1)
  losses = [1.0, 1.0, 1.0, float("nan"), 1.0, 1.0]
  with pytest.raises(UserError, match="non-finite at step 4"):
    train_loop.run_loop(fake_steps(state, losses), None, state, loop, RUN, str(tmp_path), interactive=False)
  assert checkpoint_steps(directory) == [2]


# --- Signals through the CLI ------------------------------------------------------------------------

ARGS = scriptrun.TINY + ["--config.pretrain.epochs=4", "--config.run.checkpoint_every=1000"]


def logged_steps(workdir):
  path = os.path.join(workdir, "pretrain_log.jsonl")
  return [r["step"] for r in train_loop.read_log(path, "step")] if os.path.exists(path) else []


@pytest.mark.slow
@pytest.mark.parametrize("number,name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")])
def test_script_saves_on_signal_and_the_rerun_continues_from_that_step(tmp_path, number, name):
  workdir = str(tmp_path / "run")
  log_path = str(tmp_path / "first.log")
  process = scriptrun.start("paws_train.py", *ARGS, f"--workdir={workdir}", log_path=log_path)
  deadline = time.time() + 300
  while time.time() < deadline and len(logged_steps(workdir)) < 3:
    assert process.poll() is None, scriptrun.read_text(log_path)[-2000:]
    time.sleep(0.2)
  process.send_signal(number)
  assert process.wait(timeout=120) == 128 + number
  output = scriptrun.read_text(log_path)
  stopped_at = logged_steps(workdir)[-1]
  assert 3 <= stopped_at < 40
  lines = [line for line in output.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in output, output[-2000:]
  assert f"{name} received: stopped at step {stopped_at} of 40" in lines[0]
  assert "re-run the same command to resume" in lines[0]
  assert checkpoint_steps(os.path.join(workdir, "checkpoints"))[-1] == stopped_at
  rerun = scriptrun.run("paws_train.py", *ARGS, f"--workdir={workdir}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"at step {stopped_at}" in rerun.stdout
  assert logged_steps(workdir) == list(range(1, 41))  # no step lost, none repeated
