"""Batches from a split (arrays in memory, or a streaming source: `data.sources`). The order of
epoch `e` is a pure function of (seed, epoch), so a run resumed at any step sees exactly the
batches an uninterrupted run would, whichever kind of source it reads."""

import numpy as np

from flaxzoo.data import streaming
from flaxzoo.data.sources import as_source
from flaxzoo.data.types import DataError


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches only: the last partial batch of each (shuffled) epoch is dropped."""
  return num_examples // batch_size


def sorted_batch_rows(order: np.ndarray, number: int, batch_size: int, rows: slice) -> np.ndarray:
  """The example indices of batch `number` of an epoch whose order is `order`; sorted (reads in
  file order, and a faster gather in memory), then this process's `rows` of them."""
  return np.sort(order[number * batch_size:(number + 1) * batch_size])[rows]


class _TrainBatch:
  """Batch `number` (counted from batch 0 of `first_epoch`), this process's `rows` of it: what a
  grain worker computes."""

  def __init__(self, source, batch_size: int, seed: int, first_epoch: int, rows: slice):
    self.source, self.batch_size, self.seed, self.rows = source, batch_size, seed, rows
    self.first_epoch = first_epoch
    self.steps_per_epoch = steps_per_epoch(len(source), batch_size)
    self._order = (None, None)  # (epoch, its permutation)

  def __getstate__(self):
    return {**self.__dict__, "_order": (None, None)}  # each worker draws the permutations itself

  def __call__(self, number: int):
    epoch, within = divmod(number, self.steps_per_epoch)
    epoch += self.first_epoch
    if self._order[0] != epoch:
      self._order = (epoch, epoch_permutation(self.seed, epoch, len(self.source)))
    indices = sorted_batch_rows(self._order[1], within, self.batch_size, self.rows)
    try:
      return self.source.read(indices)
    except DataError as e:
      step = epoch * self.steps_per_epoch + within + 1
      raise DataError(f"{e} (in the batch of train step {step})") from e


def train_batches(split, batch_size: int, seed: int, epoch: int, start: int = 0,
                  rows: slice = slice(None), workers: int = 0, epochs: int = 1):
  """Yields (images, labels) for batches `start`, `start+1`, ... of `epoch`, then every batch of
  the next `epochs - 1` epochs; with `rows`, only those rows of each batch (one process's part of
  a global batch) are read. `split`: an (images, labels) pair or a source; a streaming source is
  read by `workers` grain processes, started once for all the epochs asked for."""
  source = as_source(split)
  read_batch = _TrainBatch(source, batch_size, seed, epoch, rows)
  numbers = range(start, epochs * read_batch.steps_per_epoch)
  if source.streams:
    yield from streaming.batches(read_batch, numbers, workers)
  else:
    yield from map(read_batch, numbers)


class _EvalBatch:
  """Examples [number * batch_size, ...) in order, the last batch padded and masked."""

  def __init__(self, source, batch_size: int):
    self.source, self.batch_size = source, batch_size

  def __call__(self, number: int):
    start = number * self.batch_size
    stop = min(start + self.batch_size, len(self.source))
    images, labels = self.source.read(np.arange(start, stop))
    pad = self.batch_size - (stop - start)
    mask = np.ones(self.batch_size, np.float32)
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      mask[stop - start:] = 0
    return images, labels, mask


def eval_batches(split, batch_size: int, workers: int = 0):
  """Yields (images, labels, mask) covering every example; the last batch is padded and masked so
  that every batch has one shape (one compilation). A streaming source is read by `workers`
  threads (a pass over a test split is too short to pay for starting processes)."""
  source = as_source(split)
  read_batch = _EvalBatch(source, batch_size)
  numbers = range(-(-len(source) // batch_size))
  if source.streams:
    yield from streaming.batches(read_batch, numbers, workers, processes=False)
  else:
    yield from map(read_batch, numbers)
