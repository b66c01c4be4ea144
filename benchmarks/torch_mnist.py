"""A plain PyTorch script: the standard Flax MNIST CNN, trained until it reaches a test accuracy.

The reference `flaxzoo bench --time-to-accuracy` races against. Deliberately what a PyTorch user
writes: the CNN of google/flax examples/mnist (conv32-avgpool-conv64-avgpool-dense256), Adam on a
one-cycle schedule, batch 128, data read straight from the original gzipped IDX files, a test
evaluation after every epoch; it exits as soon as the target is reached, so the process's wall time
is the time to that accuracy. Prints one JSON line.

    python -m benchmarks.torch_mnist --mnist-dir ../shared/data/mnist [--target 0.99]
"""

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

START = time.perf_counter()


def read_idx(path: Path) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class CNN(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
    self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
    self.dense1 = torch.nn.Linear(64 * 7 * 7, 256)
    self.dense2 = torch.nn.Linear(256, 10)

  def forward(self, x):
    x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
    x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
    return self.dense2(F.relu(self.dense1(x.flatten(1))))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mnist-dir", default="../shared/data/mnist")
  parser.add_argument("--target", type=float, default=0.99)
  parser.add_argument("--epochs", type=int, default=5, help="length of the one-cycle schedule")
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  torch.manual_seed(args.seed)
  root = Path(args.mnist_dir)
  to_tensor = lambda a: torch.from_numpy(a.copy()).float().div_(255).unsqueeze(1)  # noqa: E731
  train_x = to_tensor(read_idx(root / "train-images-idx3-ubyte.gz"))
  train_y = torch.from_numpy(read_idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64))
  test_x = to_tensor(read_idx(root / "t10k-images-idx3-ubyte.gz"))
  test_y = torch.from_numpy(read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64))

  model = CNN()
  steps_per_epoch = len(train_x) // args.batch_size
  optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
  schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.learning_rate,
                                                 total_steps=args.epochs * steps_per_epoch)
  accuracy = 0.0
  for epoch in range(1, args.epochs + 1):
    model.train()
    order = torch.randperm(len(train_x))
    for i in range(steps_per_epoch):
      idx = order[i * args.batch_size:(i + 1) * args.batch_size]
      optimizer.zero_grad(set_to_none=True)
      F.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
      optimizer.step()
      schedule.step()
    model.eval()
    with torch.inference_mode():
      correct = sum(int((model(test_x[i:i + 1000]).argmax(1) == test_y[i:i + 1000]).sum())
                    for i in range(0, len(test_x), 1000))
    accuracy = correct / len(test_x)
    print(f"epoch {epoch}: test accuracy {accuracy:.2%}, {time.perf_counter() - START:.1f} s",
          flush=True)
    if accuracy >= args.target:
      break
  print(json.dumps({"epochs": epoch, "test_accuracy": accuracy, "reached": accuracy >= args.target,
                    "seconds_in_script": round(time.perf_counter() - START, 2)}))


if __name__ == "__main__":
  main()
