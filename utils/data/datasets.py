"""The in-memory datasets as uint8 arrays: CIFAR-10 (read, or downloaded and checked) and scikit-learn's digits.

Every loader returns `(train_images, train_labels, test_images, test_labels)`:
images uint8 [N, H, W, 3], labels int64 [N].
"""

import contextlib
import hashlib
import http.client
import os
import pickle
import socket
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib

from absl import logging
import numpy as np
from sklearn import datasets as sklearn_datasets
from sklearn import model_selection
import tensorflow as tf

from utils.errors import UserError

CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"


CIFAR10_FOLDER = "cifar-10-batches-py"


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


# Where load_cifar10(None) downloads the archive from (read at call time: tests point it at a local server).
CIFAR10_DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


# The same bytes under the name tf_keras' downloader gives them: reused if found in the cache.
KERAS_CIFAR10_ARCHIVE = "cifar-10-batches-py.tar.gz"


DOWNLOAD_TIMEOUT_SECONDS = 60  # per blocking socket operation, not for the whole transfer


# Read in this order so training indices match the official order the split files index into.
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{number}" for number in range(1, 6))


CIFAR10_TEST_BATCH = "test_batch"


# Loaded into memory here; "folder", "tfrecord" and "tfds" are streamed from files by utils/data/sources.py.
IN_MEMORY_DATASETS = ("cifar10", "digits")


DATASET_NAMES = IN_MEMORY_DATASETS + ("folder", "tfrecord", "tfds")


_numpy_core = getattr(np, "_core", None) or np.core


# The only globals an official CIFAR pickle refers to (numpy 1 and numpy 2 module spellings).
_ALLOWED_GLOBALS = {
  (module, name): getattr(_numpy_core.multiarray, name)
  for module in ("numpy.core.multiarray", "numpy._core.multiarray")
  for name in ("_reconstruct", "scalar")
}
_ALLOWED_GLOBALS[("numpy", "ndarray")] = np.ndarray
_ALLOWED_GLOBALS[("numpy", "dtype")] = np.dtype


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that only rebuilds numpy arrays, so a tampered batch cannot run code."""

  def __init__(self, file, source_name):
    super().__init__(file, encoding="bytes")  # The official pickles are Python 2 pickles.
    self.source_name = source_name

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED_GLOBALS:
      raise UserError(
        f"{self.source_name}: refused to unpickle global {module}.{name}, which a CIFAR-10 "
        f"batch never contains; replace the file with the official one from {CIFAR10_URL}"
      )
    return _ALLOWED_GLOBALS[(module, name)]


def _file_md5(path, chunk_size=1 << 20):
  digest = hashlib.md5()
  with tf.io.gfile.GFile(path, "rb") as file:
    for chunk in iter(lambda: file.read(chunk_size), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _parse_batch(file, source_name):
  """Unpickles one CIFAR batch from an open file; returns (images HWC uint8, labels int64)."""
  try:
    batch = _RestrictedUnpickler(file, source_name).load()
  except (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OSError,
    tf.errors.OpError,
    zlib.error,
    tarfile.TarError,
  ) as error:
    raise UserError(
      f"{source_name}: cannot read this CIFAR-10 batch ({error}); re-download {CIFAR10_ARCHIVE} from {CIFAR10_URL}"
    ) from None
  data = batch.get(b"data") if isinstance(batch, dict) else None
  labels = batch.get(b"labels") if isinstance(batch, dict) else None
  if (
    not isinstance(data, np.ndarray)
    or data.dtype != np.uint8
    or data.ndim != 2
    or data.shape[1] != 3 * 32 * 32
    or labels is None
    or len(labels) != len(data)
  ):
    raise UserError(
      f"{source_name}: not a CIFAR-10 batch (expected b'data' uint8 [N, 3072] and "
      f"N b'labels'); re-download {CIFAR10_ARCHIVE} from {CIFAR10_URL}"
    )
  labels = np.asarray(labels, dtype=np.int64)
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise UserError(f"{source_name}: labels outside 0..9; re-download {CIFAR10_ARCHIVE} from {CIFAR10_URL}")
  # Each row is 3 planes of 32x32 (CHW); models here take HWC.
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _read_batches_from_archive(archive_path):
  batches = {}
  try:
    # Members are read in archive order, so the gzip stream is never rewound on a remote file.
    with tf.io.gfile.GFile(archive_path, "rb") as file, tarfile.open(fileobj=file, mode="r:gz") as archive:
      for batch_name in CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,):
        member_name = f"{CIFAR10_FOLDER}/{batch_name}"
        try:
          member = archive.extractfile(member_name)
        except KeyError:
          member = None
        if member is None:
          raise UserError(
            f"{archive_path}: member {member_name} is missing; re-download {CIFAR10_ARCHIVE} from {CIFAR10_URL}"
          )
        batches[batch_name] = _parse_batch(member, f"{archive_path}:{member_name}")
  except (tarfile.TarError, EOFError, zlib.error, OSError, tf.errors.OpError) as error:
    raise UserError(
      f"{archive_path}: truncated or unreadable archive ({error}); re-download {CIFAR10_ARCHIVE} from {CIFAR10_URL}"
    ) from None
  return batches


def _read_batches_from_folder(folder):
  batches = {}
  for batch_name in CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,):
    path = os.path.join(folder, batch_name)
    if not _is_file(path):
      raise UserError(
        f"{path} is missing; re-extract {CIFAR10_ARCHIVE} (from {CIFAR10_URL}) into {os.path.dirname(folder)}"
      )
    with tf.io.gfile.GFile(path, "rb") as file:
      batches[batch_name] = _parse_batch(file, path)
  return batches


def _is_file(path):
  """A file (not a folder) on any file system tf.io.gfile knows (local, gs://, ...)."""
  return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)


def default_cache_dir() -> str:
  """~/.keras/datasets, where Keras keeps its downloads ($KERAS_HOME/datasets if that is set)."""
  return os.path.join(os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras"), "datasets")


def download_cifar10(
  url: str | None = None,
  cache_dir: str | None = None,
  expected_md5: str = CIFAR10_MD5,
  timeout: float = DOWNLOAD_TIMEOUT_SECONDS,
) -> str:
  """Returns the path of the official CIFAR-10 archive in the cache, downloading it if it is not there.

  An archive in the cache counts only if its MD5 matches: a partial or corrupt one is deleted and
  downloaded again. The download goes to a temporary file in the cache that is renamed into place only
  once complete and hash-checked, so an interrupted or damaged transfer never looks like an archive.

  Args:
    url: where to download from; None = CIFAR10_DOWNLOAD_URL.
    cache_dir: folder of the archive; None = default_cache_dir().
    expected_md5: MD5 the archive must have.
    timeout: seconds any one network operation may block.
  Returns:
    Path of the verified archive.
  Raises:
    UserError: the download failed (no network, name resolution, HTTP error, interrupted transfer,
      checksum mismatch, unwritable cache); the message says how to run offline with --data_dir.
  """
  url = url or CIFAR10_DOWNLOAD_URL
  cache_dir = cache_dir or default_cache_dir()
  archive_path = os.path.join(cache_dir, CIFAR10_ARCHIVE)
  for name in (CIFAR10_ARCHIVE, KERAS_CIFAR10_ARCHIVE):
    path = os.path.join(cache_dir, name)
    if os.path.isfile(path):
      if _file_md5(path) == expected_md5:
        return path
      if name == CIFAR10_ARCHIVE:
        logging.info(f"{path} is incomplete or corrupted (checksum mismatch); deleting it and downloading again")
        _remove_quietly(path)

  def failure(reason):
    return UserError(
      f"could not download CIFAR-10 from {url} ({reason}); to run offline, get {CIFAR10_ARCHIVE} "
      f"(from {CIFAR10_URL}) on a machine with network, put it in a folder DIR and pass --data_dir=DIR "
      f"(or put it in {cache_dir})"
    )

  try:
    os.makedirs(cache_dir, exist_ok=True)
    descriptor, partial_path = tempfile.mkstemp(prefix=CIFAR10_ARCHIVE + ".", suffix=".part", dir=cache_dir)
  except OSError as error:
    raise failure(f"cannot write to {cache_dir}: {error.strerror}") from None
  logging.info(f"downloading CIFAR-10 from {url} to {archive_path}")
  try:
    with os.fdopen(descriptor, "wb") as file:
      received, expected = _fetch(url, file, timeout)
    if expected is not None and received != expected:
      raise failure(f"transfer interrupted after {received} of {expected} bytes")
    md5 = _file_md5(partial_path)
    if md5 != expected_md5:
      raise failure(
        f"the downloaded file's checksum {md5} is not the official archive's {expected_md5}; it was deleted"
      )
    os.replace(partial_path, archive_path)
  except urllib.error.HTTPError as error:
    raise failure(f"HTTP {error.code} {error.reason}") from None
  except urllib.error.URLError as error:
    raise failure(_network_reason(error.reason)) from None
  except (OSError, http.client.HTTPException) as error:
    raise failure(_network_reason(error)) from None
  finally:
    _remove_quietly(partial_path)
  return archive_path


def _fetch(url, file, timeout, chunk_size=1 << 20):
  """Copies the response body of `url` into `file`; returns (bytes received, Content-Length or None)."""
  with urllib.request.urlopen(url, timeout=timeout) as response:
    length = response.headers.get("Content-Length")
    received = 0
    # read(n) returns b"" when the peer closes early, without an error: the byte count tells.
    for chunk in iter(lambda: response.read(chunk_size), b""):
      file.write(chunk)
      received += len(chunk)
  return received, int(length) if length and length.isdigit() else None


def _network_reason(error):
  """Words a socket-level failure for the message."""
  if isinstance(error, socket.gaierror):
    return f"cannot resolve the host name: {error.strerror or error}; no network or no DNS?"
  if isinstance(error, ConnectionRefusedError):
    return "connection refused"
  if isinstance(error, (socket.timeout, TimeoutError)):
    return "timed out"
  if isinstance(error, http.client.IncompleteRead):
    return f"transfer interrupted after {len(error.partial)} bytes"
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return str(error) or type(error).__name__


def _remove_quietly(path):
  with contextlib.suppress(OSError):
    os.remove(path)


def _assemble(batches):
  """(train_images, train_labels, test_images, test_labels) from the six parsed batches, in official order."""
  train_images = np.concatenate([batches[name][0] for name in CIFAR10_TRAIN_BATCHES])
  train_labels = np.concatenate([batches[name][1] for name in CIFAR10_TRAIN_BATCHES])
  test_images, test_labels = batches[CIFAR10_TEST_BATCH]
  return train_images, train_labels, test_images, test_labels


def load_cifar10(
  data_dir: str | None = None, expected_md5: str = CIFAR10_MD5, url: str | None = None, cache_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads CIFAR-10 (METHOD.md section 4).

  Args:
    data_dir: None to download the official archive (download_cifar10, into cache_dir); else a
      directory holding `cifar-10-python.tar.gz` or the extracted `cifar-10-batches-py/` folder, or
      that folder itself, on any file system tf.io.gfile knows (local, gs://, ...).
    expected_md5: MD5 the archive must have before it is opened.
    url, cache_dir: of the download when data_dir is None (see download_cifar10).
  Returns:
    (train_images, train_labels, test_images, test_labels); images uint8 [N, 32, 32, 3] in the
    official order, labels int64 [N].
  """
  if data_dir is None:
    return _assemble(_read_batches_from_archive(download_cifar10(url, cache_dir, expected_md5)))

  how_to_get = f"download {CIFAR10_ARCHIVE} from {CIFAR10_URL} into {data_dir}, or omit --data_dir to download it"
  if not tf.io.gfile.isdir(data_dir):
    raise UserError(f"data directory {data_dir} does not exist; {how_to_get}")
  archive_path = os.path.join(data_dir, CIFAR10_ARCHIVE)
  extracted_folder = os.path.join(data_dir, CIFAR10_FOLDER)
  if _is_file(archive_path):
    # Checked before opening: unpickling a tampered archive could run arbitrary code.
    if _file_md5(archive_path) != expected_md5:
      raise UserError(
        f"{archive_path}: checksum does not match the official archive (truncated, "
        f"corrupted or another file; it was not opened); re-download it from {CIFAR10_URL}"
      )
    batches = _read_batches_from_archive(archive_path)
  elif tf.io.gfile.isdir(extracted_folder):
    batches = _read_batches_from_folder(extracted_folder)
  elif os.path.basename(os.path.normpath(data_dir)) == CIFAR10_FOLDER or any(
    tf.io.gfile.exists(os.path.join(data_dir, name)) for name in CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,)
  ):
    batches = _read_batches_from_folder(data_dir)
  else:
    raise UserError(f"{data_dir} holds neither {CIFAR10_ARCHIVE} nor {CIFAR10_FOLDER}/; {how_to_get}")

  return _assemble(batches)


def load_digits(
  test_fraction: float = 0.25, split_seed: int = 0, image_size: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads scikit-learn's bundled 8x8 digits as a tiny offline stand-in for CIFAR-10.

  Args:
    test_fraction: fraction of the 1797 images held out, stratified by class.
    split_seed: seed of the fixed train/test split.
    image_size: side the 8x8 images are bilinearly resized to.
  Returns:
    (train_images, train_labels, test_images, test_labels); images uint8
    [N, image_size, image_size, 3], labels int64 [N].
  """
  digits = sklearn_datasets.load_digits()
  images = digits.images.astype(np.float32) * (255.0 / 16.0)  # Pixel values are 0..16.
  labels = digits.target.astype(np.int64)
  resized = tf.image.resize(images[..., None], (image_size, image_size), method="bilinear")
  images = np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)
  images = np.repeat(images, 3, axis=-1)
  train_images, test_images, train_labels, test_labels = model_selection.train_test_split(
    images, labels, test_size=test_fraction, stratify=labels, random_state=split_seed
  )
  return train_images, train_labels, test_images, test_labels


def load_dataset(name: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads "cifar10" or "digits" (which ignores data_dir); returns the 4-tuple.

  "folder", "tfrecord" and "tfds" data is never loaded whole: utils.sources.open_source streams it.
  """
  if name == "cifar10":
    return load_cifar10(data_dir)
  if name == "digits":
    return load_digits()
  if name in DATASET_NAMES:
    raise UserError(
      f"data.dataset={name} is streamed from its files, not loaded into memory; use utils.sources.open_source"
    )
  raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
