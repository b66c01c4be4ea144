"""Orbax checkpoints: the full train state plus a JSON model card, one folder per step.

Layout: WORKDIR/<step>/state (orbax PyTree) and WORKDIR/<step>/card (JSON). The card alone is
enough to rebuild the model: `load_checkpoint` needs no code or config from the training run.
"""

import dataclasses
import importlib.metadata
from pathlib import Path

import jax
import orbax.checkpoint as ocp

import models
from training.config import Config
from training.state import TrainState

CARD_FORMAT = "flaxzoo-model-card/1"


class CheckpointError(Exception):
  """A checkpoint problem the user can fix; the message is one line saying how."""


def open_manager(workdir, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, enable_async_checkpointing=not read_only,
      create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(Path(workdir).absolute(), options=options)


def saved_steps(workdir) -> list[int]:
  """Steps of the finalised checkpoints in `workdir` (none when it does not exist)."""
  if not Path(workdir).is_dir():
    return []
  with open_manager(workdir, read_only=True) as manager:
    return list(manager.all_steps())


def make_card(model, config: Config, dataset_info, step: int, epoch: float, metrics: dict) -> dict:
  versions = {pkg: importlib.metadata.version(pkg)
              for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")}
  return {
      "format": CARD_FORMAT,
      "model": {"name": model.registered_name, "kwargs": models.model_kwargs(model)},
      "num_classes": model.num_classes,
      "input_shape": list(dataset_info.image_shape),
      "input": "uint8 pixels, or float32 already scaled to [0, 1]; NHWC",
      "dataset": {"name": dataset_info.name, "class_names": list(dataset_info.class_names),
                  "num_examples": dict(dataset_info.num_examples)},
      "config": dataclasses.asdict(config),
      "step": step,
      "epoch": epoch,
      "metrics": metrics,
      "versions": versions,
  }


def save(manager: ocp.CheckpointManager, state: TrainState, card: dict) -> None:
  """Starts an asynchronous save; orbax commits the step folder atomically when it finishes."""
  manager.save(int(card["step"]), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), card=ocp.args.JsonSave(card)))


def read_card(workdir, step: int | None = None) -> dict:
  """The model card of `step` (default: the latest checkpoint) in `workdir`."""
  steps = saved_steps(workdir)
  if not steps:
    raise CheckpointError(no_checkpoint_message(workdir))
  step = max(steps) if step is None else step
  if step not in steps:
    raise CheckpointError(f"{workdir} has no checkpoint for step {step}; it has steps "
                          f"{', '.join(map(str, steps))}")
  with open_manager(workdir, read_only=True) as manager:
    card = manager.restore(step, args=ocp.args.Composite(card=ocp.args.JsonRestore())).card
  if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
    raise CheckpointError(f"{workdir}/{step} is not a flaxzoo checkpoint (no {CARD_FORMAT} card)")
  return card


def no_checkpoint_message(workdir) -> str:
  where = "does not exist" if not Path(workdir).exists() else "has no checkpoint"
  return f"{workdir} {where}; train one first with: flaxzoo train --workdir {workdir}"


def _restore_target(tree):
  """Shapes and dtypes of `tree`, placed on the default device (restored as jax arrays there)."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def restore_state(manager: ocp.CheckpointManager, step: int, target: TrainState) -> TrainState:
  """The full train state of `step`, shaped like `target` (a real or `jax.eval_shape` state)."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_restore_target(target))))
  return restored.state


def model_from_card(card: dict):
  return models.create_model(card["model"]["name"], num_classes=card["num_classes"],
                             **card["model"]["kwargs"])


def load_checkpoint(workdir, step: int | None = None):
  """Returns `(model, variables, card)` from a checkpoint, rebuilding the model from its card.

  Only the model's variables (params, and batch_stats where the model has them) are read, so this
  works whatever optimizer trained the model.
  """
  card = read_card(workdir, step)
  model = model_from_card(card)
  shape = (1, *card["input_shape"])
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros(shape)))
  target = _restore_target(dict(abstract))
  with open_manager(workdir, read_only=True) as manager:
    restored = manager.restore(card["step"], args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  return model, restored.state, card
