"""The errors a run ends with, each one line for the user. Apart from the code that raises them so
that the CLI can catch them without importing orbax or optax."""

from flaxzoo.data.types import DataError
from flaxzoo.models.registry import UnknownModelError
from flaxzoo.training.config import ConfigError


class CheckpointError(Exception):
  """A checkpoint problem the user can fix; the message is one line saying how."""


class TrainingInterrupted(KeyboardInterrupt):
  """SIGINT/SIGTERM stopped training after a checkpoint was written; `exit_status` is 128+signal."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_status = 128 + signum


class TrainingDiverged(Exception):
  """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""

  def __init__(self, message: str, last_saved: int | None):
    super().__init__(message)
    self.last_saved = last_saved


class ExportError(Exception):
  """An export that cannot be done or did not pass its check; nothing was written."""


# Errors the CLI reports as one line and exit status 2.
USER_ERRORS = (DataError, ConfigError, CheckpointError, UnknownModelError, TrainingDiverged,
               ExportError)
