"""Images read from files: decoding (JPEG or PNG, or only a JPEG's crop window), crops resized with PIL's filter,
and the two whole-image transforms of evaluation (`centre_square`, `resize_centre_crop`)."""

from collections.abc import Callable
from typing import TYPE_CHECKING

import tensorflow as tf

from utils.data import augment

if TYPE_CHECKING:  # image_files imports this module
  from utils.data.image_files import ImageFiles

# Decoding a crop window of a chroma-subsampled JPEG upsamples the chroma at the window's edges differently
# from a full decode; a window widened to 16-pixel blocks plus one block on each side decodes the crop
# inside it exactly as a full decode does (tests/test_sources.py checks 4:4:4, 4:2:2, 4:2:0, progressive).
_JPEG_BLOCK = 16


def resize_box(image: tf.Tensor, box: tf.Tensor, size: int) -> tf.Tensor:
  """One box of a uint8 [H, W, 3] image resized to size x size with PIL's bilinear filter, float32 in [0, 1].

  tf.image.resize's antialiased bilinear is PIL's filter (a triangle widened by the scale factor when
  shrinking, normalised over the pixels inside the box), the filter augment.augment_batch applies with
  per-image weight matrices. Its kernel runs over the few non-zero taps only: 2-3x faster per crop than a
  gather-based version of those matrices, which took a plain decode + crop + resize pipeline's speed down
  to 0.2x (benchmarks/stream_speed.py). It computes the weights in float32 rather than from integers: the
  two differ by at most 3e-6 of the [0, 1] range (tests/test_sources.py); a box of the output size is
  copied exactly.
  """
  crop = image[None, box[0] : box[0] + box[2], box[1] : box[1] + box[3]]
  # tf.image.resize(..., "bilinear", antialias=True)'s kernel, called on the uint8 crop: the same pixels without
  # a float32 copy of the crop first (a quarter of the time of a 224 px view).
  scale = tf.constant([size, size], tf.float32) / tf.cast(box[2:], tf.float32)
  resized = tf.raw_ops.ScaleAndTranslate(
    images=crop, size=[size, size], scale=scale, translation=[0.0, 0.0], kernel_type="triangle", antialias=True
  )
  return resized[0] * (1.0 / 255.0)


_JPEG_MAGIC = b"\xff\xd8\xff"


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


UNDECODABLE = "is not a JPEG or PNG image"  # in the assertion message a bad stream ends with (sources.py)


def _is_jpeg(encoded):
  return tf.strings.substr(encoded, 0, len(_JPEG_MAGIC)) == _JPEG_MAGIC


def _check_format(encoded, description):
  """Fails with the image's name unless the bytes start like a JPEG or a PNG."""
  known = _is_jpeg(encoded) | (tf.strings.substr(encoded, 0, len(_PNG_MAGIC)) == _PNG_MAGIC)
  return tf.debugging.Assert(known, [description, UNDECODABLE], name="check_image_format")


def decode_image(encoded: tf.Tensor, description: tf.Tensor | str) -> tf.Tensor:
  """uint8 [H, W, 3] of JPEG or PNG bytes, as PIL's Image.open(...).convert("RGB").

  JPEGs are decoded with libjpeg's accurate integer DCT, which PIL uses (TensorFlow's default, the fast
  DCT, is up to 5 levels off).
  """
  with tf.control_dependencies([_check_format(encoded, description)]):
    return tf.cond(
      _is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_png(encoded, channels=3),
    )


def decode_one_box(encoded: tf.Tensor, description: tf.Tensor | str, draws: dict) -> tuple[tf.Tensor, tf.Tensor]:
  """Decodes only the part of a JPEG its single view needs (the crop box, widened as _JPEG_BLOCK says).

  draws: one image's augment.crop_draws of its one view. Returns (uint8 pixels, int32 [1, 4] box within
  them). A PNG is decoded whole.
  """

  def jpeg_window():
    shape = tf.image.extract_jpeg_shape(encoded)
    box = augment.crop_boxes(draws, shape[0], shape[1])[0]
    low = tf.maximum(box[:2] // _JPEG_BLOCK * _JPEG_BLOCK - _JPEG_BLOCK, 0)
    high = tf.minimum(-(-(box[:2] + box[2:]) // _JPEG_BLOCK) * _JPEG_BLOCK + _JPEG_BLOCK, shape[:2])
    window = tf.concat([low, high - low], axis=0)
    pixels = tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method="INTEGER_ACCURATE")
    return pixels, tf.concat([box[:2] - low, box[2:]], axis=0)[None]

  def whole():
    pixels = tf.io.decode_png(encoded, channels=3)
    shape = tf.shape(pixels)
    return pixels, augment.crop_boxes(draws, shape[0], shape[1])

  with tf.control_dependencies([_check_format(encoded, description)]):
    return tf.cond(_is_jpeg(encoded), jpeg_window, whole)


def centre_box(height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """int32 [4]: the largest centred square of a height x width image, as (top, left, side, side)."""
  side = tf.minimum(height, width)
  return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def centre_square(pixels: tf.Tensor, size: int) -> tf.Tensor:
  """The centred square of a uint8 [H, W, 3] image resized to size x size, float32 in [0, 1].

  SuNCEt fine-tuning and BatchNorm re-estimation use whole images (METHOD.md section 6); files of any shape
  become the encoder's size as Resize(shorter side) + CenterCrop would make them, in one PIL-bilinear
  resampling (an image already size x size is returned exactly). Evaluation (soft-NN, classifier) of files
  uses resize_centre_crop, the reference's Resize + CenterCrop.
  """
  shape = tf.shape(pixels)
  return resize_box(pixels, centre_box(shape[0], shape[1]), size)


def image_loader(images: "ImageFiles", size: int, transform: Callable[[tf.Tensor, int], tf.Tensor] = centre_square):
  """index -> float32 [size, size, 3] in [0, 1]: image `index` of an image_files.ImageFiles, decoded and
  brought to size x size by `transform` (centre_square or resize_centre_crop), for a tf.data map."""

  def load(index):
    return transform(decode_image(images.read(index), images.describe(index)), size)

  return load


# Evaluation: Resize(shorter side to 256) + CenterCrop(224); other image sizes keep the ratio 256 / 224.
RESIZE_RATIO = 256 / 224


def resize_size(size: int) -> int:
  """Resize's shorter side for a CenterCrop of `size`: 256 for 224."""
  return int(round(size * RESIZE_RATIO))


def _half_to_even(excess):
  """round(excess / 2) with Python's round-half-to-even, for integer tensors (torchvision's CenterCrop offset)."""
  half = excess // 2
  return half + (excess % 2) * (half % 2)


def resize_centre_crop(pixels: tf.Tensor, size: int, resize: int | None = None) -> tf.Tensor:
  """torchvision Resize(resize) + CenterCrop(size) of a uint8 [H, W, 3] image, float32 [size, size, 3] in [0, 1]
  (or of a batch [B, H, W, 3] of images of one size, as the exported model receives them: [B, size, size, 3]).

  Resize scales the shorter side to `resize` and the longer to int(resize * longer / shorter) with PIL's
  bilinear filter: tf.image.resize with antialias, one pass per axis, each rounded to uint8 as PIL does;
  CenterCrop then cuts size x size at round((side - size) / 2) from the top and the left. PIL's filter
  weights are fixed-point: a pixel is rarely one grey level off Pillow's (tests/test_classifier.py).
  """
  resize = resize_size(size) if resize is None else resize
  if resize < size:
    raise ValueError(f"resize={resize} is smaller than the crop {size}")
  shape = tf.shape(pixels)
  height, width = shape[-3], shape[-2]
  shorter, longer = tf.minimum(height, width), tf.maximum(height, width)
  new_longer = resize * longer // shorter  # int(resize * longer / shorter): exact in integers
  portrait = width <= height
  new_height = tf.where(portrait, new_longer, resize)
  new_width = tf.where(portrait, resize, new_longer)
  # PIL resamples the width, rounds to uint8 (half up), then the height, and rounds again.
  to_uint8 = lambda x: tf.floor(tf.clip_by_value(x, 0.0, 255.0) + 0.5)
  resized = to_uint8(
    tf.image.resize(tf.cast(pixels, tf.float32), tf.stack([height, new_width]), "bilinear", antialias=True)
  )
  resized = to_uint8(tf.image.resize(resized, tf.stack([new_height, new_width]), "bilinear", antialias=True))
  top, left = _half_to_even(new_height - size), _half_to_even(new_width - size)
  crop = resized[..., top : top + size, left : left + size, :]
  return tf.ensure_shape(crop, pixels.shape[:-3].concatenate([size, size, 3])) * (1.0 / 255.0)
