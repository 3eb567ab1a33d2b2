"""The project's error types (a problem the user can fix) and the one place that turns them into a line and an exit
code: run(). Torch-free, so scripts that never load a model (data, tokenizer, client) fail the same way."""
import functools
import sys

from .files import first_line


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


class Failed(SystemExit):
    """The exit code after the one line run() printed; str() is that line (as for sys.exit("line"))."""

    def __init__(self, line, code=2):
        super().__init__(code)
        self.line = line

    def __str__(self):
        return self.line


def run(main, *args, exit_code=2, **kwargs):
    """Run a script's main(*args, **kwargs) and return what it returns; the project's errors and files the OS cannot
    read or write become one line on stderr and exit_code (Failed). The one place that turns an error into an exit."""
    try:
        return main(*args, **kwargs)
    except (UserError, OSError) as e:
        tqdm = sys.modules.get("tqdm")
        for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):  # a bar cut short: a line of its own
            bar.close()
        line = f"error: {first_line(e, 1000)}"
        print(line, file=sys.stderr, flush=True)
        raise Failed(line, exit_code) from None
    finally:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def script(main=None, *, exit_code=2):
    """A script's main() that fails as run() says, also when called from Python (tests call main(argv))."""
    def wrap(main):
        @functools.wraps(main)
        def wrapped(*args, **kwargs):
            return run(main, *args, exit_code=exit_code, **kwargs)
        return wrapped
    return wrap(main) if main is not None else wrap
