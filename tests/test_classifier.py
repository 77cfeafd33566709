"""utils/model/classifier.py: the reference's ImageNet fine-tuning (trunk + first projection block + zero-initialised
linear classifier, cross-entropy, SGD Nesterov), its input stream, Resize + CenterCrop and top-1/top-5; the
imagenet preset's values."""

import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tf_keras

import config as presets
from tests import model_size
from utils import config_rules, evaluation
from utils.data import decoding, pipelines, sampling, sources
from utils.errors import UserError
from utils.model import classifier as classifier_lib
from utils.model import encoder as encoder_lib
from utils.train import loop as train_loop
from utils.train import optim, steps

SIZE = 16  # crop size of the tiny tests
CLASSES = 3


def tiny_config(**finetune):
  """The imagenet preset with a WRN-10-1 and 16-d heads at 16 px: the classifier machinery, small."""
  c = presets.get_config("imagenet")
  with c.unlocked():
    c.model.name = "wrn"
    c.model.depth = 10
    c.model.width = 1
    c.model.hidden_dim = 16
    c.model.projection_dim = 16
    c.model.prediction_hidden_dim = 8
    c.data.image_size = SIZE
    c.finetune.batch_size = 8
    for key, value in finetune.items():
      setattr(c.finetune, key, value)
  return c


def strategy():
  return tf.distribute.OneDeviceStrategy("/cpu:0")


def random_images(count, seed=0, size=SIZE):
  return np.random.default_rng(seed).normal(size=[count, size, size, 3]).astype(np.float32)


def test_imagenet_preset_holds_the_reference_values():
  c = presets.get_config("imagenet")
  assert config_rules.config_problems(c) == []
  d = c.data
  assert (d.dataset, d.image_size, d.large_crop_size, d.small_crop_size) == ("folder", 224, 224, 96)
  assert (tuple(d.large_crop_scale), tuple(d.small_crop_scale)) == ((0.14, 1.0), (0.05, 0.14))
  assert (d.flip, d.color_jitter_prob, d.color_jitter_strength, d.grayscale_prob, d.blur_prob) == (
    True,
    0.8,
    1,
    0.2,
    0.5,
  )
  assert (tuple(d.blur_radius), d.solarize_prob, d.equalize_prob) == ((0.1, 2.0), 0, 0)
  assert (tuple(d.mean), tuple(d.std)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  m = c.model
  assert (m.name, m.hidden_dim, m.projection_dim, m.prediction_head, m.prediction_hidden_dim) == (
    "resnet50",
    2048,
    2048,
    True,
    512,
  )
  p = c.pretrain
  replicas = 64
  assert (p.batch_size // replicas, p.images_per_class // replicas, p.classes_per_batch) == (64, 7, 15)
  assert (p.batch_size % replicas, p.images_per_class % replicas) == (0, 0)
  assert (p.multicrop, p.support_views, p.unique_classes_per_replica, p.label_smoothing) == (6, 1, True, 0.1)
  assert (p.start_lr, p.lr, p.final_lr, p.warmup_epochs, p.epochs, p.weight_decay) == (0.3, 6.4, 0.064, 10, 100, 1e-6)
  f = c.finetune
  assert f.mode == "classifier"
  assert (f.epochs, f.lr, f.final_lr, f.momentum, f.weight_decay) == (50, 0.02, 0.0, 0.9, 0.0)
  assert presets.get_config("cifar10").finetune.mode == "suncet"


# --- Model ------------------------------------------------------------------------------------------------


def test_zero_initialised_classifier_gives_uniform_probabilities():
  c = tiny_config()
  model = classifier_lib.build(c, num_classes=7)
  assert not np.any(model.head.kernel.numpy()) and not np.any(model.head.bias.numpy())
  assert model.head.kernel.shape == (16, 7)
  for training in (False, True):
    probabilities = tf.nn.softmax(model(random_images(5), training=training)).numpy()
    np.testing.assert_array_equal(probabilities, np.full([5, 7], 1 / 7, np.float32))


def test_kept_block_and_trunk_are_the_pretrained_encoders(tmp_path):
  c = tiny_config()
  encoder = encoder_lib.build_encoder(c.model, SIZE)
  encoder(random_images(8), training=True)  # moving statistics away from their initial values
  encoder_lib.save_encoder(encoder, c, str(tmp_path), step=5, stage="pretrain")
  model = classifier_lib.build(c, CLASSES, encoder_directory=str(tmp_path))
  pairs = [(model.trunk, encoder.trunk)] + [
    (getattr(model, name), encoder.projection.get_layer(name)) for name in classifier_lib.KEPT_BLOCK
  ]
  for mine, pretrained in pairs:
    assert len(mine.weights) == len(pretrained.weights) > 0
    for a, b in zip(mine.weights, pretrained.weights):
      assert a.name == b.name
      np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert pairs[2][0].moving_mean.numpy().any()  # the BN's moving statistics came along
  # Nothing else: trunk + Dense + BN + the new classifier; dense2, dense3 and the prediction head are gone.
  expected = sum(model_size.trainable_scalars(layer) for layer, _ in pairs) + 16 * CLASSES + CLASSES
  assert model_size.trainable_scalars(model) == expected


def test_save_and_load_round_trip(tmp_path):
  c = tiny_config()
  model = classifier_lib.build(c, CLASSES)
  model.head.kernel.assign(np.random.default_rng(1).normal(size=[16, CLASSES]))
  images = random_images(4)
  directory = str(tmp_path / "finetuned")
  classifier_lib.save(model, c, directory, step=11)
  assert classifier_lib.exists(directory)
  tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    loaded, meta = classifier_lib.load(directory, c)
    assert tf_keras.mixed_precision.global_policy().name == "mixed_bfloat16"
  finally:
    tf_keras.mixed_precision.set_global_policy("float32")
  assert loaded.trunk.compute_dtype == "float32"  # evaluated in float32 whatever trained it
  assert (meta["num_classes"], meta["finetune_step"], meta["image_size"]) == (CLASSES, 11, SIZE)
  np.testing.assert_array_equal(loaded(images, training=False).numpy(), model(images, training=False).numpy())
  other = tiny_config()
  with other.unlocked():
    other.model.hidden_dim = 32
  with pytest.raises(UserError, match="model.hidden_dim differ"):
    classifier_lib.load(directory, other)
  with pytest.raises(UserError, match="run fine_tune.py first"):
    classifier_lib.load(str(tmp_path / "nothing"), c)


# --- The step ---------------------------------------------------------------------------------------------


def mean_cross_entropy(logits, labels):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return -log_probabilities[np.arange(len(labels)), labels].mean()


def gradients(model, images, labels):
  with tf.GradientTape() as tape:
    logits = model(images, training=True)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
  return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)], logits.numpy()


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_step_loss_and_two_nesterov_updates_match_numpy(weight_decay):
  c = tiny_config(weight_decay=weight_decay, momentum=0.9)
  rates = [0.3, 0.1]  # a changing rate: the velocity must carry the first step's rate (tf_keras' form)
  schedule = tf_keras.optimizers.schedules.PiecewiseConstantDecay([0], rates)  # update 0: 0.3, then 0.1
  run = strategy()
  state = train_loop.create_train_state(
    run, lambda: classifier_lib.build(c, CLASSES), lambda: optim.build_sgd(schedule, c.finetune.momentum)
  )
  model = state.model
  model.head.kernel.assign(np.random.default_rng(2).normal(size=[16, CLASSES]) * 0.5)  # non-uniform logits
  train_steps = steps.classifier_steps(c, run, model, state.optimizer, jit_compile=False)
  images = random_images(8, seed=3)
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int64)
  iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
  decayed = {id(v) for v in optim.decayed_variables(model)}
  assert decayed and len(decayed) < len(model.trainable_variables)  # biases and BN scale/offset are not decayed
  weights = [v.numpy().astype(np.float64) for v in model.trainable_variables]
  velocity = [np.zeros_like(w) for w in weights]
  for lr in rates:
    grads, logits = gradients(model, images, labels)
    metrics = train_steps(iterator, tf.constant(1))
    np.testing.assert_allclose(float(metrics["loss"]), mean_cross_entropy(logits, labels), rtol=1e-5)
    accuracy = np.mean(logits.argmax(axis=1) == labels)
    np.testing.assert_allclose(float(metrics["accuracy"]), accuracy)
    for i, variable in enumerate(model.trainable_variables):
      g = grads[i] + (weight_decay * weights[i] if id(variable) in decayed else 0.0)
      velocity[i] = 0.9 * velocity[i] - lr * g
      weights[i] = weights[i] + 0.9 * velocity[i] - lr * g
      np.testing.assert_allclose(variable.numpy(), weights[i], rtol=2e-4, atol=2e-6, err_msg=variable.name)
  assert int(state.optimizer.iterations.numpy()) == 2


def test_loss_falls_on_a_repeated_batch():
  c = tiny_config()
  run = strategy()
  state = train_loop.create_train_state(
    run, lambda: classifier_lib.build(c, CLASSES), lambda: optim.build_sgd(0.05, c.finetune.momentum)
  )
  train_steps = steps.classifier_steps(c, run, state.model, state.optimizer, jit_compile=False)
  images = random_images(8, seed=4)
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int64)
  iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
  first = float(train_steps(iterator, tf.constant(1))["loss"])
  np.testing.assert_allclose(first, np.log(CLASSES), rtol=1e-6)  # zero-initialised classifier
  last = float(train_steps(iterator, tf.constant(15))["loss"])
  assert last < 0.5 * first, (first, last)


# --- Input -------------------------------------------------------------------------------------------------


def small_arrays(count=12, size=20, seed=5):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, [count, size, size, 3], dtype=np.uint8)
  labels = np.arange(count) % CLASSES
  return images, labels


def batches(dataset):
  return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_dataset_draws_epochs_of_the_labeled_subset_and_splits_replicas():
  images, labels = small_arrays()
  labeled = np.array([0, 2, 3, 5, 6, 7, 9, 10, 11])  # 9 labeled images: one batch of 4 per step, 1 left out
  c = tiny_config(batch_size=4)

  def make(replicas=sampling.ONE_DEVICE):
    plan = sampling.ClassifierPlan(labeled, labels, c.finetune, 0, replicas.total)
    return pipelines.classifier_dataset(images, plan, c.data, start_step=0, total_steps=4, replicas=replicas)

  whole = batches(make())
  assert [x.shape for x, _ in whole] == [(4, SIZE, SIZE, 3)] * 4 and whole[0][0].dtype == np.float32
  for step, (_, y) in enumerate(whole):
    positions = sampling.batch_positions(len(labeled), 4, step, 0)
    np.testing.assert_array_equal(y, labels[labeled][positions])
  # An epoch is 2 steps of 4 different images; the next epoch is another permutation.
  epoch = np.concatenate([sampling.batch_positions(9, 4, step, 0) for step in (0, 1)])
  assert len(set(epoch)) == 8
  assert not np.array_equal(sampling.batch_positions(9, 4, 2, 0), sampling.batch_positions(9, 4, 0, 0))
  # Replica streams hold their rows of the global batch, augmented with the global batch's draws.
  halves = [batches(make(sampling.Replicas((index,), 2))) for index in (0, 1)]
  for step, (x, y) in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([halves[0][step][0], halves[1][step][0]]), x)
    np.testing.assert_array_equal(np.concatenate([halves[0][step][1], halves[1][step][1]]), y)
  # Crops and flips differ between steps (views are random), and the images are normalised with data.mean.
  assert not np.allclose(whole[0][0], whole[2][0])
  with pytest.raises(UserError, match="must divide by the 3 replicas"):
    make(sampling.Replicas((0,), 3))
  with pytest.raises(UserError, match="larger than the 9 labeled images"):
    sampling.ClassifierPlan(labeled, labels, tiny_config(batch_size=16).finetune, 0, 1)


def test_a_pipeline_feeding_several_replicas_emits_their_batches_in_turn():
  images, labels = small_arrays()
  source = sources.ArraySource("arrays", images, labels, images[:3], labels[:3])
  c = tiny_config(batch_size=6)
  with c.unlocked():
    c.data.flip = False
  labeled = np.arange(12)
  steps = dict(start_step=1, total_steps=3)
  plan = sampling.ClassifierPlan(labeled, source.train_labels, c.finetune, 2, 3)
  both = batches(source.classifier_dataset(plan, c.data, replicas=sampling.Replicas((1, 2), 3), **steps))
  alone = [
    batches(source.classifier_dataset(plan, c.data, replicas=sampling.Replicas((r,), 3), **steps)) for r in (1, 2)
  ]
  expected = [alone[r][step] for step in range(2) for r in range(2)]
  assert len(both) == len(expected) == 4
  for (x, y), (xe, ye) in zip(both, expected):
    np.testing.assert_array_equal(x, xe)
    np.testing.assert_array_equal(y, ye)
  np.testing.assert_array_equal(both[0][1], labels[sampling.batch_positions(12, 6, 1, 2)][2:4])


def test_streamed_files_give_the_in_memory_batches(tmp_path):
  images, labels = small_arrays()
  for index, (image, label) in enumerate(zip(images, labels)):
    os.makedirs(tmp_path / "train" / f"c{label}", exist_ok=True)
    Image.fromarray(image).save(tmp_path / "train" / f"c{label}" / f"{index:05d}.png")
  source = sources.open_folder(str(tmp_path))
  order = np.array([int(os.path.basename(name)[:5]) for name in source.train.names])  # folder index -> array index
  labeled = np.arange(len(order))[np.isin(order, [0, 1, 4, 5, 7, 8, 9, 11])]
  c = tiny_config(batch_size=4)
  data = c.data
  kwargs = dict(start_step=0, total_steps=3, replicas=sampling.Replicas((1,), 2))
  plan = sampling.ClassifierPlan(labeled, source.train_labels, c.finetune, 7, 2)
  streamed = batches(pipelines.classifier_dataset(source.train, plan, data, **kwargs))
  plan = sampling.ClassifierPlan(order[labeled], labels, c.finetune, 7, 2)
  in_memory = batches(pipelines.classifier_dataset(images, plan, data, **kwargs))
  for (xs, ys), (xm, ym) in zip(streamed, in_memory, strict=True):
    np.testing.assert_array_equal(ys, ym)
    np.testing.assert_allclose(xs, xm, atol=3e-6 / min(data.std), rtol=0)


# --- Evaluation ---------------------------------------------------------------------------------------------


def torchvision_geometry(height, width, size, resize):
  """torchvision Resize(resize) + CenterCrop(size) of a PIL image, written out: (new_w, new_h, left, top)."""
  if width <= height:
    new_w, new_h = resize, int(resize * height / width)
  else:
    new_w, new_h = int(resize * width / height), resize
  return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


def test_resize_centre_crop_is_pillows_resize_then_centre_crop():
  rng = np.random.default_rng(0)
  shapes = [(30, 30), (25, 40), (40, 25), (23, 61), (70, 17), (12, 15), (19, 19), (33, 34)]
  exact = total = 0
  for height, width in shapes:
    image = rng.integers(0, 256, [height, width, 3], dtype=np.uint8)
    for size, resize in ((16, 18), (16, 16), (17, 19), (16, None)):
      mine = decoding.resize_centre_crop(tf.constant(image), size, resize).numpy()
      resize = decoding.resize_size(size) if resize is None else resize
      new_w, new_h, left, top = torchvision_geometry(height, width, size, resize)
      pil = Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + size, top + size))
      pil = np.asarray(pil, np.float32) / 255.0
      assert mine.shape == (size, size, 3)
      assert np.abs(mine - pil).max() <= 1 / 255 + 1e-6, (height, width, size, resize)  # fixed-point weights
      exact += int(np.sum(np.abs(mine - pil) < 1e-6))
      total += mine.size
  assert exact / total > 0.95, exact / total  # 97.7 % when written
  assert decoding.resize_size(224) == 256
  # The ImageNet sizes: Resize(256) + CenterCrop(224) of a 375 x 500 photo.
  image = rng.integers(0, 256, [375, 500, 3], dtype=np.uint8)
  mine = decoding.resize_centre_crop(tf.constant(image), 224).numpy()
  new_w, new_h, left, top = torchvision_geometry(375, 500, 224, 256)
  assert (new_w, new_h, left, top) == (341, 256, 58, 16)
  pil = Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + 224, top + 224))
  assert np.abs(mine - np.asarray(pil, np.float32) / 255).max() <= 1 / 255 + 1e-6


class FixedLogits:
  """A stand-in classifier whose logits are its input's [N, 1, 1, C] values."""

  num_classes = 6

  def __call__(self, batch, training):
    assert training is False
    return batch[:, 0, 0, :]


def test_top1_and_top5_are_counted_as_numpy_does():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=[50, 6]).astype(np.float32)
  labels = rng.integers(0, 6, 50)
  ranks = (-logits).argsort(axis=1)
  dataset = tf.data.Dataset.from_tensor_slices(logits[:, None, None, :]).batch(16)
  metrics = evaluation.evaluate_classifier(FixedLogits(), dataset, labels)
  assert metrics["num_test"] == 50 and metrics["top_k"] == 5
  assert metrics["top1"] == pytest.approx(100 * np.mean(ranks[:, 0] == labels))
  assert metrics["top5"] == pytest.approx(100 * np.mean(np.any(ranks[:, :5] == labels[:, None], axis=1)))
  assert metrics["top1"] < metrics["top5"] < 100
  with pytest.raises(ValueError, match="50 images for 49 labels"):
    evaluation.evaluate_classifier(FixedLogits(), dataset, labels[:49])


def test_streamed_evaluation_images_are_resized_and_centre_cropped(tmp_path):
  rng = np.random.default_rng(4)
  shapes = [(20, 30), (31, 18), (24, 24)]
  for index, (height, width) in enumerate(shapes):
    for split in ("train", "val"):
      os.makedirs(tmp_path / split / f"c{index}", exist_ok=True)
      image = rng.integers(0, 256, [height, width, 3], dtype=np.uint8)
      Image.fromarray(image).save(tmp_path / split / f"c{index}" / "a.png")
  source = sources.open_folder(str(tmp_path))
  data = tiny_config().data
  queries, labels = evaluation.evaluation_images(source, data, batch_size=2)
  batch = np.concatenate([x.numpy() for x in queries])
  assert batch.shape == (3, SIZE, SIZE, 3)
  np.testing.assert_array_equal(labels, [0, 1, 2])
  for index in range(3):
    pixels = np.asarray(Image.open(tmp_path / "val" / f"c{index}" / "a.png"))
    expected = decoding.resize_centre_crop(tf.constant(pixels), SIZE).numpy()
    np.testing.assert_allclose(batch[index], (expected - data.mean) / data.std, atol=1e-5)
  # Soft-NN's supports and queries and the held-out images: the same transform, within a grey level of Pillow's
  # Resize(18) + CenterCrop(16) (the reference's Resize(256) + CenterCrop(224) at 16 px).
  supports, support_labels, soft_nn_queries, query_labels = source.evaluation_sets([0, 2], data, batch_size=2)
  heldout, heldout_labels = evaluation.heldout_images(source, [1], data, batch_size=2)
  np.testing.assert_array_equal(support_labels, [0, 2])
  np.testing.assert_array_equal(query_labels, [0, 1, 2])
  np.testing.assert_array_equal(heldout_labels, [1])
  np.testing.assert_array_equal(np.concatenate(list(soft_nn_queries)), batch)
  sets = [(np.concatenate(list(supports)), "train", [0, 2]), (np.concatenate(list(heldout)), "train", [1])]
  for images, split, indices in sets + [(batch, "val", [0, 1, 2])]:
    for image, index in zip(images, indices, strict=True):
      pixels = Image.open(tmp_path / split / f"c{index}" / "a.png")
      new_w, new_h, left, top = torchvision_geometry(pixels.height, pixels.width, SIZE, 18)
      pil = pixels.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + SIZE, top + SIZE))
      expected = (np.asarray(pil, np.float32) / 255 - data.mean) / data.std
      assert np.abs(image - expected).max() <= (1 / 255 + 1e-6) / min(data.std)


def test_resize_centre_crop_of_a_batch_is_that_of_each_image():
  """The exported model's input (utils/export.py) is a batch of images of one size."""
  images = np.random.default_rng(5).integers(0, 256, [3, 21, 34, 3], dtype=np.uint8)
  batch = decoding.resize_centre_crop(tf.constant(images), SIZE).numpy()
  assert batch.shape == (3, SIZE, SIZE, 3)
  for image, mine in zip(images, batch, strict=True):
    np.testing.assert_array_equal(mine, decoding.resize_centre_crop(tf.constant(image), SIZE).numpy())


# --- The real network ----------------------------------------------------------------------------------------


def test_resnet50_classifier_shapes_parameters_and_one_step():
  c = presets.get_config("imagenet")
  with c.unlocked():
    c.data.image_size = 64  # the network is the real one; small images keep the step quick
    c.finetune.batch_size = 2
  run = strategy()
  state = train_loop.create_train_state(
    run, lambda: classifier_lib.build(c, 1000), lambda: optim.build_sgd(0.02, c.finetune.momentum)
  )
  model = state.model
  assert model.dense1.kernel.shape == (2048, 2048) and model.head.kernel.shape == (2048, 1000)
  trunk = model_size.trainable_scalars(model.trunk)
  assert 23.4e6 < trunk < 23.6e6
  assert model_size.trainable_scalars(model) == trunk + (2048 * 2048 + 2048) + 2 * 2048 + (2048 * 1000 + 1000)
  train_steps = steps.classifier_steps(c, run, model, state.optimizer, jit_compile=False)
  images = random_images(2, seed=6, size=64)
  iterator = iter(tf.data.Dataset.from_tensors((images, np.array([3, 999]))).repeat())
  loss = float(train_steps(iterator, tf.constant(1))["loss"])
  np.testing.assert_allclose(loss, np.log(1000), rtol=1e-5)
  assert np.any(model.head.kernel.numpy())  # the classifier moved off zero
