"""Files written whole or not at all."""

import os
from pathlib import Path
from typing import Callable


def replace_atomically(path, write: Callable[[Path], object]) -> None:
  """Calls `write(tmp)` on a temporary file beside `path`, then renames it over `path`, so that a
  reader (or a run killed mid-write) sees the old file or the new one, never half of one. The
  temporary name keeps `path`'s suffix (savefig and np.save choose their format by it)."""
  path = Path(path)
  tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
