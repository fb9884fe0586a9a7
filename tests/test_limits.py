"""A way out of every loop: the cycle budget of a vertex (`--max-cycles`, the same
stopping point natively and in the reference evaluator), Ctrl-C while native code
runs (exit 130), compile-time budgets that name their flag, the largest source,
and diagnostics that stay short on very long lines."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from popdsl import cli
from popdsl.codegen.jit import NativeCodelets, aligned_zeros
from popdsl.diagnostics import Diagnostic, SourceMap, Span
from popdsl.ir import cost
from popdsl.ir.codelet import ERR_CYCLES
from popdsl.limits import MAX_SOURCE_BYTES
from test_codegen import Vertices, assert_same, both, pop

ROOT = Path(__file__).resolve().parent.parent


def popc(*argv):
    import contextlib
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    assert "Traceback" not in out.getvalue() + err.getvalue()
    assert "internal compiler error" not in err.getvalue(), err.getvalue()
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- the cycle budget

# Every kind of check point: while tests, loops of loops (after every 16th
# iteration, also one ended by `continue`), short straight inner loops and loops
# without inner loops (no check; see LONG for long ones).
BUDGETED = """
codelet Budgeted(inout x: i32[n], k: i32) {
    var w: i32 = 0;
    while w < k { x[0] += 1; w += 1; }
    for i in 0..n { for j in 0..k { x[i] += j; } }
    for i in 0..n { if i == 1 { continue; } for j in 0..k { x[i] += 1; } }
    for i in 0..n { if x[i] > 5 { x[i] -= 1; } else { continue; } }
    for i in 0..n step 2 {
        if i == 2 { continue; }
        for j in 0..n { if j == k { break; } x[j] += 1; }
    }
    var s: i32 = 0;
    while true { s += 1; if s > k { break; } }
}
"""


def _rows(sizes):
    return [{"x": np.arange(n, dtype=np.int32), "k": k, "n": n} for n, k in sizes]


def test_budget_not_reached_changes_nothing():
    cs = list(pop(BUDGETED).values())
    vs = Vertices(cs[0], _rows([(5, 3), (1, 0), (7, 9)]))
    mj, mr, cj, cr, ej, er = both(cs, "Budgeted", vs)
    assert ej is None and er is None
    assert_same(vs, mj, mr, cj, cr, ej, er)
    # The same counts with a budget exactly at each vertex's total.
    for row in range(3):
        *_, ej, er = both(cs, "Budgeted", vs, begin=row, end=row + 1, max_cycles=int(cj[row]))
        assert ej is None and er is None


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 7), st.integers(0, 9)), min_size=1, max_size=3),
       budget=st.integers(0, 400))
def test_jit_and_reference_stop_at_the_same_point(sizes, budget):
    """Over budget, both stop at the same check point: the same vertex, the same
    count, the same memory (stores before the stop done, after it not)."""
    cs = list(pop(BUDGETED).values())
    vs = Vertices(cs[0], _rows(sizes))
    mj, mr, cj, cr, ej, er = both(cs, "Budgeted", vs, max_cycles=budget)
    assert_same(vs, mj, mr, cj, cr, ej, er)
    if ej is not None:
        assert ej.kind == ERR_CYCLES and ej.size == budget and ej.index > budget


# Loops of 2^16 trips or more are checked: straight ones on entry (after their
# whole cost is charged), others on exit (also after `break`).
LONG = """
codelet Long(inout x: i32[n], k: i32) {
    for i in 0..k { x[0] += 1; }
    for i in 0..k { if i == n { break; } x[1] += 1; }
}
"""


@pytest.mark.parametrize("k, budget, stop", [
    (65535, "overhead", None),          # short loops: never checked
    (65536, "overhead", "entry"),       # long straight loop: stops before it starts
    (65536, "total-1", "exit"),         # long loop left by `break`: checked as it ends
    (65536, "total", None),
])
def test_long_loops_are_checked_at_the_same_point(k, budget, stop):
    cs = list(pop(LONG).values())
    vs = Vertices(cs[0], _rows([(4, k)]))
    full = np.zeros(1, np.int64)
    mem = aligned_zeros(vs.mem.size)
    mem[:] = vs.mem
    NativeCodelets(cs).run("Long", mem, vs.table, 0, 1, full)
    limit = {"overhead": cost.VERTEX_OVERHEAD, "total-1": int(full[0]) - 1, "total": int(full[0])}[budget]
    mj, mr, cj, cr, ej, er = both(cs, "Long", vs, max_cycles=limit)
    assert_same(vs, mj, mr, cj, cr, ej, er)
    if stop is None:
        assert ej is None
    else:
        assert ej.kind == ERR_CYCLES
        assert vs.get(mj, 0, "x")[0] == (0 if stop == "entry" else k)


def test_huge_straight_loop_stops_before_it_starts():
    """A straight loop's whole cost is charged on entry: 2^31 iterations over a
    budget of a thousand stop at once, memory untouched."""
    cs = list(pop("codelet Big(inout x: f32[n]) { for i in 0..2147483647 { x[0] += 1.0; } }").values())
    vs = Vertices(cs[0], [{"x": np.zeros(2, np.float32), "n": 2}])
    t = time.perf_counter()
    mj, mr, cj, cr, ej, er = both(cs, "Big", vs, max_cycles=1000)
    assert time.perf_counter() - t < 30
    assert ej.key() == er.key() == (ERR_CYCLES, 0, "", -1, ej.index, 1000)
    assert ej.index > 2**31
    assert_same(vs, mj, mr, cj, cr, ej, er)
    assert vs.get(mj, 0, "x")[0] == 0


SPIN = """\
codelet Spin(inout x: f32[n]) {
    var go: bool = true;
    while go { x[0] = x[0] + 1.0; }
}
codelet Nest(inout x: f32[n]) {
    for i in 0..1000000 { for j in 0..1000000 { x[0] = x[0] + 1.0; } }
}
graph g(tiles = 2) {
    var v: f32[4];
    map v -> linear;
    compute quick { Nest(x = v[0:2]) on tile 0; }
    compute spin { Spin(x = v[2:4]) on tile 1; }
    program { print v; execute WHICH; }
}
"""


def _spin(tmp_path, which: str) -> Path:
    p = tmp_path / f"{which}.pop"
    p.write_text(SPIN.replace("WHICH", which))
    return p


def test_max_cycles_stops_a_runaway_vertex_and_names_it(tmp_path):
    code, _, err = popc("run", _spin(tmp_path, "spin"), "--max-cycles", "1000000")
    assert code == 1
    assert "error: vertex ran more than 1,000,000 cycles" in err
    assert "in codelet Spin, vertex 0 of compute set 'spin', on tile 1" in err
    assert "--max-cycles" in err
    code, _, err = popc("run", _spin(tmp_path, "spin"), "--max-cycles", "0")
    assert code == 2


def test_default_budget_stops_a_trillion_iterations(tmp_path):
    t = time.perf_counter()
    code, _, err = popc("run", _spin(tmp_path, "quick"))
    assert code == 1 and "vertex ran more than 10,000,000,000 cycles" in err and "codelet Nest" in err
    assert time.perf_counter() - t < 120


ENDLESS = """\
codelet Bump(inout c: i32) { c += 1; }

graph endless(tiles = 2) {
    var going: bool = true;
    var count: i32 = 0;
    map going -> tile 0;
    map count -> tile 1;
    compute bump { Bump(c = count) on tile 1; }
    program {
        while going { BODY }
    }
    output count;
}
"""


@pytest.mark.parametrize("body", ["execute bump;", ""], ids=["vertices", "empty"])
def test_max_cycles_stops_a_device_while_loop_that_never_ends(tmp_path, body):
    """No vertex runs long, the loop does: the step's cycles (a test of the condition
    counting one at least) meet the same budget, and the error points at the condition."""
    p = tmp_path / "endless.pop"
    p.write_text(ENDLESS.replace("BODY", body))
    t = time.perf_counter()
    code, _, err = popc("run", p, "--max-cycles", "200000")
    assert code == 1, err
    assert f"{p}:4:5: error: a device while loop on 'going' ran more than 200,000 cycles" in err
    assert "--max-cycles" in err and time.perf_counter() - t < 60


def test_partition_report_honours_max_cycles(tmp_path):
    code, _, err = popc("report", _spin(tmp_path, "spin"), "--partition", "--max-cycles", "5000")
    assert code == 1 and "more than 5,000 cycles" in err


# ---------------------------------------------------------------- Ctrl-C

@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("threads", ["1", "2"])
def test_ctrl_c_stops_a_running_codelet(tmp_path, threads):
    """`while true` in native code, no cycle limit in sight: SIGINT ends the run
    within seconds with exit 130."""
    popx = tmp_path / "spin.popx"
    assert popc("build", _spin(tmp_path, "spin"), "-o", popx)[0] == 0
    # SIG_DFL in the child: a shell without job control starts background commands
    # with SIGINT ignored, the child inherits that, and Python then installs no
    # handler (popc rightly ignores Ctrl-C there; the test would time out).
    # -X faulthandler: if the run does not stop, SIGABRT makes it print every thread's
    # stack, which the failure shows.
    proc = subprocess.Popen([sys.executable, "-u", "-X", "faulthandler", "-m", "popdsl", "run", str(popx),
                             "--threads", threads, "--max-cycles", str(1 << 60)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().startswith("v: ")        # the program reached the spinning vertex
        time.sleep(0.5)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        t = time.perf_counter()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            pytest.fail("SIGINT did not stop the run in 30 s; its threads:\n" + proc.communicate(timeout=30)[1])
        assert time.perf_counter() - t < 10
    finally:
        proc.kill()
    assert code == 130, proc.stderr.read()
    assert "popc: interrupted" in proc.stderr.read()


def test_api_stop_request_interrupts_native_code(tmp_path):
    """The mechanism without signals: a stop request from another thread ends a
    native call in progress (KeyboardInterrupt); the next run starts clean."""
    import threading
    import popdsl
    from popdsl.codegen import jit
    exe = popdsl.compile(_spin(tmp_path, "spin"))
    with popdsl.Simulator(exe, max_cycles=1 << 60, out=io.StringIO()) as sim:
        threading.Timer(0.5, jit.request_stop).start()
        with pytest.raises(KeyboardInterrupt):
            sim.run()
    quick = popdsl.compile(tmp_path.joinpath("ok.pop").write_text(
        SPIN.replace("WHICH", "quick").replace("1000000", "10")) and tmp_path / "ok.pop")
    with popdsl.Simulator(quick, out=io.StringIO()) as sim:
        sim.run()


# ---------------------------------------------------------------- compile-time budgets

@pytest.mark.parametrize("source, message", [
    ("graph g(tiles = 2) {\n    for i in 0..2147483648 { }\n}\n", "compile-time steps"),
    ("def f(x: f32[N], d: int) -> f32[N] {\n    if d == 0 { return x + 1.0; }\n"
     "    return f(x, d - 1) * f(x + 2.0, d - 1);\n}\n"
     "graph g(tiles = 2) {\n    var v: f32[4] = 1;\n    output o = f(v, 40);\n}\n", "compile-time steps"),
])
def test_default_budgets_stop_runaway_graph_programs_in_seconds(tmp_path, source, message):
    p = tmp_path / "loop.pop"
    p.write_text(source)
    t = time.perf_counter()
    code, _, err = popc("check", p)
    assert code == 1 and message in err and "--max-unroll" in err
    assert time.perf_counter() - t < 60


@pytest.mark.parametrize("source, flag, message", [
    ("graph g(tiles = 2) { for i in 0..100 { for j in 0..100 { } } }", "--max-unroll 5000",
     "compile-time steps (loop iterations; a def call counts 64): more than 5,000"),
    ("def f(x: f32[N]) -> f32[N] {\n let y = x;\n for i in 0..300 { y = y + 1.0; }\n return y;\n}\n"
     "graph g(tiles = 2) { var v: f32[4] = 1; map v -> linear; output o = f(v); }", "--max-ops 100",
     "tensor operations built (in loops): more than 100"),
    ("codelet S(inout x: f32[n]) { for i in 0..n { x[i] = 1.0; } }\n"
     "graph g(tiles = 2) { var v: f32[50]; map v -> tile 0;\n"
     "  compute c { for i in 0..50 { S(x = v[i:i+1]) on tile 0; } } }",
     "--max-vertices 20", "vertices placed: more than 20"),
    ("import \"popnn\";\ngraph g(tiles = 64) { var x: f32[64, 64] = 1; var w: f32[64, 64] = 1;\n"
     " map x -> linear; map w -> linear; output o = x @ w; }", "--max-vertices 10",
     "vertices after partitioning: more than 10"),
])
def test_budget_flags(tmp_path, source, flag, message):
    p = tmp_path / "b.pop"
    p.write_text(source)
    code, _, err = popc("check", p, *flag.split())
    assert code == 1 and message in err and flag.split()[0] in err, err
    code, _, err = popc("check", p, flag.split()[0], "100000000")
    assert code == 0, err


def test_source_size_limit(tmp_path):
    p = tmp_path / "big.pop"
    p.write_text("// " + "x" * MAX_SOURCE_BYTES + "\ngraph g(tiles = 1) { }\n")
    t = time.perf_counter()
    code, _, err = popc("check", p)
    assert code == 1 and f"popc compiles sources of at most {MAX_SOURCE_BYTES:,} bytes" in err
    assert time.perf_counter() - t < 5
    import popdsl
    from popdsl.diagnostics import CompileError
    with pytest.raises(CompileError, match="at most"):
        popdsl.compile(p.read_text())


# ---------------------------------------------------------------- long lines

def test_long_line_is_cut_around_the_caret():
    line = "a" * 5000 + "BAD" + "b" * 5000
    SourceMap.add("long.pop", line + "\n")
    out = Diagnostic(Span("long.pop", 1, 5001, 1, 5004), "here").render().splitlines()
    assert all(len(x) < 120 for x in out)
    text, caret = out[1], out[2]
    assert text.startswith("  ...") and text.endswith("...")
    at = caret.index("^")
    assert text[at:at + 3] == "BAD" and caret[at:] == "^~~"


@pytest.mark.parametrize("col, width", [(1, 1), (3, 10000), (9990, 5), (10001, 1)])
def test_caret_stays_on_its_column_at_both_ends(col, width):
    line = "".join(chr(ord("a") + i % 26) for i in range(10000))
    SourceMap.add("ends.pop", line)
    text, caret = Diagnostic(Span("ends.pop", 1, col, 1, col + width), "x").render().splitlines()[1:3]
    at = caret.index("^")
    if col <= len(line):
        assert text[at] == line[col - 1]
    assert len(caret) <= len(text) + 1


def test_deep_nesting_error_is_short(tmp_path):
    p = tmp_path / "deep.pop"
    n = 30_000
    p.write_text("codelet A(out y: f32) { y = " + "(" * n + "1.0" + ")" * n + "; }\n")
    code, _, err = popc("check", p)
    assert code == 1 and "nested too deeply" in err and len(err) < 1000
