"""Runs the entry scripts as a user would, in subprocesses, with tiny digits settings."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A smoke-sized digits run: 10 steps per epoch, a WRN-10-1 with small heads.
TINY = ["--config=config.py:digits", "--config.model.hidden_dim=32", "--config.model.projection_dim=32",
        "--config.pretrain.batch_size=128", "--config.pretrain.multicrop=2", "--config.pretrain.epochs=2",
        "--config.pretrain.warmup_epochs=1", "--config.finetune.epochs=3", "--config.run.log_every=1"]


def environment():
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  env.pop("TF_CONFIG", None)
  return env


def run(script, *args, timeout=600):
  """Runs `python script args...` from the repo root; returns the CompletedProcess."""
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=environment(),
                        capture_output=True, text=True, timeout=timeout)


def start(script, *args, log_path):
  """Starts a script in the background, output to log_path; returns the Popen."""
  log = open(log_path, "w")
  return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=environment(),
                          stdout=log, stderr=subprocess.STDOUT)


def error_line(result):
  """The one 'error: ...' line a failed run must end with."""
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  return lines[0]
