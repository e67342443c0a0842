"""Atomic file and directory writes: nothing half-written is ever left at the target path.

Write into a temporary sibling, flush it to disk, then ``os.replace`` it onto the target (atomic
on POSIX within one file system). On any exception the temporary is removed and the target is
untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


class TargetExistsError(FileExistsError):
    """The output path holds something that the write would destroy and that it did not make."""


def check_target(
    target: str | os.PathLike,
    directory: bool = False,
    replaceable: Callable[[Path], bool] | None = None,
) -> Path:
    """Refuse an output path whose current content a write would destroy.

    Parameters
    ----------
    target : the file (or, with ``directory=True``, the directory) about to be written
    directory : whether the write produces a directory
    replaceable : for a directory target that already exists: whether this directory is one the
        writer made earlier (and may therefore replace as a whole); ``None`` refuses any
        existing directory

    Raises TargetExistsError naming the path when the write would replace a directory with a file,
    a file with a directory, or a directory that ``replaceable`` does not recognize.
    """
    target = Path(target)
    if directory:
        if target.exists() and not target.is_dir():
            raise TargetExistsError(
                f"{target} exists and is not a directory; refusing to replace it"
            )
        if target.is_dir() and any(target.iterdir()) and not (replaceable and replaceable(target)):
            raise TargetExistsError(
                f"{target} is an existing directory that this command did not write; refusing "
                "to replace its contents (choose a new path)"
            )
    elif target.is_dir():
        raise TargetExistsError(f"{target} is a directory; expected a file path")
    return target


def check_writable(target: str | os.PathLike) -> Path:
    """Refuse a target that cannot be written, before any work: the nearest existing ancestor
    of its folder must be a directory in which a file can be created (a probe file is made and
    removed, so read-only file systems and missing permissions are both seen). Raises
    PermissionError / NotADirectoryError naming the path."""
    target = Path(target)
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {target}: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.probe-", dir=folder)
    except OSError as exc:
        raise PermissionError(
            exc.errno, f"cannot write {target}: {folder} is not writable ({exc.strerror})"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return target


@contextlib.contextmanager
def atomic_path(
    target: str | os.PathLike,
    directory: bool = False,
    replaceable: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success move it onto ``target``.

    Parameters
    ----------
    target : path of the file (or directory, with ``directory=True``) to produce
    directory : yield an empty temporary directory instead of a file path
    replaceable : see :func:`check_target`; an existing non-empty directory target is replaced
        as a whole only when this recognizes it as the writer's own output

    The caller writes the temporary path completely; if the block raises, it is deleted.
    The target is checked (:func:`check_target`) before anything is written and again before the
    rename.
    """
    target = check_target(target, directory, replaceable)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp / mkdtemp (and safetensors) create 0600 / 0700; give the result the mode any
        # new file gets under the umask, as an ordinary write would
        _usual_mode(tmp)
        if not directory:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        check_target(target, directory, replaceable)  # it may have appeared meanwhile
        if directory and target.is_dir():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _usual_mode(path: Path) -> None:
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for child in path.iterdir():
            if stat.S_ISREG(child.lstat().st_mode):
                os.chmod(child, 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
