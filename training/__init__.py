"""flaxzoo training: TrainState + optax, jitted steps, orbax checkpoints, the CLI."""

from training.checkpoint import CheckpointError, load_checkpoint, read_card
from training.config import Config, ConfigError, default_config
from training.state import TrainState, create_train_state, eval_step, predict_step, train_step
from training.train import TrainingDiverged, TrainingInterrupted, evaluate, train_and_evaluate
from training.finetuning import finetune, load_pretrained
from training.inference import predict_arrays as predict
from training.inference import evaluate_checkpoint, predict_files


__all__ = ["CheckpointError", "Config", "ConfigError", "default_config", "TrainState", "create_train_state",
           "eval_step", "evaluate", "evaluate_checkpoint", "finetune", "load_checkpoint", "load_pretrained", "predict",
           "predict_files", "predict_step", "read_card",
           "train_and_evaluate", "train_step", "TrainingDiverged", "TrainingInterrupted"]
