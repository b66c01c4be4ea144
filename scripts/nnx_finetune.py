"""Fine-tune a flaxzoo checkpoint in a plain Flax NNX training loop (nnx.Optimizer, nnx.jit).

    .venv/bin/python scripts/nnx_finetune.py --from checkpoints/mnist-convnet \
        --dataset fashion_mnist --epochs 1

The checkpoint's model comes in as an NNX module through `flax.nnx.bridge`
(`flaxzoo.training.load_nnx_model`); everything after that is ordinary NNX code. The dataset must
have as many classes as the checkpoint (for a new head, use `flaxzoo finetune`).
"""

import argparse
import sys

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flaxzoo import data, runtime, training


def train_step_fn():
  @nnx.jit
  def train_step(model, optimizer, images, labels):
    def loss_fn(model):
      logits = model(images, train=True, mutable=True)  # mutable: BatchNorm statistics update
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return train_step


@nnx.jit
def predict_classes(model, images):
  return jnp.argmax(model(images, train=False), -1)


def to_input(images) -> jnp.ndarray:
  return jnp.asarray(images, jnp.float32) / 255.0  # the zoo models take [0, 1] pixels


def accuracy(model, images, labels, batch_size: int = 1000) -> float:
  predictions = [np.asarray(predict_classes(model, to_input(images[i:i + batch_size])))
                 for i in range(0, len(images), batch_size)]
  return float(np.mean(np.concatenate(predictions) == labels))


def finetune_nnx(model, images, labels, *, epochs: int, batch_size: int, learning_rate: float,
                 seed: int = 0) -> list[float]:
  """Trains `model` in place with AdamW; returns the loss of every step."""
  optimizer = nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)
  train_step = train_step_fn()
  losses = []
  for epoch in range(epochs):
    for batch_images, batch_labels in data.train_batches((images, labels), batch_size, seed, epoch):
      losses.append(float(train_step(model, optimizer, to_input(batch_images), jnp.asarray(batch_labels))))
  return losses


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--from", dest="source", required=True, help="flaxzoo workdir")
  parser.add_argument("--dataset", required=True, help="tfds name or folder:PATH")
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--learning-rate", type=float, default=1e-3)
  parser.add_argument("--train-examples", type=int, default=0, help="first N only (0: all)")
  parser.add_argument("--data-dir")
  args = parser.parse_args()
  runtime.configure()

  model, card = training.load_nnx_model(args.source)
  dataset = data.load_dataset(args.dataset, args.data_dir, image_shape=card["input_shape"],
                              limits={"train": args.train_examples})
  if dataset.info.num_classes != card["num_classes"]:
    print(f"nnx_finetune: error: {args.dataset} has {dataset.info.num_classes} classes, the "
          f"checkpoint {card['num_classes']}; use flaxzoo finetune for a new head", file=sys.stderr)
    return 2
  test_images, test_labels = dataset.splits["test"].arrays()
  print(f"{card['model']['name']} from {args.source} (step {card['step']}) as an NNX module: "
        f"test accuracy on {args.dataset} before {accuracy(model, test_images, test_labels):.2%}")
  losses = finetune_nnx(model, *dataset.splits["train"].arrays(), epochs=args.epochs,
                        batch_size=args.batch_size, learning_rate=args.learning_rate)
  print(f"{len(losses)} NNX steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; test accuracy after "
        f"{accuracy(model, test_images, test_labels):.2%}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
