"""Prints the CPU (model, cores, AVX-512/AVX2 flags) and a measured FP32 matmul peak.

Usage: python scripts/machine_info.py [--json]. The code is `benchmarks/machine.py`.
"""

from flaxzoo.benchmarks.machine import main

if __name__ == "__main__":
  main()
