"""LARS / weight-decay groups against the reference's, tensor by tensor (METHOD.md sections 5 and 10).

The reference splits its parameters by their PyTorch names: `'bias' in name or 'bn' in name` takes plain SGD
momentum without LARS and without weight decay, every other parameter takes both. The lists below are the
reference's parameter names and shapes, written from its networks (its WideResNet-28-2, torchvision's
ResNet-50 as its resnet.py builds it, and the `fc` / `pred` heads its paws_train.init_model attaches). Each
TensorFlow variable is mapped to the reference parameter it stands for by where it sits in the model (not by
its name), the mapping is checked one to one with equal shapes, and then:
  - optim.excluded_from_lars and optim.decayed_variables give each tensor the reference's group;
  - one step of the real optimizer (optim.build_lars) updates each tensor as its group does.
"""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from utils.model import classifier as classifier_lib
from utils.model import encoder as encoder_lib
from utils.model import resnet
from utils.train import optim

# --- The reference's parameters: {name: PyTorch shape} ------------------------------------------------


def conv_parameters(prefix, in_channels, out_channels, kernel, bias):
  shapes = {f"{prefix}.weight": (out_channels, in_channels, kernel, kernel)}
  if bias:
    shapes[f"{prefix}.bias"] = (out_channels,)
  return shapes


def batch_norm_parameters(prefix, channels):
  return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,)}


def linear_parameters(prefix, in_features, out_features):
  return {f"{prefix}.weight": (out_features, in_features), f"{prefix}.bias": (out_features,)}


def reference_wide_resnet(depth, width):
  """The reference's WideResNet (src/wide_resnet.py): conv1, layer1..3 of WideBasicBlocks, bn1; convs with bias."""
  shapes = conv_parameters("conv1", 3, 16, 3, bias=True)
  in_planes = 16
  for stage, planes in enumerate((16 * width, 32 * width, 64 * width)):
    for index in range((depth - 4) // 6):
      block = f"layer{stage + 1}.{index}"
      stride = 2 if stage and not index else 1
      shapes.update(batch_norm_parameters(f"{block}.bn1", in_planes))
      shapes.update(conv_parameters(f"{block}.conv1", in_planes, planes, 3, bias=True))
      shapes.update(batch_norm_parameters(f"{block}.bn2", planes))
      shapes.update(conv_parameters(f"{block}.conv2", planes, planes, 3, bias=True))
      if stride != 1 or in_planes != planes:
        shapes.update(conv_parameters(f"{block}.shortcut.0", in_planes, planes, 1, bias=True))
      in_planes = planes
  shapes.update(batch_norm_parameters("bn1", in_planes))
  return shapes


def reference_resnet50():
  """torchvision's ResNet-50 without its fc (the reference's src/resnet.py): bias-free convs, `downsample.0/1`."""
  shapes = conv_parameters("conv1", 3, 64, 7, bias=False)
  shapes.update(batch_norm_parameters("bn1", 64))
  in_channels = 64
  for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
    for index in range(blocks):
      block = f"layer{stage + 1}.{index}"
      shapes.update(conv_parameters(f"{block}.conv1", in_channels, width, 1, bias=False))
      shapes.update(batch_norm_parameters(f"{block}.bn1", width))
      shapes.update(conv_parameters(f"{block}.conv2", width, width, 3, bias=False))
      shapes.update(batch_norm_parameters(f"{block}.bn2", width))
      shapes.update(conv_parameters(f"{block}.conv3", width, 4 * width, 1, bias=False))
      shapes.update(batch_norm_parameters(f"{block}.bn3", 4 * width))
      if index == 0:
        shapes.update(conv_parameters(f"{block}.downsample.0", in_channels, 4 * width, 1, bias=False))
        shapes.update(batch_norm_parameters(f"{block}.downsample.1", 4 * width))
      in_channels = 4 * width
  return shapes


def reference_heads(trunk_dim, hidden_dim, output_dim, prediction_head):
  """paws_train.init_model's heads: fc (fc1, bn1, relu1, fc2, bn2, relu2, fc3) and pred (bn1, fc1, bn2, relu, fc2)."""
  shapes = linear_parameters("fc.fc1", trunk_dim, hidden_dim)
  shapes.update(batch_norm_parameters("fc.bn1", hidden_dim))
  shapes.update(linear_parameters("fc.fc2", hidden_dim, hidden_dim))
  shapes.update(batch_norm_parameters("fc.bn2", hidden_dim))
  shapes.update(linear_parameters("fc.fc3", hidden_dim, output_dim))
  if prediction_head:  # the reference's 4x bottleneck: output_dim // 4
    shapes.update(batch_norm_parameters("pred.bn1", output_dim))
    shapes.update(linear_parameters("pred.fc1", output_dim, output_dim // 4))
    shapes.update(batch_norm_parameters("pred.bn2", output_dim // 4))
    shapes.update(linear_parameters("pred.fc2", output_dim // 4, output_dim))
  return shapes


def reference_excluded(name):
  """The reference's rule (paws_train.init_opt): plain SGD, no LARS, no weight decay."""
  return "bias" in name or "bn" in name


# --- Our variables -> the reference's names, by position in the model ---------------------------------

SUFFIX = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}


def torch_shape(variable):
  """A TensorFlow variable's shape in PyTorch's layout (conv HWIO -> OIHW, dense [in, out] -> [out, in])."""
  shape = tuple(variable.shape)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return shape


def layer_prefixes(encoder):
  """(layer, reference prefix) for every layer of an Encoder that holds trainable variables."""
  trunk = encoder.trunk
  pairs = []
  if isinstance(trunk, resnet.ResNet):
    pairs += [(trunk.stem_conv, "conv1"), (trunk.stem_bn, "bn1")]
    block_layers = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2", "conv3": "conv3", "bn3": "bn3"}
    block_layers.update(shortcut_conv="downsample.0", shortcut_bn="downsample.1")
  else:
    pairs += [(trunk.stem, "conv1"), (trunk.final_bn, "bn1")]
    block_layers = {"bn1": "bn1", "conv1": "conv1", "bn2": "bn2", "conv2": "conv2", "shortcut": "shortcut.0"}
  for block in trunk.blocks:
    stage, index = block.name.removeprefix("stage").split("_block")
    for attribute, name in block_layers.items():
      if getattr(block, attribute) is not None:
        pairs.append((getattr(block, attribute), f"layer{stage}.{int(index) - 1}.{name}"))
  projection = {"dense1": "fc1", "bn1": "bn1", "dense2": "fc2", "bn2": "bn2", "dense3": "fc3"}
  pairs += [(encoder.projection.get_layer(ours), f"fc.{theirs}") for ours, theirs in projection.items()]
  if encoder.prediction is not None:
    prediction = {"bn_in": "bn1", "dense1": "fc1", "bn1": "bn2", "dense2": "fc2"}
    pairs += [(encoder.prediction.get_layer(ours), f"pred.{theirs}") for ours, theirs in prediction.items()]
  return pairs


def reference_names(encoder, reference):
  """{id(variable): reference name} for every trainable variable of the encoder, checked one to one with shapes."""
  names = {}
  for layer, prefix in layer_prefixes(encoder):
    for variable in layer.trainable_weights:
      name = f"{prefix}.{SUFFIX[variable.name.split('/')[-1].split(':')[0]]}"
      assert name in reference, (variable.name, name)
      assert torch_shape(variable) == reference[name], (variable.name, name)
      assert id(variable) not in names, variable.name
      names[id(variable)] = name
  assert sorted(names.values()) == sorted(reference), set(reference) ^ set(names.values())
  assert set(names) == {id(v) for v in encoder.trainable_variables}  # every variable, each once
  return names


def model_config(name, hidden_dim, prediction_head, prediction_hidden_dim):
  return ml_collections.ConfigDict(
    dict(
      name=name,
      depth=28,
      width=2,
      hidden_dim=hidden_dim,
      projection_dim=hidden_dim,
      prediction_head=prediction_head,
      prediction_hidden_dim=prediction_hidden_dim,
    )
  )


@pytest.fixture(scope="module")
def resnet_encoder():
  """The paper's ImageNet encoder: ResNet-50, 2048-d heads, prediction head 2048 -> 512 -> 2048."""
  tf_keras.utils.set_random_seed(0)
  return encoder_lib.build_encoder(model_config("resnet50", 2048, True, 512), 32)


def wrn_encoder(prediction_head):
  """The paper's CIFAR-10 encoder, WRN-28-2 with 128-d heads (the prediction head, off for CIFAR-10, 128 -> 32)."""
  tf_keras.utils.set_random_seed(0)
  return encoder_lib.build_encoder(model_config("wrn", 128, prediction_head, 32), 32)


def check_groups(encoder, reference):
  """Both groups, tensor by tensor: optim's rule and the weight-decay set give the reference's group."""
  names = reference_names(encoder, reference)
  for variable in encoder.trainable_variables:
    assert optim.excluded_from_lars(variable.name) == reference_excluded(names[id(variable)]), (
      variable.name,
      names[id(variable)],
    )
  decayed = {names[id(v)] for v in optim.decayed_variables(encoder)}
  assert decayed == {name for name in reference if not reference_excluded(name)}
  return names


def lars_step_groups(variables):
  """One Model Garden LARS step (optim.build_lars) on copies of the variables (same names); which of them it
  updated as the excluded group (-lr * g) and which with the trust ratio and weight decay. Asserts each matches
  one of the two updates."""
  learning_rate, weight_decay, eta = 0.5, 0.1, 0.001
  copies = [tf.Variable(v.numpy(), name=v.name.split(":")[0]) for v in variables]
  assert [c.name for c in copies] == [v.name for v in variables]
  rng = np.random.default_rng(0)
  gradients = [rng.normal(size=v.shape).astype(np.float32) for v in variables]
  optim.build_lars(learning_rate, 0.9, weight_decay, eta).apply_gradients(
    zip([tf.constant(g) for g in gradients], copies)
  )
  excluded = []
  for copy, original, gradient in zip(copies, variables, gradients):
    weights = original.numpy().astype(np.float64)
    plain = weights - learning_rate * gradient
    decayed = gradient + weight_decay * weights
    adapted = weights - learning_rate * eta * np.linalg.norm(weights) / np.linalg.norm(decayed) * decayed
    after = copy.numpy()
    if np.allclose(after, plain, rtol=1e-5, atol=1e-6):
      excluded.append(True)
    else:
      np.testing.assert_allclose(after, adapted, rtol=1e-5, atol=1e-6, err_msg=copy.name)
      excluded.append(False)
  return excluded


@pytest.mark.parametrize("prediction_head", [False, True])
def test_wrn_28_2_groups_are_the_references(prediction_head):
  encoder = wrn_encoder(prediction_head)
  reference = reference_wide_resnet(28, 2)
  reference.update(reference_heads(128, 128, 128, prediction_head))
  names = check_groups(encoder, reference)
  # In the WideResNet every BatchNorm has 'bn' in its reference name: all BN parameters and all biases are out,
  # the conv and dense weights in: 28 conv weights (stem, 12 blocks x 2, 3 shortcuts, as every stage's first
  # block changes the width), against 28 conv biases and 25 BNs (12 x 2 + the final one).
  trunk = [name for name in reference if not name.startswith(("fc.", "pred."))]
  assert sum(not reference_excluded(name) for name in trunk) == 1 + 24 + 3
  assert len(trunk) == 2 * 28 + 2 * 25
  assert all(reference_excluded(name) == (name.endswith(".bias") or ".bn" in f".{name}") for name in reference)
  # The real optimizer, on every tensor of the encoder.
  groups = lars_step_groups(encoder.trainable_variables)
  assert groups == [reference_excluded(names[id(v)]) for v in encoder.trainable_variables]


def test_resnet50_groups_are_the_references(resnet_encoder):
  reference = reference_resnet50()
  trunk_names = set(reference)
  reference.update(reference_heads(2048, 2048, 2048, True))
  names = check_groups(resnet_encoder, reference)
  # The numbers for the reference's trunk: 57 LARS tensors (53 conv weights and the 4 shortcut BN
  # scales), 23 458 752 of its 23 508 032 parameters.
  lars_trunk = [name for name in trunk_names if not reference_excluded(name)]
  assert len(lars_trunk) == 57
  assert sum(int(np.prod(reference[name])) for name in lars_trunk) == 23_458_752
  shortcut_scales = sorted(name for name in lars_trunk if "downsample.1" in name)
  assert shortcut_scales == [f"layer{stage}.0.downsample.1.weight" for stage in (1, 2, 3, 4)]
  assert sum(reference[name][0] for name in shortcut_scales) == 256 + 512 + 1024 + 2048
  # Ours: the 4 shortcut gammas take LARS and decay, their betas (reference: downsample.1.bias) do not.
  shortcut_bns = [block.shortcut_bn for block in resnet_encoder.trunk.blocks if block.shortcut_bn is not None]
  assert len(shortcut_bns) == 4
  assert not any(optim.excluded_from_lars(bn.gamma.name) for bn in shortcut_bns)
  assert all(optim.excluded_from_lars(bn.beta.name) for bn in shortcut_bns)
  # Heads, same rule: the 5 Linear weights take LARS; their biases and the 4 head BNs do not.
  heads = [name for name in reference if name.startswith(("fc.", "pred.")) and not reference_excluded(name)]
  assert sorted(heads) == ["fc.fc1.weight", "fc.fc2.weight", "fc.fc3.weight", "pred.fc1.weight", "pred.fc2.weight"]
  # The real optimizer, on every tensor of the encoder.
  groups = lars_step_groups(resnet_encoder.trainable_variables)
  assert groups == [reference_excluded(names[id(v)]) for v in resnet_encoder.trainable_variables]


def test_classifier_weight_decay_follows_the_same_rule(resnet_encoder):
  """Classifier fine-tuning's decayed set (optim.decayed_variables): the trunk and kept block as in
  pre-training, the new classifier's kernel decayed and its bias not."""
  model = classifier_lib.from_encoder(resnet_encoder, 10, 32)
  names = reference_names(resnet_encoder, {**reference_resnet50(), **reference_heads(2048, 2048, 2048, True)})
  decayed = {id(v) for v in optim.decayed_variables(model)}
  for variable in model.trainable_variables:
    if variable is model.head.kernel:
      assert id(variable) in decayed
    elif variable is model.head.bias:
      assert id(variable) not in decayed
    else:
      assert (id(variable) in decayed) == (not reference_excluded(names[id(variable)])), variable.name
