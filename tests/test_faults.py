"""Crash safety: runs killed at any moment resume bit for bit; damaged checkpoints are skipped,
never deleted; signals save and say how to resume; NaN stops without saving; a failed save keeps
what was committed. Each attempt runs in its own process (tests/fault_child.py) on a 640-image
slice of the real MNIST files."""

import gc
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT, assert_tensorboard_equals_metrics, tree_snapshot

from flaxzoo import models, training
from flaxzoo.training import checkpoint
from flaxzoo.training import config as config_lib
from flaxzoo.training.state import create_train_state

TINY = '{"widths": [4, 8], "hidden": 16}'
STEPS = 30  # 3 epochs of 10 steps; checkpoints every 4 steps and at epoch ends (10, 20, 30)


def train_args(workdir, data_dir, *extra):
  return ["--workdir", workdir, "--data-dir", data_dir, "--epochs", 3, "--batch-size", 64,
          "--learning-rate", 3e-3, "--checkpoint-every-steps", 4, "--set", f"model_kwargs={TINY}",
          "--set", "train_examples=640", "--set", "test_examples=500",
          "--set", "log_every_steps=3", "--set", "keep_checkpoints=2", *extra]


def attempt(workdir, data_dir, *hooks, extra=()):
  """One training attempt in a new process; `hooks` are fault_child.py options."""
  command = [sys.executable, str(ROOT / "tests" / "fault_child.py"), *map(str, hooks), "--",
             *map(str, train_args(workdir, data_dir, *extra))]
  return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def final_state(workdir):
  """The full train state (params, optimizer state, step, rng) of the newest checkpoint."""
  card = checkpoint.read_card(workdir)
  config = config_lib.from_dict(card["config"])
  model = models.create_model(config.model, num_classes=card["num_classes"], **config.model_kwargs)
  target = create_train_state(model, config, card["input_shape"], total_steps=card["step"])
  return checkpoint.restore_latest(workdir, target)[0]


def assert_bit_identical(state_a, state_b):
  """Every saved part of two train states (params, optimizer state, step, rng...) byte for byte."""
  a, b = ({part: getattr(s, part) for part in checkpoint.STATE_PARTS} for s in (state_a, state_b))
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def metrics(workdir):
  """metrics.jsonl without its timing field, which legitimately differs between runs."""
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_data_dir):
  workdir = tmp_path_factory.mktemp("faults") / "uninterrupted"
  result = attempt(workdir, mnist_data_dir)
  assert result.returncode == 0, result.stderr
  (workdir.parent / "uninterrupted.stdout").write_text(result.stdout)
  return workdir


def epoch_lines(stdout: str) -> dict:
  """{epoch: its printed figures} without the timing, which legitimately differs between runs."""
  return {line.split()[1]: line.split(" img/s")[0].rsplit("  ", 1)[0]
          for line in stdout.splitlines() if line.startswith("epoch ")}


def assert_same_run(workdir, reference):
  assert checkpoint.saved_steps(workdir) == checkpoint.saved_steps(reference) == [28, 30]
  assert_bit_identical(final_state(workdir), final_state(reference))
  assert metrics(workdir) == metrics(reference)


def test_sigkill_at_any_point_resumes_bit_for_bit(tmp_path, mnist_data_dir, uninterrupted):
  workdir = tmp_path / "killed"
  kills = [
      (["--kill-at-step", 6], [4]),  # mid-epoch, two steps after a checkpoint
      (["--kill-before-commit", 1], [4]),  # step 8 written to a temporary folder, not committed
      (["--kill-after-commit", 2], [4, 8, 10]),  # 8 and 10 committed, the old one not yet pruned
      (["--kill-at-step", 17], [10, 12, 16]),  # the oldest goes when the next save starts
      (["--kill-before-commit", 3], [20, 24]),  # while step 28 is being written
  ]
  for hooks, steps_after in kills:
    result = attempt(workdir, mnist_data_dir, *hooks)
    assert result.returncode == -signal.SIGKILL, (hooks, result.stderr)
    assert checkpoint.saved_steps(workdir) == steps_after, hooks
  leftovers = [p.name for p in workdir.iterdir() if "tmp" in p.name]
  assert leftovers  # the killed save's temporary folder: never listed as a checkpoint

  result = attempt(workdir, mnist_data_dir)
  assert result.returncode == 0, result.stderr
  assert "Resuming" in result.stderr and "from step 24" in result.stderr
  # The resumed epoch's printed figures cover the whole epoch, as the uninterrupted run's do.
  reference = epoch_lines((uninterrupted.parent / "uninterrupted.stdout").read_text())
  assert epoch_lines(result.stdout) == {"3/3": reference["3/3"]}
  assert not [p.name for p in workdir.iterdir() if "tmp" in p.name]  # cleaned up on restart
  assert_same_run(workdir, uninterrupted)
  # Six writers' event files: the points the killed runs wrote past their restored step are purged.
  assert len(list((workdir / "tensorboard").iterdir())) == 6
  assert_tensorboard_equals_metrics(workdir)
  assert_tensorboard_equals_metrics(uninterrupted)


RUN_KINDS = {
    "resnet-batchnorm-ema": ["--model", "resnet", "--set", 'model_kwargs={"widths": [4, 8, 8]}', "--ema-decay", "0.9"],
    "vit-dropout-shift": ["--model", "vit_tiny", "--set", "augment=shift", "--set",
                          'model_kwargs={"stem_widths": [4, 8, 8], "dim": 16, "depth": 1, "heads": 2, '
                          '"mlp_dim": 16, "dropout": 0.1}'],
    "bfloat16": ["--dtype", "bfloat16"],
    # Issue 23's options together: resumed state includes the EMA, micro-batches, mixed targets.
    "sgd-cosine-smoothing-ema-accum-mixup": ["--optimizer", "sgd", "--schedule", "cosine",
                                             "--label-smoothing", "0.1", "--ema-decay", "0.9",
                                             "--grad-accum", "2", "--augment", "affine,erase,mixup"],
    "finetune-frozen-backbone": ["--set", "freeze=backbone", "--set", "head_learning_rate=0.01"],
}


@pytest.mark.parametrize("kind", RUN_KINDS)
def test_every_kind_of_run_resumes_bit_for_bit_after_sigkill(kind, tmp_path, mnist_data_dir, uninterrupted):
  extra = list(RUN_KINDS[kind])
  if kind.startswith("finetune"):  # from the uninterrupted ConvNet run's last checkpoint
    extra += ["--set", f"init_from={uninterrupted}", "--set", "init_step=30"]
  reference, workdir = tmp_path / "reference", tmp_path / "killed"
  assert attempt(reference, mnist_data_dir, extra=extra).returncode == 0
  result = attempt(workdir, mnist_data_dir, "--kill-at-step", 6, extra=extra)  # mid-epoch
  assert result.returncode == -signal.SIGKILL, result.stderr
  result = attempt(workdir, mnist_data_dir, extra=extra)
  assert result.returncode == 0 and "from step 4" in result.stderr, result.stderr
  assert_same_run(workdir, reference)


def test_a_streaming_run_killed_mid_epoch_resumes_to_the_in_memory_run(tmp_path, mnist_data_dir,
                                                                       uninterrupted):
  """Batches read by grain worker processes from the ArrayRecord files: killed (workers and all)
  mid-epoch, stopped by SIGTERM with its worker's queue full (grain's own stop hung there), and
  killed after a save; each resume ends bit-identical to the uninterrupted in-memory run."""
  workdir = tmp_path / "streamed"
  streaming = ["--streaming", "on", "--workers", "1"]
  result = attempt(workdir, mnist_data_dir, "--kill-at-step", 6, extra=streaming)
  assert result.returncode == -signal.SIGKILL, result.stderr
  result = attempt(workdir, mnist_data_dir, "--kill-at-step", 13, "--signal", "TERM", extra=streaming)
  assert result.returncode == 143 and "SIGTERM: stopped at step 14" in result.stderr, result.stderr
  result = attempt(workdir, mnist_data_dir, "--kill-at-step", 17, extra=streaming)
  assert result.returncode == -signal.SIGKILL, result.stderr
  result = attempt(workdir, mnist_data_dir, extra=streaming)
  assert result.returncode == 0 and "from step 16" in result.stderr, result.stderr
  assert "Streaming mnist's 640 training images" in result.stderr
  assert_same_run(workdir, uninterrupted)


@pytest.mark.parametrize("name,status", [("INT", 130), ("TERM", 143)])
def test_a_second_signal_stops_at_once_with_the_signal_status(tmp_path, mnist_data_dir, name, status):
  workdir = tmp_path / "twice"
  result = attempt(workdir, mnist_data_dir, "--kill-at-step", 13, "--signal", name, "--twice")
  assert result.returncode == status, result.stderr
  assert f"stopped at once by a second SIG{name}" in result.stderr and "Traceback" not in result.stderr
  assert checkpoint.saved_steps(workdir) and checkpoint.saved_steps(workdir)[-1] <= 12
  assert attempt(workdir, mnist_data_dir).returncode == 0  # and it resumes


def start(workdir, data_dir, *hooks):
  command = [sys.executable, str(ROOT / "tests" / "fault_child.py"), *map(str, hooks), "--",
             *map(str, train_args(workdir, data_dir))]
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_a_second_writer_is_refused_at_the_same_moment_and_mid_run(tmp_path, mnist_data_dir, uninterrupted):
  workdir = tmp_path / "shared"
  # Both started at once; whichever takes the lock pauses at step 2 until the test has seen the
  # other one refused (or 5 minutes passed), so the other finds it held.
  resume = tmp_path / "resume"
  processes = [start(workdir, mnist_data_dir, "--pause-at-step", 2, "--pause-seconds", 300,
                     "--resume-file", resume) for _ in range(2)]
  deadline = time.monotonic() + 300
  while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
    time.sleep(0.1)
  resume.touch()
  results = sorted((p.wait(timeout=600), p.stderr.read()) for p in processes)
  (ok, _), (refused, message) = results
  assert (ok, refused) == (0, 2), message
  assert "is being written by another flaxzoo run (pid" in message and "wait for it to end" in message
  assert_same_run(workdir, uninterrupted)

  # Mid-run: a second writer while the first is paused at step 16 of a continued run.
  shutil.rmtree(workdir)
  resume = tmp_path / "resume-mid-run"
  holder = start(workdir, mnist_data_dir, "--pause-at-step", 16, "--pause-seconds", 300, "--resume-file", resume)
  deadline = time.monotonic() + 300
  while 12 not in checkpoint.saved_steps(workdir) and time.monotonic() < deadline:
    time.sleep(0.2)
  late = attempt(workdir, mnist_data_dir)
  resume.touch()
  assert late.returncode == 2 and late.stderr.count("flaxzoo: error:") == 1, late.stderr
  assert f"pid {holder.pid} on " in late.stderr
  assert holder.wait(timeout=600) == 0, holder.stderr.read()
  assert_same_run(workdir, uninterrupted)  # the first run's checkpoints and log untouched


@pytest.mark.parametrize("name,status", [("TERM", 143), ("INT", 130)])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, mnist_data_dir,
                                                          uninterrupted, name, status):
  workdir = tmp_path / "signalled"
  result = attempt(workdir, mnist_data_dir, "--kill-at-step", 13, "--signal", name)
  assert result.returncode == status, result.stderr
  assert f"SIG{name}: stopped at step 14" in result.stderr  # the step under way was finished
  assert f"Resume with: flaxzoo train --workdir {workdir}" in result.stderr
  assert "Traceback" not in result.stderr
  assert checkpoint.saved_steps(workdir) == [12, 14]

  result = attempt(workdir, mnist_data_dir)
  assert result.returncode == 0, result.stderr
  assert "from step 14" in result.stderr
  assert_same_run(workdir, uninterrupted)  # the pending train metrics travelled in the card


def array_files(workdir, step):
  """The files holding the state's array bytes (tensorstore's OCDBT data files)."""
  return sorted(p for p in (Path(workdir) / str(step) / "state").rglob("d/*") if p.is_file())


def damage_state_data(workdir, step):
  """Flips one byte in the middle of every array file: same sizes, other bytes."""
  for path in array_files(workdir, step):
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))


def truncate_state_data(workdir, step):
  for path in array_files(workdir, step):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def delete_card(workdir, step):
  (Path(workdir) / str(step) / "card" / "metadata").unlink()


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, mnist_data_dir):
  """A finished 1-epoch run with checkpoints at steps 4, 8 and 10."""
  workdir = tmp_path_factory.mktemp("corrupt") / "run"
  config = small_config(mnist_data_dir, epochs=1)
  training.train_and_evaluate(config, workdir)
  assert checkpoint.saved_steps(workdir) == [4, 8, 10]
  return workdir


def small_config(data_dir, **changes):
  values = dict(model_kwargs={"widths": [4, 8], "hidden": 16}, data_dir=data_dir, batch_size=64,
                learning_rate=3e-3, train_examples=640, test_examples=500, checkpoint_every_steps=4,
                log_every_steps=4)
  return training.Config(**{**values, **changes})


@pytest.mark.parametrize("damage", [damage_state_data, truncate_state_data, delete_card])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, one_epoch, damage,
                                                                  capsys):
  workdir = tmp_path / "run"
  shutil.copytree(one_epoch, workdir)
  damage(workdir, 10)
  before = tree_snapshot(workdir)
  model, variables, card = training.load_checkpoint(workdir)
  assert card["step"] == 8
  warnings = [l for l in capsys.readouterr().err.splitlines() if "unreadable" in l]
  assert len(warnings) == 1 and f"{workdir}/10 is unreadable" in warnings[0]
  assert tree_snapshot(workdir) == before  # loading changes nothing


def test_training_continues_from_the_newest_good_checkpoint(tmp_path, mnist_data_dir):
  config = small_config(mnist_data_dir, epochs=2, keep_checkpoints=2)
  straight = training.train_and_evaluate(config, tmp_path / "straight")
  workdir = tmp_path / "run"
  shutil.copytree(tmp_path / "straight", workdir)
  assert checkpoint.saved_steps(workdir) == [16, 20]
  damage_state_data(workdir, 20)
  damaged = tree_snapshot(workdir / "20")
  state = training.train_and_evaluate(config, workdir)
  # The unreadable step is kept, moved aside, and training redid steps 17 to 20 from step 16.
  assert tree_snapshot(workdir / "unreadable" / "20") == damaged
  assert checkpoint.saved_steps(workdir) == [16, 20]
  assert_bit_identical(state, straight)
  assert metrics(workdir) == metrics(tmp_path / "straight")


def test_no_readable_checkpoint_is_an_error_that_changes_nothing(tmp_path, one_epoch, mnist_data_dir):
  workdir = tmp_path / "run"
  shutil.copytree(one_epoch, workdir)
  for step in (4, 8, 10):
    truncate_state_data(workdir, step)
  before = tree_snapshot(workdir)
  with pytest.raises(training.CheckpointError, match="no readable checkpoint in .*nothing was changed"):
    training.load_checkpoint(workdir)
  with pytest.raises(training.CheckpointError, match="no readable checkpoint"):
    training.train_and_evaluate(small_config(mnist_data_dir, epochs=2), workdir)
  assert tree_snapshot(workdir) == before


def test_nan_loss_stops_without_saving(tmp_path, one_epoch, mnist_data_dir):
  workdir = tmp_path / "run"
  shutil.copytree(one_epoch, workdir)
  checkpoints_before = {s: tree_snapshot(workdir / str(s)) for s in (4, 8, 10)}
  metrics_before = (workdir / "metrics.jsonl").read_text()
  with pytest.raises(training.TrainingDiverged,
                     match=rf"loss became (nan|inf) at step 1[12] .*saved nothing newer.*"
                           rf"last good checkpoint, {workdir}/10, is kept"):
    training.train_and_evaluate(small_config(mnist_data_dir, epochs=2, learning_rate=1e30), workdir)
  assert checkpoint.saved_steps(workdir) == [4, 8, 10]
  assert {s: tree_snapshot(workdir / str(s)) for s in (4, 8, 10)} == checkpoints_before
  assert (workdir / "metrics.jsonl").read_text() == metrics_before


def test_a_failed_save_keeps_the_committed_checkpoints(tmp_path, mnist_data_dir, one_epoch):
  workdir = tmp_path / "run"
  shutil.copytree(one_epoch, workdir)
  before = {s: tree_snapshot(workdir / str(s)) for s in (4, 8, 10)}
  # Files may grow to 20 kB: metrics and cards fit, the state's array data (~50 kB) do not.
  result = subprocess.run(
      [sys.executable, str(ROOT / "tests" / "fault_child.py"), "--file-size-limit", "20000", "--",
       "--workdir", str(workdir), "--data-dir", mnist_data_dir, "--epochs", "2"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 2, result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith("flaxzoo: error:")]
  assert len(errors) == 1 and "saving step 12" in errors[0], result.stderr
  assert "Traceback" not in result.stderr and "File too large" in errors[0], result.stderr
  assert "the committed checkpoints (4, 8, 10) are intact" in errors[0]
  assert {s: tree_snapshot(workdir / str(s)) for s in (4, 8, 10)} == before
  assert training.load_checkpoint(workdir)[2]["step"] == 10


# tensorstore's two messages for a full disk, as a save failing under RLIMIT_FSIZE raised them: which
# one comes depends on whether OCDBT was flushing an array's chunk or its .zarray metadata (about 1
# run in 30 of the test above), and only the second carries a spec between the words and the code.
DATA = ('OUT_OF_RANGE: Error writing "opt_state.0.count/0" in OCDBT database at local file '
        '"/w/12.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: '
        '"/w/ocdbt.process_0/d/79b2": Failed to write 56362 bytes to file 7: File too large '
        "[os_error_code='27']")
METADATA = ('OUT_OF_RANGE: Error opening "zarr" driver: Error writing "opt_state.0.nu.Dense_0.bias/'
            '.zarray" in OCDBT database at local file "/w/ocdbt.process_0/": Failed writing: '
            '"/w/ocdbt.process_0/d/67c0": Failed to write 29094 bytes to file 14: File too large '
            '[tensorstore_spec=\'{"context":{"cache_pool":{}},"driver":"zarr",'
            '"metadata":{"chunks":[16],"shape":[16]}}\'] [os_error_code=\'27\']')


@pytest.mark.parametrize("message", [DATA, METADATA])
def test_a_full_disk_is_named_in_the_os_words(message):
  assert checkpoint._save_reason(ValueError(message)) == "File too large, writing its array data"


def test_other_save_errors_keep_their_first_line():
  assert checkpoint._save_reason(ValueError("NOT_FOUND: gone\nmore")) == "ValueError: NOT_FOUND: gone"


def test_reads_abandoned_after_a_damaged_checkpoint_stay_quiet(recwarn):
  """A failed read leaves orbax coroutines that never ran; collecting them must not add Python's
  "never awaited" warning to the one line that names the damaged step."""
  async def never_started_read():
    pass

  with pytest.raises(checkpoint.UnreadableCheckpoint):
    with checkpoint._quiet_failed_reads():
      cycle = {"read": never_started_read()}
      cycle["self"] = cycle  # only the collector frees it, as orbax's abandoned tasks are
      del cycle
      raise checkpoint.UnreadableCheckpoint("/w", 10, "damaged")
  gc.collect()  # anything left uncollected would warn here
  assert not [w for w in recwarn if "never awaited" in str(w.message)]
