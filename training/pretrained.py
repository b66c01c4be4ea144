"""A trained checkpoint's parameters in a model for a new dataset (the weight surgery of
fine-tuning).

`load_pretrained` merges a checkpoint's variables into a freshly initialised model: every array
whose path and shape match is loaded; any shape difference outside the classifier head (`head/…`)
is an error listing each path with both shapes. The head follows the class names (`head_rows`): a
row is kept for each new class the checkpoint has by name (or by `class_map`), in the new order,
and re-initialised for the others.
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import traverse_util

from flaxzoo.models import init_variables
from flaxzoo.training import checkpoint
from flaxzoo.training.optimizer import param_groups, param_path


@dataclasses.dataclass
class PretrainedReport:
  """What `load_pretrained` did, by variable path ('Conv_0/kernel'; 'batch_stats/…' for
  non-parameter collections)."""
  source_workdir: str
  source_step: int
  source_card: dict
  loaded: list
  reinitialized: list
  reinitialized_why: str = ""
  head: dict = dataclasses.field(default_factory=dict)  # see `HeadRows.record`

  def lines(self) -> list[str]:
    lines = [f"loaded ({len(self.loaded)}): {', '.join(self.loaded) or 'nothing'}"]
    if self.reinitialized:
      lines.append(f"re-initialised ({len(self.reinitialized)}): {', '.join(self.reinitialized)}"
                   f" ({self.reinitialized_why})")
    else:
      lines.append("re-initialised: none")
    if self.head:
      lines.append(f"head: {self.head['summary']}")
    return lines


HEAD_MODES = ("auto", "keep", "reinit")


@dataclasses.dataclass
class HeadRows:
  """Which checkpoint row feeds each class of the new head (None: freshly initialised)."""
  rows: list  # per new class: the source class index, or None
  how: str  # kept | reordered | partly kept | re-initialised
  summary: str  # one line for the report

  def record(self, source_names, new_names) -> dict:
    return {"how": self.how, "summary": self.summary,
            "rows": {new: (None if row is None else source_names[row]) for new, row in zip(new_names, self.rows)}}


def _some(names, most: int = 4) -> str:
  names = list(names)
  return ", ".join(names[:most]) + (", …" if len(names) > most else "")


def head_rows(source_names, new_names, head: str = "auto", class_map: dict | None = None) -> HeadRows:
  """How the classifier of a model trained on `source_names` serves `new_names`.

  auto: a class keeps the checkpoint's row of the same name (or of `class_map[name]`), in the new
  dataset's order; a class the checkpoint does not have gets a fresh row. keep: the rows as they
  are (the class counts must match). reinit: every row fresh. Raises ConfigError for a class map
  that names a class on neither side.
  """
  from flaxzoo.training.config import ConfigError
  source_names, new_names = list(source_names), list(new_names)
  if head not in HEAD_MODES:
    raise ConfigError(f"--head must be one of {', '.join(HEAD_MODES)}, got {head!r}")
  class_map = dict(class_map or {})
  unknown_new = sorted(set(class_map) - set(new_names))
  unknown_source = sorted({v for v in class_map.values() if v not in source_names})
  if unknown_new or unknown_source:
    problems = ([f"{_some(unknown_new)} not a class of the new dataset ({_some(new_names, 10)})"]
                if unknown_new else []) + ([f"{_some(unknown_source)} not a class of the checkpoint "
                                            f"({_some(source_names, 10)})"] if unknown_source else [])
    raise ConfigError(f"--class-map names classes that do not exist: {'; '.join(problems)}; map each "
                      f"new class name to a checkpoint class name")
  if class_map and head != "auto":
    raise ConfigError(f"--class-map goes with --head auto, not --head {head}")
  if head == "reinit":
    return HeadRows([None] * len(new_names), "re-initialised", "re-initialised (--head reinit)")
  if head == "keep":
    if len(source_names) != len(new_names):
      raise ConfigError(f"--head keep needs as many classes as the checkpoint's {len(source_names)}; "
                        f"this dataset has {len(new_names)}: use --head auto or reinit")
    return HeadRows(list(range(len(new_names))), "kept", "kept as it is (--head keep)")
  targets = [class_map.get(name, name) for name in new_names]
  rows = [source_names.index(t) if t in source_names else None for t in targets]
  kept = sum(row is not None for row in rows)
  if kept == 0:
    return HeadRows(rows, "re-initialised", f"re-initialised: the checkpoint's classes ({_some(source_names)}) "
                                            f"are not this dataset's ({_some(new_names)})")
  if rows == list(range(len(source_names))):
    return HeadRows(rows, "kept", "kept (the same classes in the same order)")
  if kept == len(rows) == len(source_names):
    return HeadRows(rows, "reordered", "head rows reordered to the new dataset's classes")
  if kept == len(rows):
    return HeadRows(rows, "reordered", f"kept the rows of the new dataset's {kept} classes (of the "
                                       f"checkpoint's {len(source_names)}), in its order")
  fresh = [name for name, row in zip(new_names, rows) if row is None]
  return HeadRows(rows, "partly kept", f"kept the rows of {kept} classes the checkpoint has, re-initialised "
                                       f"{len(fresh)} ({_some(fresh)})")


def _head_leaf(old, fresh, rows: list):
  """The head array for the new classes: along the last (class) axis, `old`'s row where `rows`
  names one, zeros elsewhere. A zero row starts its class at the same logit as every other new
  one (big_vision's `head_zeroinit`): a randomly initialised row on top of trained features gave
  logits large enough that a short fine-tune's first epoch lost more than it learnt (train loss 5.5
  against ln 10 = 2.3)."""
  index = jnp.asarray([0 if row is None else row for row in rows])
  keep = jnp.asarray([row is not None for row in rows])
  return jnp.where(keep, jnp.take(jnp.asarray(old, fresh.dtype), index, axis=-1), jnp.zeros_like(fresh))


def _name(key: str) -> str:
  """'params/Conv_0/kernel' -> 'Conv_0/kernel'; other collections keep their prefix."""
  return key.removeprefix("params/")


def is_head(key: str) -> bool:
  """Whether a flattened variable key ('params/head/kernel') belongs to the classifier."""
  return key.split("/")[1] == "head"


def load_pretrained(source_workdir, model, input_shape=None, *, class_names=None, head: str = "auto",
                    class_map: dict | None = None, step: int | None = None, seed: int = 0,
                    variables: dict | None = None):
  """`(variables, report)`: `model`'s variables with every matching array from the checkpoint.

  `class_names`: the new dataset's, in its label order (the head's rows follow them, see
  `head_rows`; `head` and `class_map` as there; rows not kept start at zero). Without them the
  classes are taken to be the checkpoint's when the counts match. `variables`: the freshly
  initialised variables to merge into (default: `model.init` with `seed` at `input_shape`, which
  defaults to the checkpoint's input shape). Raises CheckpointError listing every path outside the
  head whose shape differs.
  """
  _, source_variables, card = checkpoint.load_checkpoint(source_workdir, step)
  if variables is None:
    variables = init_variables(model, jax.random.PRNGKey(seed), input_shape or card["input_shape"])
  source_names = list(card["dataset"]["class_names"])
  if class_names is not None:
    head_plan = head_rows(source_names, class_names, head, class_map)
  elif len(source_names) == model.num_classes:  # no names given: the checkpoint's classes
    class_names, head_plan = source_names, head_rows(source_names, source_names, head, class_map)
  else:
    class_names = [str(i) for i in range(model.num_classes)]
    head_plan = HeadRows([None] * model.num_classes, "re-initialised", f"re-initialised: the checkpoint has "
                         f"{len(source_names)} classes, the model {model.num_classes}")
  fresh = traverse_util.flatten_dict(dict(variables), sep="/")
  source = traverse_util.flatten_dict(dict(source_variables), sep="/")
  merged, loaded, reinitialized, mismatched = {}, [], [], []
  for key, leaf in fresh.items():
    old = source.get(key)
    if old is not None and is_head(key) and _class_axis_fits(old, leaf, len(source_names), len(class_names)):
      merged[key] = _head_leaf(old, leaf, head_plan.rows)
      (loaded if head_plan.how != "re-initialised" else reinitialized).append(_name(key))
    elif old is not None and old.shape == leaf.shape:
      merged[key] = jnp.asarray(old, leaf.dtype)
      loaded.append(_name(key))
    elif old is not None:
      mismatched.append(f"{_name(key)}: checkpoint {tuple(old.shape)}, model {tuple(leaf.shape)}")
    else:
      merged[key] = leaf
      reinitialized.append(_name(key))
  if mismatched:
    raise checkpoint.CheckpointError(
        f"cannot load {source_workdir} step {card['step']} into {model.registered_name}: shapes "
        f"differ at {'; '.join(mismatched)}. Only the classifier head may differ, when the number "
        f"of classes changes; build the model with the checkpoint's arguments "
        f"{card['model']['kwargs']} and input shape {card['input_shape']}")
  missing = [k for k in fresh if k not in source]
  why = ["the head's classes" if head_plan.how == "re-initialised" else "",
         f"{len(missing)} not in the checkpoint" if missing else ""]
  report = PretrainedReport(str(source_workdir), card["step"], card, sorted(loaded),
                            sorted(reinitialized), "; ".join(w for w in why if w),
                            head_plan.record(source_names, class_names))
  return traverse_util.unflatten_dict(merged, sep="/"), report


def _class_axis_fits(old, fresh, source_classes: int, new_classes: int) -> bool:
  """Whether a head array has the class axis last and otherwise the same shape on both sides."""
  return (old.shape[-1:] == (source_classes,) and fresh.shape[-1:] == (new_classes,)
          and old.shape[:-1] == fresh.shape[:-1])


def frozen_paths(params, freeze: str) -> list[str]:
  labels = param_groups(params, freeze)
  return [param_path(p) for p, label in jax.tree_util.tree_flatten_with_path(labels)[0]
          if label == "frozen"]


def lineage(report: PretrainedReport, frozen: list[str]) -> dict:
  """What a fine-tuned model card records about where its weights came from."""
  card = report.source_card
  return {"source_workdir": str(Path(report.source_workdir).absolute()),
          "source_step": report.source_step,
          "source_dataset": card["dataset"]["name"],
          "source_model": card["model"]["name"],
          "source_test_accuracy": card["metrics"].get("test", {}).get("accuracy"),
          "loaded": report.loaded, "reinitialized": report.reinitialized, "frozen": frozen,
          "head": report.head}


def print_report(report: PretrainedReport, frozen: list[str], dataset: str) -> None:
  card = report.source_card
  print(f"Fine-tuning {card['model']['name']} from {report.source_workdir} step "
        f"{report.source_step} (trained on {card['dataset']['name']}) on {dataset}:",
        flush=True)
  for line in report.lines() + [f"frozen ({len(frozen)}): {', '.join(frozen)}" if frozen
                                else "frozen: none"]:
    print(f"  {line}", flush=True)
