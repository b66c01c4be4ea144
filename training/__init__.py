"""flaxzoo training: TrainState + optax, jitted steps, orbax checkpoints, evaluation, the CLI.

The names below load with the module that defines them, on first use, so that the CLI's light
commands (`flaxzoo --help`, `flaxzoo models`) and `flaxzoo.training.config` never load orbax or
optax.
"""

import importlib

_WHERE = {
    "checkpoint": ("load_checkpoint", "load_nnx_model", "read_card"),
    "checkpoint_analysis": ("analyze_checkpoint",),
    "config": ("Config", "ConfigError"),
    "configs": ("default_config", "named_config"),
    "errors": ("CheckpointError", "TrainingDiverged", "TrainingInterrupted"),
    "evaluation": ("eval_step", "evaluate", "predict_step"),
    "export": ("export_checkpoint", "load_exported"),
    "finetuning": ("finetune",),
    "inference": ("evaluate_checkpoint", "predict_arrays", "predict_files"),
    "pretrained": ("load_pretrained",),
    "state": ("TrainState", "create_train_state"),
    "steps": ("train_step",),
    "train": ("train_and_evaluate",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  if name not in _MODULE_OF:  # a submodule, e.g. `training.config`
    try:
      return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{name}":
        raise
      raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
  value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted({*globals(), *__all__})
