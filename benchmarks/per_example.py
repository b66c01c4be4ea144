"""Per-example gradient norms of a checkpoint's test split: `jax.vmap` of `jax.grad` in batches
(flaxzoo.training.analysis) against a Python loop of jitted batch-1 `jax.grad` calls over the same
images, in one process, each timed after its compilation; the two must agree.

    FLAXZOO_MANUAL_DIR=../shared/data python -m flaxzoo.benchmarks.per_example --workdir checkpoints/mnist-convnet
"""

import argparse
import time

import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="checkpoints/mnist-convnet")
  parser.add_argument("--examples", type=int, default=10_000, help="first N test images (10,000)")
  args = parser.parse_args()
  from flaxzoo import runtime
  runtime.configure()  # before JAX computes
  import jax
  import jax.numpy as jnp

  from flaxzoo.benchmarks import machine
  from flaxzoo.training import analysis, checkpoint
  from flaxzoo.training.inference import checkpoint_split
  from flaxzoo.training.steps import cross_entropy, to_model_input
  print(machine.machine_line())
  model, variables, card = checkpoint.load_checkpoint(args.workdir)
  images, labels = (a[:args.examples] for a in checkpoint_split(card, "test"))

  @jax.jit
  def one_norm(image, label):
    def loss(params):
      logits = model.apply({**variables, "params": params}, to_model_input(image[None]), train=False)
      return cross_entropy(logits, label[None])[0]
    grads = jax.grad(loss)(variables["params"])
    return jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))

  analysis.per_example_grad_norms(model, variables, images[:analysis.GRAD_BATCH], labels[:analysis.GRAD_BATCH])
  one_norm(images[0], labels[0]).block_until_ready()  # both compiled before the clocks start
  start = time.perf_counter()
  vmapped = analysis.per_example_grad_norms(model, variables, images, labels)["grad_norm"]
  vmap_seconds = time.perf_counter() - start
  start = time.perf_counter()
  looped = np.asarray([float(one_norm(image, label)) for image, label in zip(images, labels)])
  loop_seconds = time.perf_counter() - start
  np.testing.assert_allclose(vmapped, looped, rtol=1e-3, atol=1e-5)  # two programs: float32 rounding
  print(f"{card['model']['name']} step {card['step']}, {len(images)} test images: vmap of grad in batches of "
        f"{analysis.GRAD_BATCH} {vmap_seconds:.2f} s ({len(images) / vmap_seconds:,.0f} img/s); loop of batch-1 "
        f"grad {loop_seconds:.2f} s ({len(images) / loop_seconds:,.0f} img/s); vmap {loop_seconds / vmap_seconds:.1f}x "
        f"faster; largest relative difference {np.max(np.abs(vmapped - looped) / np.maximum(looped, 1e-6)):.1e}")


if __name__ == "__main__":
  main()
