"""Process-wide settings flaxzoo runs fastest with, applied only by `configure()`.

Importing a flaxzoo module changes nothing in the process. The CLI calls `configure()` first;
`train_and_evaluate`, `finetune` and `bench` call it too; a library user may call it or not. Each
setting below was measured (docs/performance.md), and each yields to the user's own:

- XLA:CPU without YNNPACK fusions (`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`): their
  weight gradients ran the zoo's CNNs' train step ~3x slower. A user's own setting of the flag wins.
- CPU programs run on the calling thread (`jax_cpu_enable_async_dispatch=False`): the hand-off to a
  worker thread cost ~55 us a call on 2 cores, more than a batch-1 forward pass. A
  JAX_CPU_ENABLE_ASYNC_DISPATCH in the environment wins.
- glibc serves large blocks from its heap and keeps freed memory (`mallopt`: M_MMAP_MAX 0,
  M_TRIM_THRESHOLD 2 GiB) instead of mapping, and page-faulting in, every XLA buffer over 32 MB
  afresh on every call: ResNet and ViT-tiny trained 1.16-1.30x faster. MALLOC_* variables or
  glibc.malloc tunables in GLIBC_TUNABLES win.
- jax's persistent compilation cache, in a folder per CPU and jaxlib (see `compilation_cache_dir`).

`FLAXZOO_KEEP_XLA_FLAGS=1` leaves the first three alone; `FLAXZOO_COMPILATION_CACHE=off` the cache.
XLA reads its flags once, when JAX first computes: `configure()` after that warns (once) instead.
"""

import ctypes
import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

FLAGS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # empty: no YNNPACK fusions
# glibc's own environment settings of what `_keep_large_blocks_on_the_heap` sets
MALLOC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                   "MALLOC_TOP_PAD_")
CACHE_ENV = "FLAXZOO_COMPILATION_CACHE"
CACHE_DISABLED = ("off", "0", "none", "false")
# Every environment variable that changes what `configure` does (for tools that start clean
# processes)
ENVIRONMENT = ("FLAXZOO_KEEP_XLA_FLAGS", "XLA_FLAGS", "JAX_CPU_ENABLE_ASYNC_DISPATCH",
               "GLIBC_TUNABLES", *MALLOC_SETTINGS)

_warned = False


def configure(compilation_cache: bool = True) -> None:
  """Applies the settings above to this process (safe to call again; each applies once)."""
  if not os.environ.get("FLAXZOO_KEEP_XLA_FLAGS"):
    _configure_xla()
  if compilation_cache:
    enable_compilation_cache()


def _configure_xla() -> None:
  global _warned
  started = xla_started()
  if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ and not started:
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  if not _user_tuned_malloc():
    _keep_large_blocks_on_the_heap()
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f"--{name}={value}" for name, value in FLAGS.items() if f"--{name}=" not in current]
  if not extra:
    return
  if started:
    if not _warned:
      _warned = True
      warnings.warn(
          "flaxzoo: JAX started XLA before flaxzoo.runtime.configure() ran, so XLA:CPU keeps its "
          "YNNPACK fusions and the zoo's CNNs train up to 3x slower; call configure() (or set "
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


def one_malloc_arena() -> None:
  """Makes glibc serve all of this process's threads from one heap (M_ARENA_MAX 1), for flaxzoo's
  streaming worker processes: the ArrayRecord reader's threads each took an arena of their own
  and held on to its memory (docs/streaming.md). MALLOC_ARENA_MAX or glibc.malloc.arena_max in
  GLIBC_TUNABLES, if set, win."""
  if "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
    return
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc
    return
  m_arena_max = -8  # from glibc's malloc.h
  mallopt(m_arena_max, 1)


def xla_started() -> bool:
  """Whether this process already created XLA's clients (XLA_FLAGS is read only then)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # a jax without this private helper: assume not
    return False


@functools.cache
def machine_fingerprint() -> str:
  """A short hash of this CPU's model name and feature flags, and the jaxlib version: jax's cache
  key leaves out the instruction set, and AVX-512 code must never load on an AVX2-only machine."""
  import jaxlib
  try:  # /proc/cpuinfo repeats these lines per core: a set, so the core count plays no part
    lines = {line for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith(("model name", "flags", "Features"))}
  except OSError:
    lines = {platform.processor()}
  cpu = "|".join([platform.machine(), *sorted(lines)])
  return hashlib.sha256(f"{cpu}|jaxlib {jaxlib.__version__}".encode()).hexdigest()[:16]


def compilation_cache_dir() -> Path | None:
  """`$FLAXZOO_COMPILATION_CACHE` (`off` disables it), else `$XDG_CACHE_HOME/flaxzoo/jax`
  (default `~/.cache/flaxzoo/jax`); in a sub-folder per `machine_fingerprint`."""
  setting = os.environ.get(CACHE_ENV, "").strip()
  if setting.lower() in CACHE_DISABLED:
    return None
  if setting:
    base = Path(setting).expanduser()
  else:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flaxzoo" / "jax"
  return base / machine_fingerprint()


def enable_compilation_cache() -> Path | None:
  """Turns jax's persistent compilation cache on for this process; returns its folder.

  A start-up is dozens of small compilations (each initialiser, the steps): several seconds on a
  2-core CPU that a restarted run loads from disk instead. Leaves a cache folder the user set for
  jax alone; a folder that cannot be created only means compiling as usual. The folder is private
  (0700), as jax's documentation asks: it holds machine code that jax trusts.
  """
  import jax
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return Path(configured)
  path = compilation_cache_dir()
  if path is None:
    return None
  try:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  # Every program, not only those over jax's default 1 s: the small ones add up to seconds.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def die_with_parent() -> None:
  """This process gets SIGKILL when its parent dies, even by kill -9 (Linux; elsewhere nothing):
  for launched training processes and grain's data workers, which would otherwise live on."""
  import signal
  try:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
