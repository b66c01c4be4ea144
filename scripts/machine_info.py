"""Prints the CPU (model, cores, AVX-512/AVX2 flags) and a measured FP32 matmul peak.

Usage: python scripts/machine_info.py [--json]. The code is `benchmarks/machine.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.machine import main  # noqa: E402

if __name__ == "__main__":
  main()
