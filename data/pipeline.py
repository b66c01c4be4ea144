"""Batches from in-memory arrays. The order of epoch `e` is a pure function of (seed, epoch), so a
run resumed at any step sees exactly the batches an uninterrupted run would."""

import numpy as np


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches only: the last partial batch of each (shuffled) epoch is dropped."""
  return num_examples // batch_size


def train_batches(images, labels, batch_size: int, seed: int, epoch: int, start: int = 0,
                  rows: slice = slice(None)):
  """Yields (images, labels) for batches `start`, `start+1`, ... of `epoch`; with `rows`, only
  those rows of each batch (one process's part of a global batch) are read."""
  order = epoch_permutation(seed, epoch, len(images))
  for i in range(start, steps_per_epoch(len(images), batch_size)):
    idx = np.sort(order[i * batch_size:(i + 1) * batch_size])[rows]  # sorted: faster gather
    yield images[idx], labels[idx]


def eval_batches(images, labels, batch_size: int):
  """Yields (images, labels, mask) covering every example; the last batch is padded and masked so
  that every batch has one shape (one compilation)."""
  n = len(images)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    batch_images, batch_labels = images[start:stop], labels[start:stop]
    mask = np.ones(batch_size, np.float32)
    if pad:
      batch_images = np.concatenate([batch_images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      batch_labels = np.concatenate([batch_labels, np.zeros(pad, labels.dtype)])
      mask[stop - start:] = 0
    yield batch_images, batch_labels, mask
