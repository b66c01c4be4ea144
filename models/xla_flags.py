"""XLA:CPU settings flaxzoo runs with; applied when `models` is imported, before JAX starts XLA.

jaxlib 0.10 hands convolutions and dots to YNNPACK fusions by default. On the zoo's small CNNs their
weight gradients (a convolution reducing over batch x height x width into a 3x3 kernel) ran ~3x
slower than XLA's own Eigen convolutions: the ConvNet's train step went from 0.7x to 1.0x PyTorch
eager with YNNPACK off (measurements: docs/benchmarks.md). A user's own XLA_FLAGS setting of the same
flag wins; `FLAXZOO_KEEP_XLA_FLAGS=1` leaves XLA_FLAGS untouched.
"""

import os

FLAGS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # empty: no YNNPACK fusions


def apply() -> None:
  if os.environ.get("FLAXZOO_KEEP_XLA_FLAGS"):
    return
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f"--{name}={value}" for name, value in FLAGS.items() if f"--{name}=" not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
