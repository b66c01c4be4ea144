"""WORKDIR/tensorboard/: the records of metrics.jsonl as TensorBoard scalars, and the config as
hparams, written with tensorboardX (no TensorFlow in the training process).

A resumed run opens its writer with `purge_step` = the restored step + 1: TensorBoard then drops the
points a killed run wrote past that step, as `MetricsLog.drop_after` does for metrics.jsonl.
"""

import json
import os
import sys
import time
from pathlib import Path

# The numeric fields of a metrics.jsonl record that become scalars (tag: split/field).
SCALAR_FIELDS = {
    "train": ("loss", "accuracy", "learning_rate", "img_per_s"),
    "test": ("loss", "accuracy", "macro_f1", "top5_accuracy"),
}
HPARAM_METRICS = ("test/accuracy", "test/loss", "test/macro_f1")


def _import_tensorboardx():
  """tensorboardX's pieces: its synchronous event-file writer, the Event protos, the summaries."""
  # tensorboardX imports torch, when installed, only to accept torch tensors; flaxzoo writes floats,
  # so torch (seconds to import, hundreds of MB) is kept out of the training process.
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None
  try:
    from tensorboardX import event_file_writer, summary
    from tensorboardX.proto import event_pb2
  finally:
    if blocked:
      del sys.modules["torch"]
  return event_file_writer.EventsWriter, event_pb2, summary


def hparams(config_values: dict) -> dict:
  """Config fields as TensorBoard hparams: numbers, strings and booleans as they are, the rest
  (lists, dicts, None) as JSON text."""
  return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
          for key, value in config_values.items()}


class TensorBoardLog:
  """One event file for the whole run; `write` takes a metrics.jsonl record.

  Events are written and flushed on the calling thread (tensorboardX's `EventsWriter`, not its
  queued `SummaryWriter`, whose flush does not drain the queue): a kill -9 then never loses a point
  that metrics.jsonl holds.
  """

  def __init__(self, logdir, purge_step: int, config_values: dict):
    self.logdir, self.purge_step, self.config_values = Path(logdir), purge_step, config_values
    self._writer = None  # opened with the first record: a run that logs nothing leaves no file

  def _open(self) -> None:
    events_writer, self._event_pb2, self._summary = _import_tensorboardx()
    self.logdir.mkdir(parents=True, exist_ok=True)
    # Event files are named by the second and the host: the suffix keeps a run resumed within the
    # same second from overwriting the killed run's file.
    self._suffix = f".{self.purge_step:010d}.{os.getpid()}"
    self._writer = events_writer(os.path.join(self.logdir, "events"), self._suffix)
    # TensorBoard drops the points of earlier files at steps >= purge_step (a killed run's).
    start = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
    self._write(self._event_pb2.Event(step=self.purge_step, session_log=start))
    config_hparams = hparams(self.config_values)
    for summary in self._summary.hparams(config_hparams, dict.fromkeys(HPARAM_METRICS, 0.0)):
      self._write(self._event_pb2.Event(step=self.purge_step, summary=summary))

  def _write(self, event) -> None:
    event.wall_time = time.time()
    self._writer.write_event(event)

  def write(self, record: dict) -> None:
    if self._writer is None:
      self._open()
    for field in SCALAR_FIELDS.get(record["split"], ()):
      if record.get(field) is not None:
        summary = self._summary.scalar(f"{record['split']}/{field}", float(record[field]))
        self._write(self._event_pb2.Event(step=record["step"], summary=summary))
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()

  def discard(self) -> None:
    """Removes this run's event file (a run that ended saving nothing, whose records metrics.jsonl
    also drops)."""
    if self._writer is not None:
      self._writer.close()
      for path in self.logdir.glob(f"events.out.tfevents.*{self._suffix}"):
        path.unlink()
      self._writer = None
      if self.logdir.exists() and not any(self.logdir.iterdir()):
        self.logdir.rmdir()
