"""The project's error types: a problem the user can fix, which cli.run prints as one line (no traceback)."""


class UserError(Exception):
    """A bad flag, or a file that is missing or cannot be used: the message says which and what to do."""


class TrainError(UserError):
    """A training run that cannot start or go on (bad flag, missing file, shape mismatch)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or does not fit the requested model shape."""


class DataError(UserError):
    """A data file is missing or unusable; the message names the file (and line) and what to do."""


class EvalError(UserError):
    """An evaluation input (prompt file, benchmark folder) that cannot be used."""


class ExportError(UserError):
    """An export that cannot be made or does not match the model it came from."""
