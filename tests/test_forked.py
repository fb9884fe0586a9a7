"""popdsl.forked: work in a forked child, its answer read back."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

from popdsl import forked
from popdsl.diagnostics import CompileError, Diagnostic, OutOfMemory, Span

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")


def test_a_child_answers_what_its_function_returns_computed_on_the_parents_data():
    data = list(range(100_000))
    f = forked.Forked(lambda: (sum(data), os.getpid()))
    try:
        total, pid = f.answer()
    finally:
        f.close()
    assert total == sum(data) and pid != os.getpid()
    assert f.peak_rss() > 0


def test_what_a_child_raises_is_raised_in_the_parent():
    err = CompileError([Diagnostic(Span("x.pop", 1, 2, 1, 3), "no such thing", "error", ())])

    def fail():
        raise err
    f = forked.Forked(fail)
    with pytest.raises(CompileError, match="no such thing") as got:
        f.answer()
    f.close()
    assert got.value.diagnostics == err.diagnostics and type(got.value) is CompileError
    oom = OutOfMemory(err.diagnostics, 3, 700_000, 638_976, np.arange(4))

    def over():
        raise oom
    f = forked.Forked(over)
    with pytest.raises(OutOfMemory) as got:
        f.answer()
    f.close()
    assert (got.value.tile, got.value.need, got.value.capacity) == (3, 700_000, 638_976)
    assert got.value.bounds.tolist() == [0, 1, 2, 3] and str(got.value) == str(oom)


def test_what_cannot_be_sent_as_itself_comes_back_as_its_traceback():
    class Local(Exception):             # not picklable: a local class
        pass

    def fail():
        raise Local("deep inside")
    f = forked.Forked(fail)
    with pytest.raises(forked.ForkedError, match="deep inside"):
        f.answer()
    f.close()
    f = forked.Forked(lambda: threading.Lock())          # an answer that cannot be pickled
    with pytest.raises(TypeError, match="pickle"):
        f.answer()
    f.close()


def test_a_child_that_dies_answers_none():
    f = forked.Forked(lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert f.answer() is None
    f.close()
    f = forked.Forked(lambda: os._exit(3))
    assert f.answer() is None
    f.close()


def test_ready_never_blocks_and_close_kills_a_running_child():
    f = forked.Forked(lambda: time.sleep(60))
    t = time.perf_counter()
    assert not f.ready()
    pid = f.pid
    f.close()
    assert time.perf_counter() - t < 10
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)                      # reaped
    f = forked.Forked(lambda: 7)
    while not f.ready():
        time.sleep(0.01)
    assert f.answer() == 7 and f.answer() == 7         # asked again: the same
    f.close()


def test_an_answer_over_the_limit_is_a_bug_of_the_caller(monkeypatch):
    monkeypatch.setattr(forked, "MAX_ANSWER_BYTES", 1000)
    f = forked.Forked(lambda: b"x" * 100_000)
    with pytest.raises(AssertionError, match="over 1,000 bytes"):
        f.answer()
    f.close()


def test_a_child_runs_llvm_while_the_parent_held_its_compile_lock_on_a_thread():
    """A fork waits for the LLVM lock a thread holds (ir.host_llvm's fork
    handlers), so the child can compile: it never inherits the lock held."""
    from popdsl.ir import host_llvm
    held = threading.Event()

    def hold():
        with host_llvm.LOCK:
            held.set()
            time.sleep(0.5)
    t = threading.Thread(target=hold)
    t.start()
    held.wait()

    def child():
        with host_llvm.LOCK:
            return host_llvm.target_machine() is not None
    f = forked.Forked(child)
    t.join()
    assert f.answer(timeout=60) is True          # a child stuck on the lock would not answer
    f.close()


def test_available_says_no_when_told(monkeypatch):
    monkeypatch.setenv("POPDSL_FORK", "0")
    assert not forked.available()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc: Linux")
def test_a_child_dies_with_its_parent():
    """A parent killed outright (SIGKILL, or SIGTERM without a handler) takes its
    child with it: nothing is left running with nobody to answer to."""
    import subprocess
    code = ("import sys, time\nfrom popdsl import forked\nf = forked.Forked(lambda: time.sleep(60))\n"
            "print(f.pid, flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    p.kill()
    p.wait()
    for _ in range(1000):                   # 10 s at most, for a loaded machine
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":     # dead, not yet reaped by init
                    break
        except FileNotFoundError:
            break
        time.sleep(0.01)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


def test_a_child_that_does_not_answer_in_time_is_killed_and_answers_none():
    f = forked.Forked(lambda: time.sleep(60))
    pid = f.pid
    t = time.perf_counter()
    assert f.answer(timeout=0.2) is None
    assert time.perf_counter() - t < 10
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    f.close()
    f = forked.Forked(lambda: 5)
    assert f.answer(timeout=30) == 5
    f.close()


def test_nothing_a_child_prints_reaches_the_parents_streams(capfd):
    def noisy():
        print("from the child")
        sys.stderr.write("warned\n")
        return 1
    f = forked.Forked(noisy)
    assert f.answer() == 1
    f.close()
    out, err = capfd.readouterr()
    assert "from the child" not in out and "warned" not in err
