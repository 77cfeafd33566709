"""Support sampler and input pipelines (METHOD.md section 4)."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from utils.data import pipelines, sampling
from utils.errors import UserError


def make_labels(per_class, num_classes=5):
  return np.repeat(np.arange(num_classes), per_class)


@pytest.mark.parametrize("per_class,images_per_class", [(6, 3), (7, 3), (4, 4)])
def test_sampler_batches_are_stratified_interleaved_and_unique(per_class, images_per_class):
  labels = make_labels(per_class)
  sampler = sampling.SupportSampler(labels, 5, images_per_class, seed=1)
  orders = []
  for step in range(12):
    batch = sampler.batch(step)
    assert len(batch) == 5 * images_per_class
    assert len(np.unique(batch)) == len(batch)  # no image twice in a batch
    classes = labels[batch].reshape(images_per_class, 5)
    # interleaved: position i holds the (i mod K)-th class of this batch
    assert (classes == classes[0]).all()
    assert sorted(classes[0]) == list(range(5))
    orders.append(tuple(classes[0]))
  assert len(set(orders)) > 1  # class order re-drawn across batches


def test_sampler_batches_are_independent_draws():
  """Each batch takes images_per_class of a fresh per-class shuffle, whatever earlier batches took."""
  per_class, images_per_class, num_classes, num_batches = 10, 3, 10, 2000
  labels = make_labels(per_class, num_classes)
  sampler = sampling.SupportSampler(labels, num_classes, images_per_class, seed=5)
  batches = [(step, sampler.batch(step)) for step in range(num_batches)]
  present = np.zeros([num_batches, len(labels)], bool)
  for step, batch in batches:
    present[step, batch] = True
  # An image's count over the batches is Binomial(num_batches, p). Every batch has exactly
  # images_per_class per class, so the mean is exact; the spread tests independence (a sampler
  # walking through per-class passes gives counts within 1 of the mean, variance ~0).
  p = images_per_class / per_class
  counts = present.sum(axis=0)
  assert counts.mean() == num_batches * p
  variance = num_batches * p * (1 - p)
  observed = np.mean((counts - num_batches * p) ** 2)
  assert abs(observed / variance - 1) < 4 * np.sqrt(2 / len(labels)), observed  # chi-square-like spread
  # Two consecutive batches share, per class, a Hypergeometric(per_class, images_per_class,
  # images_per_class) number of images if independent (a pass-based sampler: almost none).
  # Disjoint pairs (0, 1), (2, 3), ... are independent of each other.
  shared = (present[0::2] & present[1::2]).sum(axis=1)
  mean = num_classes * images_per_class * p
  shared_variance = num_classes * images_per_class * p * (1 - p) * (per_class - images_per_class) / (per_class - 1)
  assert abs(shared.mean() - mean) < 4 * np.sqrt(shared_variance / len(shared)), shared.mean()
  assert abs(shared.var() / shared_variance - 1) < 0.25, shared.var()
  # Class order: each class at position 0 about equally often.
  first = np.bincount(labels[[batch[0] for _, batch in batches]], minlength=num_classes)
  expected = num_batches / num_classes
  assert np.all(np.abs(first - expected) < 5 * np.sqrt(expected)), first


@pytest.mark.parametrize("start_step", [1, 7, 30])
def test_support_batches_resume_exactly_without_replay(start_step):
  labels = make_labels(7)
  full = sampling.SupportSampler(labels, 5, 3, seed=2)
  full = [full.batch(step) for step in range(40)]
  resumed = sampling.SupportSampler(labels, 5, 3, seed=2)  # a new sampler, as a resumed run builds
  for step in range(start_step, 40):
    assert full[step].dtype == np.int64
    np.testing.assert_array_equal(resumed.batch(step), full[step])
  # No replay: a step far away costs the same as the first one.
  far_batch = resumed.batch(10**12)
  assert len(np.unique(far_batch)) == 15
  other_seed = sampling.SupportSampler(labels, 5, 3, seed=3)
  assert not all(np.array_equal(other_seed.batch(step), full[step]) for step in range(40))


def test_sampler_subset_of_classes_per_batch():
  labels = make_labels(4, num_classes=6)
  sampler = sampling.SupportSampler(labels, 3, 2, seed=0)
  included = np.zeros(6)
  for step in range(600):
    batch = sampler.batch(step)
    assert len(np.unique(batch)) == 6
    classes = labels[batch].reshape(2, 3)
    assert len(set(classes[0])) == 3 and (classes == classes[0]).all()
    included[classes[0]] += 1
  # the first 3 of a fresh class permutation: each class in a batch with probability 1/2
  assert np.all(np.abs(included - 300) < 5 * np.sqrt(600 * 0.25)), included


def test_sampler_errors_on_too_few_images_or_classes():
  labels = make_labels(3)
  with pytest.raises(UserError, match="images_per_class=4"):
    sampling.SupportSampler(labels, 5, 4, seed=0)
  with pytest.raises(UserError, match="classes_per_batch=6"):
    sampling.SupportSampler(labels, 6, 2, seed=0)


def pretrain_section(classes_per_batch, images_per_class, unique_classes=False, batch_size=320):
  return ml_collections.ConfigDict(
    dict(
      batch_size=batch_size,
      classes_per_batch=classes_per_batch,
      images_per_class=images_per_class,
      unique_classes_per_replica=unique_classes,
    )
  )


def test_support_rows_split_between_replicas():
  # The K * images_per_class rows are shared; images_per_class itself need not divide by the replicas.
  assert sampling.pretrain_geometry(pretrain_section(10, 5), 2).local_support == 25
  assert sampling.pretrain_geometry(pretrain_section(10, 5), 5).local_support == 10
  finetune = ml_collections.ConfigDict(dict(classes_per_batch=10, images_per_class=5))
  assert sampling.SuncetPlan(np.arange(60), make_labels(6, 10), finetune, 0, 2).geometry.local_support == 25
  message = r"the 50 support images .*pretrain.classes_per_batch=10 x images_per_class=5.*3 replicas"
  with pytest.raises(UserError, match=message):
    sampling.pretrain_geometry(pretrain_section(10, 5, batch_size=3), 3)
  # Unique classes: each replica draws images_per_class / R of its own classes.
  assert sampling.pretrain_geometry(pretrain_section(15, 448, unique_classes=True), 64).local_support == 7 * 15
  with pytest.raises(UserError, match="images_per_class=5 must divide by the 2 replicas with unique classes"):
    sampling.pretrain_geometry(pretrain_section(2, 5, unique_classes=True), 2)
  # The unlabeled batch: each replica holds its block of rows of the global batch.
  geometry = sampling.pretrain_geometry(pretrain_section(10, 5, batch_size=64), 2)
  assert (geometry.batch, geometry.local_batch, geometry.batch_rows(1)) == (64, 32, sampling.Rows(32, 32, 64))
  with pytest.raises(UserError, match="pretrain.batch_size=64 must divide by the 5 replicas"):
    sampling.pretrain_geometry(pretrain_section(10, 5, batch_size=64), 5)


def test_unlabeled_indices_epoch_permutation_drops_last_partial_batch():
  seen = np.concatenate([sampling.unlabeled_indices(10, 3, step, seed=0) for step in range(3)])
  assert len(np.unique(seen)) == 9  # one image of the 10 dropped this epoch
  next_epoch = sampling.unlabeled_indices(10, 3, 3, seed=0)
  assert not np.array_equal(next_epoch, seen[:3])


def small_pretrain_dataset(
  start_step, total_steps=4, replicas=sampling.ONE_DEVICE, unique_classes=False, images_per_class=2
):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=[20, 8, 8, 3], dtype=np.uint8)
  labels = np.repeat(np.arange(4), 5)
  labeled = np.flatnonzero(np.arange(20) % 5 < 3)  # 3 labeled images per class
  data = ml_collections.ConfigDict(
    dict(
      flip=True,
      color_jitter_prob=0.8,
      color_jitter_strength=0.5,
      solarize_prob=0.2,
      equalize_prob=0.2,
      grayscale_prob=0.0,
      blur_prob=0.0,
      blur_radius=(0.1, 2.0),
      mean=(0.5,) * 3,
      std=(0.25,) * 3,
      large_crop_size=8,
      small_crop_size=5,
      large_crop_scale=(0.75, 1.0),
      small_crop_scale=(0.3, 0.75),
    )
  )
  pretrain = ml_collections.ConfigDict(
    dict(
      batch_size=4,
      multicrop=2,
      classes_per_batch=2 if unique_classes else 4,
      images_per_class=images_per_class,
      support_views=2,
      unique_classes_per_replica=unique_classes,
    )
  )
  plan = sampling.PawsPlan(labeled, labels, len(images), pretrain, 7, replicas.total)
  return pipelines.pretrain_dataset(
    images, plan, data, pretrain, start_step=start_step, total_steps=total_steps, replicas=replicas
  )


def test_pretrain_dataset_shapes_and_exact_resume():
  full = list(small_pretrain_dataset(0))
  assert len(full) == 4
  views, supports = full[0]
  assert [tuple(v.shape) for v in views] == [(4, 8, 8, 3)] * 2 + [(4, 5, 5, 3)] * 2
  assert supports.shape == (2, 8, 8, 8, 3)  # [support views, K * images_per_class, ...]
  assert views[0].dtype == tf.float32
  resumed = list(small_pretrain_dataset(2))
  assert len(resumed) == 2
  for (views_a, supports_a), (views_b, supports_b) in zip(full[2:], resumed):
    np.testing.assert_array_equal(supports_a.numpy(), supports_b.numpy())
    for a, b in zip(views_a, views_b):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
  # the two large views of one step are different augmentations
  assert not np.array_equal(full[0][0][0].numpy(), full[0][0][1].numpy())


def test_pretrain_replicas_get_their_rows_of_the_one_device_batch():
  """Two replicas: elements alternate replica 0, 1 per step, and their rows make up the one-device batch.

  3 supports per class do not split per class between 2 replicas; the 12 rows split 6 and 6.
  """
  sizes = dict(total_steps=3, images_per_class=3)
  one_device = list(small_pretrain_dataset(0, **sizes))
  both = list(small_pretrain_dataset(0, replicas=sampling.Replicas((0, 1), 2), **sizes))
  second_worker = list(small_pretrain_dataset(0, replicas=sampling.Replicas((1,), 2), **sizes))
  assert len(both) == 6 and len(second_worker) == 3
  for step, (views, supports) in enumerate(one_device):
    (views_0, supports_0), (views_1, supports_1) = both[2 * step], both[2 * step + 1]
    assert supports_0.shape == (2, 6, 8, 8, 3)
    np.testing.assert_array_equal(np.concatenate([supports_0, supports_1], axis=1), supports)
    for whole, part_0, part_1 in zip(views, views_0, views_1, strict=True):
      assert part_0.shape[0] == 2
      np.testing.assert_array_equal(np.concatenate([part_0, part_1]), whole)
    # a worker feeding only replica 1 builds exactly replica 1's batches
    for a, b in zip(second_worker[step][0], views_1, strict=True):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(second_worker[step][1], supports_1)


def test_unique_classes_give_each_replica_its_own_classes():
  labels = np.repeat(np.arange(6), 4)
  sampler = sampling.SupportSampler(labels, 2, 4, seed=3, num_replicas=2, unique_classes=True)
  shared = sampling.SupportSampler(labels, 2, 4, seed=3, num_replicas=2)
  one_replica = sampling.SupportSampler(labels, 2, 4, seed=3, num_replicas=1, unique_classes=True)
  np.testing.assert_array_equal(one_replica.batch(0), shared.batch(0))  # one replica: the usual draw
  class_pairs = set()
  for step in range(50):
    blocks = labels[sampler.batch(step)].reshape(2, 2, 2)  # [replica, image, class position]
    assert len(set(sampler.batch(step))) == 8  # no image twice
    for block in blocks:
      assert (block == block[0]).all()  # interleaved by class: column j is one class
    assert not set(blocks[0, 0]) & set(blocks[1, 0])  # the two replicas' classes differ
    class_pairs.add(tuple(sorted(blocks[0, 0])))
    shared_blocks = labels[shared.batch(step)].reshape(2, 2, 2)
    np.testing.assert_array_equal(shared_blocks[0, 0], shared_blocks[1, 0])  # without: the same classes
  assert len(class_pairs) > 5  # classes re-drawn every step
  with pytest.raises(UserError, match="3 classes.*lower classes_per_batch"):
    sampling.SupportSampler(np.repeat(np.arange(3), 4), 2, 4, seed=0, num_replicas=2, unique_classes=True)


def test_unique_classes_pipeline_blocks():
  both = list(small_pretrain_dataset(0, total_steps=2, replicas=sampling.Replicas((0, 1), 2), unique_classes=True))
  assert both[0][1].shape == (2, 2, 8, 8, 3)  # [support views, 1 image x K = 2 classes, ...]
  assert not np.array_equal(both[0][1], both[1][1])


def flip_only_data(flip):
  """A whole data section without colour operations, normalised by mean 0 and std 1: pixels stay [0, 1]."""
  colour = dict(color_jitter_prob=0.0, color_jitter_strength=0.0, solarize_prob=0.0, equalize_prob=0.0)
  blur = dict(grayscale_prob=0.0, blur_prob=0.0, blur_radius=(0.1, 2.0))
  return ml_collections.ConfigDict(dict(flip=flip, mean=(0.0,) * 3, std=(1.0,) * 3, **colour, **blur))


def finetune_dataset(images, labels, finetune, data, replicas=sampling.ONE_DEVICE, *, seed, **steps):
  """pipelines.finetune_dataset with all the images labeled."""
  plan = sampling.SuncetPlan(np.arange(len(images)), labels, finetune, seed, replicas.total)
  return pipelines.finetune_dataset(images, plan, finetune, data, replicas=replicas, **steps)


def _finetune_batch(flip):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=[8, 6, 6, 3], dtype=np.uint8)
  labels = np.repeat(np.arange(2), 4)
  finetune = ml_collections.ConfigDict(dict(classes_per_batch=2, images_per_class=4, views=2))
  data = flip_only_data(flip)
  batch = next(iter(finetune_dataset(images, labels, finetune, data, start_step=0, total_steps=1, seed=0))).numpy()
  assert batch.shape == (2, 8, 6, 6, 3)
  return images.astype(np.float32) / 255, batch


def test_finetune_dataset_is_flip_only():
  originals, views = _finetune_batch(flip=True)
  flipped = 0
  for view in views:
    for image in view:
      plain = [np.allclose(image, o, atol=1e-6) for o in originals]
      mirrored = [np.allclose(image, o[:, ::-1], atol=1e-6) for o in originals]
      assert any(plain) or any(mirrored)
      flipped += not any(plain)
  assert 0 < flipped < 16  # a fair coin per image over 16 images


def test_finetune_dataset_without_flip_gives_the_images_themselves():
  originals, views = _finetune_batch(flip=False)
  for view in views:
    # 4 per class interleaved by class: every labeled image exactly once per view
    matched = sorted(int(np.flatnonzero([np.allclose(image, o) for o in originals])[0]) for image in view)
    assert matched == list(range(8))


def test_finetune_replicas_get_their_rows_of_the_one_device_batch():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=[12, 6, 6, 3], dtype=np.uint8)
  labels = np.repeat(np.arange(3), 4)
  # 3 images of 2 classes: 6 rows, 3 for each of 2 replicas (not the same number of images of each class)
  finetune = ml_collections.ConfigDict(dict(classes_per_batch=2, images_per_class=3, views=2))
  data = flip_only_data(True)
  steps = dict(start_step=0, total_steps=3, seed=4)
  one_device = list(finetune_dataset(images, labels, finetune, data, **steps))
  both = list(finetune_dataset(images, labels, finetune, data, replicas=sampling.Replicas((0, 1), 2), **steps))
  for step, batch in enumerate(one_device):
    assert both[2 * step].shape == (2, 3, 6, 6, 3)
    np.testing.assert_array_equal(np.concatenate([both[2 * step], both[2 * step + 1]], axis=1), batch)
