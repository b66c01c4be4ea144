"""Orbax checkpoints: the full train state plus a JSON model card, one folder per step.

Layout: WORKDIR/<step>/state (orbax PyTree) and WORKDIR/<step>/card (JSON). The card alone is
enough to rebuild the model: `load_checkpoint` needs no code or config from the training run.

Integrity: orbax writes each step into a temporary folder and renames it when complete, so a
killed save leaves no half-written step. Old steps are deleted only after a newer one is
committed. The card holds a sha256 fingerprint of every part of the state; a restore that reads
other bytes (truncated, damaged or missing files) calls the checkpoint unreadable, and callers
fall back to the newest one that reads back exactly. Nothing here unpickles: the state is
tensorstore arrays, the card JSON.
"""

import contextlib
import dataclasses
import datetime
import functools
import gc
import hashlib
import importlib.metadata
import logging
import re
import shutil
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from flaxzoo import models
from flaxzoo.training import parallel
from flaxzoo.training.config import Config
from flaxzoo.training.errors import CheckpointError
from flaxzoo.training.state import TrainState, copy_of

CARD_FORMAT = "flaxzoo-model-card/1"


class UnreadableCheckpoint(CheckpointError):
  """One step's checkpoint cannot be read back as it was written."""

  def __init__(self, workdir, step: int, reason: str):
    super().__init__(f"checkpoint {workdir}/{step} is unreadable: {reason}")
    self.step, self.reason = step, reason


UNREADABLE_DIR = "unreadable"  # where training moves unreadable steps (never deletes them)
ITEM_NAMES = ("state", "card")  # what each flaxzoo step folder holds


def is_flaxzoo_step(workdir, step: int) -> bool:
  """Whether a step folder holds a flaxzoo checkpoint (a card), not some other orbax save."""
  return (Path(workdir) / str(step) / "card").is_dir()


def open_manager(workdir, read_only: bool = False) -> ocp.CheckpointManager:
  """Retention is ours (see `save`), so orbax never deletes a step on its own."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None, enable_async_checkpointing=not read_only, create=not read_only,
      read_only=read_only, save_interval_steps=0 if read_only else 1,
      cleanup_tmp_directories=not read_only,  # leftovers of killed saves
      # A reader writes nothing, so it needs no barrier with the other processes of a
      # multi-process run (they list and read steps each on its own).
      save_root_metadata=not read_only)
  # Named items: without them orbax infers single-item mode from the newest step, and one foreign
  # (not flaxzoo) checkpoint there made every flaxzoo step unreadable.
  manager = functools.partial(ocp.CheckpointManager, Path(workdir).absolute(), options=options,
                              item_names=ITEM_NAMES)
  if not read_only:
    manager = manager()
    if jax.process_count() > 1:
      # Which steps are another program's is decided once, here: the processes of a run must
      # delete the same steps in the same order (each delete is a barrier), and the first
      # process deleting a folder must not change what the others decide.
      manager.flaxzoo_foreign_steps = {s for s in manager.all_steps()
                                       if not is_flaxzoo_step(workdir, s)}
    return manager
  with _absl_quiet():  # orbax warns "Given directory is read only" on every read-only open
    return manager()


@contextlib.contextmanager
def _absl_quiet():
  import absl.logging
  level = absl.logging.get_verbosity()
  absl.logging.set_verbosity(min(level, absl.logging.ERROR))  # lower = fewer messages
  try:
    yield
  finally:
    absl.logging.set_verbosity(level)


def saved_steps(workdir) -> list[int]:
  """Steps of the finalised checkpoints in `workdir` (none when it does not exist)."""
  if not Path(workdir).is_dir():
    return []
  with open_manager(workdir, read_only=True) as manager:
    return list(manager.all_steps())


def make_card(model, config: Config, dataset_info, step: int, epoch: float, metrics: dict) -> dict:
  versions = {pkg: importlib.metadata.version(pkg)
              for pkg in ("flaxzoo", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint")}
  return {
      "format": CARD_FORMAT,
      "model": {"name": model.registered_name, "kwargs": models.model_kwargs(model)},
      "num_classes": model.num_classes,
      "input_shape": list(dataset_info.image_shape),
      "input": "uint8 pixels, or float32 already scaled to [0, 1]; NHWC",
      "dtype": {"params": "float32", "training_compute": config.dtype},
      # Which weights eval, predict, export and fine-tune read (`load_checkpoint`).
      "weights": f"ema (decay {config.ema_decay})" if config.ema_decay else "trained",
      "dataset": {"name": dataset_info.name, "class_names": list(dataset_info.class_names),
                  "num_examples": dict(dataset_info.num_examples),
                  **({"split_rule": dataset_info.split_rule} if dataset_info.split_rule else {})},
      "config": dataclasses.asdict(config),
      "step": step,
      "epoch": epoch,
      "metrics": metrics,
      "versions": versions,
  }


def fingerprint(tree) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = parallel.host_value(leaf)  # a replica of an array that spans processes
    digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


STATE_PARTS = ("params", "batch_stats", "opt_state", "step", "rng", "ema_params", "ema_batch_stats")


def state_fingerprints(state: TrainState) -> dict:
  return {part: fingerprint(getattr(state, part)) for part in STATE_PARTS}


def _verify(workdir, step: int, card: dict, parts: dict) -> None:
  expected = card.get("fingerprints") or {}  # cards written before fingerprints had none
  for part, tree in parts.items():
    if part in expected and fingerprint(tree) != expected[part]:
      raise UnreadableCheckpoint(workdir, step, f"its {part} do not match the fingerprint saved "
                                 f"with them (damaged files)")


def save(manager: ocp.CheckpointManager, state: TrainState, card: dict, keep: int) -> None:
  """Starts an asynchronous save of `state` and `card` as step `card["step"]`.

  First waits for the previous save to commit (raising if it failed) and only then deletes steps
  beyond the newest `keep`, so a failed or killed save never costs a committed checkpoint.
  """
  step = int(card["step"])
  card = dict(card, fingerprints=state_fingerprints(state))
  with _save_errors(manager, step):
    wait(manager, keep)
    saved = manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), card=ocp.args.JsonSave(card)))
  if not saved:  # orbax skips, without an error, a step at or below the newest it holds
    raise CheckpointError(f"step {step} was not saved: {manager.directory} already holds step "
                          f"{manager.latest_step()}; move that step folder away or use another --workdir")


def wait(manager: ocp.CheckpointManager, keep: int | None = None) -> None:
  """Blocks until the save in flight (if any) is committed, raising CheckpointError if it failed;
  then deletes committed steps beyond the newest `keep`."""
  with _save_errors(manager, manager.latest_step()):  # the step in flight, if one is
    manager.wait_until_finished()
    manager.check_for_errors()
    ours = _own_steps(manager)
    for old in ours[:-keep] if keep else []:  # another program's checkpoints are never deleted
      manager.delete(old)


def _own_steps(manager) -> list[int]:
  """The manager's flaxzoo steps, oldest first (see `open_manager` for several processes)."""
  steps = sorted(manager.all_steps())
  foreign = getattr(manager, "flaxzoo_foreign_steps", None)
  if foreign is not None:
    return [s for s in steps if s not in foreign]
  return [s for s in steps if is_flaxzoo_step(manager.directory, s)]


class _save_errors:
  """Turns any failure while saving into one CheckpointError line naming what is still intact."""

  def __init__(self, manager, step):
    self.manager, self.step = manager, step

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback):
    if error is None or isinstance(error, CheckpointError) or not isinstance(error, Exception):
      return False
    workdir = self.manager.directory
    committed = sorted(s for s in _committed_steps(workdir) if s != self.step)
    intact = (f"the committed checkpoints ({', '.join(map(str, committed))}) are intact"
              if committed else "no earlier checkpoint exists")
    what = f"step {self.step}" if self.step is not None else "a checkpoint"
    raise CheckpointError(f"saving {what} in {workdir} failed ({_save_reason(error)}); {intact}. "
                          f"Free disk space or choose another --workdir, then run again to continue"
                          ) from error


def _save_reason(error: Exception) -> str:
  """The OS's words when tensorstore failed to write a file (its message is mostly a spec, which
  may stand between those words and the error code), else the error's first line."""
  os_error = re.search(r"Failed to write [^:]*: ([^\[]+?)\s*\[.*os_error_code", str(error),
                       re.DOTALL)
  return f"{os_error.group(1)}, writing its array data" if os_error else _reason(error)


def _committed_steps(workdir) -> list[int]:
  try:
    return saved_steps(workdir)
  except Exception:  # listing itself failed: claim nothing
    return []


# In the names of orbax's temporary folders (a save not yet committed).
TMP_MARK = ".orbax-checkpoint-tmp"


def check_free_space(workdir, state: TrainState, keep: int) -> None:
  """Raises when the disk cannot hold the checkpoints this run will add: at most `keep` + 1 are on
  disk at once (one being written), and those already committed count among them. Orbax's
  temporary folders of an interrupted save count as free: they are removed when training starts."""
  size = sum(x.nbytes for x in jax.tree.leaves(state))  # no host copy
  committed = len([s for s in saved_steps(workdir) if is_flaxzoo_step(workdir, s)])
  new = keep + 1 - min(committed, keep)
  needed = new * size + (1 << 20)
  leftovers = sum(f.stat().st_size for tmp in Path(workdir).glob(f"*{TMP_MARK}*")
                  for f in tmp.rglob("*") if f.is_file()) if Path(workdir).exists() else 0
  free = shutil.disk_usage(workdir).free + leftovers
  if free < needed:
    raise CheckpointError(f"not enough free disk space in {workdir}: {new} more checkpoint(s) need "
                          f"about {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB are free; free some "
                          f"space or choose another --workdir")


def _read_card(manager, workdir, step: int) -> dict:
  if not is_flaxzoo_step(workdir, step):
    raise UnreadableCheckpoint(workdir, step, "not a flaxzoo checkpoint (it has no card); it is "
                               "left as it is")
  try:
    card = manager.restore(step, args=ocp.args.Composite(card=ocp.args.JsonRestore())).card
  except Exception as e:
    raise UnreadableCheckpoint(workdir, step, f"its card cannot be read ({_reason(e)})") from e
  if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
    raise UnreadableCheckpoint(workdir, step, f"no {CARD_FORMAT} card (not a flaxzoo checkpoint)")
  return card


def _reason(error: Exception) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" See full TensorStore details")[0]  # the rest is a repr of a bound method
  return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def newest_readable(workdir, restore, step: int | None = None, quiet: bool = False):
  """`(step, restore(manager, step))` for the newest step that `restore` reads without error.

  With `step` given, only that step is tried. Each unreadable step is reported in one line on
  stderr (unless `quiet`) and skipped; the list of skipped steps is returned as a third value.
  Raises CheckpointError when no step is readable; nothing is changed on disk.
  """
  steps = saved_steps(workdir)
  if not steps:
    raise CheckpointError(no_checkpoint_message(workdir))
  if step is not None and step not in steps:
    raise CheckpointError(f"{workdir} has no checkpoint for step {step}; it has steps "
                          f"{', '.join(map(str, steps))}")
  candidates = [step] if step is not None else sorted(steps, reverse=True)
  skipped = []
  with open_manager(workdir, read_only=True) as manager:
    for candidate in candidates:
      try:
        with _quiet_failed_reads():
          return candidate, restore(manager, candidate), skipped
      except UnreadableCheckpoint as e:
        skipped.append(e)
        if not quiet and step is None:
          print(f"flaxzoo: warning: {e}; trying the one before it", file=sys.stderr)
  if step is not None:
    raise skipped[0]
  reasons = "; ".join(f"step {e.step}: {e.reason}" for e in skipped)
  raise CheckpointError(f"no readable checkpoint in {workdir} ({reasons}); nothing was changed. "
                        f"Delete the workdir to start over, or pass another --workdir")


@contextlib.contextmanager
def _quiet_failed_reads():
  """After a failed tensorstore read, orbax's other read tasks end with errors nobody retrieves:
  asyncio logs each one (kilobytes of spec) when collected, reads it never started warn that they
  were never awaited, and tensorstore threads that finish late find orbax's event loop closed. Our
  one line says it all, so all three are kept quiet."""
  log = logging.getLogger("asyncio")
  level = log.level
  log.setLevel(logging.CRITICAL)
  try:
    yield
  except UnreadableCheckpoint:
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _drop_closed_loop_errors(previous_hook)
    try:
      with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        gc.collect()  # collect the tasks now, while asyncio is quiet
    finally:
      sys.unraisablehook = previous_hook
    raise
  finally:
    log.setLevel(level)


def ignore_closed_loop_callbacks() -> None:
  """For the CLI's whole process: after a failed read, tensorstore threads that finish late find
  orbax's event loop closed, and orbax's abandoned read coroutines die with the same error when
  collected: Python would print a traceback for each (hundreds of lines). The CLI's one line has
  said what matters; these are dropped. Library calls only drop those collected at once."""
  if not getattr(sys.unraisablehook, "flaxzoo", False):
    sys.unraisablehook = _drop_closed_loop_errors(sys.unraisablehook)


def _drop_closed_loop_errors(previous):
  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    from_orbax = code is not None and "orbax" in code.co_filename
    closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                   and str(unraisable.exc_value) == "Event loop is closed")
    if not (from_orbax or closed_loop):
      previous(unraisable)
  hook.flaxzoo = True
  return hook


def read_card(workdir, step: int | None = None, quiet: bool = True) -> dict:
  """The model card of `step` (default: the newest readable checkpoint) in `workdir`."""
  return newest_readable(workdir, lambda m, s: _read_card(m, workdir, s), step, quiet)[1]


def set_aside(workdir, skipped: list[UnreadableCheckpoint]) -> None:
  """Moves unreadable steps into WORKDIR/unreadable/ so training can save those steps again."""
  for error in skipped:  # another program's checkpoint too: orbax saves no step below one it has
    target = Path(workdir) / UNREADABLE_DIR / str(error.step)
    if target.exists():
      target = target.with_name(f"{error.step}-{datetime.datetime.now():%Y%m%dT%H%M%S%f}")
    target.parent.mkdir(exist_ok=True)
    (Path(workdir) / str(error.step)).rename(target)
    print(f"flaxzoo: moved the unreadable checkpoint of step {error.step} to {target}",
          file=sys.stderr)


def no_checkpoint_message(workdir) -> str:
  where = "does not exist" if not Path(workdir).exists() else "has no checkpoint"
  return f"{workdir} {where}; train one first with: flaxzoo train --workdir {workdir}"


def _restore_target(tree, sharding=None):
  """Shapes and dtypes of `tree`, placed with `sharding` (default: on the default device). Orbax
  reads each array into whatever sharding it is given, so a checkpoint written by N devices
  restores onto M."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _read_state(manager, workdir, step: int, restore_args):
  """The `state` item of `step` read with `restore_args`; any failure is UnreadableCheckpoint."""
  try:
    return manager.restore(step, args=ocp.args.Composite(state=restore_args)).state
  except Exception as e:
    raise UnreadableCheckpoint(workdir, step, f"its state cannot be read ({_reason(e)})") from e


def restore_latest(workdir, target: TrainState, sharding=None):
  """`(state, card, skipped)`: the newest checkpoint in `workdir` that reads back exactly.

  `target` gives the structure, shapes and dtypes (a real or `jax.eval_shape` state); `sharding`
  where its arrays go (default: the default device).
  """
  # Read part by part: checkpoints written before the EMA existed have no `ema_params`.
  parts = {part: getattr(target, part) for part in STATE_PARTS
           if part not in ("ema_params", "ema_batch_stats") or getattr(target, part)}
  parts_target = _restore_target(parts, sharding)

  def restore(manager, step):
    card = _read_card(manager, workdir, step)
    read = {part: t for part, t in parts_target.items() if part != "ema_batch_stats" or _has_ema_stats(card)}
    state = target.replace(**_read_state(manager, workdir, step, ocp.args.PyTreeRestore(
        item=read, restore_args=ocp.checkpoint_utils.construct_restore_args(read), partial_restore=True)))
    if "ema_batch_stats" in parts and "ema_batch_stats" not in read:
      # Saved before the EMA kept BatchNorm statistics: it starts from the live ones.
      state = state.replace(ema_batch_stats=copy_of(state.batch_stats))
    _verify(workdir, step, card, {part: getattr(state, part) for part in STATE_PARTS if part in read})
    return state, card

  _, (state, card), skipped = newest_readable(workdir, restore)
  return state, card, skipped


def _has_ema_stats(card: dict) -> bool:
  """Whether the checkpoint holds an EMA of the BatchNorm statistics (those saved before it had
  none: their EMA's params are then read with the live statistics)."""
  return "ema_batch_stats" in (card.get("fingerprints") or {})


def model_from_card(card: dict):
  return models.create_model(card["model"]["name"], num_classes=card["num_classes"],
                             **card["model"]["kwargs"])


def load_checkpoint(workdir, step: int | None = None):
  """Returns `(model, variables, card)` from a checkpoint, rebuilding the model from its card.

  Only the model's variables (params, and batch_stats where the model has them) are read, so this
  works whatever optimizer trained the model. A run that kept an EMA of its weights gives the
  EMA's as params (its card's "weights" says so).
  """
  def restore(manager, step):
    card = _read_card(manager, workdir, step)
    model = model_from_card(card)
    variables = models.abstract_variables(model, card["input_shape"])
    ema = bool(card["config"].get("ema_decay"))
    part_of = {"params": "ema_params" if ema else "params",
               "batch_stats": "ema_batch_stats" if ema and _has_ema_stats(card) else "batch_stats"}
    target = _restore_target({part_of[k]: v for k, v in variables.items()})
    parts = _read_state(manager, workdir, step, ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    _verify(workdir, step, card, parts)
    return model, {k: parts[part_of[k]] for k in variables}, card

  return newest_readable(workdir, restore, step)[1]


def load_nnx_model(workdir, step: int | None = None, rngs=None):
  """Returns `(nnx_model, card)`: the checkpoint's model as a Flax NNX module holding its weights
  (and BatchNorm statistics), through `flax.nnx.bridge`; its logits equal the linen model's."""
  model, variables, card = load_checkpoint(workdir, step)
  return models.to_nnx(model, card["input_shape"], variables, rngs), card
