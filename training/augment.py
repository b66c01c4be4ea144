"""Training-time augmentation, on device, from the step's key."""

import jax
import jax.numpy as jnp

MAX_SHIFT = 2  # pixels, for augment="shift"


def augment_images(key, images, augment: str):
  """Training-time augmentation on device. "shift": each image moved by up to MAX_SHIFT pixels
  in each direction, zero-filled (the classic MNIST augmentation); "none": unchanged."""
  if augment == "none":
    return images
  n, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * MAX_SHIFT + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(  # noqa: E731
      image, (offset[0], offset[1], 0), (height, width, channels))
  return jax.vmap(crop)(padded, offsets)
