"""Evaluation and prediction: eval-mode logits (in passes when one call's temporaries would be
large), the jitted eval and predict steps, and `evaluate` over a whole split."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxzoo import data
from flaxzoo.training import metrics
from flaxzoo.training.config import TEST_TIME_AUGMENTATIONS, ConfigError
from flaxzoo.training.steps import cross_entropy, to_model_input

# Temporary memory per pass of one evaluation or prediction call. XLA allocates a program's
# temporaries as one block on every call, often on one of its own threads (strace); a block over
# 64 MB does not fit such a thread's malloc arena, so glibc maps it afresh and every 4 kB page
# faults in again (~19,000 faults in a ConvNet eval call at batch 1000 without runtime.configure's
# heap settings). A batch whose one-pass program needs more runs in one pass per EVAL_TEMP_BYTES:
# smaller chunks, each computed while its data is in cache. The block shrinks less than the chunks,
# as XLA may overlap them (batch 1024, runtime.configure's settings: the ConvNet 36.8 MB in one
# pass, 30.6 MB in two; ResNet 73.5 MB, 65.3 MB in three); LeNet-5 (55.1 MB) runs in two, the MLP
# and ViT-tiny in one.
EVAL_TEMP_BYTES = 32 << 20
MAX_PASSES = 16  # the passes are written out in the program: a bound on its size and compile time


def tta_log_probs(apply, images, tta: str = "none"):
  """`apply(images)`'s logits, or with `tta="flip"` the log of the mean of the softmax of each
  image and of its left-right mirror (test-time augmentation; log-probabilities are logits too)."""
  if tta == "none":
    return apply(images)
  if tta != "flip":
    raise ConfigError(f"tta must be {' or '.join(TEST_TIME_AUGMENTATIONS)}, got {tta!r}")
  mirrored = jnp.flip(images, axis=2)
  return jnp.logaddexp(jax.nn.log_softmax(apply(images)), jax.nn.log_softmax(apply(mirrored))) - jnp.log(2.0)


def logits_in_passes(model: nn.Module, variables, images, passes: int = 1, tta: str = "none"):
  """Eval-mode logits of `images` (N, H, W, C), `passes` chunks one after another inside one
  program (the last chunk may be shorter); `tta`: see `tta_log_probs`. The chunks are written
  out, not a `lax.map`: XLA:CPU runs the ops of a loop's body on one thread, and the ConvNet's
  eval at batch 1024 in 4-16 mapped passes ran at 0.6x the speed of the same passes written out."""
  forward = lambda x: model.apply(variables, to_model_input(x), train=False)  # noqa: E731
  apply = functools.partial(tta_log_probs, forward, tta=tta)
  if passes <= 1:
    return apply(images)
  n = images.shape[0]
  chunk = -(-n // passes)
  return jnp.concatenate([apply(jax.lax.slice_in_dim(images, start, min(start + chunk, n)))
                          for start in range(0, n, chunk)])


def passes_for(jitted, model: nn.Module, variables, images, *rest, tta: str = "none") -> int:
  """The `passes` for the call `jitted(model, variables, images, *rest, tta=tta)`: one per
  EVAL_TEMP_BYTES of the one-pass program's temporaries (XLA's memory analysis of that program),
  at most MAX_PASSES. Remembered per shape."""
  return _analysed(*_signature(jitted, model, variables, images, *rest, tta=tta))[0]


def compiled_in_passes(jitted, model: nn.Module, variables, images, *rest, tta: str = "none"):
  """`jitted(model, variables, images, *rest, passes=passes_for(...), tta=tta)` compiled ahead of
  time for these shapes; call it as `program(variables, images, *rest)`. When one pass is enough
  it is the very program `passes_for` analysed: a jitted call would compile that again (~0.5 s
  for the ConvNet on 2 cores, without the persistent compilation cache). Remembered per shape."""
  signature = _signature(jitted, model, variables, images, *rest, tta=tta)
  passes, one_pass = _analysed(*signature)
  return one_pass if passes == 1 else _compiled(*signature, passes)


def _signature(jitted, model, *args, tta: str):
  """A hashable key of a call's static parts and argument shapes (with their placement)."""
  leaves, treedef = jax.tree.flatten(args)
  specs = tuple(jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype,
                                     sharding=leaf.sharding if isinstance(leaf, jax.Array) else None)
                for leaf in leaves)
  return jitted, model, treedef, specs, tta


@functools.lru_cache(maxsize=64)
def _analysed(jitted, model, treedef, specs, tta: str):
  """(passes, the one-pass program compiled)."""
  one_pass = _compiled(jitted, model, treedef, specs, tta, 1)
  temp = getattr(one_pass.memory_analysis(), "temp_size_in_bytes", 0) or 0  # None: no analysis
  batch = jax.tree.unflatten(treedef, specs)[1].shape[0]
  return int(max(1, min(batch, MAX_PASSES, -(-temp // EVAL_TEMP_BYTES)))), one_pass


@functools.lru_cache(maxsize=64)
def _compiled(jitted, model, treedef, specs, tta: str, passes: int):
  return jitted.lower(model, *jax.tree.unflatten(treedef, specs), passes=passes, tta=tta).compile()


TOP_K = 5


@functools.partial(jax.jit, static_argnums=0, static_argnames=("passes", "tta"))
def eval_step(model: nn.Module, variables, images, labels, mask, passes: int = 1, tta: str = "none"):
  """Sums over one (padded) batch: loss, correct predictions, real examples, and the confusion
  matrix (rows: true class, columns: predicted class). `passes`: see `passes_for`; `tta`: see
  `tta_log_probs`."""
  logits = logits_in_passes(model, variables, images, passes, tta)
  predictions = jnp.argmax(logits, -1)
  num_classes = logits.shape[-1]
  confusion = jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, predictions].add(
      mask.astype(jnp.int32))
  sums = {"loss_sum": jnp.sum(cross_entropy(logits, labels) * mask),
          "correct": jnp.sum((predictions == labels) * mask),
          "count": jnp.sum(mask),
          "confusion": confusion}
  if num_classes > TOP_K:  # top-5 accuracy, where it differs from 100 %
    top = jax.lax.top_k(logits, TOP_K)[1]
    sums["top5_correct"] = jnp.sum(jnp.any(top == labels[:, None], axis=-1) * mask)
  return sums


@functools.partial(jax.jit, static_argnums=0, static_argnames=("passes", "tta"))
def logits_step(model: nn.Module, variables, images, passes: int = 1, tta: str = "none"):
  return logits_in_passes(model, variables, images, passes, tta)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("passes", "tta"))
def predict_step(model: nn.Module, variables, images, passes: int = 1, tta: str = "none"):
  return jax.nn.softmax(logits_in_passes(model, variables, images, passes, tta))


def evaluate(model, variables, split, batch_size: int, class_names=None, layout=None,
             workers: int = 0, tta: str = "none") -> dict:
  """Loss, accuracy and macro-F1 over every example of `split` ((images, labels) or a source, read
  by `workers` threads if it streams; the last batch is padded and masked); with `class_names`,
  also per-class accuracy and the confusion matrix (see `training.metrics`). With a
  `parallel.Layout` of several devices, each batch is split over them (this process reads its rows).
  `tta`: test-time augmentation (`tta_log_probs`), named in the result when not "none"."""
  if layout is not None and layout.num_devices > 1:
    sums = _sharded_eval_sums(model, variables, split, batch_size, layout, workers, tta)
  else:
    batches = data.eval_batches(split, batch_size, workers)  # all of one shape: one `passes`
    first = next(batches)
    program = compiled_in_passes(eval_step, model, variables, *first, tta=tta)
    sums = jax.device_get([program(variables, *batch) for batch in itertools.chain([first], batches)])
  totals = {k: np.sum([s[k] for s in sums], axis=0) for k in sums[0]}
  names = class_names or [str(i) for i in range(len(totals["confusion"]))]
  report = metrics.classification_metrics(totals["confusion"], names)
  result = {"loss": float(totals["loss_sum"] / totals["count"]),
            "accuracy": float(totals["correct"] / totals["count"]),
            "macro_f1": report["macro_f1"],
            "num_examples": int(totals["count"])}
  if "top5_correct" in totals:
    result["top5_accuracy"] = float(totals["top5_correct"] / totals["count"])
  if tta != "none":
    result["tta"] = tta
  if class_names:
    result.update((k, report[k]) for k in ("per_class_accuracy", "per_class", "class_names",
                                           "confusion_matrix"))
  return result


def _sharded_eval_sums(model, variables, split, batch_size: int, layout, workers: int,
                       tta: str) -> list[dict]:
  """`eval_step`'s sums per batch, each batch split over `layout`'s devices. The batch is rounded
  up to a multiple of the device count (padding is masked, so the sums are the same); one pass
  per call, as each device holds only its share."""
  from flaxzoo.training import parallel
  batch_size += -batch_size % layout.num_devices
  rows = parallel.process_rows(layout, batch_size)
  # Each batch's sums fetched before the next is sent: see `Layout.waits_for_each_step`.
  return [parallel.host_values(eval_step(model, variables,
                                         *parallel.global_batch(layout, *(x[rows] for x in batch)),
                                         tta=tta))
          for batch in data.eval_batches(split, batch_size, workers)]
