"""Errors that name the file (and line) at fault, so a user can fix their input."""


class DataError(ValueError):
  """Bad input data: `path` is the offending file or folder, `line` its 1-based line if known."""

  def __init__(self, path, message, line=None):
    self.path = str(path)
    self.line = line
    self.message = message
    where = self.path if line is None else f"{self.path}:{line}"
    super().__init__(f"{where}: {message}")


class ConfigError(ValueError):
  """A config value that cannot work (wrong type, unknown key, inconsistent settings)."""
