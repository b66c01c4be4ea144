"""jax's persistent compilation cache: where it lives, that it can be turned off, and that a second
process loads what the first compiled."""

import os
import subprocess
import sys

from conftest import ROOT
from training import compile_cache

PROGRAM = """
import jax, jax.numpy as jnp
from training import compile_cache
print(compile_cache.enable())
print(jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((4, 4))).sum())
"""


def run_program(cache_setting):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_DEBUG_LOG_MODULES="jax._src.compiler")
  env[compile_cache.CACHE_ENV] = cache_setting
  return subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=120)


def test_cache_dir_settings(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.CACHE_ENV, "off")
  assert compile_cache.cache_dir() is None
  monkeypatch.setenv(compile_cache.CACHE_ENV, str(tmp_path / "mine"))
  assert compile_cache.cache_dir() == tmp_path / "mine" / compile_cache.machine_fingerprint()
  monkeypatch.delenv(compile_cache.CACHE_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.cache_dir().parent == tmp_path / "xdg" / "flaxzoo" / "jax"
  # One folder per CPU: an executable built for another instruction set is never looked up.
  monkeypatch.setattr(compile_cache, "machine_fingerprint", lambda: "another-cpu")
  assert compile_cache.cache_dir() == tmp_path / "xdg" / "flaxzoo" / "jax" / "another-cpu"


def test_second_process_loads_the_compiled_program(tmp_path):
  first = run_program(str(tmp_path / "cache"))
  assert first.returncode == 0, first.stderr
  folder = tmp_path / "cache" / compile_cache.machine_fingerprint()
  assert first.stdout.splitlines()[0] == str(folder)
  assert (folder.stat().st_mode & 0o777) == 0o700  # jax trusts what is in it: private
  assert any(folder.iterdir())
  assert "cache hit" not in first.stderr
  second = run_program(str(tmp_path / "cache"))
  assert second.returncode == 0, second.stderr
  assert "Persistent compilation cache hit" in second.stderr
  assert second.stdout.splitlines()[1] == first.stdout.splitlines()[1]


def test_off_compiles_as_usual(tmp_path):
  done = run_program("off")
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[0] == "None"
  assert "cache hit" not in done.stderr
