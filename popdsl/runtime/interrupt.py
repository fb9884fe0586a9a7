"""Ctrl-C while native code runs.

Requires `popdsl.codegen.jit` (its stop flag); produces `interruptible()`, a context
manager the simulator wraps around each step.

Python runs its SIGINT handler only between bytecodes of the main thread, never
while that thread is inside a native call, so a codelet in `while true {}` would
ignore Ctrl-C.  Python's C-level handler does one thing at once, though: it writes
the signal's number to the wakeup fd (`signal.set_wakeup_fd`).  Inside the block a
pipe is that fd, and a daemon thread waiting on it sets the native stop flag
(`jit.request_stop`); every running vertex stops at its next check point
(`ir.checkpoints`), the native call raises KeyboardInterrupt, and so does Python's
own handler.  The previous wakeup fd is restored afterwards and gets every byte
meanwhile (an event loop's still sees its signals).  Nothing is installed outside
the main thread or on Windows; when SIGINT has no Python handler (ignored), no byte
ever comes.  Entering and leaving costs a few microseconds a step.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from popdsl.codegen import jit

_lock = threading.Lock()
_pipe: tuple[int, int] | None = None
_forward = -1             # the wakeup fd that was there before ours


def _watch(r: int) -> None:
    while True:
        try:
            data = os.read(r, 512)
        except OSError:
            return
        if not data:
            return
        if signal.SIGINT in data:
            jit.request_stop()
        fwd = _forward
        if fwd >= 0:
            try:
                os.write(fwd, data)
            except OSError:
                pass


def _start() -> int:
    global _pipe
    with _lock:
        if _pipe is None:
            r, w = os.pipe()
            os.set_blocking(w, False)
            threading.Thread(target=_watch, args=(r,), name="popdsl-ctrl-c", daemon=True).start()
            _pipe = (r, w)
        return _pipe[1]


@contextlib.contextmanager
def interruptible():
    """While the block runs, Ctrl-C also stops native code (KeyboardInterrupt).
    The block must not leave native code running when it ends: the stop flag is
    cleared then, so that later native work (the compiler's too) runs."""
    global _forward
    jit.clear_stop()
    try:
        if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
            yield
            return
        w = _start()
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:          # not the main interpreter, or similar
            yield
            return
        _forward = old if old != w else -1
        try:
            yield
        finally:
            signal.set_wakeup_fd(old if old != w else -1)
            _forward = -1
    finally:
        jit.clear_stop()
