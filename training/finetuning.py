"""Fine-tuning: `train_and_evaluate` with a config that says where the weights come from
(`init_from`, `init_step`), what stays frozen and the source model's input shape, to which the new
dataset's images are converted. A fine-tune checkpoints and resumes like any run; the weight
surgery itself is `training.pretrained`.
"""

import dataclasses
from pathlib import Path

from flaxzoo import data, models, runtime
from flaxzoo.training import checkpoint
from flaxzoo.training import config as config_lib
from flaxzoo.training.pretrained import frozen_paths
from flaxzoo.training.train import train_and_evaluate


def finetune_config(source_card: dict, source_workdir, dataset: str, **overrides):
  """The source run's config for `dataset`: same model and training settings, its weights as the
  start (`init_from`/`init_step`), its input shape, all examples of the new dataset; then
  `overrides` (any Config field) on top."""
  saved = config_lib.from_dict(source_card["config"])
  config = dataclasses.replace(
      saved, dataset=data.canonical_name(dataset), init_from=str(Path(source_workdir).absolute()),
      init_step=source_card["step"], input_shape=list(source_card["input_shape"]),
      train_examples=0, test_examples=0, checkpoint_every_steps=0, manual_dir=None, head="auto",
      class_map=None, config_file=None, profile_steps="")
  return config_lib.override(config, {k: v for k, v in overrides.items() if v is not None})


def finetune(source_workdir, dataset: str, workdir=None, *, freeze: str = "none",
             head_learning_rate: float | None = None, epochs: int | None = None,
             step: int | None = None, devices: int | None = None, **overrides):
  """Fine-tunes the model in `source_workdir` (its newest readable checkpoint, or `step`) on
  `dataset` (a tfds name or `folder:PATH`); returns the final TrainState.

  `workdir` defaults to checkpoints/<dataset>-<model>-from-<source workdir name>; a re-run
  continues it. `overrides`: any Config field (learning_rate=..., batch_size=..., ...);
  `devices`: as for `train_and_evaluate`.
  """
  runtime.configure()
  source_card = checkpoint.read_card(source_workdir, step)
  config = finetune_config(source_card, source_workdir, dataset, freeze=freeze,
                           head_learning_rate=head_learning_rate, epochs=epochs, **overrides)
  source_model = checkpoint.model_from_card(source_card)
  source_params = models.abstract_variables(source_model, source_card["input_shape"])["params"]
  frozen_paths(source_params, config.freeze)  # a bad --freeze fails before any data
  workdir = Path(workdir or config_lib.default_workdir(config))
  if checkpoint.saved_steps(workdir):
    saved = config_lib.from_dict(checkpoint.read_card(workdir)["config"])
    if saved.init_from == config.init_from and step is None:
      # The source may have trained on since this fine-tune began: it continues from its start.
      config = dataclasses.replace(config, init_step=saved.init_step)
  return train_and_evaluate(config, workdir, devices)
