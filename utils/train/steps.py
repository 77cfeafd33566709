"""The compiled train steps: PAWS pre-training (METHOD.md sections 2 to 5), SuNCEt fine-tuning (section 6) and
the classifier fine-tuning of the ImageNet recipe (section 10).

Each builder returns train_steps(iterator, num_steps): one compiled call running
num_steps updates under a tf.distribute strategy and returning the replica mean
of the last step's metrics. Each replica receives its own share of the global
batch (utils/data/pipelines.py emits one batch per replica, sampling.distribute
places them on their devices); supports are all-gathered so that the loss is
that of the global batch.
"""

from collections.abc import Callable

from ml_collections import ConfigDict
import tensorflow as tf
import tf_keras

from utils import losses
from utils.data import augment, pipelines, sampling
from utils.model import encoder as encoder_lib
from utils.train import optim


def compile_steps(
  strategy: tf.distribute.Strategy, step_fn: Callable, metric_names: tuple[str, ...], jit_compile: bool
) -> Callable:
  """Wraps a per-replica step into one compiled call running `num_steps` updates.

  step_fn(*batch) returns a dict of scalar metrics; the call returns their
  replica mean for the last step. Several steps per call cut host overhead.
  """
  step_fn = tf.function(step_fn, jit_compile=jit_compile)

  @tf.function
  def train_steps(iterator, num_steps):
    metrics = {k: tf.constant(0.0) for k in metric_names}
    for _ in tf.range(num_steps):
      batch = next(iterator)
      per_replica = strategy.run(step_fn, args=batch if isinstance(batch, tuple) else (batch,))
      metrics = {k: strategy.reduce("MEAN", per_replica[k], axis=None) for k in metric_names}
    return metrics

  return train_steps


def all_gather(replica, value):
  """replica.all_gather(value, axis=0), as an all-reduce: it compiles inside the per-replica XLA step on GPUs.

  ReplicaContext.all_gather always goes through merge_call, which TensorFlow refuses inside the XLA
  function MirroredStrategy runs per GPU; all_reduce has a collective path there. Each replica puts its
  rows at its offset in a block of zeros and the blocks are summed: adding zeros is exact, and the
  gradient (all-reduced, then this replica's rows) is that of all_gather.
  """
  index, count = replica.replica_id_in_sync_group, replica.num_replicas_in_sync
  rows = value.shape[0]
  padded = tf.pad(value, [[index * rows, (count - 1 - index) * rows]] + [[0, 0]] * (value.shape.rank - 1))
  return tf.ensure_shape(replica.all_reduce("SUM", padded), [count * rows] + value.shape[1:].as_list())


def paws_steps(
  config: ConfigDict, strategy: tf.distribute.Strategy, encoder: tf_keras.Model, optimizer, jit_compile: bool
) -> Callable:
  """The compiled PAWS update: forward by resolution, PAWS loss, LARS step."""
  p = config.pretrain
  num_replicas = strategy.num_replicas_in_sync
  geometry = sampling.pretrain_geometry(p, num_replicas)
  local_batch, local_support = geometry.local_batch, geometry.local_support
  num_support = p.support_views * local_support
  # The gathered supports are the replicas' blocks in turn, each its rows of every support view.
  support_labels = losses.support_labels(
    p.classes_per_batch,
    p.images_per_class,
    p.support_views,
    num_replicas,
    p.label_smoothing,
    unique_classes=p.unique_classes_per_replica,
  )

  spec = augment.AugmentSpec.from_config(config.data)

  def step_fn(views, supports, colour=None):
    """views: this replica's 2 + multicrop batches; supports: its support rows [support_views, n, S, S, 3];
    colour: a streamed pipeline's colour draws (pipelines.stream_pretrain_dataset), whose colour stage runs
    here, on the accelerator, batched; None when the pipeline already applied it (in-memory images)."""
    replica = tf.distribute.get_replica_context()
    # Across workers tf.distribute leaves batch dimensions unknown (it allows partial batches); ours are whole.
    views = [tf.ensure_shape(v, [local_batch, None, None, None]) for v in views]
    supports = tf.ensure_shape(supports, [p.support_views, local_support, None, None, None])
    if colour is not None:
      views, supports = pipelines.colour_pretrain_batch(views, supports, colour, spec)
    supports = tf.reshape(supports, [num_support] + supports.shape[-3:].as_list())
    with tf.GradientTape() as tape:
      h, z = encoder_lib.embed_views(encoder, [[supports, views[0], views[1]], views[2:]], training=True)
      h = tf.cast(h, tf.float32)
      z = tf.cast(z, tf.float32)
      h_support, z_support = h[:num_support], z[:num_support]
      if num_replicas > 1:
        h_support = all_gather(replica, h_support)
        z_support = all_gather(replica, z_support)
      large = h[num_support : num_support + 2 * local_batch]
      targets = tf.concat([large[local_batch:], large[:local_batch]], axis=0)
      ce, me_max = losses.paws_loss(
        losses.SnnInputs(z[num_support:], z_support, support_labels),
        losses.SnnInputs(targets, h_support, support_labels),
        tau=p.tau,
        T=p.sharpen_T,
        multicrop=p.multicrop,
        me_max=p.me_max,
      )
      replica_share = (ce + me_max) / num_replicas  # summed over replicas by apply_gradients
    # Under a LossScaleOptimizer (mixed_float16) minimize scales the loss on the tape, unscales the
    # gradients and skips the update (halving the scale) when they overflow.
    optimizer.minimize(replica_share, encoder.trainable_variables, tape=tape)
    return {"loss": ce + me_max, "ce": ce, "me_max": me_max}

  return compile_steps(strategy, step_fn, ("loss", "ce", "me_max"), jit_compile)


def suncet_steps(
  config: ConfigDict,
  strategy: tf.distribute.Strategy,
  encoder: tf_keras.Model,
  optimizer,
  jit_compile: bool,
  bn_training: bool,
) -> Callable:
  """The compiled SuNCEt update on one class-stratified batch."""
  f = config.finetune
  num_replicas = strategy.num_replicas_in_sync
  local_batch = sampling.suncet_geometry(f, num_replicas).local_support
  labels = losses.support_labels(f.classes_per_batch, f.images_per_class, f.views, num_replicas)

  def step_fn(batch):
    """batch: this replica's rows of the class-stratified batch, [views, n, H, W, 3]."""
    replica = tf.distribute.get_replica_context()
    batch = tf.ensure_shape(batch, [f.views, local_batch, None, None, None])
    batch = tf.reshape(batch, [-1] + batch.shape[-3:].as_list())
    with tf.GradientTape() as tape:
      # training=False keeps BatchNorm on its moving statistics; gamma/beta still get gradients.
      _, z = encoder(batch, training=bn_training)
      z = tf.cast(z, tf.float32)
      if num_replicas > 1:
        z = all_gather(replica, z)
      loss = losses.suncet_loss(z, labels, f.tau)
      replica_share = loss / num_replicas  # inside the tape, or it has no gradient
    optimizer.minimize(replica_share, encoder.trainable_variables, tape=tape)
    return {"loss": loss}

  return compile_steps(strategy, step_fn, ("loss",), jit_compile)


METRICS = ("loss", "accuracy")


def classifier_steps(
  config: ConfigDict, strategy: tf.distribute.Strategy, model: tf_keras.Model, optimizer, jit_compile: bool
) -> Callable:
  """The compiled cross-entropy update; step_fn gets this replica's (images [B, S, S, 3], labels [B]).

  The replica's loss is the mean over its rows; divided by the number of replicas, the summed gradients
  are those of the mean over the global batch. finetune.weight_decay (0 in the reference) is PyTorch's
  coupled decay: wd * w added to the gradients of the decayed variables.
  """
  f = config.finetune
  num_replicas = strategy.num_replicas_in_sync
  decayed = optim.decayed_variables(model)

  def step_fn(images, labels):
    labels = tf.cast(labels, tf.int32)
    with tf.GradientTape() as tape:
      logits = tf.cast(model(images, training=True), tf.float32)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
      objective = loss
      if f.weight_decay:
        objective += 0.5 * f.weight_decay * tf.add_n([tf.reduce_sum(tf.square(v)) for v in decayed])
      replica_share = objective / num_replicas  # summed over replicas by apply_gradients
    optimizer.minimize(replica_share, model.trainable_variables, tape=tape)
    accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels), tf.float32))
    return {"loss": loss, "accuracy": accuracy}

  return compile_steps(strategy, step_fn, METRICS, jit_compile)
