"""Dropout in training, linen's (nn.Dropout, nn.dot_product_attention: a 32-bit threefry word per
draw) against models.layers' (four 8-bit draws per word), side by side in one process: first the
draws alone (ViT-tiny's 25 masks of one batch-128 step), then ViT-tiny's whole train step as
`mnist_vit_tiny` trains it, built with linen's dropout, with layers', and without dropout, taking
turns; medians of the repeats. Prints the machine first.

    python -m flaxzoo.benchmarks.dropout [--repeats 6]
"""

import contextlib
import dataclasses

BATCH = 128
RATE = 0.1
# ViT-tiny's dropout per batch-128 step: embeddings and each block's two residual branches
# (16 tokens x 64), its MLP (16 x 128), and its attention weights (one 16 x 16 mask, broadcast)
MASK_SHAPES = ([(BATCH, 16, 64)] + [(BATCH, 16, 64), (BATCH, 16, 128), (BATCH, 16, 64), (1, 1, 16, 16)] * 6)


def draw_rows():
  """ms for one step's masks drawn each way."""
  import jax

  from flaxzoo.benchmarks import bench
  from flaxzoo.models import layers

  def linen_masks(key):
    keys = jax.random.split(key, len(MASK_SHAPES))
    return [jax.random.bernoulli(k, 1.0 - RATE, shape) for k, shape in zip(keys, MASK_SHAPES)]

  def layers_masks(key):
    keys = jax.random.split(key, len(MASK_SHAPES))
    return [layers.keep_mask(k, shape, 1.0 - RATE)[0] for k, shape in zip(keys, MASK_SHAPES)]

  key = jax.random.key(0)
  return bench.median_ms(jax.jit(linen_masks), key), bench.median_ms(jax.jit(layers_masks), key)


@contextlib.contextmanager
def linen_dropout():
  """ViT-tiny built inside uses nn.Dropout and nn.dot_product_attention: it looks up
  layers.Dropout and layers.dot_product_attention when it is called, so both names are swapped."""
  import flax.linen as nn

  from flaxzoo.models import layers
  before = layers.Dropout, layers.dot_product_attention
  layers.Dropout, layers.dot_product_attention = nn.Dropout, nn.dot_product_attention
  try:
    yield
  finally:
    layers.Dropout, layers.dot_product_attention = before


def step_rates(repeats: int, steps: int = 10) -> dict:
  import jax.numpy as jnp

  from flaxzoo.benchmarks import bench
  from flaxzoo.training import configs
  images, labels = (jnp.asarray(a) for a in bench.synthetic_batch(BATCH))
  config = configs.named_config("mnist_vit_tiny", batch_size=BATCH)
  without = dataclasses.replace(config, model_kwargs={**config.model_kwargs, "dropout": 0.0})
  runners = [bench.SwappedStepRunner("linen dropout", config, linen_dropout, images, labels),
             bench.SwappedStepRunner("layers dropout", config, contextlib.nullcontext, images, labels),
             bench.SwappedStepRunner("no dropout", without, contextlib.nullcontext, images, labels)]
  return bench.interleaved_rates(runners, lambda r: r.train_steps(images, labels, steps),
                                 steps * BATCH, repeats)


def main() -> None:
  from flaxzoo.benchmarks import bench
  repeats = bench.start_swap_benchmark(__doc__)
  linen_ms, layers_ms = draw_rows()
  print(f"one step's {len(MASK_SHAPES)} masks: jax.random.bernoulli {linen_ms:.2f} ms | "
        f"layers.keep_mask {layers_ms:.2f} ms | {linen_ms / layers_ms:.2f}x", flush=True)
  rates = step_rates(repeats)
  print(f"ViT-tiny train step, batch {BATCH} (mnist_vit_tiny): variant | img/s | against linen's")
  for name, rate in rates.items():
    print(f"{name} | {rate:,.0f} | {rate / rates['linen dropout']:.2f}x")


if __name__ == "__main__":
  main()
