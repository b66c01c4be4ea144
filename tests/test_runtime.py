"""flaxzoo.runtime: importing flaxzoo changes nothing process-wide; `configure()` applies the
measured settings (each yielding to the user's own) and jax's persistent compilation cache."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from flaxzoo import runtime


def fresh_python(*args: str, **env_overrides: str):
  """`python *args` in a new process, with none of the user's XLA, allocator or flaxzoo runtime
  settings unless given here."""
  env = {k: v for k, v in os.environ.items() if k not in runtime.ENVIRONMENT}
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                        env=dict(env, **env_overrides), timeout=120)


# Every module of every flaxzoo package imported; then what changed in the process.
IMPORT_EVERYTHING = """
import importlib, json, os, pkgutil, sys
import jax
before_env, before_hook = dict(os.environ), sys.unraisablehook
before_config = {k: repr(v) for k, v in jax.config.values.items()}
import flaxzoo
CONFIGURE
names = []
for package in ("flaxzoo", "flaxzoo.models", "flaxzoo.data", "flaxzoo.training", "flaxzoo.benchmarks"):
  for info in pkgutil.iter_modules(importlib.import_module(package).__path__, package + "."):
    if info.name != "flaxzoo.training.__main__":  # runs the CLI
      importlib.import_module(info.name)
      names.append(info.name)
env = sorted(k for k in set(os.environ) | set(before_env) if os.environ.get(k) != before_env.get(k))
config = sorted(k for k, v in jax.config.values.items() if before_config.get(k) != repr(v))
print(json.dumps({"modules": names, "env": env, "config": config,
                  "hook": sys.unraisablehook is not before_hook}))
"""


def process_changes(configure: str = "") -> dict:
  done = fresh_python("-c", IMPORT_EVERYTHING.replace("CONFIGURE", configure))
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_every_module_changes_nothing_process_wide():
  seen = process_changes()
  assert {"flaxzoo.runtime", "flaxzoo.models.layers", "flaxzoo.training.cli", "flaxzoo.training.checkpoint",
          "flaxzoo.data.datasets", "flaxzoo.benchmarks.bench"} <= set(seen["modules"])
  assert (seen["env"], seen["config"], seen["hook"]) == ([], [], False)


def test_configure_is_what_changes_them():
  """Without this, the test above would also pass if nothing could change those settings."""
  seen = process_changes("from flaxzoo import runtime; runtime.configure()")
  assert "XLA_FLAGS" in seen["env"]
  assert {"jax_cpu_enable_async_dispatch", "jax_compilation_cache_dir"} <= set(seen["config"])
  assert not seen["hook"]  # the quiet unraisable hook is the CLI's own


def test_cli_help_and_models_load_no_orbax_optax_or_tensorflow():
  program = ("import sys\nfrom flaxzoo.training import cli\n"
             "for argv in (['--help'], ['train', '--help']):\n"
             "  try:\n    cli.main(argv)\n  except SystemExit:\n    pass\n"
             "cli.main(['models', 'mlp'])\n"
             "print(sorted(m for m in ('orbax', 'optax', 'tensorflow', 'torch') if m in sys.modules))")
  done = fresh_python("-c", program, FLAXZOO_COMPILATION_CACHE="off")
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip().splitlines()[-1] == "[]"
  assert "--profile-steps" in done.stdout and "mlp" in done.stdout  # train --help, then models


def test_xla_runs_without_ynnpack_fusions():
  """configure() (conftest calls it first, as the CLI does) turns YNNPACK fusions off before XLA
  starts: they made the CNNs' weight gradients ~3x slower. The compiled train step shows none."""
  import numpy as np

  from flaxzoo.models import create_model
  from flaxzoo.training.config import Config
  from flaxzoo.training.state import create_train_state
  from flaxzoo.training.steps import train_step
  state = create_train_state(create_model("convnet"), Config(), (28, 28, 1), 10)
  images, labels = np.zeros((4, 28, 28, 1), np.uint8), np.zeros(4, np.int32)
  assert "__ynn_fusion" not in train_step.lower(state, images, labels).compile().as_text()


SETTINGS_AFTER_CONFIGURE = """
import ctypes, sys
from flaxzoo import runtime
runtime.configure(compilation_cache=False)
import jax
import numpy as np
class MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
              "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
array = np.ones(100_000_000 // 8)
print(jax.config.values["jax_cpu_enable_async_dispatch"], libc.mallinfo2().hblkhd >= 100_000_000)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("env, expected", [
    ({}, "False False"),  # programs on the calling thread; a 100 MB block from the heap, not mapped
    ({"JAX_CPU_ENABLE_ASYNC_DISPATCH": "1"}, "True False"),
    ({"MALLOC_MMAP_THRESHOLD_": "33554432"}, "False True"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"}, "False True"),
    ({"FLAXZOO_KEEP_XLA_FLAGS": "1"}, "True True"),
])
def test_each_setting_yields_to_the_users_own(env, expected):
  """Async dispatch off: the hand-off to a worker thread cost more than a batch-1 forward pass.
  Large blocks on the heap: glibc mapped (and page-faulted in) every XLA buffer over 32 MB afresh."""
  done = fresh_python("-c", SETTINGS_AFTER_CONFIGURE, **env)
  assert done.stdout.strip() == expected, (env, done.stderr[-500:])


def test_configure_after_jax_computed_warns_that_the_flags_cannot_apply():
  late = fresh_python("-c", "import jax.numpy as jnp; jnp.ones(2).sum()\n"
                      "from flaxzoo import runtime; runtime.configure(); runtime.configure()")
  assert late.returncode == 0
  assert late.stderr.count("JAX started XLA before flaxzoo.runtime.configure() ran") == 1, late.stderr
  early = fresh_python("-W", "error", "-c", "from flaxzoo import runtime; runtime.configure()\n"
                       "import jax.numpy as jnp; jnp.ones(2).sum()")
  assert early.returncode == 0, early.stderr


PROGRAM = """
import logging; logging.basicConfig()  # where JAX_DEBUG_LOG_MODULES's messages go
import jax, jax.numpy as jnp
from flaxzoo import runtime
print(runtime.enable_compilation_cache())
print(jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((4, 4))).sum())
print(jax.config.jax_compilation_cache_dir)
"""


def run_program(cache_setting, **env):
  env = dict(os.environ, JAX_DEBUG_LOG_MODULES="jax._src.compiler", **env)
  env[runtime.CACHE_ENV] = cache_setting
  return subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=120)


def test_cache_dir_settings(monkeypatch, tmp_path):
  monkeypatch.setenv(runtime.CACHE_ENV, "off")
  assert runtime.compilation_cache_dir() is None
  monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "mine"))
  assert runtime.compilation_cache_dir() == tmp_path / "mine" / runtime.machine_fingerprint()
  monkeypatch.delenv(runtime.CACHE_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert runtime.compilation_cache_dir().parent == tmp_path / "xdg" / "flaxzoo" / "jax"
  # One folder per CPU: an executable built for another instruction set is never looked up.
  monkeypatch.setattr(runtime, "machine_fingerprint", lambda: "another-cpu")
  assert runtime.compilation_cache_dir() == tmp_path / "xdg" / "flaxzoo" / "jax" / "another-cpu"


def test_second_process_loads_the_compiled_program(tmp_path):
  first = run_program(str(tmp_path / "cache"))
  assert first.returncode == 0, first.stderr
  folder = tmp_path / "cache" / runtime.machine_fingerprint()
  assert first.stdout.splitlines()[0] == str(folder)
  assert (folder.stat().st_mode & 0o777) == 0o700  # jax trusts what is in it: private
  assert any(folder.iterdir())
  assert "cache hit" not in first.stderr
  second = run_program(str(tmp_path / "cache"))
  assert second.returncode == 0, second.stderr
  assert "Persistent compilation cache hit" in second.stderr
  assert second.stdout.splitlines()[1] == first.stdout.splitlines()[1]


def test_off_leaves_jax_without_a_cache(tmp_path):
  done = run_program("off", XDG_CACHE_HOME=str(tmp_path / "xdg"))
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[0] == "None"
  assert done.stdout.splitlines()[2] == "None"  # jax_compilation_cache_dir
  assert not (tmp_path / "xdg").exists()  # not the default folder either
