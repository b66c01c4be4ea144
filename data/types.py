"""What every data module shares: the dataset types and the one error a user can fix."""

import dataclasses


class DataError(Exception):
  """A data problem the user can fix; the message is one line saying how."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_examples: dict  # split name -> count
  split_rule: str | None = None  # image folders: how the test split was chosen (in the card)
  # image folders: split name -> file paths relative to the folder (WORKDIR/dataset-files.json)
  files: dict | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass
class Dataset:
  info: DatasetInfo
  splits: dict  # split name -> a source (data.sources): `read(indices)`, `arrays()`, len()
