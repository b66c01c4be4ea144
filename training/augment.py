"""Training-time augmentation, on device, from the step's key.

`Config.augment` names the operations, comma-separated; they run in the order of
`config.AUGMENTATIONS` whatever order they are written in. Each takes a batch of float images in
[0, 1] (NHWC) and returns the same shape and dtype; mixup and cutmix also mix the targets (class
probabilities), one weight per batch.
"""

import math

import jax
import jax.numpy as jnp

from flaxzoo.training.config import MIXING, parse_augment

MAX_SHIFT = 2  # pixels, for "shift" (the classic MNIST augmentation)
CROP_PADDING = 4  # pixels of zeros around the image before "crop" cuts it back to size
MAX_ROTATION_DEGREES = 15.0  # "affine": rotation, scale and translation drawn uniformly within
SCALE_RANGE = (0.9, 1.1)
MAX_TRANSLATION = 0.1  # of the image size
ERASE_PROBABILITY = 0.5  # "erase" (Zhong et al., 2017): a rectangle of 2-33 % of the image set to 0
ERASE_AREA = (0.02, 0.33)
ERASE_ASPECT = (0.3, 3.3)
MIXUP_ALPHA = 0.2  # Beta(alpha, alpha) mixing weight, one per batch (Zhang et al., 2018)
CUTMIX_ALPHA = 1.0  # (Yun et al., 2019)


def augment_batch(key, images, targets, augment: str):
  """`(images, targets)` after the operations named in `augment`; targets are class
  probabilities (N, classes), changed only by mixup and cutmix. One key per operation; with a
  single operation that key is `key` itself."""
  names = parse_augment(augment)
  keys = [key] if len(names) == 1 else list(jax.random.split(key, len(names)))
  for name, op_key in zip(names, keys):
    if name in MIXING:
      images, targets = MIXERS[name](op_key, images, targets)
    else:
      images = IMAGE_OPS[name](op_key, images)
  return images, targets


def random_crop(key, images, padding: int):
  """Each image padded by `padding` zeros and cut back to size at a random offset."""
  n, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(  # noqa: E731
      image, (offset[0], offset[1], 0), (height, width, channels))
  return jax.vmap(crop)(padded, offsets)


def shift(key, images):
  return random_crop(key, images, MAX_SHIFT)


def crop(key, images):
  return random_crop(key, images, CROP_PADDING)


def flip(key, images):
  mirrored = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(mirrored, images[:, :, ::-1, :], images)


def affine(key, images):
  """A random rotation, scale and translation per image (see `warp_affine`)."""
  n, height, width, _ = images.shape
  k_angle, k_scale, k_move = jax.random.split(key, 3)
  angle = jax.random.uniform(k_angle, (n,), minval=-1, maxval=1) * math.radians(MAX_ROTATION_DEGREES)
  scale = jax.random.uniform(k_scale, (n,), minval=SCALE_RANGE[0], maxval=SCALE_RANGE[1])
  move = jax.random.uniform(k_move, (n, 2), minval=-1, maxval=1) * MAX_TRANSLATION * jnp.array(
      [height, width])
  return warp_affine(images, angle, scale, move)


def warp_affine(images, angle, scale, move):
  """Each image rotated by `angle` (radians; positive turns it clockwise as displayed) and scaled
  by `scale` about its centre, then moved by `move` (rows, columns); sampled bilinearly, points
  from outside read 0."""
  _, height, width, channels = images.shape
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - (height - 1) / 2,
                            jnp.arange(width, dtype=jnp.float32) - (width - 1) / 2, indexing="ij")

  def warp(image, angle, scale, move):
    # Each output pixel reads the input at the inverse transform of its position.
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
    src_rows = cos * (rows - move[0]) - sin * (cols - move[1]) + (height - 1) / 2
    src_cols = sin * (rows - move[0]) + cos * (cols - move[1]) + (width - 1) / 2
    return jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., c], [src_rows, src_cols], order=1,
                                                        mode="constant", cval=0.0)
                      for c in range(channels)], axis=-1)

  return jax.vmap(warp)(images, angle, scale, move).astype(images.dtype)


def _boxes(key, n, height, width, area, aspect):
  """Per-image rectangles (top, left, box height, box width) of `area` share of the image with
  aspect ratio `aspect` (both (n,) arrays), at random positions, clipped to the image."""
  box_h = jnp.clip(jnp.round(jnp.sqrt(area * height * width * aspect)), 1, height).astype(jnp.int32)
  box_w = jnp.clip(jnp.round(jnp.sqrt(area * height * width / aspect)), 1, width).astype(jnp.int32)
  k_top, k_left = jax.random.split(key)
  top = jax.random.randint(k_top, (n,), 0, height - box_h + 1)
  left = jax.random.randint(k_left, (n,), 0, width - box_w + 1)
  return top, left, box_h, box_w


def _box_masks(top, left, box_h, box_w, height, width):
  """(n, H, W, 1) boolean masks: True inside each image's rectangle."""
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
  return inside[..., None]


def erase(key, images):
  n, height, width, _ = images.shape
  k_apply, k_area, k_aspect, k_place = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (n,), minval=ERASE_AREA[0], maxval=ERASE_AREA[1])
  log_aspect = jax.random.uniform(k_aspect, (n,), minval=math.log(ERASE_ASPECT[0]),
                                  maxval=math.log(ERASE_ASPECT[1]))
  boxes = _boxes(k_place, n, height, width, area, jnp.exp(log_aspect))
  applied = jax.random.bernoulli(k_apply, ERASE_PROBABILITY, (n, 1, 1, 1))
  return jnp.where(_box_masks(*boxes, height, width) & applied, 0, images).astype(images.dtype)


def mixup(key, images, targets):
  """Each example blended with the batch's mirror image (example n-1-i), by one Beta weight."""
  weight = jax.random.beta(key, MIXUP_ALPHA, MIXUP_ALPHA)
  mixed = weight * images + (1 - weight) * images[::-1]
  return mixed.astype(images.dtype), weight * targets + (1 - weight) * targets[::-1]


def cutmix(key, images, targets):
  """One rectangle of the batch's mirror image pasted into each example, the targets mixed by
  the share of pixels each came from."""
  _, height, width, _ = images.shape
  k_weight, k_place = jax.random.split(key)
  weight = jax.random.beta(k_weight, CUTMIX_ALPHA, CUTMIX_ALPHA)
  top, left, box_h, box_w = _boxes(k_place, 1, height, width, (1 - weight)[None], jnp.ones((1,)))
  mask = _box_masks(top, left, box_h, box_w, height, width)  # one box for the batch
  pasted = (box_h * box_w / (height * width)).astype(targets.dtype)[0]
  return (jnp.where(mask, images[::-1], images).astype(images.dtype),
          (1 - pasted) * targets + pasted * targets[::-1])


IMAGE_OPS = {"shift": shift, "crop": crop, "flip": flip, "affine": affine, "erase": erase}
MIXERS = {"mixup": mixup, "cutmix": cutmix}
