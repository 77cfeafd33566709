"""Support sampler and input pipelines (METHOD.md section 4)."""
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from utils import pipeline
from utils.errors import UserError


def make_labels(per_class, num_classes=5):
  return np.repeat(np.arange(num_classes), per_class)


@pytest.mark.parametrize("per_class,images_per_class", [(6, 3), (7, 3), (4, 4)])
def test_sampler_batches_are_stratified_interleaved_and_unique(per_class, images_per_class):
  labels = make_labels(per_class)
  sampler = pipeline.SupportSampler(labels, 5, images_per_class, seed=1)
  orders = []
  for _ in range(12):
    batch = sampler.next_batch()
    assert len(batch) == 5 * images_per_class
    assert len(np.unique(batch)) == len(batch)  # no image twice in a batch
    classes = labels[batch].reshape(images_per_class, 5)
    # interleaved: position i holds the (i mod K)-th class of this batch
    assert (classes == classes[0]).all()
    assert sorted(classes[0]) == list(range(5))
    orders.append(tuple(classes[0]))
  assert len(set(orders)) > 1  # class order re-drawn across batches


def test_sampler_sees_every_labeled_image_within_one_pass_and_reshuffles():
  labels = make_labels(6)
  sampler = pipeline.SupportSampler(labels, 5, 3, seed=3)
  first_pass = np.concatenate([sampler.next_batch() for _ in range(2)])
  second_pass = np.concatenate([sampler.next_batch() for _ in range(2)])
  assert sorted(first_pass) == list(range(30))
  assert sorted(second_pass) == list(range(30))
  per_class_order = lambda seen: [list(seen[labels[seen] == c]) for c in range(5)]
  assert per_class_order(first_pass) != per_class_order(second_pass)


def test_sampler_with_remainder_covers_each_pass_exactly_once():
  labels = make_labels(7)
  sampler = pipeline.SupportSampler(labels, 5, 3, seed=0)
  stream = np.concatenate([sampler.next_batch() for _ in range(7)])  # 3 full passes of 7
  for c in range(5):
    seen = stream[labels[stream] == c]
    for start in range(0, 21, 7):
      assert sorted(seen[start:start + 7]) == list(np.flatnonzero(labels == c))


def test_sampler_subset_of_classes_per_batch():
  labels = make_labels(4, num_classes=6)
  batch = pipeline.SupportSampler(labels, 3, 2, seed=0).next_batch()
  classes = labels[batch].reshape(2, 3)
  assert len(set(classes[0])) == 3 and (classes == classes[0]).all()


def test_sampler_errors_on_too_few_images_or_classes():
  labels = make_labels(3)
  with pytest.raises(UserError, match="images_per_class=4"):
    pipeline.SupportSampler(labels, 5, 4, seed=0)
  with pytest.raises(UserError, match="classes_per_batch=6"):
    pipeline.SupportSampler(labels, 6, 2, seed=0)


def test_unlabeled_indices_epoch_permutation_drops_last_partial_batch():
  seen = np.concatenate([pipeline.unlabeled_indices(10, 3, step, seed=0) for step in range(3)])
  assert len(np.unique(seen)) == 9  # one image of the 10 dropped this epoch
  next_epoch = pipeline.unlabeled_indices(10, 3, 3, seed=0)
  assert not np.array_equal(next_epoch, seen[:3])


def small_pretrain_dataset(start_step, total_steps=4):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=[20, 8, 8, 3], dtype=np.uint8)
  labels = np.repeat(np.arange(4), 5)
  labeled = np.arange(20)[::2]  # 10 images; class counts 3,2,3,2
  data = ml_collections.ConfigDict(dict(
      flip=True, color_jitter_prob=0.8, color_jitter_strength=0.5, solarize_prob=0.2, equalize_prob=0.2,
      mean=(0.5,) * 3, std=(0.25,) * 3, large_crop_size=8, small_crop_size=5, large_crop_scale=(0.75, 1.0),
      small_crop_scale=(0.3, 0.75)))
  pretrain = ml_collections.ConfigDict(dict(
      batch_size=4, multicrop=2, classes_per_batch=4, images_per_class=2, support_views=2))
  return pipeline.pretrain_dataset(
      images, labeled, labels[labeled], data, pretrain,
      start_step=start_step, total_steps=total_steps, seed=7)


def test_pretrain_dataset_shapes_and_exact_resume():
  full = list(small_pretrain_dataset(0))
  assert len(full) == 4
  views, supports = full[0]
  assert [tuple(v.shape) for v in views] == [(4, 8, 8, 3)] * 2 + [(4, 5, 5, 3)] * 2
  assert supports.shape == (2, 2, 4, 8, 8, 3)
  assert views[0].dtype == tf.float32
  resumed = list(small_pretrain_dataset(2))
  assert len(resumed) == 2
  for (views_a, supports_a), (views_b, supports_b) in zip(full[2:], resumed):
    np.testing.assert_array_equal(supports_a.numpy(), supports_b.numpy())
    for a, b in zip(views_a, views_b):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
  # the two large views of one step are different augmentations
  assert not np.array_equal(full[0][0][0].numpy(), full[0][0][1].numpy())


def _finetune_batch(flip):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=[8, 6, 6, 3], dtype=np.uint8)
  labels = np.repeat(np.arange(2), 4)
  finetune = ml_collections.ConfigDict(dict(classes_per_batch=2, images_per_class=4, views=2))
  data = ml_collections.ConfigDict(dict(flip=flip, mean=(0.0,) * 3, std=(1.0,) * 3))
  batch = next(iter(pipeline.finetune_dataset(
      images, labels, finetune, data, start_step=0, total_steps=1, seed=0))).numpy()
  assert batch.shape == (2, 4, 2, 6, 6, 3)
  return images.astype(np.float32) / 255, batch.reshape(2, 8, 6, 6, 3)


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
