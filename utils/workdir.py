"""The workdir: the name of every artefact in it; created, checked writable and locked; the saved-config check;
per-worker folders in a cluster.

  WORKDIR/config.json              resolved config of pre-training (fine-tuning: WORKDIR/finetuned/config.json)
  WORKDIR/labeled_indices.{txt,npy} the labeled subset; labeled_files.txt names its images (folder, tfrecord)
  WORKDIR/checkpoints/             pre-training checkpoints (fine-tuning: WORKDIR/finetuned/checkpoints/)
  WORKDIR/encoder/                 the pre-trained encoder (fine-tuned: WORKDIR/finetuned/)
  WORKDIR/{pretrain,finetune}_log.jsonl, tensorboard/, *_loss.png   metrics and loss curves
  WORKDIR/eval.json, confusion_matrix.png, pca_projection.png      nn_eval.py's results
  WORKDIR/workers/<task>/          another worker's own folder in a cluster (worker_directory)
"""

import atexit
import dataclasses
import fcntl
import json
import os
import re
import socket
import sys
import uuid

from ml_collections import ConfigDict
import tensorflow as tf

from utils import devices, fileio
from utils.errors import UserError


@dataclasses.dataclass(frozen=True)
class Workdir:
  """A run folder and the path of every artefact the scripts write into it (module docstring)."""

  root: str

  def path(self, name: str) -> str:
    return os.path.join(self.root, name)

  @property
  def config(self) -> str:
    return self.path("config.json")

  @property
  def labeled_indices(self) -> str:
    return self.path("labeled_indices.txt")

  @property
  def labeled_indices_npy(self) -> str:
    return self.path("labeled_indices.npy")

  @property
  def labeled_files(self) -> str:
    return self.path("labeled_files.txt")

  @property
  def checkpoints(self) -> str:
    return self.path("checkpoints")

  @property
  def encoder(self) -> str:
    return self.path("encoder")

  @property
  def finetuned(self) -> "Workdir":
    """Fine-tuning's own folder: its config, checkpoints, log and the fine-tuned model."""
    return Workdir(self.path("finetuned"))

  @property
  def eval_json(self) -> str:
    return self.path("eval.json")

  @property
  def confusion_matrix(self) -> str:
    return self.path("confusion_matrix.png")

  @property
  def pca_projection(self) -> str:
    return self.path("pca_projection.png")

  def metrics_log(self, stage: str) -> str:
    return self.path(f"{stage}_log.jsonl")

  def tensorboard(self, stage: str) -> str:
    return os.path.join(self.root, "tensorboard", stage)

  def loss_plot(self, stage: str) -> str:
    return self.path(f"{stage}_loss.png")

  def worker(self) -> "Workdir":
    """This process's own folder (worker_directory): the workdir itself on the chief."""
    return Workdir(worker_directory(self.root))


def worker_directory(directory: str) -> str:
  """Where this process keeps what every worker must write: `directory` on the chief, else
  `directory/workers/<type><index>`.

  With MultiWorkerMirroredStrategy every worker must save checkpoints and the encoder (reading the
  BatchNorm statistics is a collective); other workers keep theirs, and their copy of the labeled subset,
  there, so that each can resume and fine-tune on its own whether or not the workdir is shared (gs://).
  """
  if devices.is_chief():
    return directory
  kind, index = devices.cluster_task()
  return os.path.join(directory, "workers", f"{kind}{index}")


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir, checks it is writable and locks it (lock_workdir) before any work starts.

  Any file system tf.io.gfile knows works (local, gs://, ...): every run output goes through it. In a
  cluster only the chief locks it (the other workers share it and write to their worker_directory).
  """
  if not workdir:
    raise UserError("--workdir is required: the folder where checkpoints, logs and results go")
  try:
    tf.io.gfile.makedirs(workdir)
    # A name of its own: the workers of a cluster probe the shared workdir at the same time.
    probe = os.path.join(workdir, f".write_test-{uuid.uuid4().hex}")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as error:
    raise UserError(
      f"workdir {workdir} is not writable ({_reason(error)}); choose another --workdir or fix its permissions"
    ) from None
  if devices.is_chief():
    lock_workdir(workdir)
  return workdir


def _reason(error):
  """The short cause of a failed file operation: the OS's words, or the first line of TensorFlow's message."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return str(getattr(error, "message", error)).strip().splitlines()[0][:200]


def check_config(config: ConfigDict, path: str, sections: tuple[str, ...], force: bool = False) -> dict:
  """Saves the resolved config to `path`, or checks it against the saved one.

  Only the listed config sections are compared: they define what the run in
  this workdir computes, so resuming with other values would silently mix two
  experiments. `force` overwrites the saved config instead.
  """
  current = fileio.config_to_dict(config)
  if tf.io.gfile.exists(path) and not force:
    with tf.io.gfile.GFile(path) as f:
      saved = json.load(f)
    changed = [
      f"{section}.{key}"
      for section in sections
      for key in sorted(set(saved.get(section, {})) | set(current.get(section, {})))
      if saved.get(section, {}).get(key) != current.get(section, {}).get(key)
    ]
    if changed:
      raise UserError(
        f"{path} was written with other settings ({', '.join(changed[:5])}); "
        "use a new --workdir, restore those values, or pass --force to overwrite"
      )
  else:
    fileio.write_json(path, current)
  return current


LOCK_FILE = ".lock"


_LOCKS = {}  # real path of each workdir this process holds -> its open lock file (None: not lockable, warned)


def lock_workdir(workdir: str):
  """Locks `workdir` for the rest of this process, or raises UserError naming the process that holds it.

  An exclusive fcntl.flock on WORKDIR/.lock: the kernel releases it when the holder exits, also when it
  is killed, so a lock left by a killed run never blocks the next one. The file holds the holder's pid,
  host and command for the message; a normal exit removes it. A folder inside a workdir this process
  already holds is covered by that lock (fine_tune.py writes WORKDIR/finetuned).

  flock needs a local file system: a workdir on another one (gs://, any tf.io.gfile scheme but file://)
  runs unlocked, with a one-line warning.

  Returns:
    The open lock file; the lock lasts as long as it stays open (this module keeps a reference).
    None for an unlocked workdir.
  """
  local = _local_path(workdir)
  path = os.path.realpath(local) if local is not None else workdir.rstrip("/")
  for locked, handle in _LOCKS.items():
    if path == locked or path.startswith(locked + os.sep):
      return handle
  if local is None:
    print(
      f"warning: workdir {workdir} is not on a local file system and cannot be locked; make sure no other run uses it",
      file=sys.stderr,
    )
    _LOCKS[path] = None  # warned once; folders inside it (WORKDIR/finetuned) are covered
    return None
  lock_path = os.path.join(path, LOCK_FILE)
  while True:
    try:
      handle = open(lock_path, "a+")  # noqa: SIM115 (held open for the process lifetime: closing releases the lock)
    except OSError as error:
      raise UserError(
        f"workdir {workdir} is not writable ({error.strerror}); choose another --workdir or fix its permissions"
      ) from None
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = _describe_holder(handle.read())
      handle.close()
      raise UserError(
        f"workdir {workdir} is in use by {holder}; wait for it to end or stop it, or use another --workdir"
      ) from None
    except OSError as error:  # a file system without flock (some network mounts): run unlocked
      print(
        f"warning: cannot lock workdir {workdir} ({error.strerror}); make sure no other run uses it", file=sys.stderr
      )
      handle.close()
      return None
    # A holder that just exited may have removed the file after we opened it: hold the file at the path.
    if _same_file(handle, lock_path):
      break
    handle.close()
  handle.seek(0)
  handle.truncate()
  json.dump(
    {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300],
    },
    handle,
  )
  handle.flush()
  _LOCKS[path] = handle
  atexit.register(_release_lock, lock_path, handle)
  return handle


def _local_path(path):
  """The local path behind `path` ("file://" stripped), or None for another file system (gs://, ram://, ...)."""
  scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", path)
  if scheme is None:
    return path
  return path[len(scheme.group(0)) :] if scheme.group(1).lower() == "file" else None


def _same_file(handle, path):
  try:
    return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
  except FileNotFoundError:
    return False


def _describe_holder(text):
  try:
    holder = json.loads(text)
    return f"process {holder['pid']} on {holder['host']} ({holder['command']})"
  except (ValueError, KeyError, TypeError):  # the holder has not written its details yet
    return "another process"


def _release_lock(lock_path, handle):
  """Removes the lock file while still holding it (a process that opened it meanwhile retries), then unlocks."""
  try:
    if _same_file(handle, lock_path):
      os.remove(lock_path)
  except OSError:
    pass  # left behind, it only holds a stale pid: the next run takes the lock all the same
  handle.close()
