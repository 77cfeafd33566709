"""Feeding a step test's global batch to the replicas as the input pipelines do: each replica its own share.

utils/data/pipelines.py emits each replica's share of the global batch (its rows of the unlabeled views and of the
support batch); these are the same shares of a batch built whole by a test.
"""

import tensorflow as tf

from utils.data import sampling


def share(batch, replica, num_replicas):
  """Replica `replica`'s share of a global batch.

  PAWS (views, supports): rows of every view, and rows of [support views, rows, ...]; SuNCEt
  [views, rows, ...]: rows.
  """

  def rows(tensor, axis):
    size = tensor.shape[axis] // num_replicas
    return tf.gather(tensor, tf.range(replica * size, (replica + 1) * size), axis=axis)

  if isinstance(batch, tuple):
    views, supports = batch
    return tuple(rows(v, 0) for v in views), rows(supports, 1)
  return rows(batch, 1)


def repeated(strategy, batch):
  """An iterator giving every replica its share of `batch` at every step, placed on its device."""

  def make_dataset(replicas):
    parts = [share(batch, replica, replicas.total) for replica in replicas.ids]
    stacked = tf.nest.map_structure(lambda *tensors: tf.stack(tensors), *parts)
    return tf.data.Dataset.from_tensor_slices(stacked).repeat()

  return iter(sampling.distribute(strategy, make_dataset))
