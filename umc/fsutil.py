"""Filesystem steps that never clobber what a user has: no-replace renames, an exclusive lock on a
directory, and new files written atomically under a no-clobber policy.

Checking that a path is free and then renaming onto it is a race (anything can appear in
between); these helpers make the check and the act one step where the kernel allows it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

AT_FDCWD = -100
RENAME_NOREPLACE = 1
# renameat2 errors meaning "this kernel or filesystem cannot do a no-replace rename", not "dst exists"
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS)


def _load_renameat2():
    """libc's renameat2 through ctypes, or None where libc has none (non-Linux, glibc before 2.28)."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()
_held = threading.local()  # (st_dev, st_ino) of the directories this thread holds the lock on


@contextmanager
def exclusive_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` (waiting for other holders) for the ``with`` body.

    The lock is on the directory itself, so it leaves no lock file behind. It excludes only
    other holders of the same lock (other umc processes and threads), not programs that do not
    take it. Re-entering it in the thread that holds it is a no-op, so a holder may call helpers
    that take it too.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        held = _held.__dict__.setdefault("dirs", set())
        if key in held:
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
    finally:
        os.close(fd)


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if anything is at ``dst`` (an empty directory or a
    dangling symlink included), checked and renamed in one step by Linux ``renameat2(RENAME_NOREPLACE)``.

    Fallback, where libc has no renameat2 or the kernel or filesystem refuses the flag (EINVAL,
    ENOSYS): take ``exclusive_lock`` on dst's directory, check that dst is free, and rename. That is
    atomic only against other users of the lock; a program that does not take it can still create
    dst between the check and the rename, and then a directory src replaces it if it is an empty
    directory, a file src replaces it if it is a file (rename(2) semantics).
    """
    if _renameat2 is not None:
        if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code), os.fsdecode(src), None, os.fsdecode(dst))
    _rename_noreplace_locked(src, dst)


def _rename_noreplace_locked(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """rename_noreplace's fallback: check that dst is free and rename, under dst's directory lock."""
    with exclusive_lock(Path(dst).absolute().parent):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(src), None, os.fsdecode(dst))
        os.rename(src, dst)


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The header metadata of a regular safetensors file (not a symlink); None when it is anything
    else or cannot be read (so a caller deciding what it may overwrite treats it as foreign)."""
    from safetensors import SafetensorError, safe_open

    if path.is_symlink() or not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError):
        return None


def check_new_file(path: Path, *, force: bool, replaceable: Callable[[Path], bool], what: str) -> None:
    """FileExistsError (one line, naming the path and what is allowed) unless ``path`` is free, or
    ``force`` is given and ``replaceable(path)`` says it is ``what`` (e.g. "a umc weights file");
    FileNotFoundError if the directory it would go into does not exist."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: directory {path.parent} does not exist (create it or choose another path)")
    if not os.path.lexists(path):
        return
    if not force:
        raise FileExistsError(f"{path} exists (use --force to replace it if it is {what})")
    if not replaceable(path):
        raise FileExistsError(f"{path} is not {what}; --force replaces only {what} (choose another path)")


def write_new_file(path: Path, write: Callable[[Path], None], *, force: bool,
                   replaceable: Callable[[Path], bool], what: str) -> None:
    """Write a file at ``path`` atomically under the no-clobber policy of ``check_new_file``.

    ``write(tmp)`` writes the content into a private temporary directory next to ``path``; the
    file is then renamed into place, so an interrupted write never leaves a truncated file under
    ``path``. The policy is checked before writing (fail fast) and again when the file goes in.
    """
    check_new_file(path, force=force, replaceable=replaceable, what=what)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        tmp = scratch / path.name
        write(tmp)
        _move_into_place(tmp, path, force=force, replaceable=replaceable, what=what)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _move_into_place(tmp: Path, path: Path, *, force: bool, replaceable: Callable[[Path], bool], what: str) -> None:
    """Rename a finished ``tmp`` to ``path`` under ``exclusive_lock`` of its directory, re-checking the
    policy there. A free path is taken with a no-replace rename, so a file that appears at the last
    moment is kept; an existing one (allowed by ``force``) is replaced, which the lock makes safe
    against other umc writers but not against other programs swapping the file in that instant."""
    with exclusive_lock(path.parent):
        check_new_file(path, force=force, replaceable=replaceable, what=what)
        try:
            if os.path.lexists(path):
                os.replace(tmp, path)
            else:
                rename_noreplace(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} appeared while it was being written and was left alone; "
                                  "run again to choose what to do with it") from None
