"""The operation table is the definition: every element-wise row on every dtype its rule
accepts (and an error on the ones it does not), compiled and simulated, against the
reference evaluator that runs the rows' numpy references; whole example networks
against the same evaluator; and the table's own consistency."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import popdsl
from popdsl import ops
from popdsl.diagnostics import CompileError
from popdsl.ir.target import get_target
from popdsl.ops import elementwise
from popdsl.ops.evaluate import run_graph
from popdsl.pipeline import compile_source
from popdsl.passes.partition import prim_codelets

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("f32", "f16", "i32", "bool")
NP = {"f32": np.float32, "f16": np.float16, "i32": np.int32, "bool": np.bool_}


def accepts(row, dt: str) -> bool:
    rule = row.rule
    if rule == "float":
        return dt in ("f32", "f16")
    if rule == "numeric":
        return dt in ("f32", "f16", "i32")
    if rule == "int":
        return dt == "i32"
    if rule == "compare":
        return dt != "bool" or row.name in ("eq", "ne")
    return dt == "bool"


def sample(dt: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dt == "bool":
        return rng.random(shape) < 0.5
    if dt == "i32":
        v = rng.integers(-20, 20, shape).astype(np.int32)
        return np.where(v == 0, 3, v).astype(np.int32)      # a divisor of zero is a runtime error
    return rng.uniform(0.25, 3.0, shape).astype(NP[dt]) * np.where(rng.random(shape) < 0.3, -1, 1).astype(NP[dt])


def expression(row) -> str:
    if row.arity == 1:
        return "-a" if row.name == "neg" else "!a" if row.name == "not" else f"{row.name}(a)"
    return f"a {row.symbol} b" if row.symbol else f"{row.name}(a, b)"


def source(row, dt: str) -> str:
    ins = "    input a: {0}[3, 5];\n".format(dt) + ("    input b: {0}[5];\n".format(dt) if row.arity == 2 else "")
    return f"graph g(tiles = 3) {{\n{ins}    output y = {expression(row)};\n}}\n"


def compare(got: np.ndarray, want: np.ndarray, dt: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype.kind in "fc":
        tol = 2e-3 if got.dtype == np.float16 else 2e-6
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol,
                                   equal_nan=True)
    else:
        np.testing.assert_array_equal(got, want)


CASES = [(row, dt) for row in elementwise.ROWS for dt in DTYPES]


@pytest.mark.parametrize("row,dt", CASES, ids=[f"{r.name}-{d}" for r, d in CASES])
def test_elementwise_row_on_every_dtype(row, dt):
    src = source(row, dt)
    target = get_target("gc200", tiles=3)
    if not accepts(row, dt):
        with pytest.raises(CompileError) as e:
            popdsl.compile(src, tiles=3)
        assert "<string>:" in str(e.value) and "error:" in str(e.value)
        return
    feeds = {"a": sample(dt, (3, 5), 1)}
    if row.arity == 2:
        feeds["b"] = sample(dt, (5,), 2)
    want = run_graph(compile_source(src, "<string>", target, stop_after="elaborate"), feeds)["y"]
    with popdsl.Simulator(popdsl.compile(src, tiles=3)) as sim:
        got = sim.run(feeds)["y"]
    compare(got, want, dt)


@pytest.mark.parametrize("to", sorted(elementwise.CASTS))
@pytest.mark.parametrize("frm", DTYPES)
def test_casts_between_every_pair_of_dtypes(frm, to):
    src = f"graph g(tiles = 2) {{\n    input a: {frm}[7];\n    output y = {to}(a);\n}}\n"
    values = [0, 1, -1, 2.75, -3.5, 70000 if frm != "f16" else np.inf, 0.3]
    a = np.array(values).astype(NP[frm]) if frm != "bool" else np.array([True, False, True, True, False, False, True])
    want = run_graph(compile_source(src, "<string>", get_target("gc200", tiles=2), stop_after="elaborate"),
                     {"a": a})["y"]
    with popdsl.Simulator(popdsl.compile(src, tiles=2)) as sim:
        got = sim.run({"a": a})["y"]
    compare(got, want, to)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_example_networks_match_the_reference_evaluator(name):
    path = ROOT / "examples" / f"{name}.pop"
    text = path.read_text()
    graph = compile_source(text, str(path), get_target(), stop_after="elaborate")
    exe = popdsl.compile(path)
    rng = np.random.default_rng(5)
    feeds = {n: (rng.integers(0, 10, s).astype(np.int32) if d == "i32" else rng.standard_normal(s).astype(np.float32))
             for n, (d, s) in exe.inputs.items()}
    want = run_graph(graph, feeds)
    with popdsl.Simulator(exe) as sim:
        got = sim.run(feeds)
    assert set(got) == set(want)
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_the_table_is_complete():
    """Every operation has a reference and, unless the partitioner fuses or views it,
    a partition rule; the codelets a rule names exist; every function is documented
    and its overloads can all be reached."""
    prims = prim_codelets()
    for name, entry in ops.OPS.items():
        assert entry.doc, name
        if entry.kind in ("compute", "view"):
            assert entry.ref is not None and entry.partition is not None, name
        if entry.kind == "elementwise" and name != "call":
            assert entry.ref is not None and entry.emit is not None, name
        for c in entry.codelets:
            assert c in prims, (name, c)
    for name, overloads in ops.FUNCTIONS.items():
        for f in overloads:
            assert f.doc and f.params, name
    assert ops.function("max", 1, set()).params[0].name == "x"          # a reduction
    assert ops.function("max", 2, set()).params[0].name == "a"          # element-wise
    assert ops.function("max", 0, {"a", "b"}).params[0].name == "a"


def test_an_operand_used_twice_by_an_op_is_computed_once():
    """square(a + b) fuses into one codelet that adds once, into a local, and squares it."""
    src = "graph g(tiles = 2) {\n    input a: f32[8];\n    input b: f32[8];\n    output y = square(a + b);\n}\n"
    graph = compile_source(src, "<string>", get_target("gc200", tiles=2), stop_after="partition")
    fused = [c for n, c in graph.codelets.items() if n.startswith("ew_")]
    assert len(fused) == 1
    text = repr(fused[0].body)
    assert text.count("Binary(op='+'") == 1 and "Declare(name='t0'" in text
    a, b = np.arange(8, dtype=np.float32), np.ones(8, np.float32)
    with popdsl.Simulator(popdsl.compile(src)) as sim:
        np.testing.assert_array_equal(sim.run({"a": a, "b": b})["y"], (a + b) ** 2)


def test_leaky_relu_takes_its_slope_and_erf_matches_math():
    """The two rows added as table entries only: leaky_relu's compile-time slope
    (default 0.01, PyTorch's) and erf through the libm intrinsic."""
    import math
    src = ("graph g(tiles = 2) {\n    input x: f32[9];\n    output a = leaky_relu(x);\n"
           "    output b = leaky_relu(x, alpha = 0.2);\n    output c = erf(x);\n}\n")
    x = np.linspace(-3, 3, 9).astype(np.float32)
    with popdsl.Simulator(popdsl.compile(src)) as sim:
        out = sim.run({"x": x})
    np.testing.assert_allclose(out["a"], np.where(x > 0, x, 0.01 * x), rtol=1e-6)
    np.testing.assert_allclose(out["b"], np.where(x > 0, x, 0.2 * x), rtol=1e-6)
    np.testing.assert_allclose(out["c"], [math.erf(v) for v in x], rtol=1e-6, atol=1e-7)
    with pytest.raises(CompileError, match="'alpha' must be a number"):
        popdsl.compile(src.replace("alpha = 0.2", "alpha = x"))


def test_erf_in_a_codelet():
    from popdsl.ir.codelet_eval import map_elements
    from popdsl.sema import compile_codelets
    from popdsl.codegen.jit import NativeCodelets
    [c] = compile_codelets("codelet e(x: f32) -> f32 { return erf(x) * 2.0; }")
    x = np.linspace(-2, 2, 11).astype(np.float32)
    native, ref = np.zeros_like(x), np.zeros_like(x)
    NativeCodelets([c]).map("e", native, x)
    map_elements(c, ref, x)
    np.testing.assert_allclose(native, ref, rtol=1e-6)
