"""The machine a speed figure was measured on: CPU model, cores, AVX-512/AVX2, and an FP32 matmul
peak measured in the same process.

Speed figures in this repository are stated next to this, because the machines they were measured
on differ by ~7x in raw speed. Usage: python -m benchmarks.machine [--json]
"""

import json
import os
import platform
import sys
import time


def cpu_description() -> dict:
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
  except OSError:
    pass
  simd = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no-avx2"
  # The cores this process may run on (taskset, cgroups' cpusets), not all the machine has: both
  # XLA's and PyTorch's thread pools size themselves to these.
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"cpu": model, "cores": cores, "simd": simd}


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
  """Best-of-`repeats` FP32 (n x n) @ (n x n) throughput through XLA, in GFLOP/s."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


def device_line(info: dict | None = None) -> str:
  """'AMD EPYC 7B13, 2 cores, avx2': the machine without the (slow) matmul measurement."""
  info = info or cpu_description()
  return f"{info['cpu']}, {info['cores']} cores, {info['simd']}"


def machine_line() -> str:
  return f"{device_line()}, FP32 matmul peak {matmul_gflops():.0f} GFLOP/s (measured)"


def main() -> None:
  if "--json" in sys.argv:
    print(json.dumps({**cpu_description(), "matmul_gflops": round(matmul_gflops(), 1)}))
  else:
    print(machine_line())


if __name__ == "__main__":
  main()
