"""ViT-Tiny: a small Vision Transformer for 28x28 images."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from flaxzoo.models import layers
from flaxzoo.models.registry import register_model


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: self-attention and an MLP, each with a residual."""

  dim: int
  heads: int
  mlp_dim: int
  dropout: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, dropout_rate=self.dropout,
                                        deterministic=not train,
                                        attention_fn=layers.dot_product_attention)(y, y)
    x = x + layers.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm()(x)
    y = nn.gelu(nn.Dense(self.mlp_dim)(y))
    y = layers.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.Dense(self.dim)(y)
    return x + layers.Dropout(self.dropout, deterministic=not train)(y)


@register_model("vit_tiny")
class ViTTiny(nn.Module):
  """Vision Transformer (Dosovitskiy et al., 2021), convolutional stem, 6 blocks of width 64, dropout."""

  num_classes: int = 10
  stem: str = "conv"  # conv: stride-2 3x3 convs (28x28 -> 4x4 tokens); patch: patch x patch tokens
  stem_widths: Sequence[int] = (16, 32, 64)
  patch: int = 7  # for stem="patch"
  dim: int = 64
  depth: int = 6
  heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.1

  @staticmethod
  def check_arguments(values: dict) -> str | None:
    if values["stem"] not in ("conv", "patch"):
      return f"stem must be conv or patch, got {values['stem']!r}"
    if values["dim"] % values["heads"]:
      return f"dim ({values['dim']}) must be a multiple of heads ({values['heads']})"
    return None

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if self.stem == "conv":  # "early convolutions help transformers see better" (Xiao et al., 2021)
      for i, width in enumerate(self.stem_widths):
        x = nn.relu(layers.Conv(width, (3, 3), strides=2, name=f"stem_{i}")(x))
      x = layers.Conv(self.dim, (1, 1), name="patch_embed")(x)
    elif self.stem == "patch":  # the original: one linear projection per non-overlapping patch
      x = layers.Conv(self.dim, (self.patch, self.patch), strides=self.patch, padding="VALID",
                  name="patch_embed")(x)
    else:
      raise ValueError(f"vit_tiny stem must be 'conv' or 'patch', got {self.stem!r}")
    batch, height, width, _ = x.shape
    x = x.reshape((batch, height * width, self.dim))
    x = x + self.param("pos_embed", layers.normal(0.02), (1, height * width, self.dim))
    x = layers.Dropout(self.dropout, deterministic=not train)(x)
    for _ in range(self.depth):
      x = EncoderBlock(self.dim, self.heads, self.mlp_dim, self.dropout)(x, train)
    x = jnp.mean(nn.LayerNorm()(x), axis=1)  # mean of the tokens (no class token)
    return nn.Dense(self.num_classes, name="head")(x)
