"""Data parallelism with JAX's own engine: a 1-D `jax.sharding.Mesh` over a `data` axis, and
`jax.distributed` for several processes (hosts).

Each global batch is sharded along `data`; params, optimizer state and metrics are replicated, so
the jitted step is the one-device program with XLA's all-reduces inserted by the compiler. Every
process reads only its own rows of each global batch (`process_rows`); the batch order stays a
pure function of (seed, epoch). On CPU, cross-process collectives use gloo.

`initialize` is process-wide: the entry script calls it first (the CLI does for `--coordinator`
and for a detected cluster), before anything else touches JAX.
"""

import dataclasses
import functools
import hashlib
import os
import socket
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxzoo.training.config import ConfigError

DATA_AXIS = "data"
# Seconds a process waits for the coordinator at start-up, and after which JAX's coordination
# service declares a silent process dead and stops the others (docs/scale-out.md, "Faults").
DEFAULT_TIMEOUT_S = 60
# What a collective with a dead peer raises (gloo on CPU, NCCL/ICI elsewhere say "unavailable").
PEER_LOST_WORDS = ("gloo", "connection reset", "connection closed", "socket closed", "unavailable",
                   "heartbeat", "barrier", "coordination service")
EXIT_PEER_LOST = 3  # also what `launch.supervise` exits with


class ProcessesError(ConfigError):
  """A multi-process start-up the user must fix (one line, like every ConfigError)."""


def wanted(coordinator=None, num_processes=None, process_id=None) -> bool:
  """Whether this process is one of several: flags given, or a cluster JAX detects."""
  return any(v is not None for v in (coordinator, num_processes, process_id)) or detected_cluster()


def check_process_flags(coordinator=None, num_processes=None, process_id=None) -> None:
  """Raises one line for flags that cannot start a multi-process run."""
  explicit = (coordinator, num_processes, process_id)
  if all(v is None for v in explicit):
    return
  if any(v is None for v in explicit):
    raise ProcessesError("--coordinator HOST:PORT, --num-processes P and --process-id I go together; "
                         "give all three (or none, on a cluster JAX detects)")
  if num_processes < 1:
    raise ProcessesError(f"--num-processes must be at least 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise ProcessesError(f"--process-id {process_id} is not in 0..{num_processes - 1} (one id per "
                         f"process, 0 for the coordinator's host)")
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise ProcessesError(f"--coordinator must be HOST:PORT, got {coordinator!r}")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
  """`jax.distributed.initialize` with flaxzoo's checks: with no arguments it starts only where
  JAX detects a cluster (SLURM, Open MPI, Kubernetes, TPU pods); a plain process stays single."""
  if not wanted(coordinator, num_processes, process_id):
    return
  check_process_flags(coordinator, num_processes, process_id)
  if process_id:  # JAX aborts the process (no exception) when the coordinator never answers
    wait_for_coordinator(coordinator, timeout_s, process_id)
  # Collectives between processes on CPU (it changes nothing for GPU or TPU devices).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=timeout_s, heartbeat_timeout_seconds=timeout_s)
  except Exception as e:  # DEADLINE_EXCEEDED, ALREADY_EXISTS, ... from the coordination service
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
    raise ProcessesError(f"process {process_id} could not join the run at {coordinator} within "
                         f"{timeout_s} s ({first}); check that process 0 runs there, that every "
                         f"process has its own --process-id and the same --num-processes") from e


def wait_for_coordinator(coordinator: str, timeout_s: float, process_id: int) -> None:
  """Waits until something listens at the coordinator's address (a TCP connect, closed at once),
  or raises one line after `timeout_s`."""
  host, _, port = coordinator.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ProcessesError(f"process {process_id}: no coordinator at {coordinator} after {timeout_s} s "
                             f"({e.strerror or e}); start process 0 (--process-id 0) there, or "
                             f"raise --process-timeout") from e
      time.sleep(0.5)


def detected_cluster() -> bool:
  """Whether JAX's own cluster detection finds a multi-process environment."""
  try:
    from jax._src import clusters
    return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types
               if not getattr(env, "opt_in_only_method", False))
  except Exception:  # a JAX without this registry: only explicit flags start processes
    return False


@dataclasses.dataclass(frozen=True)
class Layout:
  """The devices a run uses: `mesh` (1-D, axis `data`), this process's index and the count."""
  mesh: Mesh

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def num_processes(self) -> int:
    return len({d.process_index for d in self.mesh.devices.flat})

  @property
  def process_index(self) -> int:
    return jax.process_index()

  @property
  def is_primary(self) -> bool:
    """The process that writes the card's companions: metrics.jsonl, TensorBoard, curves."""
    return self.process_index == 0

  @property
  def batch(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(DATA_AXIS))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def waits_for_each_step(self) -> bool:
    """XLA:CPU runs the devices' parts of a step on one shared thread pool, each blocking until all
    reach the step's all-reduce: with several steps queued, the pool filled with parts of different
    steps and waited forever (seen at 4 emulated devices, after a few dozen steps). So on CPU a
    multi-device step is waited for before the next is sent; GPUs and TPUs queue freely."""
    local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
    return len(local) > 1 and local[0].platform == "cpu"

  def describe(self) -> str:
    kind = self.mesh.devices.flat[0].platform.upper()
    where = (f" in {self.num_processes} processes" if self.num_processes > 1 else "")
    return f"{self.num_devices} {kind} device{'s' if self.num_devices > 1 else ''}{where}"


def make_layout(devices_per_process: int | None = None) -> Layout:
  """A 1-D mesh over the first `devices_per_process` local devices of every process (all by
  default), ordered by process, so process p holds a contiguous block of each batch."""
  local = jax.local_device_count()
  wanted = devices_per_process or local
  if not 1 <= wanted <= local:
    raise ConfigError(f"--devices {devices_per_process}: this process has {local} "
                      f"{jax.default_backend().upper()} device(s); choose 1..{local}"
                      + (" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N emulates N)"
                         if jax.default_backend() == "cpu" else ""))
  by_process = {}
  for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(device.process_index, []).append(device)
  devices = [d for p in sorted(by_process) for d in by_process[p][:wanted]]
  return Layout(Mesh(np.array(devices), (DATA_AXIS,)))


def check_batch_size(batch_size: int, layout: Layout, flag: str = "--batch-size") -> None:
  """A global batch must split evenly over the devices."""
  n = layout.num_devices
  if batch_size % n:
    lower, upper = batch_size - batch_size % n, batch_size + n - batch_size % n
    works = f"{lower} or {upper}" if lower else str(upper)
    raise ConfigError(f"{flag} {batch_size} does not split over {layout.describe()}: use a multiple "
                      f"of {n}, e.g. {works}")


def process_rows(layout: Layout, batch_size: int) -> slice:
  """This process's rows of a global batch of `batch_size`."""
  share = batch_size // layout.num_processes
  index = sorted({d.process_index for d in layout.mesh.devices.flat}).index(layout.process_index)
  return slice(index * share, (index + 1) * share)


def global_batch(layout: Layout, *local_parts):
  """This process's rows of a batch -> global arrays sharded along `data`."""
  sharding = layout.batch
  if layout.num_processes == 1:
    return tuple(jax.device_put(part, sharding) for part in local_parts)
  return tuple(jax.make_array_from_process_local_data(sharding, part) for part in local_parts)


def step_batch(layout: Layout, *local_parts):
  """The batch arguments of `sharded_train_step(layout)`: in one process the host arrays as they
  are, placed by the step's declared in_shardings (~15 us a call against ~170 us for each
  jax.device_put, 2 cores); across processes `global_batch`'s arrays."""
  if layout.num_processes == 1:
    return local_parts
  return global_batch(layout, *local_parts)


def replicate(layout: Layout, tree):
  """`tree` replicated on every device of the layout (each process gives the same values)."""
  if layout.num_processes == 1:
    return jax.device_put(tree, layout.replicated)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      layout.replicated, np.asarray(x), np.shape(x)), tree)


def host_value(x) -> np.ndarray:
  """A numpy copy of `x`: of this process's replica when `x` spans processes (replicated)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def host_values(tree):
  return jax.tree.map(host_value, tree)


def check_same_settings(layout: Layout, settings: str) -> None:
  """Raises in every process when `settings` (e.g. the config as JSON) differ from process 0's."""
  if layout.num_processes == 1:
    return
  digest = np.frombuffer(hashlib.sha256(settings.encode()).digest(), np.uint8)
  first = np.asarray(multihost_utils.broadcast_one_to_all(digest))
  mine_differ = not np.array_equal(first, digest)
  any_differ = np.asarray(multihost_utils.process_allgather(np.array([mine_differ]))).any()
  if any_differ:
    who = f"process {layout.process_index}'s" if mine_differ else "another process's"
    raise ProcessesError(f"{who} settings differ from process 0's: start every process with the "
                         f"same command and flags (only --process-id differs)")


def barrier(layout: Layout, name: str) -> None:
  """Waits until every process of the run got here (nothing to wait for in one process)."""
  if layout.num_processes > 1:
    multihost_utils.sync_global_devices(f"flaxzoo:{name}")


def stop_requested_everywhere(step: int) -> bool:
  """Whether all processes stop at `step`: JAX's preemption sync point, reached on every process
  at the same step once any of them got SIGTERM."""
  return multihost_utils.reached_preemption_sync_point(step)


def is_peer_lost(error: BaseException) -> bool:
  """Whether an error from a collective or barrier means another process is gone."""
  text = str(error).lower()
  return isinstance(error, Exception) and any(word in text for word in PEER_LOST_WORDS)


def exit_peer_lost(layout: Layout, error: BaseException, workdir) -> None:
  """Ends this process at once with one line: waiting on a dead peer would hang, and JAX's
  shutdown barrier would abort with a trace after its timeout."""
  first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
  print(f"flaxzoo: error: process {layout.process_index}: another process of this run stopped "
        f"({first}); stopping too. The committed checkpoints in {workdir} are kept: restart every "
        f"process with the same command to resume", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(EXIT_PEER_LOST)


@functools.lru_cache(maxsize=8)
def sharded_train_step(layout: Layout):
  """The train step jitted with declared shardings: state replicated, batch split along `data`;
  the new state and the metrics come back replicated."""
  from flaxzoo.training.steps import TRAIN_STEP_COMPILER_OPTIONS, train_step
  return jax.jit(train_step.__wrapped__, donate_argnums=0,
                 in_shardings=(layout.replicated, layout.batch, layout.batch),
                 out_shardings=(layout.replicated, layout.replicated),
                 compiler_options=TRAIN_STEP_COMPILER_OPTIONS)


def gradient_bytes(params) -> int:
  """Bytes of the gradient every data-parallel step all-reduces (one float32 per parameter)."""
  return sum(int(np.prod(np.shape(p))) * 4 for p in jax.tree.leaves(params))
