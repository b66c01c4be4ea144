"""`flaxzoo launch`: P local processes of one multi-process run, for trying scale-out on one machine.

It only starts processes (each a plain `flaxzoo train|finetune ... --coordinator 127.0.0.1:PORT
--num-processes P --process-id I`); JAX's coordination service and collectives do the rest. Each
child runs in its own session, so Ctrl-C reaches the launcher alone, which passes a SIGTERM to every
child: JAX's preemption sync point then stops them all at the same step, after a checkpoint.
When one process fails, the others cannot go on (their next collective waits for it): the
launcher says which one failed and kills the rest at once; their committed checkpoints stay.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

from flaxzoo import runtime
from flaxzoo.training.config import ConfigError

COMMANDS = ("train", "finetune")
POLL_S = 0.2
EXIT_PEER_LOST = 3  # the status of a process JAX stopped because of another (parallel.py too)


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
           port: int | None = None) -> int:
  """Runs the P processes to the end; returns 0, or the exit status of the first that failed
  (the others are then killed)."""
  check_arguments(num_processes, argv, devices_per_process)
  port = port or free_port()
  env = child_environment(devices_per_process)
  # Own sessions: Ctrl-C reaches the launcher only. Killed with the launcher, even by kill -9.
  children = [subprocess.Popen(child_command(argv, port, num_processes, i), env=env,
                               start_new_session=True, preexec_fn=runtime.die_with_parent)
              for i in range(num_processes)]

  stop_requested = []

  def forward(signum, frame):
    stop_requested.append(signum)
    for child in children:
      if child.poll() is None:
        child.send_signal(signal.SIGTERM)

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    return _wait(children, stop_requested)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    for child in children:  # whatever happened above, no child outlives the launcher
      if child.poll() is None:
        child.kill()


def _wait(children, stop_requested: list) -> int:
  while True:
    if stop_requested:  # every process stops at the same step and says so itself
      return max((child.wait() for child in children), key=abs)
    codes = [child.poll() for child in children]
    failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
    if failed:
      index, code = failed[0]
      status = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
      running = [c for c in children if c.poll() is None]
      print(f"flaxzoo launch: process {index} exited with {status}"
            + ("; stopped the others (the committed checkpoints are kept)" if running else ""),
            file=sys.stderr, flush=True)
      for child in running:
        child.kill()
        child.wait()
      return code if code > 0 else 128 - code
    if all(code == 0 for code in codes):
      return 0
    time.sleep(POLL_S)


# JAX's C++ log lines (glog format: severity, date, time, thread, file:line]) and the stack trace
# its fatal errors print, which `supervise` turns into one line; and gloo's start-up chatter.
_JAX_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]")
_NOISE = re.compile(r"^(\s+@\s+0x|\*\*\* Check failure stack trace|\[Gloo\] |RPC: /|Additional GRPC|"
                    r":UNKNOWN:|Barrier result|This suggests that the workers|The tasks have crashed|"
                    r"\d+$|$)")
SUPERVISED_ENV = "FLAXZOO_SUPERVISED"


def supervise(process_id: int | None, workdir: str | None) -> int:
  """Runs this very command again as a child and relays its output, so that a multi-process run
  ends with one line however JAX stops it. JAX's coordination client does not raise when the
  coordinator is unreachable, a process id is taken twice, or another process died: it aborts
  the process with a log line and a C++ stack trace. Those become one `flaxzoo: error:` line and
  exit status 3 here; any other exit is passed on as it is (a signal by the same signal)."""
  env = dict(os.environ, **{SUPERVISED_ENV: "1"})
  child = subprocess.Popen(sys.orig_argv, env=env, stderr=subprocess.PIPE, text=True, bufsize=1,
                           preexec_fn=runtime.die_with_parent)

  def forward(signum, frame):
    child.send_signal(signum)

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
  fatal = None
  try:
    in_jax_message = False
    for line in child.stderr:
      if _JAX_LOG.match(line):
        in_jax_message = True
        if line.startswith("F") and fatal is None:
          fatal = line.split("] ", 1)[1].strip()
        continue
      if in_jax_message and _NOISE.match(line.rstrip("\n")) or line.startswith("[Gloo] "):
        continue
      in_jax_message = False
      sys.stderr.write(line)
      sys.stderr.flush()
    code = child.wait()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  if fatal and code == -signal.SIGABRT:
    reason = fatal.split(". Disable Python buffering")[0].split(" absl::Status")[0]
    where = f"; the committed checkpoints in {workdir} are kept" if workdir else ""
    print(f"flaxzoo: error: process {process_id}: JAX stopped it ({reason}){where}. Check that every "
          f"process runs, each with its own --process-id, then restart them all with the same "
          f"command", file=sys.stderr, flush=True)
    return EXIT_PEER_LOST
  if code < 0:  # killed by a signal: so is this process (what a caller of kill -9 expects)
    if -code not in (signal.SIGKILL, signal.SIGSTOP):
      signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
  return code


