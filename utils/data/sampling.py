"""Which images every training step reads, and how its batches are shared between replicas (METHOD.md section 4).

One index plan per stage, built once by the script from the labeled subset, the stage's config section, the
seed and the number of replicas, and given to the input pipeline (in-memory or streamed) and to
`Source.stream_errors`:

  PawsPlan        PAWS pre-training: unlabeled batches (a permutation per epoch) and class-stratified supports.
  SuncetPlan      SuNCEt fine-tuning: class-stratified supports only.
  ClassifierPlan  classifier fine-tuning: batches of the labeled subset (a permutation per epoch) and their labels.

Every plan holds the stage's `Geometry` (rows of the step's batch and of its support batch, over all replicas
and on each); `pretrain_geometry`, `suncet_geometry` and `classifier_geometry` give it without labels, for the
train steps, which need only sizes. All indices are drawn in NumPy from seeds that depend only on the step, so a
stream restarted at step s is exactly the stream that was cut at s; no iterator state needs checkpointing.

Every pipeline feeds replicas (docs/running.md, Input to the replicas): given a `Replicas`, it emits for each step one
batch per replica it serves, in turn, each holding only that replica's `Rows` of the global batch, with the
random draws those rows have in the global batch. tf.distribute's distribute_datasets_from_function hands
consecutive elements to a worker's devices in turn and prefetches them there (`distribute`), so no device
receives, and no worker builds, more than its own share.
"""

from collections.abc import Callable, Iterator, Sequence
import contextlib
import contextvars
import dataclasses
import functools
import itertools
from typing import NamedTuple

from ml_collections import ConfigDict
import numpy as np
import tensorflow as tf

from utils.errors import UserError


class Replicas(NamedTuple):
  """The replicas one input pipeline feeds.

  ids: their replica ids (replica_id_in_sync_group), in the order the pipeline emits their batches;
  total: the number of replicas in sync (all workers). The default is a single device.
  """

  ids: tuple = (0,)
  total: int = 1


ONE_DEVICE = Replicas()


class Rows(NamedTuple):
  """Rows start .. start + count - 1 of a batch of `total` rows: one replica's share of a global batch."""

  start: int
  count: int
  total: int

  def take(self, batch):
    """These rows of `batch` (an array or tensor of the whole batch's rows)."""
    return batch[self.start : self.start + self.count]


def replicas_for(strategy: tf.distribute.Strategy, input_context: tf.distribute.InputContext) -> Replicas:
  """The Replicas of one worker's input pipeline under distribute_datasets_from_function.

  Worker w (input pipeline w) of a strategy with L devices per worker runs replicas w*L .. w*L + L - 1,
  and tf.distribute gives its devices consecutive elements of its dataset in turn.
  """
  local = strategy.num_replicas_in_sync // input_context.num_input_pipelines
  first = input_context.input_pipeline_id * local
  return Replicas(tuple(range(first, first + local)), strategy.num_replicas_in_sync)


def distribute(strategy: tf.distribute.Strategy, make_dataset: Callable[[Replicas], tf.data.Dataset]):
  """The distributed dataset of make_dataset(replicas): each worker builds only its replicas' batches.

  distribute_datasets_from_function prefetches each batch to its device (fetch-to-device is on by default),
  so the host-to-device copy is off the step's critical path.
  """
  return strategy.distribute_datasets_from_function(
    lambda input_context: make_dataset(replicas_for(strategy, input_context))
  )


def round_robin(replica_dataset: Callable[[int], tf.data.Dataset], replicas: Replicas) -> tf.data.Dataset:
  """replica_dataset(replica id) for each of replicas.ids, taken in turn: step 0 of each, then step 1, ..."""
  datasets = [replica_dataset(replica) for replica in replicas.ids]
  if len(datasets) == 1:
    return datasets[0]
  choice = tf.data.Dataset.range(len(datasets)).repeat()
  return tf.data.Dataset.choose_from_datasets(datasets, choice)


# --- Index sources ------------------------------------------------------------------------------------------

# (stop, rows) while indices_in_graph is active, else None.
_IN_GRAPH = contextvars.ContextVar("indices_in_graph", default=None)


@contextlib.contextmanager
def indices_in_graph(stop: int, rows: int):
  """While active, index_dataset holds the indices of the steps before `stop` as constants, sharded by step.

  For a dataset sent to tf.data service workers (utils/data/service.py), whose graph cannot call back into
  this process's Python: the pipelines build the same maps on the same indices. rows: the source's rows,
  padding rows included (TensorFlow refuses a hint-sharded source of fewer rows than workers); at least
  the steps.
  """
  token = _IN_GRAPH.set((stop, rows))
  try:
    yield
  finally:
    _IN_GRAPH.reset(token)


def padded_steps(first: int, stop: int, rows: int) -> tf.data.Dataset:
  """Steps first .. stop - 1 as index_dataset shards them under indices_in_graph(stop, rows): this worker's."""
  hint = tf.data.experimental.SHARD_HINT
  return tf.data.Dataset.range(first, first + rows).shard(hint, hint).filter(lambda step: step < stop)


def index_dataset(steps: Callable[[], Iterator[tuple]], signature: tuple) -> tf.data.Dataset:
  """A training pipeline's index source: the tuples (step, arrays...) that steps() yields, one per step.

  Normally drawn by NumPy as the pipeline runs (Dataset.from_generator), so the plan of a long run never sits
  in memory. Under indices_in_graph(stop, rows): the tuples of the steps before `stop`, stacked into
  constants of the graph, with a tf.data service shard hint: worker i of W reads rows i, i + W, ... of them
  (ShardingPolicy.HINT; padding rows are dropped after the hint, as padded_steps does), each step whole, so
  the zipped index sources of one pipeline stay aligned.
  """
  in_graph = _IN_GRAPH.get()
  if in_graph is None:
    return tf.data.Dataset.from_generator(steps, output_signature=signature)
  stop, rows = in_graph
  drawn = list(itertools.takewhile(lambda row: row[0] < stop, steps()))
  real = len(drawn)
  drawn += [drawn[-1]] * (rows - real)  # padding, dropped before anything is built from it
  columns = tuple(
    np.array([row[i] for row in drawn], spec.dtype.as_numpy_dtype).reshape([rows, *spec.shape])
    for i, spec in enumerate(signature)
  )
  hint = tf.data.experimental.SHARD_HINT
  dataset = tf.data.Dataset.from_tensor_slices((np.arange(rows), columns)).shard(hint, hint)
  return dataset.filter(lambda row, _: row < real).map(lambda _, columns: columns)


# --- Batch geometry -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
  """The rows of one stage's batches in a step, over all replicas; each replica holds 1 / replicas of them.

  Attributes:
    replicas: replicas in sync.
    batch: rows of the step's image batch (PAWS: unlabeled images; classifier: labeled images; SuNCEt: 0).
    support: rows of the step's class-stratified support batch (PAWS, SuNCEt; classifier: 0).
  """

  replicas: int
  batch: int
  support: int

  @property
  def local_batch(self) -> int:
    """Rows of the image batch on one replica."""
    return self.batch // self.replicas

  @property
  def local_support(self) -> int:
    """Rows of the support batch on one replica."""
    return self.support // self.replicas

  def batch_rows(self, replica: int) -> Rows:
    """Replica `replica`'s rows of the image batch."""
    return Rows(replica * self.local_batch, self.local_batch, self.batch)

  def support_rows(self, replica: int) -> Rows:
    """Replica `replica`'s rows of the support batch."""
    return Rows(replica * self.local_support, self.local_support, self.support)


def _support_rows(classes_per_batch, images_per_class, num_replicas, unique_classes, section):
  """Rows of the support batch, K * images_per_class, after checking that the replicas can share them.

  Raises UserError when the batch cannot be shared evenly: its K * images_per_class rows by the replicas,
  or with unique classes (each replica its own K classes) images_per_class by the replicas.
  section: the config section the sizes come from ("pretrain."), for the message.
  """
  if unique_classes and images_per_class % num_replicas:
    raise UserError(
      f"{section}images_per_class={images_per_class} must divide by the {num_replicas} replicas with "
      "unique classes per replica (each replica draws images_per_class / replicas images of its classes)"
    )
  rows = classes_per_batch * images_per_class
  if rows % num_replicas:
    raise UserError(
      f"the {rows} support images per step ({section}classes_per_batch={classes_per_batch} x "
      f"images_per_class={images_per_class}) must divide by the {num_replicas} replicas; change images_per_class"
    )
  return rows


def _batch_rows(batch_size, num_replicas, section):
  if batch_size % num_replicas:
    raise UserError(f"{section}batch_size={batch_size} must divide by the {num_replicas} replicas")
  return batch_size


def pretrain_geometry(pretrain: ConfigDict, num_replicas: int) -> Geometry:
  """PAWS pre-training's Geometry from the config's `pretrain` section (batch_size, classes_per_batch,
  images_per_class, unique_classes_per_replica, sizes over all replicas); UserError if they do not share."""
  p = pretrain
  return Geometry(
    num_replicas,
    _batch_rows(p.batch_size, num_replicas, "pretrain."),
    _support_rows(p.classes_per_batch, p.images_per_class, num_replicas, p.unique_classes_per_replica, "pretrain."),
  )


def suncet_geometry(finetune: ConfigDict, num_replicas: int) -> Geometry:
  """SuNCEt fine-tuning's Geometry from the config's `finetune` section (classes_per_batch, images_per_class)."""
  f = finetune
  return Geometry(
    num_replicas, 0, _support_rows(f.classes_per_batch, f.images_per_class, num_replicas, False, "finetune.")
  )


def classifier_geometry(finetune: ConfigDict, num_replicas: int) -> Geometry:
  """Classifier fine-tuning's Geometry from the config's `finetune` section (batch_size)."""
  return Geometry(num_replicas, _batch_rows(finetune.batch_size, num_replicas, "finetune."), 0)


# --- Index draws ---------------------------------------------------------------------------------------------


def check_pretrain_sizes(
  pretrain: ConfigDict, labeled_per_class: int, num_train: int, num_classes: int, num_replicas: int
) -> None:
  """Raises UserError when pre-training's batches do not fit the data or the replicas, before anything runs.

  The checks PawsPlan and its SupportSampler make too, but stated in the config's terms (paws_train.py runs
  them before it writes the labeled subset; data.labeled_per_class = 0 leaves the per-class count to the
  split file).
  """
  p = pretrain
  if p.batch_size > num_train:
    raise UserError(f"pretrain.batch_size={p.batch_size} is larger than the {num_train} training images; lower it")
  if p.classes_per_batch > num_classes:
    raise UserError(
      f"pretrain.classes_per_batch={p.classes_per_batch} but the data has {num_classes} classes; lower it"
    )
  # Support images of one class in a step: on each replica with unique classes, else over all replicas.
  per_class = p.images_per_class // num_replicas if p.unique_classes_per_replica else p.images_per_class
  if labeled_per_class and per_class > labeled_per_class:
    raise UserError(
      f"pretrain.images_per_class={p.images_per_class} needs {per_class} labeled images per class but "
      f"data.labeled_per_class={labeled_per_class}; lower it or label more images"
    )
  pretrain_geometry(p, num_replicas)  # the unlabeled and support batches divide by the replicas
  if p.unique_classes_per_replica and p.classes_per_batch * num_replicas > num_classes:
    raise UserError(
      f"pretrain.unique_classes_per_replica: {num_replicas} replicas x classes_per_batch={p.classes_per_batch} "
      f"different classes, but the data has {num_classes}; lower classes_per_batch or turn it off"
    )


class SupportSampler:
  """Class-stratified index batches for the support set (METHOD.md section 4).

  Each batch holds `classes_per_batch` classes x `images_per_class` images,
  laid out interleaved by class (position i has the (i mod K)-th chosen
  class). As the reference does with all classes in every batch (CIFAR-10),
  every batch is drawn afresh: its classes are the first `classes_per_batch`
  of a new permutation of the classes, and each of them gives the first
  `images_per_class` images of a new permutation of its labeled images. So no
  image appears twice within a batch, and batches are independent of each
  other (an image is in each batch with probability images_per_class / class
  size, whatever came before). Batch `step` is a function of (seed, step)
  only: a stream resumed at any step needs no replay.

  With R replicas the batch is cut into R consecutive blocks of
  Geometry.local_support rows, one per replica. Without unique classes these
  are consecutive rows of the one-device batch (any images_per_class works as
  long as the K * images_per_class rows divide by R; a block's classes then
  follow from its rows' positions, losses.support_labels); with
  `unique_classes` (the reference's ImageNet setting), replica r gets
  images_per_class / R images of each of classes r*K .. r*K + K - 1 of the
  permutation, so the R replicas support R*K different classes.
  """

  # A trailing non-zero word keeps these generators apart from unlabeled_indices'
  # default_rng([seed, epoch]): numpy's SeedSequence ignores trailing zero words.
  STREAM = 1

  def __init__(
    self,
    labels: Sequence[int],
    classes_per_batch: int,
    images_per_class: int,
    seed: int,
    num_replicas: int = 1,
    unique_classes: bool = False,
  ):
    _support_rows(classes_per_batch, images_per_class, num_replicas, unique_classes, "")
    labels = np.asarray(labels)
    self.classes = np.unique(labels)
    num_classes = classes_per_batch * (num_replicas if unique_classes else 1)
    if num_classes > len(self.classes):
      per_replica = f" x {num_replicas} replicas (unique_classes_per_replica)" if unique_classes else ""
      raise UserError(
        f"classes_per_batch={classes_per_batch}{per_replica} but the labeled set has only "
        f"{len(self.classes)} classes; lower classes_per_batch"
      )
    self.members = [np.flatnonzero(labels == c) for c in self.classes]
    smallest = min(len(m) for m in self.members)
    per_class = images_per_class // num_replicas if unique_classes else images_per_class
    if per_class > smallest:
      raise UserError(
        f"images_per_class={images_per_class} support images per class but a class has only "
        f"{smallest} labeled images; lower images_per_class or label more images per class"
      )
    self.num_classes = num_classes
    self.per_class = per_class
    self.num_replicas = num_replicas
    self.unique_classes = unique_classes
    self.seed = seed

  def batch(self, step: int) -> np.ndarray:
    """The int64 positions (in `labels`) of batch `step`, interleaved by class; replica r's are rows
    r*n .. r*n + n - 1."""
    rng = np.random.default_rng([self.seed, step, self.STREAM])
    chosen = rng.permutation(len(self.classes))[: self.num_classes]
    columns = [rng.permutation(self.members[c])[: self.per_class] for c in chosen]
    batch = np.stack(columns, axis=1)  # [per_class, num_classes]
    if self.unique_classes:  # replica r's block: its K columns
      batch = batch.reshape(self.per_class, self.num_replicas, -1).transpose(1, 0, 2)
    return batch.reshape(-1).astype(np.int64)


def unlabeled_indices(num_images: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of the unlabeled batch at `step`: a fresh permutation per epoch, last partial batch dropped."""
  steps_per_epoch = num_images // batch_size
  epoch, position = divmod(step, steps_per_epoch)
  return _epoch_order(num_images, seed, epoch)[position * batch_size : (position + 1) * batch_size]


@functools.lru_cache(maxsize=4)
def _epoch_order(num_images, seed, epoch):
  """One epoch's permutation, computed once per epoch, not per step (1.3 M images: ~30 ms each time)."""
  order = np.random.default_rng([seed, epoch]).permutation(num_images)
  order.flags.writeable = False  # shared by every step of the epoch
  return order


# A trailing word of its own keeps these permutations apart from unlabeled_indices' for the same seed.
_STREAM = 3


def batch_positions(num_labeled: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Positions in the labeled subset of the global batch at `step`: a new permutation per epoch, no partial batch."""
  epoch, position = divmod(step, num_labeled // batch_size)
  order = np.random.default_rng([seed, epoch, _STREAM]).permutation(num_labeled)
  return order[position * batch_size : (position + 1) * batch_size]


# --- Index plans ---------------------------------------------------------------------------------------------


_NONE = np.zeros([0], np.int64)


class IndexPlan:
  """Which training images each step of one stage reads: its image batch and its support batch.

  Attributes:
    geometry: the stage's Geometry (sizes of both batches, over all replicas).
    seed: the run's seed; the pipelines derive the step's augmentation seeds from it too.
    labeled: int64 [L], the labeled subset (indices into the training images).
    labeled_labels: int64 [L], their labels.
    steps_per_epoch: steps in one epoch of the stage.
  """

  geometry: Geometry
  steps_per_epoch: int

  def __init__(self, labeled: Sequence[int], train_labels: Sequence[int], seed: int):
    self.labeled = np.asarray(labeled, np.int64)
    self.labeled_labels = np.asarray(train_labels, np.int64)[self.labeled]
    self.seed = seed

  def batch(self, step: int) -> np.ndarray:
    """int64 [geometry.batch]: the image indices of the step's batch (none by default)."""
    del step
    return _NONE

  def support_positions(self, step: int) -> np.ndarray:
    """int64 [geometry.support]: positions in `labeled` of the step's support batch (none by default)."""
    del step
    return _NONE

  def supports(self, step: int) -> np.ndarray:
    """int64 [geometry.support]: the training-image indices of the step's support batch."""
    return self.labeled[self.support_positions(step)]

  def step_images(self, step: int) -> np.ndarray:
    """Every image index the step reads (all replicas'), batch first: where to look for an unreadable one."""
    return np.concatenate([self.batch(step), self.supports(step)])


class PawsPlan(IndexPlan):
  """PAWS pre-training: `batch` are unlabeled images (indices into the unlabeled set, whose first images are
  the training images), `supports` the class-stratified support batch (SupportSampler)."""

  def __init__(
    self,
    labeled: Sequence[int],
    train_labels: Sequence[int],
    num_unlabeled: int,
    pretrain: ConfigDict,
    seed: int,
    num_replicas: int,
  ):
    """num_unlabeled: images the unlabeled batches draw from; pretrain: the config's `pretrain` section."""
    super().__init__(labeled, train_labels, seed)
    p = pretrain
    self.geometry = pretrain_geometry(p, num_replicas)
    self.num_unlabeled = num_unlabeled
    self.steps_per_epoch = num_unlabeled // p.batch_size
    self.sampler = SupportSampler(
      self.labeled_labels, p.classes_per_batch, p.images_per_class, seed, num_replicas, p.unique_classes_per_replica
    )

  def batch(self, step):
    return unlabeled_indices(self.num_unlabeled, self.geometry.batch, step, self.seed)

  def support_positions(self, step):
    return self.sampler.batch(step)


class SuncetPlan(IndexPlan):
  """SuNCEt fine-tuning: class-stratified batches of the labeled subset only (`supports`; no image batch)."""

  def __init__(
    self, labeled: Sequence[int], train_labels: Sequence[int], finetune: ConfigDict, seed: int, num_replicas: int
  ):
    """finetune: the config's `finetune` section (classes_per_batch, images_per_class over all replicas)."""
    super().__init__(labeled, train_labels, seed)
    f = finetune
    self.geometry = suncet_geometry(f, num_replicas)
    self.sampler = SupportSampler(self.labeled_labels, f.classes_per_batch, f.images_per_class, seed, num_replicas)
    # An epoch: every image of the smallest class once (at least one step).
    self.steps_per_epoch = max(int(np.bincount(self.labeled_labels).min()) // f.images_per_class, 1)

  def support_positions(self, step):
    return self.sampler.batch(step)


class ClassifierPlan(IndexPlan):
  """Classifier fine-tuning: `batch` are labeled images, a new permutation of the subset per epoch, no partial
  batch; `batch_labels` their labels."""

  def __init__(
    self, labeled: Sequence[int], train_labels: Sequence[int], finetune: ConfigDict, seed: int, num_replicas: int
  ):
    """finetune: the config's `finetune` section (batch_size over all replicas)."""
    super().__init__(labeled, train_labels, seed)
    self.geometry = classifier_geometry(finetune, num_replicas)
    if self.geometry.batch > len(self.labeled):
      raise UserError(
        f"finetune.batch_size={self.geometry.batch} is larger than the {len(self.labeled)} labeled images; "
        "lower finetune.batch_size"
      )
    self.steps_per_epoch = len(self.labeled) // self.geometry.batch

  def positions(self, step: int) -> np.ndarray:
    """Positions in `labeled` of the step's batch."""
    return batch_positions(len(self.labeled), self.geometry.batch, step, self.seed)

  def batch(self, step):
    return self.labeled[self.positions(step)]

  def batch_labels(self, step: int) -> np.ndarray:
    """int64 [geometry.batch]: the labels of batch(step)."""
    return self.labeled_labels[self.positions(step)]
