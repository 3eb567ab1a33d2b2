"""model/files.py, the one way the project writes: a process killed between writing and renaming leaves the old
file or folder intact (and its half-written copy under the writer's temporary name); errors name the target."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model.files import WriteError, atomic_folder, atomic_open, atomic_write, temp_path

ROOT = Path(__file__).resolve().parents[1]

# writes the new version of argv[2] with helper argv[1], and SIGKILLs itself at the rename that would publish it
CRASH_AT_RENAME = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from model import files
    def crash(src, dst):
        os.kill(os.getpid(), signal.SIGKILL)
    files.os.replace = crash
    helper, target = sys.argv[1], Path(sys.argv[2])
    if helper == "atomic_write":
        files.atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    elif helper == "atomic_open":
        with files.atomic_open(target) as f:
            f.write("new")
    else:
        with files.atomic_folder(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text("new")
""")


@pytest.mark.parametrize("helper", ["atomic_write", "atomic_open", "atomic_folder"])
def test_a_crash_between_write_and_rename_keeps_the_old_version(tmp_path, helper):
    target = tmp_path / ("model" if helper == "atomic_folder" else "data.txt")
    if helper == "atomic_folder":
        target.mkdir()
        (target / "weights").write_text("old")
    else:
        target.write_text("old")
    proc = subprocess.Popen([sys.executable, "-c", CRASH_AT_RENAME, helper, str(target)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err
    old = target / "weights" if helper == "atomic_folder" else target
    assert old.read_text() == "old"
    left = temp_path(target, pid=proc.pid)  # the new version, complete but never published
    assert (left / "weights" if helper == "atomic_folder" else left).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, left.name])


def test_writes_replace_whole_and_leave_nothing_behind(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write(path, lambda tmp: Path(tmp).write_text("one"))
    with atomic_open(path) as f:
        f.write("two")
    assert path.read_text() == "two"
    folder = tmp_path / "folder"
    for version in ("a", "b"):
        with atomic_folder(folder) as tmp:
            tmp.mkdir()
            (tmp / version).write_text(version)
    assert [p.name for p in folder.iterdir()] == ["b"]  # nothing of the old folder mixes in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f.txt"]


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=f"cannot write {path}: No space left on device"):
        atomic_write(path, fail)
    with pytest.raises(ValueError):  # the block's own errors pass through unchanged
        with atomic_open(path) as f:
            f.write("half")
            raise ValueError("a bad record")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
