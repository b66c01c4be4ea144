"""XLA:CPU and allocator settings flaxzoo runs with; applied when `models` is imported, before JAX
starts XLA.

jaxlib 0.10 hands convolutions and dots to YNNPACK fusions by default. On the zoo's small CNNs their
weight gradients (a convolution reducing over batch x height x width into a 3x3 kernel) ran ~3x
slower than XLA's own Eigen convolutions: the ConvNet's train step went from 0.7x to 1.0x PyTorch
eager with YNNPACK off (measurements: docs/benchmarks.md). A user's own XLA_FLAGS setting of the same
flag wins; `FLAXZOO_KEEP_XLA_FLAGS=1` leaves XLA_FLAGS untouched. XLA reads XLA_FLAGS once, when
JAX first computes: a program that computed before importing `models` gets a warning saying so.

CPU programs also run on the calling thread (`jax_cpu_enable_async_dispatch=False`): handing each
one to a worker thread and waking the caller afterwards cost ~55 us per call on a 2-core machine,
more than a batch-1 forward pass's own arithmetic, while the train steps' rate did not change
(docs/benchmarks.md, "Batch-1 latency"). A JAX_CPU_ENABLE_ASYNC_DISPATCH in the environment, or
FLAXZOO_KEEP_XLA_FLAGS=1, keeps jax's own setting.

With glibc, large blocks are served from the heap, and freed memory stays there for the next call
(`mallopt`: M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB). By default glibc maps a fresh region for every
block over 32 MB and unmaps it on free, and XLA allocates its buffers anew on every call, so each
step paid a page fault per 4 kB page of them (strace: an 80 MB map and unmap per ConvNet eval call
at batch 1024, ~20,000 faults). ResNet and ViT-tiny trained 1.16-1.30x faster at batch 128 without
that, LeNet-5, the MLP and the ConvNet at batch 128 within 0.96-1.08x; the ConvNet's peak RSS grew
~17 % (docs/benchmarks.md, "Large blocks and glibc"). A block over 64 MB that one of XLA's worker
threads allocates is still mapped fresh: a thread's own arena cannot hold it, and one arena for all
threads made training up to 1.5x slower. glibc's own malloc settings in the environment
(`MALLOC_SETTINGS`, or glibc.malloc tunables in GLIBC_TUNABLES), or FLAXZOO_KEEP_XLA_FLAGS=1, keep
glibc's behaviour.
"""

import ctypes
import os
import sys
import warnings

FLAGS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # empty: no YNNPACK fusions
# glibc's own environment settings of what `_keep_large_blocks_on_the_heap` sets
MALLOC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                   "MALLOC_TOP_PAD_")
# Every environment variable that changes what `apply` does (for tools that start clean processes)
ENVIRONMENT = ("FLAXZOO_KEEP_XLA_FLAGS", "XLA_FLAGS", "JAX_CPU_ENABLE_ASYNC_DISPATCH",
               "GLIBC_TUNABLES", *MALLOC_SETTINGS)


def apply() -> None:
  if os.environ.get("FLAXZOO_KEEP_XLA_FLAGS"):
    return
  if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ and not _xla_started():
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  if not _user_tuned_malloc():
    _keep_large_blocks_on_the_heap()
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f"--{name}={value}" for name, value in FLAGS.items() if f"--{name}=" not in current]
  if not extra:
    return
  if _xla_started():
    warnings.warn(
        "flaxzoo: JAX started XLA before `models` was imported, so XLA:CPU keeps its YNNPACK "
        "fusions and the zoo's CNNs train up to 3x slower; import flaxzoo's models (or set "
        f"XLA_FLAGS={' '.join(extra)}) before the first JAX computation", stacklevel=3)
    return
  os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def _user_tuned_malloc() -> bool:
  return (any(name in os.environ for name in MALLOC_SETTINGS)
          or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def _keep_large_blocks_on_the_heap() -> None:
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator is left as it is
    return
  m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
  mallopt(m_mmap_max, 0)
  mallopt(m_trim_threshold, 2**31 - 1)


def _xla_started() -> bool:
  """Whether this process already created XLA's clients (XLA_FLAGS is read only then)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # a jax without this private helper: assume not
    return False
