"""flaxzoo models: `flax.linen` image classifiers behind a timm-style registry. Modules only:
training recipes live in `flaxzoo.training.configs`."""

from flaxzoo.models.convnet import ConvNet
from flaxzoo.models.lenet5 import LeNet5
from flaxzoo.models.mlp import MLP
from flaxzoo.models.nnx_bridge import create_nnx_model, to_nnx
from flaxzoo.models.profile import abstract_variables, flops_per_image, init_variables, param_count
from flaxzoo.models.registry import (
                                     UnknownModelError,
                                     create_model,
                                     list_models,
                                     model_description,
                                     model_kwargs,
                                     register_model,
)
from flaxzoo.models.resnet import ResNet
from flaxzoo.models.vit import ViTTiny

__all__ = ["ConvNet", "LeNet5", "MLP", "ResNet", "ViTTiny", "UnknownModelError", "abstract_variables",
           "create_model", "flops_per_image", "init_variables", "list_models", "model_description", "model_kwargs",
           "param_count", "register_model", "create_nnx_model", "to_nnx"]
