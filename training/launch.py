"""`flaxzoo launch`: P local processes of one multi-process run, for trying scale-out on one machine.

It only starts processes (each a plain `flaxzoo train|finetune ... --coordinator 127.0.0.1:PORT
--num-processes P --process-id I`); JAX's coordination service and collectives do the rest. Each
child runs in its own session, so Ctrl-C reaches the launcher alone, which passes a SIGTERM to every
child: JAX's preemption sync point then stops them all at the same step, after a checkpoint.
"""

import os
import signal
import socket
import subprocess
import sys
import time

from flaxzoo.training.config import ConfigError

COMMANDS = ("train", "finetune")
GRACE_S = 30  # after the first failure, how long the others get to stop before SIGKILL
POLL_S = 0.2


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_command(argv: list[str], port: int, num_processes: int, process_id: int) -> list[str]:
  return [sys.executable, "-m", "flaxzoo.training", *argv, "--coordinator", f"127.0.0.1:{port}",
          "--num-processes", str(num_processes), "--process-id", str(process_id)]


def child_environment(devices_per_process: int | None) -> dict:
  env = dict(os.environ)
  if devices_per_process:  # CPU devices to emulate (GPUs and TPUs are what the host has)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
  return env


def check_arguments(num_processes: int, argv: list[str], devices_per_process: int | None) -> None:
  if num_processes < 1:
    raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
  if devices_per_process is not None and devices_per_process < 1:
    raise ConfigError(f"--devices-per-process must be at least 1, got {devices_per_process}")
  if not argv or argv[0] not in COMMANDS:
    raise ConfigError(f"give the command to run after --, one of {', '.join(COMMANDS)}: e.g. "
                      f"flaxzoo launch --num-processes 2 -- train --epochs 1")
  taken = [f for f in ("--coordinator", "--num-processes", "--process-id")
           if any(a == f or a.startswith(f + "=") for a in argv)]
  if taken:
    raise ConfigError(f"the launcher sets {', '.join(taken)} itself; leave {'it' if len(taken) == 1 else 'them'} out")


def launch(num_processes: int, argv: list[str], devices_per_process: int | None = None,
           port: int | None = None, grace_s: float = GRACE_S) -> int:
  """Runs the P processes to the end; returns 0, or the exit status of the first that failed
  (the others are then stopped: SIGTERM, and SIGKILL after `grace_s`)."""
  check_arguments(num_processes, argv, devices_per_process)
  port = port or free_port()
  env = child_environment(devices_per_process)
  children = [subprocess.Popen(child_command(argv, port, num_processes, i), env=env,
                               start_new_session=True) for i in range(num_processes)]

  def forward(signum, frame):
    for child in children:
      if child.poll() is None:
        child.send_signal(signal.SIGTERM)

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    return _wait(children, grace_s)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    for child in children:  # whatever happened above, no child outlives the launcher
      if child.poll() is None:
        child.kill()


def _wait(children, grace_s: float) -> int:
  while True:
    codes = [child.poll() for child in children]
    failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
    if failed:
      index, code = failed[0]
      status = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
      running = [c for c in children if c.poll() is None]
      print(f"flaxzoo launch: process {index} exited with {status}"
            + ("; stopping the others" if running else ""), file=sys.stderr, flush=True)
      _stop(running, grace_s)
      return code if code > 0 else 128 - code
    if all(code == 0 for code in codes):
      return 0
    time.sleep(POLL_S)


def _stop(children, grace_s: float) -> None:
  for child in children:
    child.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for child in children:
    try:
      child.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()
