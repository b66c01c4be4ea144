"""Shared fixtures. Real MNIST comes from the original raw files in ../shared/data/mnist (or
$FLAXZOO_MANUAL_DIR/mnist), prepared once per test session into a data dir of its own.

The suite runs in two pytest-xdist workers, one test file each at a time (`-n 2 --dist loadfile`
in pyproject.toml): module fixtures stay in one process, and the session's expensive fixtures are
made once by whichever worker asks first (`made_once`)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from flaxzoo import runtime

# The test process runs with the settings the CLI runs with, applied as the CLI applies them: first,
# before anything computes (the compilation cache comes with the session fixture below).
runtime.configure(compilation_cache=False)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory) -> Path:
  """One jax compilation cache for the session's processes (this one and every child run),
  instead of the user's ~/.cache: tests stay hermetic, and a child re-running a program another
  test compiled loads it, as a restarted run does."""
  path = tmp_path_factory.mktemp("jax-compilation-cache")
  os.environ[runtime.CACHE_ENV] = str(path)
  runtime.enable_compilation_cache()
  return path


def raw_mnist_dir() -> Path | None:
  candidates = [ROOT.parent / "shared" / "data" / "mnist"]
  if os.environ.get("FLAXZOO_MANUAL_DIR"):
    candidates.insert(0, Path(os.environ["FLAXZOO_MANUAL_DIR"]) / "mnist")
  return next((c for c in candidates if (c / "train-images-idx3-ubyte.gz").is_file()), None)


@pytest.fixture(scope="session")
def mnist_raw_dir() -> Path:
  found = raw_mnist_dir()
  if found is None:
    message = "real MNIST raw files not found: set FLAXZOO_MANUAL_DIR=PARENT with PARENT/mnist/"
    if os.environ.get("CI"):
      pytest.fail(message)  # CI has ../shared/data: a missing folder is a broken setup, not a skip
    pytest.skip(message)
  return found


def made_once(tmp_path_factory, name: str, make) -> Path:
  """A folder `make(folder)` fills once per test session: under xdist, the first worker to ask
  makes it under a lock in the session's shared temp dir and the others wait, then read it."""
  worker = os.environ.get("PYTEST_XDIST_WORKER")
  if worker is None:
    folder = tmp_path_factory.mktemp(name)
    make(folder)
    return folder
  folder = tmp_path_factory.getbasetemp().parent / name  # this session's, beside each worker's own
  with FileLock(f"{folder}.lock"):
    if not (folder / ".made").is_file():  # a worker that failed half-way left no mark: start over
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      make(folder)
      (folder / ".made").touch()
  return folder


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory, mnist_raw_dir) -> str:
  """A tfds data dir with MNIST prepared from the real raw files (about 30 s, once)."""
  from flaxzoo import data
  return str(made_once(tmp_path_factory, "tfds", lambda folder: data.prepare("mnist", str(folder),
                                                                             str(mnist_raw_dir))))


def run_cli(*args, cwd=None, timeout=600):
  """Runs `python -m flaxzoo.training ARGS` in a new process; returns the CompletedProcess."""
  env = dict(os.environ)
  env.pop("FLAXZOO_MANUAL_DIR", None)
  return subprocess.run([sys.executable, "-m", "flaxzoo.training", *map(str, args)], capture_output=True,
                        text=True, cwd=cwd or ROOT, env=env, timeout=timeout)


def tree_snapshot(path: Path) -> dict:
  """Every file under `path` with its size, mtime and bytes: equal snapshots = nothing changed.
  A workdir's `.lock` is left out: each run that takes the writer lock names itself in it."""
  if not path.exists():
    return {}
  return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


# Real MNIST (prepared by tfds, ~30-40 s once) and real training processes make a test slow: the
# fast tier (`pytest -m "not slow"`) runs on small generated data. Requesting one of these fixtures
# marks a test slow, so that no test can land in the wrong tier.
REAL_DATA_FIXTURES = {"mnist_data_dir", "mnist_raw_dir"}


def pytest_collection_modifyitems(config, items):
  for item in items:
    if REAL_DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_mnist_run(tmp_path_factory, mnist_data_dir) -> Path:
  """A tiny ConvNet trained for one short epoch on real MNIST (1,280 training and 500 test
  images): the source of the fine-tune tests and the checkpoint the analysis tests read."""
  from flaxzoo import training
  config = training.Config(model_kwargs={"widths": [4, 8], "hidden": 16}, data_dir=mnist_data_dir, epochs=1,
                           batch_size=64, train_examples=1280, test_examples=500, learning_rate=3e-3)
  folder = made_once(tmp_path_factory, "tiny-mnist",
                     lambda folder: training.train_and_evaluate(config, folder / "mnist-tiny"))
  return folder / "mnist-tiny"


def generated_images(count: int, shape=(28, 28, 1), seed: int = 0):
  """uint8 images with int32 labels, as the input path delivers them (unit tests' data)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (count, *shape), dtype=np.uint8),
          rng.integers(0, 10, (count,), dtype=np.int32))


def write_checkpoint(workdir, model_name="convnet", class_names=None, steps=0, ema_decay=0.0,
                     tta="none", **model_kwargs):
  """A real orbax checkpoint with its card of a model trained `steps` steps on generated data,
  without a dataset: what train would leave, for tests of loading, eval and predict."""
  from flaxzoo import models
  from flaxzoo.data import DatasetInfo
  from flaxzoo.training import checkpoint
  from flaxzoo.training.config import Config
  from flaxzoo.training.state import create_train_state
  from flaxzoo.training.steps import train_step
  class_names = class_names or [f"class-{i}" for i in range(10)]
  model = models.create_model(model_name, num_classes=len(class_names), **model_kwargs)
  config = Config(model=model_name, model_kwargs=model_kwargs, ema_decay=ema_decay, tta=tta)
  state = create_train_state(model, config, (28, 28, 1), total_steps=max(steps, 1))
  images, labels = generated_images(32)
  for _ in range(steps):
    state, _ = train_step(state, images, labels % len(class_names))
  info = DatasetInfo("mnist", len(class_names), tuple(class_names), (28, 28, 1),
                     {"train": 60000, "test": 10000})
  with checkpoint.open_manager(workdir) as manager:
    checkpoint.save(manager, state, checkpoint.make_card(model, config, info, steps, 0.0, {}), keep=3)
    checkpoint.wait(manager)
  return state


def run_main(capsys, *argv):
  """`flaxzoo ARGV` in this process: (exit status, stdout, stderr)."""
  from flaxzoo.training import cli
  status = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return status, out, err


def assert_one_clear_error(result, *fragments):
  status, _, err = result
  assert status == 2, err
  lines = [line for line in err.splitlines() if line.startswith("flaxzoo: error:")]
  assert len(lines) == 1, err
  assert "Traceback" not in err
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def tensorboard_scalars(workdir) -> dict:
  """WORKDIR/tensorboard's scalars as TensorBoard itself reads them: {tag: [(step, value)...]}."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  reader = EventAccumulator(str(Path(workdir) / "tensorboard"), size_guidance={"scalars": 0})
  reader.Reload()
  return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def assert_tensorboard_equals_metrics(workdir):
  """Every number of metrics.jsonl is a TensorBoard point at its step, once (as float32, the
  event files' type), and TensorBoard has nothing else."""
  import json

  import numpy as np

  from flaxzoo.training.tensorboard_log import SCALAR_FIELDS
  expected = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    for field in (f for f in SCALAR_FIELDS[record["split"]] if f in record):
      expected.setdefault(f"{record['split']}/{field}", []).append(
          (record["step"], float(np.float32(record[field]))))
  assert tensorboard_scalars(workdir) == expected
