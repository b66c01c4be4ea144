"""Scale-out (training/parallel.py, training/launch.py): 1 device against 4 emulated CPU devices
against 2 processes of 2 devices give the same training within a stated tolerance; checkpoints move
between device counts; a multi-process run killed with kill -9 resumes bit for bit; a lost process,
a missing coordinator and mismatched settings end each process with one line."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, assert_one_clear_error, generated_images, run_main
from PIL import Image
from test_faults import assert_bit_identical, final_state, metrics, train_args

from flaxzoo.training import checkpoint, launch

# Final params of 1 device and of 4 (one process, or 2 x 2) differ only by the order XLA sums the
# per-device gradients in. Measured after 50 ConvNet steps on MNIST (scripts/scale_out_check.py,
# docs/scale-out.md): 8.6e-6 (4 devices) and 2.0e-5 (2 x 2) at most; the bound leaves room for
# other CPUs. (Over a whole epoch, Adam amplifies the differences chaotically: see the docs.)
PARAMS_TOLERANCE = 1e-4


def devices_env(count: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "FLAXZOO_MANUAL_DIR"}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
  return env


def flaxzoo(*args, devices: int = 1, timeout: int = 600):
  return subprocess.run([sys.executable, "-m", "flaxzoo.training", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, env=devices_env(devices), timeout=timeout)


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("flaxzoo: error:")]


@pytest.fixture
def small_folder(tmp_path):
  """PATH/{train,test}/<class>/*.png: 64 train and 20 test generated images of 3 classes."""
  images, labels = generated_images(84)
  for i, (image, label) in enumerate(zip(images, labels % 3)):
    split = "train" if i < 64 else "test"
    (tmp_path / "folder" / split / f"c{label}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0]).save(tmp_path / "folder" / split / f"c{label}" / f"{i}.png")
  return tmp_path / "folder"


@pytest.mark.slow  # trains in a child process of 4 emulated devices (conftest: a slow-tier test)
def test_one_and_four_devices_train_alike_and_checkpoints_move_between_device_counts(small_folder, tmp_path):
  result = subprocess.run([sys.executable, str(ROOT / "tests" / "scale_out_child.py"), str(small_folder),
                           str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True,
                          env=devices_env(4), timeout=600)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.splitlines()[-1])
  assert report["devices"] == 4
  assert report["steps"] == {"1": 8, "4": 8}
  assert report["params_difference_1_vs_4"] < PARAMS_TOLERANCE
  assert report["eval_accuracy"]["1"] == report["eval_accuracy"]["4"]
  assert report["eval_loss"]["1"] == pytest.approx(report["eval_loss"]["4"], abs=1e-6)
  assert report["continued_step"] == 12 and report["continued_on_2_vs_on_4"] < PARAMS_TOLERANCE
  assert report["sharding"] in ("P()", "PartitionSpec()")  # params replicated
  assert "--batch-size 18 does not split over 4 CPU devices" in report["batch_error"]
  assert "16 or 20" in report["batch_error"]
  assert report["rows"] == [[0, 16]]  # one process reads the whole batch


@pytest.mark.parametrize("flags, fragment", [
    (["--num-processes", 2, "--process-id", 2, "--coordinator", "127.0.0.1:1"], "--process-id 2 is not in 0..1"),
    (["--num-processes", 2], "go together"),
    (["--num-processes", 2, "--process-id", 0, "--coordinator", "nohost"], "HOST:PORT"),
])
def test_bad_process_flags_are_one_line(capsys, tmp_path, flags, fragment):
  assert_one_clear_error(run_main(capsys, "train", "--workdir", tmp_path / "w", *flags), fragment)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--num-processes", 2], "give the command to run after --"),
    (["--num-processes", 2, "--", "eval", "--workdir", "x"], "one of train, finetune"),
    (["--num-processes", 2, "--", "train", "--process-id", 1], "sets --process-id itself"),
    (["--num-processes", 0, "--", "train"], "at least 1"),
])
def test_launch_refuses_what_it_cannot_run(capsys, argv, fragment):
  assert_one_clear_error(run_main(capsys, "launch", *argv), fragment)


def test_a_coordinator_that_never_comes_up_is_one_line(tmp_path):
  start = time.monotonic()
  result = flaxzoo("train", "--workdir", tmp_path / "w", "--coordinator", f"127.0.0.1:{launch.free_port()}",
                   "--num-processes", 2, "--process-id", 1, "--process-timeout", 3, devices=2)
  assert result.returncode == 2 and time.monotonic() - start < 60
  assert error_lines(result.stderr) == [error_lines(result.stderr)[0]]
  assert "no coordinator at 127.0.0.1:" in result.stderr and "after 3 s" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()


def two_processes(command_for, port=None):
  """Starts processes 0 and 1 (2 emulated devices each); `command_for(i)` gives each one's argv."""
  port = port or launch.free_port()
  coordinator = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", 2]
  return [subprocess.Popen([sys.executable, *map(str, [*command_for(i), *coordinator, "--process-id", i])],
                           cwd=ROOT, env=devices_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for i in range(2)]


def finish(processes, timeout=600):
  return [(p.wait(timeout), *p.communicate()) for p in processes]


def test_processes_started_with_different_settings_stop_with_one_line(tmp_path):
  results = finish(two_processes(lambda i: ["-m", "flaxzoo.training", "train", "--workdir", tmp_path / "w",
                                            "--learning-rate", 0.01 * (i + 1), "--process-timeout", 20]))
  for status, _, stderr in results:
    assert status == 2, stderr
    assert len(error_lines(stderr)) == 1 and "settings differ from process 0's" in stderr
  assert not (tmp_path / "w").exists()


# --- the slow tier: real MNIST ----------------------------------------------------------------------

def test_one_device_four_devices_and_two_processes_give_the_same_training(tmp_path, mnist_data_dir):
  common = ["--data-dir", mnist_data_dir, "--epochs", 1, "--set", "train_examples=6400",
            "--set", "test_examples=2000"]
  runs = {"1": tmp_path / "one", "4": tmp_path / "four", "2x2": tmp_path / "two-by-two"}
  single = flaxzoo("train", "--workdir", runs["1"], *common, devices=1)
  assert single.returncode == 0, single.stderr
  four = flaxzoo("train", "--workdir", runs["4"], *common, devices=4)
  assert four.returncode == 0, four.stderr
  assert "Training on 4 CPU devices" in four.stderr
  launched = flaxzoo("launch", "--num-processes", 2, "--devices-per-process", 2, "--", "train",
                     "--workdir", runs["2x2"], *common)
  assert launched.returncode == 0, launched.stderr
  assert "Training on 4 CPU devices in 2 processes" in launched.stderr
  states = {name: final_state(workdir) for name, workdir in runs.items()}
  for name in ("4", "2x2"):
    assert int(states[name].step) == int(states["1"].step) == 50
    difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(*(jax_leaves(states[n].params) for n in ("1", name))))
    assert difference < PARAMS_TOLERANCE, name
  accuracy = {name: metrics(workdir)[-1]["accuracy"] for name, workdir in runs.items()}
  assert max(accuracy.values()) - min(accuracy.values()) <= 0.001, accuracy
  # The checkpoints of 4 devices and of 2 processes, evaluated in a plain one-device process.
  for name in ("4", "2x2"):
    evaluated = flaxzoo("eval", "--workdir", runs[name], "--data-dir", mnist_data_dir, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.splitlines()[-1])["accuracy"] == pytest.approx(accuracy[name], abs=1e-9)


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def fault_run(workdir, data_dir, hooks, port, timeout_s=20):
  """The fault tests' tiny run (tests/test_faults.py) as 2 processes of 2 devices;
  `hooks[i]`: tests/fault_child.py options of process i."""
  return two_processes(lambda i: [ROOT / "tests" / "fault_child.py", *hooks[i], "--",
                                  *train_args(workdir, data_dir), "--process-timeout", timeout_s], port)


def test_two_processes_killed_mid_epoch_resume_bit_for_bit(tmp_path, mnist_data_dir):
  reference, killed = tmp_path / "uninterrupted", tmp_path / "killed"
  assert [r[0] for r in finish(fault_run(reference, mnist_data_dir, [[], []], launch.free_port()))] == [0, 0]
  results = finish(fault_run(killed, mnist_data_dir, [["--kill-at-step", 6]] * 2, launch.free_port()))
  assert [r[0] for r in results] == [-9, -9], results
  assert checkpoint.saved_steps(killed) == [4]
  results = finish(fault_run(killed, mnist_data_dir, [[], []], launch.free_port()))
  assert [r[0] for r in results] == [0, 0], results
  assert "Resuming" in results[0][2] and "from step 4" in results[0][2]
  assert checkpoint.saved_steps(killed) == checkpoint.saved_steps(reference) == [28, 30]
  assert_bit_identical(final_state(killed), final_state(reference))
  assert metrics(killed) == metrics(reference)


def test_killing_one_process_stops_the_other_with_one_line_within_the_timeout(tmp_path, mnist_data_dir):
  timeout_s = 10
  processes = fault_run(tmp_path / "w", mnist_data_dir, [[], ["--kill-at-step", 6]], launch.free_port(),
                        timeout_s)
  killed_status = processes[1].wait(600)
  killed_at = time.monotonic()
  status, _, stderr = finish(processes[:1])[0]
  waited = time.monotonic() - killed_at
  assert killed_status == -9
  assert status == launch.EXIT_PEER_LOST, stderr
  assert waited < timeout_s + 15, waited  # JAX's heartbeat timeout, then the process stops
  lines = error_lines(stderr)
  assert len(lines) == 1 and "process 0:" in lines[0] and "restart them all" in lines[0], stderr
  assert "Check failure stack trace" not in stderr and "Traceback" not in stderr
  assert checkpoint.saved_steps(tmp_path / "w") == [4]  # the committed checkpoint is kept
