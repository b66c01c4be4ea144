"""flaxzoo training: TrainState + optax, jitted steps, orbax checkpoints, the CLI."""

from training.checkpoint import CheckpointError, load_checkpoint, read_card
from training.config import Config, ConfigError
from training.state import TrainState, create_train_state, eval_step, predict_step, train_step
from training.train import TrainingDiverged, TrainingInterrupted, evaluate, train_and_evaluate


def predict(model, variables, images, batch_size: int = 1000):
  """Class probabilities (N, num_classes) for uint8 or [0, 1] float images (N, H, W, C)."""
  import numpy as np
  return np.concatenate([np.asarray(predict_step(model, variables, images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


__all__ = ["CheckpointError", "Config", "ConfigError", "TrainState", "create_train_state",
           "eval_step", "evaluate", "load_checkpoint", "predict", "predict_step", "read_card",
           "train_and_evaluate", "train_step", "TrainingDiverged", "TrainingInterrupted"]
