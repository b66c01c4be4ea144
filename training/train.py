"""`train_and_evaluate`: the training loop, read top to bottom.

Resuming: the checkpoint holds the whole state (params, optimizer state, step, RNG key) and the
step fixes the epoch and the batch within it (batch order is a pure function of seed and epoch),
so a run killed at any moment and started again ends bit for bit where an uninterrupted one does.
`metrics.jsonl` is cut back to the restored step, and the train metrics of steps not yet logged
travel in the checkpoint's card, so the log too comes out record for record the same.
"""

import contextlib
import dataclasses
import itertools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from flaxzoo import data, models, runtime
from flaxzoo.files import replace_atomically
from flaxzoo.training import checkpoint, curves, parallel, pretrained, workdir_lock
from flaxzoo.training import config as config_lib
from flaxzoo.training.config import Config, ConfigError
from flaxzoo.training.errors import CheckpointError, TrainingDiverged, TrainingInterrupted
from flaxzoo.training.evaluation import evaluate
from flaxzoo.training.optimizer import learning_rate_schedule
from flaxzoo.training.profiling import StepProfiler
from flaxzoo.training.state import TrainState, create_train_state
from flaxzoo.training.tensorboard_log import TensorBoardLog


class MetricsLog:
  """WORKDIR/metrics.jsonl: one JSON object per line; each record also goes to TensorBoard when a
  `TensorBoardLog` is attached. With `writes=False` (every process but the first of a
  multi-process run) it only reads."""

  def __init__(self, path: Path, tensorboard: TensorBoardLog | None = None, writes: bool = True):
    self.path = path
    self.tensorboard = tensorboard
    self.writes = writes

  def drop_after(self, step: int) -> None:
    """Forgets records past `step` (written by a run that stopped before saving that far) and a
    line cut short by a kill."""
    if not self.path.exists() or not self.writes:
      return
    text = self.path.read_text()
    kept = "".join(line + "\n" for line in text.splitlines()
                   if _record_step(line) is not None and _record_step(line) <= step)
    if kept != text:
      replace_atomically(self.path, lambda tmp: tmp.write_text(kept))

  def records(self) -> list[dict]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

  def write(self, record: dict) -> None:
    if not self.writes:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tensorboard:
      self.tensorboard.write(record)

  def close(self) -> None:
    if self.tensorboard:
      self.tensorboard.close()


def _record_step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


class StopRequests:
  """While active, SIGINT and SIGTERM only set `signum`; the loop stops at the end of the step.

  A second signal stops the process at once, exit status 128 + signal: the checkpoints already
  committed stay. In a multi-process run every process must stop at the same step: SIGTERM is
  left to JAX's preemption notifier, SIGINT is turned into a SIGTERM, and `requested(step)` asks
  JAX's preemption sync point, which all processes reach at the same step.
  """

  def __init__(self, multi_process: bool = False):
    self.signum = None
    self.multi_process = multi_process
    self._previous = {}
    self._checked_step = -1
    self._seen = False

  def requested(self, step: int) -> bool:
    if self.multi_process and self.signum is None and step > self._checked_step:
      self._checked_step = step
      if parallel.stop_requested_everywhere(step):
        self.signum = signal.SIGTERM
    return self.signum is not None

  def _handle(self, signum, frame):
    if self.signum is not None or self._seen:
      # Exiting here, not raising into whatever code runs (orbax's waits turned that into other
      # errors): what is committed stays, as after a kill -9, and the status is the signal's.
      print(f"flaxzoo: stopped at once by a second {signal.Signals(signum).name}; the committed "
            f"checkpoints are kept. Resume with the same command", file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(128 + signum)
    self._seen = True
    if self.multi_process:  # only SIGINT comes here: on to JAX's notifier, which tells the others
      signal.raise_signal(signal.SIGTERM)
      return
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signal handlers live there only
      for sig in ((signal.SIGINT,) if self.multi_process else (signal.SIGINT, signal.SIGTERM)):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def mean_metrics(values: list[dict]) -> dict:
  """Means in float64 of per-step float32 values: the same whether they come from the device or,
  after a resume, from the card's JSON (which holds them exactly)."""
  return {k: float(np.mean(np.asarray([v[k] for v in values], np.float64))) for k in values[0]}


def epoch_summary(logged: list[dict], values: list[dict]) -> dict:
  """Loss and accuracy over a whole epoch: the train records already in metrics.jsonl (window
  means, weighted by their `num_steps`; a resumed run's earlier part) and this process's per-step
  values."""
  steps = sum(r["num_steps"] for r in logged) + len(values)
  if not steps:
    return {"loss": np.nan, "accuracy": np.nan}
  current = mean_metrics(values) if values else {"loss": 0.0, "accuracy": 0.0}
  return {key: (sum(r[key] * r["num_steps"] for r in logged) + current[key] * len(values)) / steps
          for key in ("loss", "accuracy")}


def check_finite(values: list[dict], last_step: int, epoch: int, workdir, last_saved) -> None:
  """Raises TrainingDiverged naming the first step of `values` whose loss is not finite."""
  losses = np.asarray([v["loss"] for v in values], np.float64)
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    first = last_step - len(values) + 1 + int(bad[0])
    kept = (f"the last good checkpoint, {workdir}/{last_saved}, is kept: lower --learning-rate "
            f"and run again to continue from it" if last_saved is not None else
            "no checkpoint had been saved yet: lower --learning-rate and run again")
    raise TrainingDiverged(f"the training loss became {losses[bad[0]]} at step {first} (epoch "
                           f"{epoch}); training stopped and saved nothing newer; {kept}", last_saved)


def check_resumable(card: dict, config: Config, workdir) -> None:
  """Raises when the checkpoint in `workdir` belongs to a different run than `config`."""
  saved = config_lib.from_dict(card["config"])
  changes = config_lib.run_identity_changes(saved, config)
  if changes:
    raise ConfigError(
        f"{workdir} holds a checkpoint of another run ({'; '.join(changes)}); use another "
        f"--workdir, or the saved settings to continue it")


def check_writable(workdir: Path, create: bool = False) -> None:
  """Raises unless `workdir` is (or can be made) a writable folder; creates it if `create`."""
  try:
    if create:
      workdir.mkdir(parents=True, exist_ok=True)
      probe = workdir / f".write-test.{os.getpid()}"  # one per process of a multi-process run
      probe.write_text("")
      probe.unlink()
      return
    existing = next(p for p in (workdir, *workdir.absolute().parents) if p.exists())
    if not existing.is_dir():
      raise NotADirectoryError(20, f"{existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
      raise PermissionError(13, f"no write permission on {existing}")
  except OSError as e:
    raise ConfigError(f"cannot write to workdir {workdir} ({e.strerror}); choose another --workdir") from e


@dataclasses.dataclass
class Run:
  """What the loop needs besides the train state; fixed for the whole run."""
  config: Config
  workdir: Path
  model: Any
  info: data.DatasetInfo
  steps_per_epoch: int
  manager: Any  # orbax CheckpointManager
  metrics_log: MetricsLog
  lineage: dict | None  # where a fine-tune's weights came from (in every card it writes)
  learning_rate: Any  # step -> the (backbone's) learning rate, for the logs
  profiler: StepProfiler
  layout: parallel.Layout  # the devices (and processes) the batches are split over
  dataset_moves: list = dataclasses.field(default_factory=list)  # an image folder's moves, in order

  def say(self, *args, **kwargs) -> None:
    """Prints from the first process only (every process of a run would print the same)."""
    if self.layout.is_primary:
      print(*args, **kwargs)

  def card(self, step: int, metrics: dict) -> dict:
    card = checkpoint.make_card(self.model, self.config, self.info, step,
                                step / self.steps_per_epoch, metrics)
    if self.lineage:
      card["lineage"] = self.lineage
    if self.dataset_moves:
      card["dataset_moves"] = self.dataset_moves
    return card


def train_and_evaluate(config: Config, workdir, devices: int | None = None) -> TrainState:
  """Trains `config.model` on `config.dataset`, evaluating and checkpointing every epoch.

  Continues from the newest readable checkpoint in `workdir` if there is one. Returns the final
  state. SIGINT/SIGTERM save a checkpoint and raise TrainingInterrupted; a NaN or infinite loss
  raises TrainingDiverged without saving. Each batch is split over `devices` local devices of
  every process (default: all of them; see `parallel`); `config.batch_size` is the global batch.
  """
  workdir = Path(workdir)
  runtime.configure()
  config = dataclasses.replace(config, dataset=data.canonical_name(config.dataset))
  config_lib.validate(config)
  try:  # fail on a bad model name or argument before any data are loaded
    models.create_model(config.model, **config.model_kwargs)
  except (TypeError, models.UnknownModelError) as e:
    raise ConfigError(str(e)) from e
  layout = parallel.make_layout(devices)
  parallel.check_batch_size(config.batch_size, layout)
  parallel.check_same_settings(layout, json.dumps([dataclasses.asdict(config), str(workdir), devices],
                                                  sort_keys=True))
  check_writable(workdir)
  # One writer per workdir, for the whole run: the first process holds the lock for all of them.
  lock = workdir_lock.hold(workdir) if layout.is_primary else contextlib.nullcontext()
  try:
    with lock:
      return _train_and_evaluate_locked(config, workdir, layout)
  except Exception as e:
    if layout.num_processes > 1 and parallel.is_peer_lost(e):
      parallel.exit_peer_lost(layout, e, workdir)
    raise


def _train_and_evaluate_locked(config: Config, workdir: Path, layout: parallel.Layout) -> TrainState:
  resume_card = checkpoint.read_card(workdir) if checkpoint.saved_steps(workdir) else None
  if config.init_from and not resume_card:  # a fine-tune's source must be readable: fail early
    config = source_step_on_disk(config)
    checkpoint.read_card(config.init_from, config.init_step)
  dataset_moves = list(resume_card.get("dataset_moves", [])) if resume_card else []
  if resume_card:
    saved_dataset = resume_card["config"]["dataset"]
    same_run_as = config
    if config.dataset != saved_dataset and all(map(data.folders.is_folder_dataset, (config.dataset, saved_dataset))):
      # An image folder that moved: the same classes at a new path continue the run (recorded).
      data.folders.check_moved_folder(saved_dataset, config.dataset, resume_card["dataset"]["class_names"])
      dataset_moves.append({"from": saved_dataset, "to": config.dataset, "step": resume_card["step"]})
      if layout.is_primary:
        print(f"flaxzoo: note: continuing with {config.dataset} (trained so far on {saved_dataset}, "
              f"the same classes)", file=sys.stderr)
      same_run_as = dataclasses.replace(config, dataset=saved_dataset)
    check_resumable(resume_card, same_run_as, workdir)
    num_train = resume_card["dataset"]["num_examples"]["train"]
    if config.train_examples:
      num_train = min(num_train, config.train_examples)
    if resume_card["step"] >= config.epochs * data.steps_per_epoch(num_train, config.batch_size):
      finished = restore_finished(resume_card, config, workdir, layout)
      if finished is not None:
        return finished

  # Data: prepared once per data dir; each split read into memory once, or streamed from disk.
  dataset = data.load_dataset(
      config.dataset, config.data_dir, config.manual_dir,
      limits={"train": config.train_examples, "test": config.test_examples},
      image_shape=config.input_shape, test_fraction=config.test_fraction, streaming=config.streaming)
  info = dataset.info
  train_split, test_split = dataset.splits["train"], dataset.splits["test"]
  steps_per_epoch = data.steps_per_epoch(len(train_split), config.batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(f"batch_size {config.batch_size} is larger than the {len(train_split)} "
                      f"training examples; lower --batch-size")
  if train_split.streams and layout.is_primary:
    print(f"Streaming {info.name}'s {len(train_split)} training images from disk "
          f"({workers_of(config)} worker processes).", file=sys.stderr)
  total_steps = config.epochs * steps_per_epoch
  model, state = build_model(config, info, total_steps)
  print_layout(layout)

  latest_metrics, pending = {}, []
  last_saved = lineage = None
  if resume_card:
    state, card, skipped = checkpoint.restore_latest(workdir, state, layout.replicated)
    if layout.is_primary:
      checkpoint.set_aside(workdir, skipped)  # so that training can write those steps again
    last_saved = card["step"]
    latest_metrics = card["metrics"]
    pending = card.get("pending_train_metrics", [])
    lineage = card.get("lineage")
    if layout.is_primary:
      print(f"Resuming {workdir} from step {last_saved} (epoch {last_saved / steps_per_epoch:.2f} "
            f"of {config.epochs}).", file=sys.stderr)
  elif config.init_from:
    config, variables, report = load_source(config, model, info, state)
    state = state.with_weights(variables["params"], variables.get("batch_stats", {}))
    frozen = pretrained.frozen_paths(state.params, config.freeze)
    if layout.is_primary:
      pretrained.print_report(report, frozen, info.name)
    lineage = pretrained.lineage(report, frozen)
  if not resume_card:
    state = parallel.replicate(layout, state)
  check_writable(workdir, create=True)
  checkpoint.check_free_space(workdir, state, config.keep_checkpoints)
  if info.files and not resume_card and layout.is_primary:  # for eval to compare against
    replace_atomically(workdir / data.folders.DATASET_FILES,
                       lambda tmp: data.folders.write_files_json(tmp, info.files))
  metrics_log = MetricsLog(workdir / "metrics.jsonl", writes=layout.is_primary)
  metrics_log.drop_after(last_saved or 0)
  resumed_from = last_saved
  if layout.is_primary:
    metrics_log.tensorboard = TensorBoardLog(workdir / "tensorboard", (last_saved or 0) + 1,
                                             dataclasses.asdict(config))
  parallel.barrier(layout, "workdir ready")  # unreadable steps set aside, before any lists steps
  manager = checkpoint.open_manager(workdir)
  run = Run(config, workdir, model, info, steps_per_epoch, manager, metrics_log, lineage,
            jax.jit(learning_rate_schedule(config, total_steps)),  # one program, not ~20 eager ops
            StepProfiler(config.profile_steps, workdir / "profile"), layout, dataset_moves)
  try:
    with StopRequests(multi_process=layout.num_processes > 1) as stop:
      state, latest_metrics = train_epochs(run, state, latest_metrics, pending, last_saved, stop,
                                           train_split, test_split)
    checkpoint.wait(manager, config.keep_checkpoints)
  except TrainingDiverged as e:
    _close_quietly(manager)  # the save in flight holds a good state: let it commit
    metrics_log.drop_after(e.last_saved or 0)
    if (e.last_saved or 0) == (resumed_from or 0) and metrics_log.tensorboard:  # nothing kept
      metrics_log.tensorboard.discard()
    raise
  except BaseException:
    _close_quietly(manager)
    raise
  finally:
    run.profiler.stop()
    metrics_log.close()
  manager.close()
  run.say(f"Done: {config.model} on {config.dataset}, test accuracy "
        f"{latest_metrics['test']['accuracy']:.2%}; checkpoint {workdir}/{int(state.step)}")
  return state


def workers_of(config: Config) -> int:
  return data.default_workers() if config.workers is None else config.workers


def _close_quietly(manager) -> None:
  """Lets a save in flight commit (or fail) while another error is on its way up."""
  try:
    manager.close()
  except Exception:
    pass


def build_model(config: Config, info, total_steps: int):
  """`(model, train state)`; model arguments it cannot be built with are one ConfigError line."""
  try:
    model = models.create_model(config.model, num_classes=info.num_classes, **config.model_kwargs)
    return model, create_train_state(model, config, info.image_shape, total_steps)
  except Exception as e:  # the model's own complaint, e.g. a widths list too long for the input
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    shape = "x".join(map(str, info.image_shape))
    raise ConfigError(f"model {config.model!r} cannot be built with model_kwargs "
                      f"{json.dumps(config.model_kwargs)} for {shape} images ({type(e).__name__}: "
                      f"{reason}); see `flaxzoo models --json` for its arguments and defaults") from e


def source_step_on_disk(config: Config) -> Config:
  """A fine-tune's source step, still on disk: a source that is still training deletes old steps
  (it keeps its last few), so the step chosen when this run began may be gone; then the source's
  newest step takes its place, said in one line."""
  steps = checkpoint.saved_steps(config.init_from)
  if config.init_step is None or config.init_step in steps or not steps:
    return config
  print(f"flaxzoo: note: step {config.init_step} of {config.init_from} is gone (a run still training "
        f"keeps only its latest checkpoints); fine-tuning from its step {max(steps)}", file=sys.stderr)
  return dataclasses.replace(config, init_step=max(steps))


def load_source(config: Config, model, info, state, attempts: int = 3):
  """`(config, variables, report)`: the fine-tune's source weights merged into `state`'s. Choosing
  the step and reading it race with the source's retention: a step deleted in between is replaced
  by the newest one (`source_step_on_disk`) and read again."""
  for attempt in range(attempts):
    config = source_step_on_disk(config)
    try:
      variables, report = pretrained.load_pretrained(
          config.init_from, model, class_names=info.class_names, head=config.head,
          class_map=config.class_map, step=config.init_step, variables=state.variables())
      return config, variables, report
    except CheckpointError:
      if attempt == attempts - 1 or config.init_step in checkpoint.saved_steps(config.init_from):
        raise


def print_layout(layout: parallel.Layout) -> None:
  """Says where training runs when that is more than one device."""
  if layout.num_devices > 1 and layout.is_primary:
    print(f"Training on {layout.describe()} (data parallel; each batch split along "
          f"'{parallel.DATA_AXIS}').", file=sys.stderr)


def restore_finished(card: dict, config: Config, workdir, layout: parallel.Layout) -> TrainState | None:
  """The finished run's final state, restored without loading any data (None if that state turns
  out unreadable and an older checkpoint is all there is: training then continues from it)."""
  model = checkpoint.model_from_card(card)
  state = create_train_state(model, config, card["input_shape"], total_steps=card["step"])
  state, restored_card, _ = checkpoint.restore_latest(workdir, state, layout.replicated)
  if restored_card["step"] != card["step"]:
    return None
  test = card["metrics"].get("test", {})
  summary = f", test accuracy {test['accuracy']:.2%}" if "accuracy" in test else ""
  if not layout.is_primary:
    return state
  print(f"{workdir} is already trained: {card['epoch']:g} epochs, step {card['step']}{summary}. "
        f"Nothing to do; pass --epochs above {card['epoch']:g} to train longer.")
  return state


# curves.png is redrawn at an epoch's end only when this long has passed since the last drawing
# (and always when the run ends or stops): a drawing took 0.3-0.8 s on a 2-core CPU (0.9 s the
# first, with matplotlib's import), up to 15 % of an MNIST epoch (benchmarks/fast_breakdown.py).
CURVES_EVERY_SECONDS = 60


def draw_curves(run: Run) -> None:
  """WORKDIR/curves.png from metrics.jsonl; a picture that cannot be written only warns."""
  try:
    curves.save_training_curves(run.metrics_log.path, run.workdir / "curves.png",
                                f"{run.config.model} on {config_lib.dataset_slug(run.info.name)}")
  except OSError as e:
    print(f"flaxzoo: warning: could not draw {run.workdir / 'curves.png'} ({e.strerror})",
          file=sys.stderr)


def train_epochs(run: Run, state, latest_metrics, pending, last_saved, stop, train_split,
                 test_split) -> tuple[TrainState, dict]:
  """The loop: epochs of jitted steps, a train record every `log_every_steps`, a test record and a
  checkpoint at every epoch end (and every `checkpoint_every_steps`). Returns the final state and
  the latest train and test records."""
  config, workdir, manager, steps_per_epoch = run.config, run.workdir, run.manager, run.steps_per_epoch
  layout = run.layout
  step_fn = parallel.sharded_train_step(layout)
  rows = parallel.process_rows(layout, config.batch_size)  # this process's part of each batch
  latest_metrics = dict(latest_metrics)
  step = int(state.step)
  window = list(pending)  # per-step train metrics not yet written to metrics.jsonl
  epoch_metrics = []

  def save_checkpoint():
    nonlocal last_saved
    values = parallel.host_values(window)
    check_finite(values, step, epoch + 1, workdir, last_saved)
    card = run.card(step, latest_metrics)
    card["pending_train_metrics"] = [{k: float(v) for k, v in m.items()} for m in values]
    checkpoint.save(manager, state, card, config.keep_checkpoints)
    last_saved = step

  def flush_train_window():
    nonlocal window, window_start
    values = parallel.host_values(window)
    check_finite(values, step, epoch + 1, workdir, last_saved)
    now = time.perf_counter()
    record = {"step": step, "epoch": epoch + 1, "split": "train", **mean_metrics(values),
              "num_steps": len(values), "learning_rate": float(run.learning_rate(step - 1)),
              "img_per_s": round(len(values) * config.batch_size / (now - window_start), 1)}
    run.metrics_log.write(record)
    latest_metrics["train"] = record
    epoch_metrics.extend(values)
    window, window_start = [], now

  def stop_if_requested():
    if not stop.requested(step):
      return
    if last_saved != step:
      save_checkpoint()
    if layout.is_primary:
      draw_curves(run)
    checkpoint.wait(manager, config.keep_checkpoints)
    name = signal.Signals(stop.signum).name
    raise TrainingInterrupted(f"{name}: stopped at step {step} (epoch {step / steps_per_epoch:.2f} "
                              f"of {config.epochs}); checkpoint {workdir}/{step} saved. Resume "
                              f"with: flaxzoo train --workdir {workdir}", stop.signum)

  first_epoch = step // steps_per_epoch
  last_drawn = time.perf_counter()
  # A run resumed mid-epoch: that epoch's records already logged count in its printed summary.
  logged_before = [r for r in run.metrics_log.records()
                   if r["split"] == "train" and r["epoch"] == first_epoch + 1 and r["step"] <= step]
  # One stream of batches for the rest of the run: streaming workers start once, not every epoch.
  batches = data.train_batches(train_split, config.batch_size, config.seed, first_epoch,
                               start=step - first_epoch * steps_per_epoch, rows=rows,
                               workers=workers_of(config), epochs=config.epochs - first_epoch)
  with contextlib.closing(batches):
    for epoch in range(first_epoch, config.epochs):
      start_batch = step - epoch * steps_per_epoch
      epoch_metrics = []
      epoch_start = window_start = time.perf_counter()
      bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{config.epochs}",
                 unit="step", leave=False, file=sys.stderr,
                 disable=not (sys.stderr.isatty() and layout.is_primary))  # tqdm's None misdetects ttys
      stop_if_requested()
      for images, labels in itertools.islice(batches, steps_per_epoch - start_batch):
        images, labels = parallel.step_batch(layout, images, labels)
        with run.profiler.step(step + 1):
          state, step_metrics = step_fn(state, images, labels)
        if layout.waits_for_each_step:
          jax.block_until_ready(step_metrics)
        step += 1
        window.append(step_metrics)
        bar.update()
        if bar.n % 20 == 0 and not bar.disable:
          recent = parallel.host_values(window[-20:])
          bar.set_postfix(loss=f"{np.mean([m['loss'] for m in recent]):.4f}",
                          acc=f"{np.mean([m['accuracy'] for m in recent]):.2%}",
                          img_s=f"{(bar.format_dict['rate'] or 0) * config.batch_size:.0f}")
        at_checkpoint = config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
        at_epoch_end = step % steps_per_epoch == 0
        if step % config.log_every_steps == 0 or at_checkpoint or at_epoch_end:
          flush_train_window()
        if at_checkpoint and not at_epoch_end:
          save_checkpoint()
        if not at_epoch_end:
          stop_if_requested()
      bar.close()
      train_seconds = time.perf_counter() - epoch_start

      test = evaluate(run.model, state.variables(), test_split, config.eval_batch_size, layout=layout,
                      workers=workers_of(config), tta=config.tta)
      test_record = {"step": step, "epoch": epoch + 1, "split": "test", **test}
      run.metrics_log.write(test_record)
      latest_metrics["test"] = test_record
      save_checkpoint()
      if layout.is_primary and (epoch + 1 == config.epochs
                                or time.perf_counter() - last_drawn >= CURVES_EVERY_SECONDS):
        draw_curves(run)
        last_drawn = time.perf_counter()
      trained = (steps_per_epoch - start_batch) * config.batch_size
      summary = epoch_summary(logged_before if epoch == first_epoch else [], epoch_metrics)
      run.say(f"epoch {epoch + 1}/{config.epochs}  step {step}  "
            f"train loss {summary['loss']:.4f} acc {summary['accuracy']:.2%}  "
            f"test loss {test['loss']:.4f} acc {test['accuracy']:.2%}  "
            f"{trained / train_seconds:.0f} img/s  {train_seconds:.1f} s", flush=True)
      stop_if_requested()
  return state, latest_metrics
