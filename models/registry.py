"""A timm-style model registry: `@register_model`, `create_model`, `list_models`."""

import dataclasses
import difflib
import fnmatch

_MODELS: dict[str, type] = {}


def register_model(name: str):
  """Class decorator: makes a `flax.linen` module constructible by `name`.

  Every model names its classifier layer `head` (fine-tuning replaces it by that name). How a model
  is trained by default is its recipe in `flaxzoo.training.configs`, not part of the module.
  """

  def decorator(cls):
    if name in _MODELS and _MODELS[name] is not cls:
      raise ValueError(f"model name {name!r} is already registered to {_MODELS[name].__name__}")
    _MODELS[name] = cls
    cls.registered_name = name
    return cls

  return decorator


def list_models(pattern: str | None = None) -> list[str]:
  """Registered model names, sorted; `pattern` is a shell-style wildcard such as 'conv*'."""
  names = sorted(_MODELS)
  return [n for n in names if pattern is None or fnmatch.fnmatchcase(n, pattern)]


class UnknownModelError(ValueError):
  pass


def get_model_class(name: str) -> type:
  if name not in _MODELS:
    close = difflib.get_close_matches(name, _MODELS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}.{hint} Available models: {', '.join(list_models())}.")
  return _MODELS[name]


def model_kwarg_names(name: str) -> list[str]:
  """Constructor arguments a model accepts (its dataclass fields, minus linen's own)."""
  cls = get_model_class(name)
  return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


def create_model(name: str, num_classes: int = 10, **kwargs):
  """Builds a registered model. JSON lists (e.g. from a model card) become tuples."""
  cls = get_model_class(name)
  valid = model_kwarg_names(name)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise TypeError(f"model {name!r} got unknown argument(s) {', '.join(unknown)}; "
                    f"valid arguments: {', '.join(valid)}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  check_arguments(name, cls, kwargs)
  return cls(num_classes=num_classes, **kwargs)


class ModelArgumentError(TypeError):
  """A model argument of the wrong type or out of range; the message is one line."""


def _argument_rule(default):
  """(check, requirement) for an argument from its default's type."""
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
  if isinstance(default, tuple):
    return (lambda v: isinstance(v, tuple) and len(v) > 0 and all(is_int(x) and x >= 1 for x in v),
            "a non-empty list of positive integers")
  if isinstance(default, bool):
    return (lambda v: isinstance(v, bool)), "true or false"
  if isinstance(default, int):
    return (lambda v: is_int(v) and v >= 1), "a positive integer"
  if isinstance(default, float):
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
            "a number in [0, 1)")
  if isinstance(default, str):
    return (lambda v: isinstance(v, str)), "a string"
  return (lambda v: True), ""


def check_arguments(name: str, cls, kwargs: dict) -> None:
  """Types and ranges of a model's arguments, by their defaults' types, then the model's own
  `check_arguments(values)` (rules between arguments); raises ModelArgumentError in one line."""
  defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
  for key, value in kwargs.items():
    check, requirement = _argument_rule(defaults.get(key))
    if not check(value):
      shown = list(value) if isinstance(value, tuple) else value  # as the user wrote it (JSON)
      raise ModelArgumentError(f"model {name!r}: {key} must be {requirement}, got {shown!r}")
  own = getattr(cls, "check_arguments", None)
  problem = own({**defaults, **kwargs}) if own else None
  if problem:
    raise ModelArgumentError(f"model {name!r}: {problem}")


def model_description(name: str) -> str:
  doc = get_model_class(name).__doc__ or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def model_kwargs(model) -> dict:
  """The constructor arguments of a model instance, JSON-ready (what a model card stores)."""
  out = {}
  for key in model_kwarg_names(model.registered_name):
    if key == "num_classes":
      continue
    value = getattr(model, key)
    out[key] = list(value) if isinstance(value, tuple) else value
  return out
