"""Parameter counts of a model, for tests that compare them with the reference's."""

import numpy as np


def trainable_scalars(layer):
  """Number of trainable scalars in a Keras layer or model."""
  return int(sum(np.prod(variable.shape) for variable in layer.trainable_variables))
