"""utils/data/datasets.py and splits.py: CIFAR-10 reading and its safety checks, the downloader, digits, split files.

The downloader is only ever pointed at 127.0.0.1: a closed port and small HTTP servers started here.
"""

import contextlib
import hashlib
import http.server
import os
import pickle
import socket
import threading
import time
import urllib.error

import numpy as np
import pytest
from sklearn import datasets as sklearn_datasets
from sklearn import model_selection

from tests import fake_cifar, scriptrun
from utils.data import datasets, splits
from utils.errors import UserError


def _expected_image(global_index):
  planes = fake_cifar.row(global_index).reshape(3, 32, 32)
  return np.stack([planes[0], planes[1], planes[2]], axis=-1)


def _check_fake_cifar(train_images, train_labels, test_images, test_labels):
  assert train_images.shape == (20, 32, 32, 3) and train_images.dtype == np.uint8
  assert test_images.shape == (4, 32, 32, 3) and test_images.dtype == np.uint8
  assert train_labels.dtype == np.int64 and test_labels.dtype == np.int64
  # Pixel (y, x, channel) is row[channel * 1024 + y * 32 + x] for a CHW row.
  assert train_images[0, 0, 1, 0] == 1
  assert train_images[0, 0, 0, 1] == 85
  assert train_images[0, 2, 3, 2] == (2 * 32 + 3 + 2 * 85) % 256
  for index in range(20):  # Batch order: data_batch_1 holds 0..3, data_batch_5 holds 16..19.
    np.testing.assert_array_equal(train_images[index], _expected_image(index))
  np.testing.assert_array_equal(train_labels, [fake_cifar.label(index) for index in range(20)])
  np.testing.assert_array_equal(test_images[2], _expected_image(102))
  np.testing.assert_array_equal(test_labels, [fake_cifar.label(index) for index in range(100, 104)])


def test_cifar10_archive_round_trip(tmp_path):
  archive_path, md5 = fake_cifar.make_archive(str(tmp_path))
  _check_fake_cifar(*datasets.load_cifar10(os.path.dirname(archive_path), expected_md5=md5))


def test_cifar10_extracted_folder_and_folder_itself(tmp_path):
  folder = fake_cifar.make_folder(str(tmp_path))
  _check_fake_cifar(*datasets.load_cifar10(str(tmp_path)))
  _check_fake_cifar(*datasets.load_cifar10(folder))


def test_malicious_pickle_is_live(tmp_path):
  # Guards the two tests below: an ordinary unpickler does create the marker.
  marker = tmp_path / "marker"
  folder = fake_cifar.make_folder(str(tmp_path), malicious_marker=str(marker))
  with open(os.path.join(folder, "data_batch_1"), "rb") as file:
    pickle.load(file, encoding="bytes")
  assert marker.exists()


def test_cifar10_checksum_mismatch_never_unpickles(tmp_path):
  marker = tmp_path / "marker"
  archive_path, _ = fake_cifar.make_archive(str(tmp_path), malicious_marker=str(marker))
  with pytest.raises(UserError, match="checksum does not match") as error:
    datasets.load_cifar10(os.path.dirname(archive_path))
  assert archive_path in str(error.value)
  assert not marker.exists()


def test_cifar10_restricted_unpickler_refuses_other_globals(tmp_path):
  marker = tmp_path / "marker"
  folder = fake_cifar.make_folder(str(tmp_path), malicious_marker=str(marker))
  with pytest.raises(UserError, match="refused to unpickle global .*open") as error:
    datasets.load_cifar10(str(tmp_path))
  assert os.path.join(folder, "data_batch_1") in str(error.value)
  assert not marker.exists()


def test_cifar10_truncated_archive(tmp_path):
  archive_path, _ = fake_cifar.make_archive(str(tmp_path))
  with open(archive_path, "rb") as file:
    content = file.read()
  with open(archive_path, "wb") as file:
    file.write(content[: len(content) // 2])
  with pytest.raises(UserError, match="cifar-10-python.tar.gz"):
    datasets.load_cifar10(os.path.dirname(archive_path), expected_md5=fake_cifar.md5(archive_path))


def test_cifar10_missing_and_empty_dir(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    datasets.load_cifar10(str(tmp_path / "absent"))
  with pytest.raises(UserError, match="holds neither .*omit --data_dir"):
    datasets.load_cifar10(str(tmp_path))


def test_cifar10_missing_test_batch(tmp_path):
  folder = fake_cifar.make_folder(str(tmp_path), skip=("test_batch",))
  with pytest.raises(UserError, match="test_batch is missing") as error:
    datasets.load_cifar10(str(tmp_path))
  assert os.path.join(folder, "test_batch") in str(error.value)


def test_cifar10_bad_labels(tmp_path):
  folder = fake_cifar.make_folder(str(tmp_path))
  with open(os.path.join(folder, "data_batch_3"), "wb") as file:
    fake_cifar.Python2StylePickler(file, protocol=2).dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
  with pytest.raises(UserError, match="data_batch_3: labels outside 0..9"):
    datasets.load_cifar10(folder)


# --- Downloading (load_cifar10 without --data_dir) -------------------------------------------------


@contextlib.contextmanager
def local_server(respond, lifetime=30):
  """An HTTP server on 127.0.0.1 (a free port) answering every GET with respond(handler).

  Yields the archive's URL on it. Stopped on exit, and in any case after `lifetime` seconds.
  """

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # pylint: disable=invalid-name
      respond(self)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  server.handle_error = lambda request, address: None  # a client that gave up is expected here
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  stopper = threading.Timer(lifetime, server.shutdown)
  stopper.daemon = True
  stopper.start()
  try:
    yield f"http://127.0.0.1:{server.server_port}/{datasets.CIFAR10_ARCHIVE}"
  finally:
    stopper.cancel()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def serving(content, claimed_length=None, delay=0.0):
  """A respond() sending `content` with a Content-Length (claimed_length if given), after `delay` seconds."""

  def respond(handler):
    time.sleep(delay)
    handler.send_response(200)
    handler.send_header("Content-Type", "application/gzip")
    handler.send_header("Content-Length", str(claimed_length or len(content)))
    handler.end_headers()
    handler.wfile.write(content)
    handler.wfile.flush()  # then the handler returns and the connection closes (HTTP/1.0)

  return respond


def not_found(handler):
  handler.send_error(404, "Not Found")


def closed_port_url():
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  return f"http://127.0.0.1:{port}/{datasets.CIFAR10_ARCHIVE}"  # nothing listens there any more


@pytest.fixture
def fake_archive(tmp_path):
  """(bytes, md5) of a fake CIFAR-10 archive in the official format."""
  path, md5 = fake_cifar.make_archive(str(tmp_path / "source"))
  with open(path, "rb") as file:
    return file.read(), md5


def test_download_then_offline_from_the_cache(tmp_path, fake_archive):
  content, md5 = fake_archive
  cache = str(tmp_path / "cache")
  with local_server(serving(content)) as url:
    _check_fake_cifar(*datasets.load_cifar10(None, expected_md5=md5, url=url, cache_dir=cache))
  assert os.listdir(cache) == [datasets.CIFAR10_ARCHIVE]  # no temporary file left
  assert fake_cifar.md5(os.path.join(cache, datasets.CIFAR10_ARCHIVE)) == md5
  # The verified archive in the cache is used without the network.
  _check_fake_cifar(*datasets.load_cifar10(None, expected_md5=md5, url=closed_port_url(), cache_dir=cache))


def test_corrupt_cached_archive_is_downloaded_again(tmp_path, fake_archive):
  content, md5 = fake_archive
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / datasets.CIFAR10_ARCHIVE).write_bytes(content[: len(content) // 2])  # as a cut download leaves it
  (cache / (datasets.CIFAR10_ARCHIVE + ".x1.part")).write_bytes(b"left by a killed download")
  with local_server(serving(content)) as url:
    path = datasets.download_cifar10(url, str(cache), expected_md5=md5)
  assert path == str(cache / datasets.CIFAR10_ARCHIVE) and fake_cifar.md5(path) == md5


def test_keras_named_archive_in_the_cache_is_reused(tmp_path, fake_archive):
  content, md5 = fake_archive
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / datasets.KERAS_CIFAR10_ARCHIVE).write_bytes(content)
  assert datasets.download_cifar10(closed_port_url(), str(cache), expected_md5=md5) == str(
    cache / datasets.KERAS_CIFAR10_ARCHIVE
  )


def test_default_cache_follows_keras(monkeypatch, tmp_path):
  monkeypatch.delenv("KERAS_HOME", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert datasets.default_cache_dir() == os.path.join(str(tmp_path), ".keras", "datasets")
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "k"))
  assert datasets.default_cache_dir() == os.path.join(str(tmp_path / "k"), "datasets")


def resolution_fails(*args, **kwargs):
  raise urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))


@pytest.mark.parametrize(
  "case,reason",
  [
    ("closed_port", "(connection refused)"),
    ("http_404", "(HTTP 404 Not Found)"),
    ("interrupted", "(transfer interrupted after 1000 of 5000 bytes)"),
    ("wrong_content", "checksum"),
    ("no_dns", "cannot resolve the host name: Name or service not known; no network or no DNS?"),
    ("stalled", "(timed out)"),
  ],
)
def test_download_failures_are_one_line_errors_that_leave_nothing(case, reason, tmp_path, fake_archive, monkeypatch):
  content, md5 = fake_archive
  cache = tmp_path / "cache"
  respond = {
    "http_404": not_found,
    "interrupted": serving(content[:1000], claimed_length=5000),
    "wrong_content": serving(content[::-1]),
    "stalled": serving(content, delay=3.0),
  }.get(case)
  if case == "no_dns":
    monkeypatch.setattr(datasets.urllib.request, "urlopen", resolution_fails)
  with contextlib.ExitStack() as stack:
    url = stack.enter_context(local_server(respond)) if respond else closed_port_url()
    started = time.monotonic()
    with pytest.raises(UserError) as error:
      datasets.download_cifar10(url, str(cache), expected_md5=md5, timeout=0.5)
    assert time.monotonic() - started < 2.5  # the stalled server is given up on after the timeout
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"could not download CIFAR-10 from {url} ")
  assert reason in message
  assert f"put it in a folder DIR and pass --data_dir=DIR (or put it in {cache})" in message
  assert os.listdir(cache) == []  # a partial or wrong file is never kept, so never trusted later
  if case == "wrong_content":
    assert hashlib.md5(content[::-1]).hexdigest() in message


def test_unwritable_cache_is_a_download_error(tmp_path, fake_archive):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(UserError, match=r"could not download CIFAR-10 .*cannot write to .*--data_dir=DIR"):
    datasets.download_cifar10(closed_port_url(), str(blocker / "cache"), expected_md5=fake_archive[1])


def test_digits_matches_scaled_sklearn_images_and_split():
  train_images, train_labels, test_images, test_labels = datasets.load_digits(image_size=8)
  digits = sklearn_datasets.load_digits()
  train_indices, test_indices = model_selection.train_test_split(
    np.arange(len(digits.target)), test_size=0.25, stratify=digits.target, random_state=0
  )
  # Bilinear resizing to the native 8x8 is the identity, leaving only the 0..16 -> 0..255 scale.
  expected = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)
  np.testing.assert_array_equal(train_images[..., 1], expected[train_indices])
  np.testing.assert_array_equal(test_images[..., 0], expected[test_indices])
  np.testing.assert_array_equal(train_labels, digits.target[train_indices])
  np.testing.assert_array_equal(test_labels, digits.target[test_indices])


def test_digits_shapes_proportions_and_determinism():
  train_images, train_labels, test_images, test_labels = datasets.load_digits()
  assert train_images.shape == (1347, 16, 16, 3) and test_images.shape == (450, 16, 16, 3)
  assert train_images.dtype == np.uint8 and train_labels.dtype == np.int64
  assert train_images.max() == 255 and train_images.min() == 0
  np.testing.assert_array_equal(train_images[..., 0], train_images[..., 2])
  all_counts = np.bincount(sklearn_datasets.load_digits().target)
  train_counts, test_counts = np.bincount(train_labels), np.bincount(test_labels)
  np.testing.assert_array_equal(train_counts + test_counts, all_counts)
  # Stratified: each class's test share is within one image of 25 %.
  assert np.all(np.abs(test_counts - 0.25 * all_counts) <= 1)
  again = datasets.load_digits()
  np.testing.assert_array_equal(again[0], train_images)
  np.testing.assert_array_equal(again[3], test_labels)


def test_load_dataset_dispatch():
  assert datasets.load_dataset("digits")[0].shape == (1347, 16, 16, 3)
  with pytest.raises(UserError, match="cifar10, digits"):
    datasets.load_dataset("imagenet")


def test_select_labeled_indices():
  labels = np.repeat(np.arange(10), 50)[np.random.default_rng(0).permutation(500)]
  indices = splits.select_labeled_indices(labels, per_class=7, seed=3)
  assert indices.dtype == np.int64 and len(indices) == 70
  assert len(np.unique(indices)) == 70 and np.all(np.diff(indices) > 0)
  np.testing.assert_array_equal(np.bincount(labels[indices]), [7] * 10)
  np.testing.assert_array_equal(indices, splits.select_labeled_indices(labels, 7, seed=3))
  assert not np.array_equal(indices, splits.select_labeled_indices(labels, 7, seed=4))
  with pytest.raises(UserError, match="class 0 has only 50"):
    splits.select_labeled_indices(labels, per_class=51, seed=0)


def test_split_files_round_trip(tmp_path):
  run = tmp_path / "run"
  npy_path, txt_path = splits.write_split_files(str(run / "subset.npy"), str(run / "subset.txt"), [9, 2, 5])
  np.testing.assert_array_equal(np.load(npy_path), [2, 5, 9])
  assert scriptrun.read_text(txt_path) == "2\n5\n9\n"
  indices = splits.read_split_file(txt_path, num_train=10, expected_count=3)
  assert indices.dtype == np.int64
  np.testing.assert_array_equal(indices, [2, 5, 9])


def test_read_split_file_reference_format(tmp_path):
  path = tmp_path / "spc.4000_split.152.txt"
  path.write_text("  7\n\n3 \n1\n6\n")
  labels = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0])
  indices = splits.read_split_file(str(path), 10, labels=labels)
  np.testing.assert_array_equal(indices, [1, 3, 6, 7])


@pytest.mark.parametrize(
  "content, kwargs, message",
  [
    ("1\n2\nx\n", {}, "line 3: 'x' is not an integer"),
    ("1\n\n10\n", {}, "line 3: index 10 is outside"),
    ("-1\n", {}, "line 1: index -1 is outside"),
    ("4\n2\n4\n", {}, "line 3: index 4 repeats line 1"),
    ("1\n2\n", {"expected_count": 3}, "holds 2 indices but 3 are expected"),
    ("0\n1\n2\n", {"labels": np.array([0, 0, 1] + [1] * 7)}, r"unbalanced \(0: 2, 1: 1\)"),
  ],
)
def test_read_split_file_errors(tmp_path, content, kwargs, message):
  path = tmp_path / "split.txt"
  path.write_text(content)
  with pytest.raises(UserError, match=message) as error:
    splits.read_split_file(str(path), num_train=10, **kwargs)
  assert str(path) in str(error.value)


def test_read_split_file_missing(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    splits.read_split_file(str(tmp_path / "absent.txt"), num_train=10)
