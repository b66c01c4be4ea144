"""flaxzoo models: `flax.linen` image classifiers behind a timm-style registry."""

from models import xla_flags

xla_flags.apply()  # before anything starts XLA's CPU client (see models/xla_flags.py)

from models.registry import (UnknownModelError, create_model, list_models, model_description,
                             model_kwargs, register_model, train_defaults)
from models.convnet import ConvNet
from models.lenet5 import LeNet5
from models.mlp import MLP
from models.resnet import ResNet
from models.vit import ViTTiny

__all__ = ["ConvNet", "LeNet5", "MLP", "ResNet", "ViTTiny", "UnknownModelError", "create_model", "list_models",
           "model_description", "model_kwargs", "register_model", "train_defaults"]
