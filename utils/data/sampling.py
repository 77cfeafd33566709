"""tf.data input pipelines: multi-crop unlabeled views and class-stratified supports (METHOD.md section 4).

All sampling of indices happens in NumPy from seeds that depend only on the
step, so a stream restarted at step s is exactly the stream that was cut at s;
no iterator state needs checkpointing. Augmentations are stateless and seeded
by (seed, step), so parallel `map` does not change the result either.

Every pipeline feeds replicas (README, Before a long GPU run): given a
`Replicas`, it emits for each step one batch per replica it serves, in turn,
each holding only that replica's rows of the global batch, with the random
draws those rows have in the global batch. tf.distribute's
distribute_datasets_from_function hands consecutive elements to a worker's
devices in turn and prefetches them there (`distribute`), so no device
receives, and no worker builds, more than its own share.
"""

import functools
from typing import NamedTuple

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


def replicas_for(strategy, input_context):
  """The Replicas of one worker's input pipeline under distribute_datasets_from_function.

  Worker w (input pipeline w) of a strategy with L devices per worker runs replicas w*L .. w*L + L - 1,
  and tf.distribute gives its devices consecutive elements of its dataset in turn.
  """
  local = strategy.num_replicas_in_sync // input_context.num_input_pipelines
  first = input_context.input_pipeline_id * local
  return Replicas(tuple(range(first, first + local)), strategy.num_replicas_in_sync)


def distribute(strategy, make_dataset):
  """The distributed dataset of make_dataset(replicas): each worker builds only its replicas' batches.

  distribute_datasets_from_function prefetches each batch to its device (fetch-to-device is on by default),
  so the host-to-device copy is off the step's critical path.
  """
  return strategy.distribute_datasets_from_function(
    lambda input_context: make_dataset(replicas_for(strategy, input_context))
  )


def round_robin(replica_dataset, replicas):
  """replica_dataset(replica id) for each of replicas.ids, taken in turn: step 0 of each, then step 1, ..."""
  datasets = [replica_dataset(replica) for replica in replicas.ids]
  if len(datasets) == 1:
    return datasets[0]
  choice = tf.data.Dataset.range(len(datasets)).repeat()
  return tf.data.Dataset.choose_from_datasets(datasets, choice)


def support_rows_per_replica(classes_per_batch, images_per_class, num_replicas, unique_classes=False, section=""):
  """Rows of the support batch each of num_replicas replicas holds: K * images_per_class / R.

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
  return rows // num_replicas


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
  support_rows_per_replica rows, one per replica. Without unique classes these
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

  def __init__(self, labels, classes_per_batch, images_per_class, seed, num_replicas=1, unique_classes=False):
    self.rows_per_replica = support_rows_per_replica(classes_per_batch, images_per_class, num_replicas, unique_classes)
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
    self.step = 0

  def batch(self, step):
    """The int64 indices of batch `step`, interleaved by class; replica r's are rows r*n .. r*n + n - 1."""
    rng = np.random.default_rng([self.seed, step, self.STREAM])
    chosen = rng.permutation(len(self.classes))[: self.num_classes]
    columns = [rng.permutation(self.members[c])[: self.per_class] for c in chosen]
    batch = np.stack(columns, axis=1)  # [per_class, num_classes]
    if self.unique_classes:  # replica r's block: its K columns
      batch = batch.reshape(self.per_class, self.num_replicas, -1).transpose(1, 0, 2)
    return batch.reshape(-1).astype(np.int64)

  def next_batch(self):
    """The batch of the next step (0, 1, ... since construction)."""
    self.step += 1
    return self.batch(self.step - 1)


def unlabeled_indices(num_images, batch_size, step, seed):
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


def finetune_supports(labels, finetune, seed, num_replicas):
  """SupportSampler's arguments for fine-tuning's class-stratified batches over num_replicas replicas."""
  f = finetune
  return dict(
    labels=labels,
    classes_per_batch=f.classes_per_batch,
    images_per_class=f.images_per_class,
    seed=seed,
    num_replicas=num_replicas,
  )


def pretrain_supports(labels, pretrain, seed, num_replicas):
  """SupportSampler's arguments for pre-training's supports over num_replicas replicas."""
  p = pretrain
  return dict(
    labels=labels,
    classes_per_batch=p.classes_per_batch,
    images_per_class=p.images_per_class,
    seed=seed,
    num_replicas=num_replicas,
    unique_classes=p.unique_classes_per_replica,
  )


# A trailing word of its own keeps these permutations apart from pipeline.unlabeled_indices' for the same seed.
_STREAM = 3


def batch_positions(num_labeled, batch_size, step, seed):
  """Positions in the labeled subset of the global batch at `step`: a new permutation per epoch, no partial batch."""
  epoch, position = divmod(step, num_labeled // batch_size)
  order = np.random.default_rng([seed, epoch, _STREAM]).permutation(num_labeled)
  return order[position * batch_size : (position + 1) * batch_size]


def steps_per_epoch(num_labeled, batch_size):
  if batch_size > num_labeled:
    raise UserError(
      f"finetune.batch_size={batch_size} is larger than the {num_labeled} labeled images; lower finetune.batch_size"
    )
  return num_labeled // batch_size
