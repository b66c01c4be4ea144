"""A trained checkpoint's parameters in a model for a new dataset (the weight surgery of
fine-tuning).

`load_pretrained` merges a checkpoint's variables into a freshly initialised model: every array
whose path and shape match is loaded; the classifier head (`head/…`) is re-initialised when the
number of classes differs; any other shape difference is an error listing each path with both
shapes.
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import traverse_util

from flaxzoo.training import checkpoint
from flaxzoo.training.optimizer import param_groups, param_path
from flaxzoo.training.state import init_variables


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

  def lines(self) -> list[str]:
    lines = [f"loaded ({len(self.loaded)}): {', '.join(self.loaded) or 'nothing'}"]
    if self.reinitialized:
      lines.append(f"re-initialised ({len(self.reinitialized)}): {', '.join(self.reinitialized)}"
                   f" ({self.reinitialized_why})")
    else:
      lines.append("re-initialised: none")
    return lines


def _name(key: str) -> str:
  """'params/Conv_0/kernel' -> 'Conv_0/kernel'; other collections keep their prefix."""
  return key.removeprefix("params/")


def is_head(key: str) -> bool:
  """Whether a flattened variable key ('params/head/kernel') belongs to the classifier."""
  return key.split("/")[1] == "head"


def load_pretrained(source_workdir, model, input_shape=None, *, step: int | None = None,
                    seed: int = 0, variables: dict | None = None):
  """`(variables, report)`: `model`'s variables with every matching array from the checkpoint.

  `variables`: the freshly initialised variables to merge into (default: `model.init` with
  `seed` at `input_shape`, which defaults to the checkpoint's input shape). Raises CheckpointError
  listing every path whose shape differs, unless only the head's does because the number of
  classes changed (then the head keeps its fresh initialisation).
  """
  _, source_variables, card = checkpoint.load_checkpoint(source_workdir, step)
  if variables is None:
    variables = init_variables(model, jax.random.PRNGKey(seed), input_shape or card["input_shape"])
  fresh = traverse_util.flatten_dict(dict(variables), sep="/")
  source = traverse_util.flatten_dict(dict(source_variables), sep="/")
  classes_changed = card["num_classes"] != model.num_classes
  merged, loaded, reinitialized, mismatched = {}, [], [], []
  for key, leaf in fresh.items():
    old = source.get(key)
    if old is not None and old.shape == leaf.shape:
      merged[key] = jnp.asarray(old, leaf.dtype)
      loaded.append(_name(key))
    elif old is not None and not (classes_changed and is_head(key)):
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
  why = []
  if classes_changed:
    why.append(f"the checkpoint has {card['num_classes']} classes, the model "
               f"{model.num_classes}")
  if missing:
    why.append(f"{len(missing)} not in the checkpoint")
  report = PretrainedReport(str(source_workdir), card["step"], card, sorted(loaded),
                            sorted(reinitialized), "; ".join(why))
  return traverse_util.unflatten_dict(merged, sep="/"), report


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
          "loaded": report.loaded, "reinitialized": report.reinitialized, "frozen": frozen}


def print_report(report: PretrainedReport, frozen: list[str], dataset: str) -> None:
  card = report.source_card
  print(f"Fine-tuning {card['model']['name']} from {report.source_workdir} step "
        f"{report.source_step} (trained on {card['dataset']['name']}) on {dataset}:",
        flush=True)
  for line in report.lines() + [f"frozen ({len(frozen)}): {', '.join(frozen)}" if frozen
                                else "frozen: none"]:
    print(f"  {line}", flush=True)
