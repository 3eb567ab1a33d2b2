"""Writing so that nothing is lost: every file and folder the project writes appears whole or not at all.

A write goes to a hidden temporary name beside its target (`.NAME.PID.tmp`, same folder so the rename cannot
cross file systems), is flushed to disk, then renamed over the target; until that rename the old target is
untouched. The temporary name is the writer's own (its process id), so two writers never share one."""
import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path


class WriteError(OSError):
    """A file or folder that could not be written, named in one line (errno and filename as the OS gave them)."""

    def __init__(self, message, code=None, filename=None):
        super().__init__(message)
        self.errno, self.filename = code, filename

    def __str__(self):
        return self.args[0]


def first_line(e, limit=300):
    """An exception as one short line (torch and transformers messages run over many lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def temp_path(path, pid=None) -> Path:
    """Where the process `pid` (default: this one) writes `path` before renaming it in."""
    path = Path(path)
    return path.parent / f".{path.name}.{pid or os.getpid()}.tmp"


def space_left(folder, needed=0):
    """'No space left on device (N MB needed, M free)' for the file system of `folder`."""
    free = shutil.disk_usage(folder).free
    need = f"{needed / 1e6:.1f} MB needed, " if needed else ""
    return f"No space left on device ({need}{free / 1e6:.1f} MB free)"


def disk_is_full(folder, slack=1 << 20):
    try:
        return shutil.disk_usage(folder).free < slack
    except OSError:
        return False


def why_not_written(path, e):
    """The WriteError for a failed write of `path`: the OS's reason, also when torch.save reports it as
    "[enforce fail at ...] ... strerror: REASON", or with no reason at all ("unexpected pos 2191168 vs 2191056":
    what a full disk looks like to it). A full disk sets errno ENOSPC, whoever reported it."""
    path = Path(path)
    code = getattr(e, "errno", None)
    reason = re.search(r"strerror: ([^.;]+)", str(e)) if isinstance(e, RuntimeError) else None
    if code == errno.ENOSPC or (isinstance(e, RuntimeError) and disk_is_full(path.parent)):
        return WriteError(f"cannot write {path}: {space_left(path.parent)}", errno.ENOSPC, str(path))
    why = reason.group(1) if reason else getattr(e, 'strerror', None) or first_line(e)
    return WriteError(f"cannot write {path}: {why}", code, str(path))


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp, path):
    """Rename the finished `tmp` over `path`, after its bytes are on disk, and make the rename durable too."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write(path, write_fn):
    """Run write_fn(tmp_path), which creates the file (so it gets the user's usual permissions), then rename it
    over `path`. A failure is a WriteError naming `path`; the old file, if any, is kept."""
    path = Path(path)
    tmp = temp_path(path)
    error = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_fn(str(tmp))
        commit(tmp, path)
    except (OSError, RuntimeError) as e:
        error = why_not_written(path, e)
    finally:
        remove(tmp)
    if error is not None:  # raised out here, the failed writer's traceback (and its open file) is already gone,
        raise error        # so the space of the removed temporary file is free again


@contextmanager
def atomic_open(path, mode="w"):
    """A file object for streaming writes that appears at `path` only once the block ends without an error
    (text modes: UTF-8, newlines as written)."""
    path = Path(path)
    tmp = temp_path(path)
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, mode, **text)
    except OSError as e:
        raise why_not_written(path, e) from None
    try:
        try:
            yield f
        except BaseException:
            f.close()
            raise
        try:
            f.close()
            commit(tmp, path)
        except OSError as e:  # not the block's own errors: those pass through unchanged
            raise why_not_written(path, e) from None
    finally:
        remove(tmp)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_folder(path):
    """A temporary folder to fill; when the block ends without an error it replaces the folder `path` whole
    (the old folder is moved aside first and removed only once the new one is in place)."""
    path = Path(path)
    tmp, old = temp_path(path), path.parent / f".{path.name}.{os.getpid()}.old"
    remove(tmp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        umask = current_umask()
        os.chmod(tmp, 0o777 & ~umask)
        for folder, dirs, names in os.walk(tmp):
            for name in dirs:  # writers such as safetensors create 0600 files whatever the umask says
                os.chmod(os.path.join(folder, name), 0o777 & ~umask)
            for name in names:
                os.chmod(os.path.join(folder, name), 0o666 & ~umask)
                fsync_path(os.path.join(folder, name))
        if path.exists() or path.is_symlink():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        raise why_not_written(path, e) from None
    finally:
        remove(tmp)
        remove(old)
