"""The optimizer: AdamW (or SGD with Nesterov momentum) on a one-cycle or other optax schedule,
with parameter groups for fine-tuning (frozen parameters, a head learning rate)."""

import fnmatch
import functools

import jax
import optax

from flaxzoo.training.config import Config, ConfigError


def param_path(keypath) -> str:
  """'Conv_0/kernel' for a parameter's key path (the names used in reports and --freeze)."""
  return "/".join(str(getattr(k, "key", k)) for k in keypath)


def param_groups(params, freeze: str):
  """A tree like `params` labelling each leaf 'head', 'backbone' or 'frozen'.

  The head is the classifier every zoo model names `head`. `freeze`: 'none'; 'backbone' (all but
  the head); or comma-separated shell wildcards over parameter paths, where naming a module
  (`Conv_0`) freezes all its parameters.
  """
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  has_head = any(p.startswith("head/") for p in paths)
  if freeze == "none":
    frozen = set()
  elif freeze == "backbone":
    if not has_head:
      raise ConfigError("--freeze backbone needs a classifier module named 'head'; this model has "
                        "none: freeze parameter paths instead, e.g. --freeze 'Conv_*'")
    frozen = {p for p in paths if not p.startswith("head/")}
  else:
    frozen = set()
    for pattern in (p.strip() for p in freeze.split(",") if p.strip()):
      matched = {p for p in paths if fnmatch.fnmatchcase(p, pattern)
                 or fnmatch.fnmatchcase(p, pattern.rstrip("/") + "/*")}
      if not matched:
        modules = sorted({p.rsplit("/", 1)[0] for p in paths})
        raise ConfigError(f"--freeze pattern {pattern!r} matches no parameter; parameter paths "
                          f"are MODULE/NAME with modules {', '.join(modules)}")
      frozen |= matched
  if frozen and len(frozen) == len(paths):
    raise ConfigError(f"--freeze {freeze!r} freezes every parameter, so nothing would train; "
                      f"leave the head (or more) trainable")
  labels = ["frozen" if p in frozen else "head" if p.startswith("head/") else "backbone"
            for p in paths]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), labels)


def learning_rate_schedule(config: Config, total_steps: int, peak: float | None = None):
  """Step -> learning rate, peaking at `peak` (default the config's), all from optax. Every schedule
  but `constant` and `onecycle` warms up linearly over `warmup_fraction` of the steps first.

  onecycle: cosine up then cosine down (optax's one-cycle); cosine: warm-up, cosine decay to 0;
  linear: warm-up, linear decay to 0; step: warm-up, then x0.1 at 50 % and 75 % of the steps.
  """
  peak = peak or config.learning_rate
  total = max(total_steps, 1)
  warmup = int(config.warmup_fraction * total)
  if config.schedule == "onecycle":
    return optax.cosine_onecycle_schedule(transition_steps=total, peak_value=peak,
                                          pct_start=config.warmup_fraction)
  if config.schedule == "constant":
    return optax.constant_schedule(peak)
  rest = max(total - warmup, 1)
  decay = {"cosine": lambda: optax.cosine_decay_schedule(peak, rest),
           "linear": lambda: optax.linear_schedule(peak, 0.0, rest),
           "step": lambda: optax.piecewise_constant_schedule(
               peak, {int(0.5 * total) - warmup: 0.1, int(0.75 * total) - warmup: 0.1})}[config.schedule]()
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def create_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
  """AdamW on a one-cycle schedule. With frozen parameters or a head learning rate, parameter
  groups: frozen ones get zero updates (so they stay bitwise unchanged), the head its own peak."""
  def optimizer(peak):
    schedule = learning_rate_schedule(config, total_steps, peak)
    if config.optimizer == "sgd":  # weight decay added to the gradient (L2), Nesterov momentum 0.9
      return optax.chain(optax.add_decayed_weights(config.weight_decay),
                         optax.sgd(schedule, momentum=0.9, nesterov=True))
    return optax.adamw(schedule, weight_decay=config.weight_decay)

  if config.freeze == "none" and config.head_learning_rate is None:
    return optimizer(config.learning_rate)
  head_peak = config.head_learning_rate or config.learning_rate
  return optax.multi_transform(
      {"backbone": optimizer(config.learning_rate), "head": optimizer(head_peak),
       "frozen": optax.set_to_zero()},
      functools.partial(param_groups, freeze=config.freeze))
