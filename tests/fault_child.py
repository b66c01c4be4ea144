"""One `flaxzoo train` attempt for the fault tests, in its own process, optionally killed by a
real signal at a chosen moment.

    python tests/fault_child.py [--kill-at-step N] [--kill-before-commit N] [--kill-after-commit N]
                                [--pause-at-step N [--resume-file PATH]] [--signal KILL|TERM|INT]
                                [--file-size-limit BYTES]
                                -- TRAIN_ARGS...

The product code is not changed: the hooks wrap the jitted train step (what
`parallel.sharded_train_step` returns) and orbax's commit (the rename of a finished temporary
checkpoint folder) from outside, then run the real CLI.
"""

import argparse
import os
import resource
import signal
import sys
import time
from pathlib import Path


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--kill-at-step", type=int, help="signal itself before running this step")
  parser.add_argument("--kill-before-commit", type=int, metavar="N",
                      help="signal itself when the N-th save of this process has written its "
                           "files but not yet committed them")
  parser.add_argument("--kill-after-commit", type=int, metavar="N",
                      help="signal itself right after the N-th save of this process committed")
  parser.add_argument("--pause-at-step", type=int, metavar="N",
                      help="sleep --pause-seconds before running this step (a run still going)")
  parser.add_argument("--pause-seconds", type=float, default=15.0)
  parser.add_argument("--resume-file", type=Path,
                      help="end the pause as soon as this file exists (--pause-seconds: at most)")
  parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM", "INT"])
  parser.add_argument("--twice", action="store_true", help="send the signal twice in a row")
  parser.add_argument("--file-size-limit", type=int,
                      help="RLIMIT_FSIZE: writes past this many bytes fail like a full disk")
  parser.add_argument("train_args", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  signum = getattr(signal, f"SIG{args.signal}")

  def kill_self():
    os.kill(os.getpid(), signum)
    if args.twice:
      time.sleep(0.05)  # the first one's handler has run
      os.kill(os.getpid(), signum)

  if args.file_size_limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (args.file_size_limit, args.file_size_limit))

  train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
  workdir = Path(train_args[train_args.index("--workdir") + 1])
  TMP = ".orbax-checkpoint-tmp"
  from flaxzoo.training import parallel

  def wrap_train_step(wrapper):
    """Routes the loop's jitted train step through `wrapper(real_step, state, images, labels)`."""
    make_step = parallel.sharded_train_step
    parallel.sharded_train_step = lambda layout: (
        lambda state, images, labels: wrapper(make_step(layout), state, images, labels))

  def step_of(state) -> int:
    return int(parallel.host_value(state.step))

  if args.kill_at_step is not None:
    def kill_at_step(real_step, state, images, labels):
      if step_of(state) == args.kill_at_step:
        # Let the asynchronous save in flight commit first, so that which checkpoints exist is
        # deterministic; a kill during a save is what --kill-before-commit is for.
        deadline = time.monotonic() + 60
        while any(TMP in p.name for p in workdir.iterdir()) and time.monotonic() < deadline:
          time.sleep(0.01)
        kill_self()
      return real_step(state, images, labels)
    wrap_train_step(kill_at_step)

  if args.pause_at_step is not None:
    def pause_at_step(real_step, state, images, labels):
      if step_of(state) == args.pause_at_step:
        deadline = time.monotonic() + args.pause_seconds
        while time.monotonic() < deadline and not (args.resume_file and args.resume_file.exists()):
          time.sleep(0.05)
      return real_step(state, images, labels)
    wrap_train_step(pause_at_step)

  if args.kill_before_commit or args.kill_after_commit:
    from orbax.checkpoint._src.path import atomicity
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    commits = 0

    async def finalize(self):
      nonlocal commits
      if not self._final_path.name.isdigit():
        return await real_finalize(self)  # an item inside the step folder, not the step itself
      commits += 1
      if commits == args.kill_before_commit:
        kill_self()
      await real_finalize(self)
      if commits == args.kill_after_commit:
        kill_self()
    atomicity.AtomicRenameTemporaryPath.finalize = finalize

  from flaxzoo.training import cli
  return cli.main(["train", *train_args])


if __name__ == "__main__":
  sys.exit(main())
