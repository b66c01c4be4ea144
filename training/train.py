"""`train_and_evaluate`: the training loop, read top to bottom.

Resuming: the step in the checkpoint fixes the epoch and the batch within it (batch order is a
pure function of seed and epoch), so a resumed run continues exactly where the saved one was.
"""

import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

import data
import models
from training import checkpoint
from training import config as config_lib
from training.config import Config, ConfigError
from training.state import TrainState, create_train_state, eval_step, train_step


def evaluate(model, variables, images, labels, batch_size: int) -> dict:
  """Loss and accuracy over every example (the last batch is padded and masked)."""
  sums = [eval_step(model, variables, x, y, m)
          for x, y, m in data.eval_batches(images, labels, batch_size)]
  totals = {k: float(np.sum([s[k] for s in jax.device_get(sums)])) for k in sums[0]}
  return {"loss": totals["loss_sum"] / totals["count"],
          "accuracy": totals["correct"] / totals["count"],
          "num_examples": int(totals["count"])}


class MetricsLog:
  """WORKDIR/metrics.jsonl: one JSON object per line."""

  def __init__(self, path: Path):
    self.path = path

  def drop_after(self, step: int) -> None:
    """Forgets records past `step`: written by a run that stopped before saving that far."""
    if not self.path.exists():
      return
    lines = self.path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
      tmp = self.path.with_suffix(".tmp")
      tmp.write_text("".join(kept))
      os.replace(tmp, self.path)

  def write(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def check_resumable(card: dict, config: Config, workdir) -> None:
  """Raises when the checkpoint in `workdir` belongs to a different run than `config`."""
  saved = config_lib.from_dict(card["config"])
  changes = config_lib.run_identity_changes(saved, config)
  if changes:
    raise ConfigError(
        f"{workdir} holds a checkpoint of another run ({'; '.join(changes)}); use another "
        f"--workdir, or the saved settings to continue it")


def check_writable(workdir: Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write-test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"cannot write to workdir {workdir} ({e.strerror}); choose another --workdir")


def train_and_evaluate(config: Config, workdir) -> TrainState:
  """Trains `config.model` on `config.dataset`, evaluating and checkpointing every epoch.

  Continues from the latest checkpoint in `workdir` if there is one. Returns the final state.
  """
  workdir = Path(workdir)
  config_lib.validate(config)
  try:  # fail on a bad model name or argument before any data are loaded
    models.create_model(config.model, **config.model_kwargs)
  except (TypeError, models.UnknownModelError) as e:
    raise ConfigError(str(e)) from e
  resume_card = checkpoint.read_card(workdir) if checkpoint.saved_steps(workdir) else None
  if resume_card:
    check_resumable(resume_card, config, workdir)

  # Data: prepared once per data dir, each split read into memory once.
  dataset = data.load_dataset(config.dataset, config.data_dir, config.manual_dir)
  info = dataset.info
  train_images, train_labels = dataset.splits["train"]
  test_images, test_labels = dataset.splits["test"]
  if config.train_examples:
    train_images, train_labels = train_images[:config.train_examples], train_labels[:config.train_examples]
  if config.test_examples:
    test_images, test_labels = test_images[:config.test_examples], test_labels[:config.test_examples]
  steps_per_epoch = data.steps_per_epoch(len(train_images), config.batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(f"batch_size {config.batch_size} is larger than the {len(train_images)} "
                      f"training examples; lower --batch-size")
  total_steps = config.epochs * steps_per_epoch
  model = models.create_model(config.model, num_classes=info.num_classes, **config.model_kwargs)
  state = create_train_state(model, config, info.image_shape, total_steps)

  if not resume_card:
    check_writable(workdir)
  manager = checkpoint.open_manager(workdir, keep=config.keep_checkpoints)
  metrics_log = MetricsLog(workdir / "metrics.jsonl")
  latest_metrics = {}
  if resume_card:
    step = resume_card["step"]
    state = checkpoint.restore_state(manager, step, state)
    metrics_log.drop_after(step)
    latest_metrics = resume_card["metrics"]
    print(f"Resuming {workdir} from step {step} (epoch {step / steps_per_epoch:.2f} of "
          f"{config.epochs}).", file=sys.stderr)
  step = int(state.step)
  if step >= total_steps:
    manager.close()
    test = latest_metrics.get("test", {})
    summary = f", test accuracy {test['accuracy']:.2%}" if "accuracy" in test else ""
    print(f"{workdir} is already trained: {config.epochs} epochs, step {step}{summary}. "
          f"Nothing to do; pass a larger --epochs to train longer.")
    return state

  def save_checkpoint(state, step):
    card = checkpoint.make_card(model, config, info, step, step / steps_per_epoch, latest_metrics)
    checkpoint.save(manager, state, card)

  first_epoch = step // steps_per_epoch
  for epoch in range(first_epoch, config.epochs):
    start_batch = step - epoch * steps_per_epoch
    window, epoch_metrics = [], []
    epoch_start = time.perf_counter()
    window_start = epoch_start
    bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{config.epochs}",
               unit="step", leave=False, file=sys.stderr,
               disable=not sys.stderr.isatty())  # tqdm's own disable=None misdetects ttys

    def flush_train_window():
      nonlocal window, window_start
      values = jax.device_get(window)
      now = time.perf_counter()
      record = {"step": step, "epoch": epoch + 1, "split": "train",
                "loss": float(np.mean([v["loss"] for v in values])),
                "accuracy": float(np.mean([v["accuracy"] for v in values])),
                "num_steps": len(values),
                "img_per_s": round(len(values) * config.batch_size / (now - window_start), 1)}
      metrics_log.write(record)
      latest_metrics["train"] = record
      epoch_metrics.extend(values)
      window, window_start = [], now

    for images, labels in data.train_batches(train_images, train_labels, config.batch_size,
                                             config.seed, epoch, start=start_batch):
      state, step_metrics = train_step(state, images, labels)
      step += 1
      window.append(step_metrics)
      bar.update()
      if bar.n % 20 == 0 and not bar.disable:
        recent = jax.device_get(window[-20:])
        bar.set_postfix(loss=f"{np.mean([m['loss'] for m in recent]):.4f}",
                        acc=f"{np.mean([m['accuracy'] for m in recent]):.2%}",
                        img_s=f"{(bar.format_dict['rate'] or 0) * config.batch_size:.0f}")
      at_checkpoint = config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
      at_epoch_end = step % steps_per_epoch == 0
      if step % config.log_every_steps == 0 or at_checkpoint or at_epoch_end:
        flush_train_window()
      if at_checkpoint and not at_epoch_end:
        save_checkpoint(state, step)
    bar.close()
    train_seconds = time.perf_counter() - epoch_start

    test = evaluate(model, state.variables(), test_images, test_labels, config.eval_batch_size)
    test_record = {"step": step, "epoch": epoch + 1, "split": "test", **test}
    metrics_log.write(test_record)
    latest_metrics["test"] = test_record
    save_checkpoint(state, step)
    trained = (steps_per_epoch - start_batch) * config.batch_size
    print(f"epoch {epoch + 1}/{config.epochs}  step {step}  "
          f"train loss {np.mean([m['loss'] for m in epoch_metrics]):.4f} "
          f"acc {np.mean([m['accuracy'] for m in epoch_metrics]):.2%}  "
          f"test loss {test['loss']:.4f} acc {test['accuracy']:.2%}  "
          f"{trained / train_seconds:.0f} img/s  {train_seconds:.1f} s", flush=True)

  manager.wait_until_finished()
  manager.close()
  print(f"Done: {config.model} on {config.dataset}, test accuracy "
        f"{latest_metrics['test']['accuracy']:.2%}; checkpoint {workdir}/{step}")
  return state
