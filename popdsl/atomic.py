"""Writing an output file all at once: readers see the old file or the whole new
one, a failed or killed write leaves nothing behind, and the file gets the user's
umask like any file they create.

Requires the standard library; produces `write_atomically`.  On Linux the data is
written to an unnamed file (O_TMPFILE): it has no name until it is complete, so
even SIGKILL in the middle of a write cannot leave a stray file.  It is then linked
under a hidden name and renamed over the target (the link and the rename are
microseconds apart).  Elsewhere, or on a filesystem without O_TMPFILE, a named
temporary file is used and removed on any exception.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import sys
from typing import BinaryIO, Callable

_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


def _link_fd(fd: int, path: str) -> bool:
    """Give the unnamed file open at `fd` the name `path` (Linux linkat through
    /proc, which needs no privileges; os.link does not follow the /proc link)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        r = libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD,
                        os.fsencode(path), _AT_SYMLINK_FOLLOW)
    except (OSError, AttributeError):
        return False
    return r == 0


def _hidden_name(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.{secrets.token_hex(4)}.tmp")


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with the bytes `write(f)` writes.  Raises OSError
    (the target unchanged, no file left behind) or whatever `write` raises."""
    directory = os.path.dirname(os.path.abspath(path))
    if sys.platform.startswith("linux") and hasattr(os, "O_TMPFILE"):
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o666)   # umask applies
        except OSError:
            fd = None
        if fd is not None:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                tmp = _hidden_name(path)
                if _link_fd(fd, tmp):
                    try:
                        os.replace(tmp, path)
                    except BaseException:
                        _unlink(tmp)
                        raise
                    return
            # No linkat through /proc (a sandbox): write again the portable way.
    _write_named(path, write)


def _write_named(path: str, write: Callable[[BinaryIO], None]) -> None:
    tmp = _hidden_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
