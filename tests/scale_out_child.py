"""The single-process scale-out checks, in a process of 4 emulated CPU devices (the test process
itself has one): prints one JSON object of what tests/test_scale_out.py asserts.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/scale_out_child.py FOLDER WORKROOT
"""

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from flaxzoo import runtime, training
from flaxzoo.training import config as config_lib
from flaxzoo.training import inference, parallel


def max_difference(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(folder: str, root: str) -> int:
  runtime.configure(compilation_cache=False)
  root = Path(root)
  config = training.Config(dataset=f"folder:{folder}", model_kwargs={"widths": [4, 8], "hidden": 16},
                           epochs=2, batch_size=16, learning_rate=3e-3, eval_batch_size=10)
  states = {n: training.train_and_evaluate(config, root / f"devices-{n}", devices=n) for n in (1, 4)}
  evals = {n: inference.evaluate_checkpoint(root / "devices-4", devices=n, save=False) for n in (1, 4)}
  # A checkpoint of 4 devices goes on with 2, and with 4 (a copy) to compare.
  shutil.copytree(root / "devices-4", root / "devices-4-copy")
  longer = config_lib.override(config, {"epochs": 3})
  continued = training.train_and_evaluate(longer, root / "devices-4", devices=2)
  on_four = training.train_and_evaluate(longer, root / "devices-4-copy", devices=4)
  try:
    training.train_and_evaluate(config_lib.override(config, {"batch_size": 18}), root / "odd", devices=4)
    batch_error = None
  except config_lib.ConfigError as e:
    batch_error = str(e)
  layout = parallel.make_layout(4)
  print(json.dumps({
      "devices": jax.device_count(),
      "params_difference_1_vs_4": max_difference(states[1].params, states[4].params),
      "steps": {n: int(s.step) for n, s in states.items()},
      "eval_accuracy": {n: e["accuracy"] for n, e in evals.items()},
      "eval_loss": {n: e["loss"] for n, e in evals.items()},
      "continued_on_2_vs_on_4": max_difference(continued.params, on_four.params),
      "continued_step": int(continued.step),
      "batch_error": batch_error,
      "rows": [[r.start, r.stop] for r in [parallel.process_rows(layout, 16)]],
      "sharding": str(continued.params["Conv_0"]["kernel"].sharding.spec),
  }))
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
