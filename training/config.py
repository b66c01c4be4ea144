"""The training configuration: one dataclass, its defaults, and checked overrides."""

import dataclasses
import difflib
import math
import re
import typing


class ConfigError(ValueError):
  """A configuration the user must change; the message says what and how."""


@dataclasses.dataclass
class Config:
  # What is trained. Defaults reach >= 99.0 % MNIST test accuracy (README, Result); per-model
  # recipes on top of these are in training/configs.py.
  model: str = "convnet"
  model_kwargs: dict = dataclasses.field(default_factory=dict)  # constructor args, e.g. widths
  dataset: str = "mnist"
  # How. Adam on a one-cycle learning-rate schedule over the whole run.
  epochs: int = 3
  batch_size: int = 128
  learning_rate: float = 1e-2  # peak of the one-cycle schedule
  warmup_fraction: float = 0.2  # share of all steps spent rising to the peak
  weight_decay: float = 0.0  # decoupled (AdamW) weight decay
  optimizer: str = "adamw"  # adamw | sgd (Nesterov momentum 0.9)
  schedule: str = "onecycle"  # onecycle (warm-up, cosine decay) | cosine | linear | step | constant
  label_smoothing: float = 0.0  # of the training loss (optax.smooth_labels)
  ema_decay: float = 0.0  # > 0: keep an EMA of the weights; eval, export, fine-tune use it
  grad_accum: int = 1  # micro-batches per optimizer step (batch_size / grad_accum rows each)
  seed: int = 0
  train_examples: int = 0  # > 0: train on the first N training examples only (quick runs, tests)
  test_examples: int = 0  # > 0: evaluate on the first N test examples only
  eval_batch_size: int = 1000
  tta: str = "none"  # test-time augmentation of eval and predict: none | flip (image and mirror)
  # Checkpoints and logs.
  checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
  keep_checkpoints: int = 3
  log_every_steps: int = 100  # a train record in metrics.jsonl every N steps (and at epoch ends)
  dtype: str = "float32"  # training compute: float32 or bfloat16 (params, optimizer state: float32)
  augment: str = "none"  # none, or comma-separated names of training/augment.py's AUGMENTATIONS
  profile_steps: str = ""  # "A:B": a jax.profiler trace of train steps A..B in WORKDIR/profile/
  # Fine-tuning (set by `flaxzoo finetune` / `training.finetune`; see training/finetuning.py).
  init_from: str | None = None  # workdir whose checkpoint initialises the model
  init_step: int | None = None  # that checkpoint's step, fixed when the fine-tune starts
  freeze: str = "none"  # none | backbone | comma-separated wildcards of parameter paths
  head_learning_rate: float | None = None  # peak learning rate of the head; None: learning_rate
  head: str = "auto"  # auto | keep | reinit: how the source's classifier serves the new classes
  class_map: dict | None = None  # {new class name: source class name}: rows kept by this map
  input_shape: list | None = None  # [H, W, C] the images are converted to; None: the dataset's
  test_fraction: float = 0.2  # image folders without test/: share of each class held out
  # Where data come from (not part of what makes two runs the same run).
  data_dir: str | None = None  # tfds data dir; None = tfds's default (honours TFDS_DATA_DIR)
  manual_dir: str | None = None  # raw files; None = $FLAXZOO_MANUAL_DIR/<dataset> or download
  config_file: str | None = None  # the --config file these settings started from (configs/*.toml)
  # How data are read (the batches are the same either way): in memory, or by index from disk in
  # grain worker processes; auto streams a split too large for memory (data.IN_MEMORY_MAX_BYTES).
  streaming: str = "auto"  # auto | on | off
  workers: int | None = None  # grain worker processes when streaming; None: data.default_workers()


SCHEDULES = ("onecycle", "cosine", "linear", "step", "constant")

# Fields that `flaxzoo train`/`finetune` also take as a flag (--batch-size ...); the others only
# through --set KEY=VALUE or a config file.
FIELDS_WITH_FLAGS = ("model", "dataset", "epochs", "batch_size", "learning_rate", "seed", "manual_dir",
                     "data_dir", "checkpoint_every_steps", "freeze", "head_learning_rate", "dtype",
                     "head", "profile_steps", "log_every_steps", "optimizer", "schedule",
                     "label_smoothing", "streaming", "workers", "ema_decay", "grad_accum", "augment", "tta")

# Fields that must match for a checkpoint to continue the same run.
RUN_IDENTITY_FIELDS = ("model", "model_kwargs", "dataset", "batch_size", "seed", "train_examples",
                       "init_from", "init_step", "freeze", "head", "class_map", "input_shape",
                       "test_fraction", "optimizer", "ema_decay", "grad_accum")


# Training-time augmentations (training/augment.py): what each name does, in the order they run.
AUGMENTATIONS = {
    "shift": "move by up to 2 pixels each way, zero-filled",
    "crop": "pad 4 pixels of zeros, cut a random window of the image's size",
    "flip": "mirror left-right with probability 1/2 (not for digits)",
    "affine": "rotate up to 15 degrees, scale 0.9-1.1, move up to 10 % (bilinear)",
    "erase": "random erasing: with probability 1/2 a random rectangle set to 0",
    "mixup": "blend each image and its targets with another's of the batch",
    "cutmix": "paste a rectangle of another image of the batch; targets by area",
}
MIXING = ("mixup", "cutmix")

# Test-time augmentations (training/evaluation.py's tta_log_probs).
TEST_TIME_AUGMENTATIONS = ("none", "flip")


def parse_augment(augment: str) -> tuple[str, ...]:
  """'erase, affine' -> ('affine', 'erase'): the names in running order; 'none' -> ()."""
  names = {name.strip() for name in augment.split(",")} - {"none", ""}
  return tuple(name for name in AUGMENTATIONS if name in names)


def unknown_augmentations(augment: str) -> list[str]:
  return sorted({name.strip() for name in augment.split(",")} - set(AUGMENTATIONS) - {"none", ""})


def mixes_targets(augment: str) -> bool:
  return any(name in MIXING for name in parse_augment(augment))


def _field_types() -> dict[str, type]:
  return typing.get_type_hints(Config)


def _check_type(key: str, value, expected) -> None:
  allowed = typing.get_args(expected) or (expected,)
  if expected is float:
    allowed = (int, float)
  ok = any(value is None if t is type(None) else
           isinstance(value, t) and not (isinstance(value, bool) and t in (int, float))
           for t in allowed)
  if not ok:
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"config field {key!r} must be {names}, got {value!r} "
                      f"({type(value).__name__})")


def override(config: Config, overrides: dict) -> Config:
  """A copy of `config` with `overrides` applied; unknown keys and wrong types raise ConfigError."""
  types = _field_types()
  for key, value in overrides.items():
    if key not in types:
      close = difflib.get_close_matches(key, types, n=3)
      hint = f" Did you mean {', '.join(close)}?" if close else ""
      raise ConfigError(f"unknown config field {key!r}.{hint} Fields: {', '.join(types)}")
    _check_type(key, value, types[key])
  values = {k: (float(v) if types[k] is float else v) for k, v in overrides.items()}
  return dataclasses.replace(config, **values)


def from_dict(values: dict) -> Config:
  """A Config from a JSON dict (a model card's), type-checked like any override."""
  return override(Config(), values)


def validate(config: Config) -> None:
  """Value checks that types alone cannot make; raises ConfigError naming the fix."""
  rules = [
      ("epochs", config.epochs >= 1, "at least 1"),
      ("batch_size", config.batch_size >= 1, "at least 1"),
      ("learning_rate", 0 < config.learning_rate < math.inf, "a finite number greater than 0"),
      ("seed", 0 <= config.seed < 2**32, "in [0, 2**32)"),
      ("warmup_fraction", 0 <= config.warmup_fraction < 1, "in [0, 1)"),
      ("weight_decay", config.weight_decay >= 0, "0 or more"),
      ("train_examples", config.train_examples >= 0, "0 (all) or more"),
      ("test_examples", config.test_examples >= 0, "0 (all) or more"),
      ("eval_batch_size", config.eval_batch_size >= 1, "at least 1"),
      ("checkpoint_every_steps", config.checkpoint_every_steps >= 0, "0 (epoch ends only) or more"),
      ("keep_checkpoints", config.keep_checkpoints >= 1, "at least 1"),
      ("log_every_steps", config.log_every_steps >= 1, "at least 1"),
      ("head_learning_rate", config.head_learning_rate is None or 0 < config.head_learning_rate < math.inf,
       "a finite number greater than 0"),
      ("input_shape", config.input_shape is None or (
          len(config.input_shape) == 3 and all(isinstance(n, int) and n > 0 for n in config.input_shape)
          and config.input_shape[2] in (1, 3)), "[height, width, 1 or 3]"),
      ("test_fraction", 0 < config.test_fraction < 1, "in (0, 1)"),
      ("freeze", bool(config.freeze.strip()), "none, backbone or wildcards of parameter paths"),
      ("dtype", config.dtype in ("float32", "bfloat16"), "float32 or bfloat16"),
      ("head", config.head in ("auto", "keep", "reinit"), "auto, keep or reinit"),
      ("class_map", config.class_map is None or all(
          isinstance(k, str) and isinstance(v, str) for k, v in config.class_map.items()),
       "a JSON object of class names, {\"new name\": \"checkpoint name\"}"),
      ("augment", not unknown_augmentations(config.augment) and (
          parse_augment(config.augment) or config.augment.strip() == "none"),
       "none or comma-separated names from " + ", ".join(AUGMENTATIONS)),
      ("augment", not set(MIXING) <= set(parse_augment(config.augment)),
       "a list naming at most one of mixup and cutmix"),
      ("tta", config.tta in TEST_TIME_AUGMENTATIONS, " or ".join(TEST_TIME_AUGMENTATIONS)),
      ("ema_decay", 0 <= config.ema_decay < 1, "in [0, 1): 0 (no EMA) or e.g. 0.999"),
      ("grad_accum", config.grad_accum >= 1 and config.batch_size % config.grad_accum == 0,
       f"at least 1 and divide batch_size {config.batch_size}"),
      ("optimizer", config.optimizer in ("adamw", "sgd"), "adamw or sgd"),
      ("schedule", config.schedule in SCHEDULES, " or ".join(SCHEDULES)),
      ("label_smoothing", 0 <= config.label_smoothing < 1, "in [0, 1)"),
      ("streaming", config.streaming in ("auto", "on", "off"), "auto, on or off"),
      ("workers", config.workers is None or config.workers >= 0, "0 (read in threads) or more"),
      ("profile_steps", profile_window(config.profile_steps, check=False) is not None
       or not config.profile_steps, "A:B with 1 <= A <= B (train steps as numbered in metrics.jsonl), "
       "e.g. 10:20"),
  ]
  if "num_classes" in config.model_kwargs:
    raise ConfigError("model_kwargs must not set num_classes: it comes from the dataset's labels")
  for key, ok, requirement in rules:
    if not ok:
      how = (f"set --{key.replace('_', '-')} or --set {key}=VALUE" if key in FIELDS_WITH_FLAGS
             else f"set it with --set {key}=VALUE")
      raise ConfigError(f"{key} must be {requirement}, got {getattr(config, key)!r} ({how})")


def profile_window(text: str, check: bool = True) -> tuple[int, int] | None:
  """'A:B' -> (A, B), '' -> None; anything else raises ConfigError (None if not `check`)."""
  match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
  if match and 1 <= int(match[1]) <= int(match[2]):
    return int(match[1]), int(match[2])
  if text and check:
    raise ConfigError(f"profile_steps must be A:B with 1 <= A <= B, got {text!r}; e.g. "
                      f"--profile-steps 10:20")
  return None


def run_identity_changes(saved: Config, current: Config) -> list[str]:
  """'field: saved -> current' for each field that would make `current` a different run."""
  changes = [f"{key}: {getattr(saved, key)!r} -> {getattr(current, key)!r}"
             for key in RUN_IDENTITY_FIELDS if getattr(saved, key) != getattr(current, key)]
  if (saved.head_learning_rate is None) != (current.head_learning_rate is None):
    # Its value may change like learning_rate's; setting or unsetting it changes the optimizer.
    changes.append(f"head_learning_rate: {saved.head_learning_rate!r} -> "
                   f"{current.head_learning_rate!r}")
  return changes


def dataset_slug(dataset: str) -> str:
  """A folder-name-safe name for a dataset: `folder:/x/flowers` -> `folder-flowers`."""
  if dataset.startswith("folder:"):
    return "folder-" + (dataset[len("folder:"):].rstrip("/").rsplit("/", 1)[-1] or "root")
  return dataset


def default_workdir(config: Config, config_name: str | None = None) -> str:
  """checkpoints/<dataset>-<model>, -<config name> for a named config, -from-<source> for a
  fine-tune."""
  name = f"{dataset_slug(config.dataset)}-{config.model}"
  if config_name:
    name += f"-{config_name}"
  if config.init_from:
    name += "-from-" + config.init_from.rstrip("/").rsplit("/", 1)[-1]
  return f"checkpoints/{name}"
