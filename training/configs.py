"""Training recipes, in one place: what each zoo model trains with by default, and whole named
setups. `flaxzoo train --model NAME` starts from NAME's recipe; `flaxzoo train --config NAME` from a
named setup (a model's name is one too); flags given beside either override it.

A recipe holds only the `Config` fields it changes from `Config`'s defaults.
"""

from flaxzoo.training.config import Config, ConfigError, override

# Per model: Config fields on top of the defaults (models/ holds the modules only).
MODEL_RECIPES = {
    "convnet": {},
    "lenet5": dict(epochs=5),
    "mlp": dict(epochs=10, learning_rate=1e-3),
    "resnet": {},
    "vit_tiny": dict(epochs=10, learning_rate=3e-3, weight_decay=0.05, augment="shift"),
}

NAMED_CONFIGS = {
    # >= 99.0 % MNIST test accuracy, whatever the seed, in the least wall time on a 2-core CPU: two
    # epochs on a one-cycle schedule. One epoch (batch 64) landed at 99.0 +- 0.05 % and missed the
    # target at some seeds (docs/benchmarks.md, "Time to 99 %").
    "fast": dict(model="convnet", epochs=2, batch_size=128, learning_rate=1.5e-2,
                 warmup_fraction=0.2),
}


def config_names() -> list[str]:
  """Every name `--config` takes: the named setups, then each model's recipe."""
  return [*NAMED_CONFIGS, *(name for name in MODEL_RECIPES if name not in NAMED_CONFIGS)]


def model_recipe(model: str) -> dict:
  """The Config fields `model` trains with by default (empty for a model without a recipe)."""
  from flaxzoo import models
  models.registry.get_model_class(model)  # an unknown name fails here, with close names
  return dict(MODEL_RECIPES.get(model, {}))


def default_config(model: str = "convnet", **overrides) -> Config:
  """`Config` for `model` with its recipe, then `overrides`."""
  return override(Config(model=model), {**model_recipe(model), **overrides})


def named_config(name: str, **overrides) -> Config:
  """The named setup `name` (see `config_names`), then `overrides`."""
  if name in NAMED_CONFIGS:
    values = {**NAMED_CONFIGS[name], **overrides}
    return default_config(values.pop("model"), **values)
  if name in MODEL_RECIPES:
    return default_config(**{"model": name, **overrides})
  raise ConfigError(f"unknown --config {name!r}; named configs: {', '.join(config_names())}")
