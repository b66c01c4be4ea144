"""Batches read in grain's worker processes (or threads), in order.

Each element of the pipeline is one whole batch, `read_batch(i)` for i in a range: the batch is a
pure function of its number, so a resumed run starts its range at the step it stopped at and
nothing is replayed. grain gives worker i the elements i, i+N, ... and hands them back in order,
so the batches do not depend on the number of workers either.
"""

import os

from flaxzoo.data.types import DataError

# Batches each worker process decodes ahead of the one in use (grain's per-worker buffer).
WORKER_BUFFER_BATCHES = 4
SHARED_MEMORY_FROM_BYTES = 1 << 62


def default_workers() -> int:
  """Worker processes when none is asked for: half the cores this process may use (the training
  step's XLA threads take the rest), at least 1, at most 8."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return max(1, min(8, cores // 2))


def _absl_flags_parsed() -> None:
  # grain reads absl flags inside its workers' threads; a program that never parsed absl flags
  # (every one but absl apps) would get UnparsedFlagAccessError there.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _worker_start(worker_index: int, num_workers: int) -> None:
  # A worker outlives a killed training process otherwise, holding its output pipes open.
  from flaxzoo import runtime
  runtime.die_with_parent()
  if os.getppid() == 1:  # the parent died before the line above took effect
    os._exit(1)
  runtime.one_malloc_arena()


def batches(read_batch, numbers: range, workers: int, processes: bool = True):
  """Yields `read_batch(i)` for each i in `numbers`, in order, read by `workers` grain worker
  processes (`processes`) or threads. A DataError raised while reading comes out as itself."""
  import grain
  _absl_flags_parsed()
  if len(numbers) == 0:
    return
  dataset = grain.MapDataset.range(numbers.start, numbers.stop, numbers.step).map(read_batch)
  if processes and workers > 0:
    pipeline = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    # Batches come back pickled through grain's queue, not in shared memory blocks: grain frees
    # those on a thread that the end of the process does not wait for (reported as leaked).
    pipeline = grain.experimental.WithOptionsIterDataset(
        pipeline, grain.experimental.DatasetOptions(min_shm_size=SHARED_MEMORY_FROM_BYTES))
    pipeline = pipeline.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=WORKER_BUFFER_BATCHES), worker_init_fn=_worker_start)
  else:
    pipeline = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=max(1, workers), prefetch_buffer_size=max(2, 2 * workers)))
  iterator = iter(pipeline)
  try:
    for batch in iterator:
      yield batch
  except Exception as e:
    found = _data_error_in(e)
    if found is None:
      raise
    raise found from None  # the worker's own one-line message, not grain's wrapping
  finally:
    _stop_workers(iterator)
    close = getattr(iterator, "close", None)
    if close:
      close()


def _stop_workers(iterator) -> None:
  """Kills the worker processes under `iterator` and marks them stopped, so that its `close` has
  no worker left to wait for. grain's own stop (0.2.18) drains each worker's queue first and hung
  there for good when a worker had filled it: a run stopped by SIGTERM mid-epoch never exited.
  A worker holds nothing to save."""
  for prefetcher in _process_prefetchers(iterator):
    process = prefetcher._prefetch_process
    if process is None:  # grain stopped it already (a worker that died)
      continue
    process.kill()
    process.join()
    prefetcher._prefetch_process = None


def _process_prefetchers(node, depth: int = 0, seen: set | None = None) -> list:
  """grain's per-worker iterators (those holding a `_prefetch_process`) below `node`."""
  import multiprocessing
  seen = set() if seen is None else seen
  if depth > 12 or id(node) in seen:
    return []
  seen.add(id(node))
  if isinstance(getattr(node, "_prefetch_process", None), multiprocessing.process.BaseProcess):
    return [node]
  found = []
  for value in getattr(node, "__dict__", {}).values():
    for item in (value if isinstance(value, (list, tuple)) else [value]):
      found += _process_prefetchers(item, depth + 1, seen)
  return found


def _data_error_in(error: BaseException) -> DataError | None:
  """The DataError a worker raised, however grain passed it on (itself, or as a cause)."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, DataError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None
