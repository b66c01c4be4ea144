"""flaxzoo models: `flax.linen` image classifiers behind a timm-style registry."""

from models.registry import (UnknownModelError, create_model, list_models, model_description,
                             model_kwargs, register_model)
from models.convnet import ConvNet
from models.mlp import MLP

__all__ = ["ConvNet", "MLP", "UnknownModelError", "create_model", "list_models",
           "model_description", "model_kwargs", "register_model"]
