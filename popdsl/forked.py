"""Work done in a forked copy of the process, its small answer read back.

Requires the standard library only (POSIX `fork`; `available()` says whether it
runs here, and on a second core).  Produces `Forked`: `Forked(fn)` forks; the child
runs `fn()`, sends what it returns (pickled: a few numbers, never data) or what it
raised through a pipe, and leaves with `os._exit` — no atexit handlers, no flushing
of the stdio buffers it inherited, so nothing the parent printed is printed twice.
The parent polls (`ready()`), waits (`answer()`) or drops it (`close()`: the child
killed and reaped).  The compiler runs a try of recomputation `auto` that it
expects to fail this way, beside the try it expects to keep (recompute_auto.fit).

Why a process and not a thread: the tries are Python, which holds the GIL.  Why
fork: the child starts with everything the parent built (a training step's graph)
for the cost of its page tables, shared until written.  Forking a process that has
threads copies only the forking thread, so a lock another thread held at that
moment would stay held in the child forever: a module that keeps a thread or a
lock threads take registers fork handlers (`os.register_at_fork`) that take the
lock across the fork and reset its pool in the child (ir.host_llvm, codegen.jit).
A child that dies without answering (killed, out of memory) answers None: the
parent then does the work itself.
"""
from __future__ import annotations

import ctypes
import gc
import os
import pickle
import select
import signal
import sys
import time
import traceback
from typing import Callable

# A child's answer is a few numbers; a larger one is a misuse (the pipe would need
# the parent to read while the child writes, and the data pickled both ways).
MAX_ANSWER_BYTES = 1 << 20


def available() -> bool:
    """Whether `Forked` can run here and has a core of its own: POSIX fork, on
    Linux (macOS's system libraries are not fork-safe), with two or more cores
    this process may use.  POPDSL_FORK=0 turns it off."""
    if os.environ.get("POPDSL_FORK", "") == "0" or not hasattr(os, "fork") or not sys.platform.startswith("linux"):
        return False
    try:
        return len(os.sched_getaffinity(0)) > 1
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) > 1


class ForkedError(RuntimeError):
    """What a child raised that could not be sent as itself (its traceback's text)."""


class Forked:
    """`fn()` run in a forked child; its answer read back once it has one."""

    def __init__(self, fn: Callable[[], object]):
        r, w = os.pipe()
        parent = os.getpid()
        # The collector writes the headers of the objects it visits, which in a
        # child would copy every page of them: the parent's objects are frozen for
        # the fork (the child leaves them so; the parent thaws them), and garbage
        # collected first so that none of it is frozen for good in the child.
        gc.collect()
        gc.freeze()
        try:
            pid = os.fork()
        except BaseException:
            gc.unfreeze()
            os.close(r)
            os.close(w)
            raise
        if pid == 0:                                          # the child
            os.close(r)
            _child(fn, w, parent)                             # never returns
        gc.unfreeze()
        os.close(w)
        self.rusage = None            # the child's resource usage once reaped (os.wait4)
        self.pid: int | None = pid
        self._fd: int | None = r
        self._data = bytearray()
        self._eof = False

    def ready(self) -> bool:
        """Whether the child has answered (or died): never blocks."""
        self._read(block=False)
        return self._eof

    def answer(self, timeout: float | None = None):
        """What `fn` returned (waiting for it, at most `timeout` seconds if given);
        what it raised, raised again; None when the child died without answering
        or did not answer in time (it is then killed)."""
        self._read(block=True, timeout=timeout)
        if not self._eof:
            self.close()
            self._eof = True
            self._data = bytearray()
            return None
        self._reap()
        if not self._data:
            return None
        kind, value = pickle.loads(bytes(self._data))
        if kind == "value":
            return value
        raise value

    def close(self) -> None:
        """Kill the child if it still runs, and reap it."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _read(self, block: bool, timeout: float | None = None) -> None:
        end = None if timeout is None else time.monotonic() + timeout
        while not self._eof and self._fd is not None:
            wait = 0 if not block else None if end is None else max(0.0, end - time.monotonic())
            if wait is not None and not select.select([self._fd], [], [], wait)[0]:
                return
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                self._eof = True
            elif len(self._data) + len(chunk) > MAX_ANSWER_BYTES:
                raise AssertionError(f"a forked child's answer is over {MAX_ANSWER_BYTES:,} bytes")
            else:
                self._data += chunk

    def _reap(self) -> None:
        if self.pid is not None:
            _, _, self.rusage = os.wait4(self.pid, 0)
            self.pid = None

    def peak_rss(self) -> int | None:
        """The reaped child's resident high-water mark in bytes (pages it shared
        with the parent included), or None."""
        return None if self.rusage is None else self.rusage.ru_maxrss * 1024     # Linux: kilobytes


def _child(fn: Callable[[], object], fd: int, parent: int) -> None:
    code = 0
    try:
        # Killed with the parent (SIGTERM, SIGKILL: nothing to answer to), where
        # Linux lets it say so (prctl PR_SET_PDEATHSIG); a parent gone already, too.
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:
            os._exit(1)
        # Nothing of the child is shown: and a stream's lock that a thread of the
        # parent held at the fork (a progress line being drawn) is never taken.
        sys.stdout = sys.stderr = open(os.devnull, "w")
        try:
            payload = pickle.dumps(("value", fn()))
            pickle.loads(payload)           # what the parent cannot load is sent as text
        except KeyboardInterrupt:
            os._exit(130)
        except BaseException as e:          # noqa: BLE001 - sent to the parent, raised there
            try:
                payload = pickle.dumps(("raise", e.with_traceback(None)))
                pickle.loads(payload)
            except Exception:               # noqa: BLE001 - unpicklable: its text instead
                payload = pickle.dumps(("raise", ForkedError(traceback.format_exc())))
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:                   # noqa: BLE001 - the parent reads no answer: it does the work
        code = 1
    finally:
        os._exit(code)
