"""Training recipes as TOML files in `configs/` (installed as `flaxzoo.configs`): `<model>.toml`,
what each zoo model trains with by default, and named setups such as `fast.toml`.

`flaxzoo train --model NAME` starts from NAME's recipe; `flaxzoo train --config NAME|FILE.toml` from
a config file (a model's name is one too); flags given beside either override it.

TOML rather than Python: reading a config never executes code, the standard library parses it
(`tomllib`), and its types (integers, floats, strings, arrays, tables) are `Config`'s. A file holds
only the `Config` fields it changes; `model` picks the model, whose recipe applies beneath the file.
"""

import importlib.resources
import sys
from pathlib import Path

from flaxzoo.training.config import Config, ConfigError, override

if sys.version_info >= (3, 11):
  import tomllib
else:  # pragma: no cover
  import tomli as tomllib


def config_dir():
  """The folder of the named configs (a Traversable: a folder, or inside an installed package)."""
  return importlib.resources.files("flaxzoo.configs")


def config_names() -> list[str]:
  """Every name `--config` takes: `fast` first, then the others in alphabetical order."""
  names = sorted(p.name[:-len(".toml")] for p in config_dir().iterdir() if p.name.endswith(".toml"))
  return sorted(names, key=lambda name: name != "fast")


def read_config_file(path) -> dict:
  """A config file's fields, as data (never executed). Unknown fields and wrong types are refused
  when applied (`override`)."""
  try:
    with open(path, "rb") as f:
      return tomllib.load(f)
  except OSError as e:
    raise ConfigError(f"cannot read config file {path} ({e.strerror}); pass an existing .toml file "
                      f"or one of the named configs: {', '.join(config_names())}") from e
  except tomllib.TOMLDecodeError as e:
    raise ConfigError(f"config file {path} is not valid TOML ({e}); write KEY = VALUE lines, "
                      f"e.g. epochs = 5") from e


def config_path(name_or_path: str) -> Path:
  """The file of a named config, or the given .toml path."""
  if name_or_path.endswith(".toml") or "/" in name_or_path:
    return Path(name_or_path).absolute()
  if name_or_path in config_names():
    return Path(str(config_dir() / f"{name_or_path}.toml"))
  raise ConfigError(f"unknown --config {name_or_path!r}; named configs: {', '.join(config_names())}, "
                    f"or the path of a .toml file")


def model_recipe(model: str) -> dict:
  """The Config fields `model` trains with by default (empty for a model without a recipe file)."""
  from flaxzoo import models
  models.registry.get_model_class(model)  # an unknown name fails here, with close names
  recipe = config_dir() / f"{model}.toml"
  if not recipe.is_file():
    return {}
  values = read_config_file(recipe)
  values.pop("model", None)
  return values


def default_config(model: str = "convnet", **overrides) -> Config:
  """`Config` for `model` with its recipe, then `overrides`."""
  return override(Config(model=model), {**model_recipe(model), **overrides})


def named_config(name_or_path: str, **overrides) -> Config:
  """The config file `name_or_path` (a name from `config_names` or a .toml path) on top of its
  model's recipe, then `overrides`. The config records the file it came from (`config_file`)."""
  path = config_path(name_or_path)
  from_file = read_config_file(path)
  try:  # unknown fields and wrong types: name the file
    override(Config(), from_file)
  except ConfigError as e:
    raise ConfigError(f"config file {path}: {e}") from e
  values = {**from_file, "config_file": str(path), **overrides}
  return default_config(values.pop("model", "convnet"), **values)
