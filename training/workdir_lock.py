"""One writer per workdir: `train` and `finetune` hold an exclusive OS lock on WORKDIR/.lock for the
whole run. The kernel releases it when the holder exits or dies (kill -9 included), so a lock is
never stale; readers (eval, predict, analyze, export, finetune --from) take none.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from flaxzoo.training.config import ConfigError

LOCK_NAME = ".lock"


def _holder_text() -> str:
  return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                     "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})


def _describe_holder(lock_file) -> str:
  try:
    lock_file.seek(0)
    holder = json.loads(lock_file.read())
    return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
  except (ValueError, KeyError, TypeError, OSError):
    return "a process that has not yet said who it is"


@contextlib.contextmanager
def hold(workdir):
  """Holds WORKDIR's writer lock (creating WORKDIR if needed) or raises ConfigError naming the
  holder. A workdir this call created is removed again if the run leaves nothing else in it."""
  workdir = Path(workdir)
  created = not workdir.exists()
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    lock_file = open(workdir / LOCK_NAME, "a+")
  except OSError as e:
    raise ConfigError(f"cannot write to workdir {workdir} ({e.strerror}); choose another --workdir") from e
  try:
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise ConfigError(f"{workdir} is being written by another flaxzoo run ({_describe_holder(lock_file)}); "
                        f"wait for it to end, or use another --workdir") from None
    try:
      lock_file.seek(0)
      lock_file.truncate()
      lock_file.write(_holder_text())
      lock_file.flush()
      yield
    finally:
      if created and {p.name for p in workdir.iterdir()} == {LOCK_NAME}:
        (workdir / LOCK_NAME).unlink()  # a refused or failed first run leaves no empty workdir
        workdir.rmdir()
      fcntl.flock(lock_file, fcntl.LOCK_UN)
  finally:
    lock_file.close()
