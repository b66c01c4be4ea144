"""`--profile-steps A:B`: a jax.profiler trace of train steps A to B (inclusive, numbered as in
metrics.jsonl) in WORKDIR/profile/, each step marked with a `StepTraceAnnotation`.

The trace (XPlane for TensorBoard's profile plugin / XProf, and a Perfetto JSON) is only taken while
the window is open; outside it the loop pays one comparison per step.
"""

import contextlib
import sys
from pathlib import Path

import jax

from flaxzoo.training.config import profile_window


class StepProfiler:
  """Starts the trace before step A runs and stops it after step B (or when training ends)."""

  def __init__(self, steps: str, logdir):
    self.window = profile_window(steps)
    self.logdir = Path(logdir)
    self.active = False

  @contextlib.contextmanager
  def _traced_step(self, step_num: int):
    if not self.active:
      self.logdir.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.logdir), create_perfetto_trace=True)
      self.active = True
    with jax.profiler.StepTraceAnnotation("train", step_num=step_num):
      yield
    if step_num >= self.window[1]:
      self.stop()

  def step(self, step_num: int):
    """A context for running train step `step_num`: traced inside the window."""
    if self.window and self.window[0] <= step_num <= self.window[1]:
      return self._traced_step(step_num)
    return contextlib.nullcontext()

  def stop(self) -> None:
    if not self.active:
      return
    jax.effects_barrier()
    jax.block_until_ready(jax.live_arrays())  # the traced steps' device work is in the trace
    jax.profiler.stop_trace()
    self.active = False
    print(f"Profile of train steps {self.window[0]}..{self.window[1]} written to {self.logdir} "
          f"(tensorboard --logdir {self.logdir}, or its perfetto_trace.json.gz in ui.perfetto.dev)",
          file=sys.stderr)
