"""jax's persistent compilation cache, so that a restarted or repeated run skips XLA compilation.

A run compiles dozens of programs before its first step (parameter initialisers, the train and eval
steps); on a 2-core CPU that is several seconds. With the cache on, a second process with the same
model, batch and flags loads them from disk instead (docs/benchmarks.md has the measured start-up).

Where: `$FLAXZOO_COMPILATION_CACHE` if set (`off` disables it), else
`$XDG_CACHE_HOME/flaxzoo/jax` (default `~/.cache/flaxzoo/jax`), in a sub-folder per CPU model and
feature set and jaxlib version. jax's cache key does not include the CPU's instruction set, and an
executable compiled for AVX-512 must never be loaded on an AVX2-only machine sharing the home folder.

The cache holds compiled machine code that jax trusts, so the folder is created private (0700), as
jax's documentation asks; it never holds anything derived from a checkpoint or a dataset.
"""

import functools
import hashlib
import os
import platform
from pathlib import Path

CACHE_ENV = "FLAXZOO_COMPILATION_CACHE"
DISABLED = ("off", "0", "none", "false")


@functools.cache
def machine_fingerprint() -> str:
  """A short hash of this CPU's model name and feature flags, and the jaxlib version."""
  import jaxlib
  try:  # /proc/cpuinfo repeats these lines per core: a set, so the core count plays no part
    lines = {line for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith(("model name", "flags", "Features"))}
  except OSError:
    lines = {platform.processor()}
  cpu = "|".join([platform.machine(), *sorted(lines)])
  return hashlib.sha256(f"{cpu}|jaxlib {jaxlib.__version__}".encode()).hexdigest()[:16]


def cache_dir() -> Path | None:
  """The folder this machine's compiled programs go to, or None when the cache is turned off."""
  setting = os.environ.get(CACHE_ENV, "").strip()
  if setting.lower() in DISABLED:
    return None
  if setting:
    base = Path(setting).expanduser()
  else:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flaxzoo" / "jax"
  return base / machine_fingerprint()


def enable() -> Path | None:
  """Turns jax's persistent compilation cache on for this process; returns its folder.

  Leaves a cache folder the user configured for jax themselves (jax_compilation_cache_dir) alone.
  A folder that cannot be created only means compiling as usual, never an error.
  """
  import jax
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return Path(configured)
  path = cache_dir()
  if path is None:
    return None
  try:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  # Cache every program, not only those over jax's default 1 s: a start-up is dozens of small
  # compilations (each initialiser, each eager op) that add up to seconds on a 2-core CPU.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
