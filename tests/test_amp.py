"""The accumulating matrix product, `amp(...)` in codelets (`ir.codelet.Amp`): native
code against the reference evaluator (bit for bit without FMA contraction) and both
against numpy, on random blocks, origins, steps and operand types; its bounds checks,
its cycle charge (`ir.cost.amp_cycles`) and its budget check point; and the stdlib's
AMP vertices costed by the partitioner exactly as the model charges them."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from popdsl.ir import codelet_eval as ev
from popdsl.ir import cost
from popdsl.ir.codelet import ERR_BOUNDS, ERR_CYCLES
from popdsl.ops import conv_grad, linalg
from popdsl.ops.conv import conv_vertex_cycles
from tests.test_codegen import PRIMS, Vertices, _cache, assert_same, both, pop  # noqa: F401 - _cache is a fixture

AMP = """
codelet Amp{T}(in a: {T}[ra, ca], in b: {T}[rb, cb], inout c: f32[rc, cc],
               ci: i32, cj: i32, ai: i32, aj: i32, bi: i32, bj: i32,
               mm: i32, kk: i32, nn: i32, sa: i32, sb: i32) {{
    amp(c[ci, cj], a[ai, aj], b[bi, bj], mm, kk, nn, sa, sb);
}}
"""
CODELETS = {t: pop(AMP.format(T=t))[f"Amp{t}"] for t in ("f32", "f16")}
# Every form: amp, amp_at (a read transposed), amp_bt (b read transposed), with a
# column step for c.
FORMS = """
codelet {NAME}{T}(in a: {T}[ra, ca], in b: {T}[rb, cb], inout c: f32[rc, cc],
               ci: i32, cj: i32, ai: i32, aj: i32, bi: i32, bj: i32,
               mm: i32, kk: i32, nn: i32, sa: i32, sb: i32, sc: i32) {{
    {NAME}(c[ci, cj], a[ai, aj], b[bi, bj], mm, kk, nn, sa, sb, sc);
}}
"""
FORM_CODELETS = {(f, t): pop(FORMS.format(NAME=f, T=t))[f"{f}{t}"]
                 for f in ("amp", "amp_at", "amp_bt") for t in ("f32", "f16")}


def expected(r, form="amp"):
    """What amp leaves in c, from numpy (float64 sums of the f32 products)."""
    c = r["c"].astype(np.float64)
    p, q, k = np.arange(r["mm"]), np.arange(r["nn"]), np.arange(r["kk"])
    a, b = r["a"].astype(np.float64), r["b"].astype(np.float64)
    if form == "amp_at":
        a = a[np.ix_(r["ai"] + k, r["aj"] + p * r["sa"])].T
    else:
        a = a[np.ix_(r["ai"] + p, r["aj"] + k * r["sa"])]
    if form == "amp_bt":
        b = b[np.ix_(r["bi"] + q, r["bj"] + k * r["sb"])].T
    else:
        b = b[np.ix_(r["bi"] + k, r["bj"] + q * r["sb"])]
    # np.add.at: a column step of 0 adds a row's columns into one element.
    np.add.at(c, np.ix_(r["ci"] + p, r["cj"] + q * r.get("sc", 1)), a @ b)
    return c


def row(rng, t, m, k, n, sa, sb, pad, form="amp", sc=1):
    """A vertex whose operands hold the block at random origins inside bigger fields."""
    o = rng.integers(0, pad + 1, 6)
    t = {"f32": np.float32, "f16": np.float16}[t]
    a_rows, a_cols = (k, m) if form == "amp_at" else (m, k)
    b_rows, b_cols = (n, k) if form == "amp_bt" else (k, n)
    a = rng.standard_normal((o[2] + a_rows + pad, o[3] + (a_cols - 1) * sa + 1 + pad)).astype(t)
    b = rng.standard_normal((o[4] + b_rows + pad, o[5] + (b_cols - 1) * sb + 1 + pad)).astype(t)
    c = rng.standard_normal((o[0] + m + pad, o[1] + (n - 1) * sc + 1 + pad)).astype(np.float32)
    return {"a": a, "b": b, "c": c, "ra": a.shape[0], "ca": a.shape[1], "rb": b.shape[0], "cb": b.shape[1],
            "rc": c.shape[0], "cc": c.shape[1], "ci": o[0], "cj": o[1], "ai": o[2], "aj": o[3],
            "bi": o[4], "bj": o[5], "mm": m, "kk": k, "nn": n, "sa": sa, "sb": sb, "sc": sc}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=st.sampled_from(["f32", "f16"]), m=st.integers(1, 19), k=st.integers(1, 19), n=st.integers(1, 21),
       sa=st.integers(1, 3), sb=st.integers(1, 3), pad=st.integers(0, 3), vertices=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_amp_matches_reference_bit_for_bit_and_numpy(t, m, k, n, sa, sb, pad, vertices, seed):
    rng = np.random.default_rng(seed)
    rows = [row(rng, t, m, k, n, sa, sb, pad) for _ in range(vertices)]
    vs = Vertices(CODELETS[t], rows)
    mj, mr, cj, cr, ej, er = both([CODELETS[t]], f"Amp{t}", vs, contract=False)
    assert ej is None and er is None
    np.testing.assert_array_equal(mj, mr)
    np.testing.assert_array_equal(cj, cr)
    for v, r in enumerate(rows):
        np.testing.assert_allclose(vs.get(mj, v, "c"), expected(r), rtol=1e-4, atol=1e-4 * k)
        operands = cost.stmt_cost(CODELETS[t].body[0])          # the 11 state loads
        assert cj[v] == cost.VERTEX_OVERHEAD + operands + cost.amp_cycles(m, k, n, t)
    # With FMA contraction (how the simulator runs it) the results agree closely.
    assert_same(vs, *both([CODELETS[t]], f"Amp{t}", vs), rtol=1e-4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(form=st.sampled_from(["amp", "amp_at", "amp_bt"]), t=st.sampled_from(["f32", "f16"]),
       m=st.integers(1, 13), k=st.integers(1, 13), n=st.integers(1, 13), sa=st.integers(1, 3),
       sb=st.integers(1, 3), sc=st.integers(0, 3), pad=st.integers(0, 2), vertices=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_transposed_forms_and_column_steps_match_reference_and_numpy(form, t, m, k, n, sa, sb, sc, pad,
                                                                     vertices, seed):
    rng = np.random.default_rng(seed)
    rows = [row(rng, t, m, k, n, sa, sb, pad, form, sc) for _ in range(vertices)]
    c = FORM_CODELETS[form, t]
    vs = Vertices(c, rows)
    mj, mr, cj, cr, ej, er = both([c], c.name, vs, contract=False)
    assert ej is None and er is None
    np.testing.assert_array_equal(mj, mr)
    np.testing.assert_array_equal(cj, cr)
    for v, r in enumerate(rows):
        np.testing.assert_allclose(vs.get(mj, v, "c"), expected(r, form), rtol=1e-4, atol=1e-4 * k * n)
        assert cj[v] == cost.VERTEX_OVERHEAD + cost.stmt_cost(c.body[0]) + cost.amp_cycles(m, k, n, t)


@pytest.mark.parametrize("form, change, key", [
    # m, k, n = 3, 4, 5; each field just holds its block.
    ("amp_at", {"sa": 2}, ("a", 1, 4, 3)),     # a's last column: (m - 1) * 2; a has m columns
    ("amp_at", {"ai": 1}, ("a", 0, 4, 4)),     # a's last row: 1 + k - 1; a has k rows
    ("amp_bt", {"sb": 2}, ("b", 1, 6, 4)),     # b's last column: (k - 1) * 2; b has k columns
    ("amp_bt", {"bi": 1}, ("b", 0, 5, 5)),     # b's last row: 1 + n - 1; b has n rows
    ("amp", {"sc": 2}, ("c", 1, 8, 5)),        # c's last column: (n - 1) * 2; c has n columns
])
def test_transposed_forms_check_the_corners_they_read(form, change, key):
    rng = np.random.default_rng(1)
    r = row(rng, "f32", 3, 4, 5, 1, 1, 0, form)
    r.update(change)
    c = FORM_CODELETS[form, "f32"]
    vs = Vertices(c, [r])
    mj, mr, cj, cr, ej, er = both([c], c.name, vs)
    assert ej.key() == er.key() == (ERR_BOUNDS, 0, *key)
    np.testing.assert_array_equal(vs.get(mj, 0, "c"), r["c"])          # nothing written


def test_amp_cycles_follow_the_gc200_amp():
    # A pass of an 8 x 8 f32 block: PopLibs' 23 cycles of set-up, a sixth of the
    # supervisor's load of the block (256 B at 8 B a cycle, + 15), then 4 cycles a column.
    assert cost.amp_cycles(8, 8, 100, "f32") == 23 + -(-(32 + 15) // 6) + 400
    assert cost.amp_cycles(9, 8, 100, "f32") == 2 * cost.amp_cycles(8, 8, 100, "f32")
    assert cost.amp_cycles(8, 17, 100, "f32") == 3 * cost.amp_cycles(8, 8, 100, "f32")
    assert cost.amp_cycles(16, 16, 100, "f16") == 23 + -(-(64 + 15) // 6) + 400
    # On six workers, long streams reach the GC200's peak: 16 f32 or 64 f16 MACs a cycle.
    for dtype, peak in (("f32", 16), ("f16", 64)):
        m = k = 64
        n = 100_000
        tile_cycles = cost.amp_cycles(m, k, n, dtype)        # six such vertices, one per worker
        assert 6 * m * k * n / (6 * tile_cycles) == pytest.approx(peak, rel=0.01)


@pytest.mark.parametrize("sizes", [(0, 3, 3), (3, 0, 3), (3, 3, 0), (-1, 3, 3)])
def test_amp_with_a_size_below_one_does_nothing_and_checks_nothing(sizes):
    rng = np.random.default_rng(0)
    r = row(rng, "f32", 2, 2, 2, 1, 1, 0)
    r.update(mm=sizes[0], kk=sizes[1], nn=sizes[2], ci=99, aj=-5)      # origins outside, unused
    vs = Vertices(CODELETS["f32"], [r])
    mj, mr, cj, cr, ej, er = both([CODELETS["f32"]], "Ampf32", vs)
    assert ej is None and er is None
    np.testing.assert_array_equal(vs.get(mj, 0, "c"), r["c"])
    assert cj[0] == cr[0] == cost.VERTEX_OVERHEAD + cost.stmt_cost(CODELETS["f32"].body[0])


@pytest.mark.parametrize("change, key", [
    ({"ci": 1}, ("c", 0, 3, 3)),             # last row of c: 1 + 3 - 1 = 3, c has 3 rows
    ({"cj": -1}, ("c", 1, -1, 4)),           # first column of c
    ({"sa": 2}, ("a", 1, 4, 3)),             # a's last column: (3 - 1) * 2
    ({"bj": 2, "sb": 1}, ("b", 1, 5, 4)),    # b's last column: 2 + 4 - 1
    ({"bi": 1}, ("b", 0, 3, 3)),
])
def test_amp_checks_the_corners_of_every_operand(change, key):
    rng = np.random.default_rng(1)
    r = row(rng, "f32", 3, 3, 4, 1, 1, 0)
    r.update(change)
    vs = Vertices(CODELETS["f32"], [r])
    mj, mr, cj, cr, ej, er = both([CODELETS["f32"]], "Ampf32", vs)
    assert ej.key() == er.key() == (ERR_BOUNDS, 0, *key)
    np.testing.assert_array_equal(vs.get(mj, 0, "c"), r["c"])          # nothing written


def test_amp_over_the_cycle_budget_stops_before_it_computes():
    rng = np.random.default_rng(2)
    r = row(rng, "f32", 16, 16, 16, 1, 1, 0)
    vs = Vertices(CODELETS["f32"], [r])
    budget = cost.VERTEX_OVERHEAD + cost.stmt_cost(CODELETS["f32"].body[0]) + cost.amp_cycles(16, 16, 16, "f32") - 1
    mj, mr, cj, cr, ej, er = both([CODELETS["f32"]], "Ampf32", vs, max_cycles=budget)
    assert ej.key() == er.key()
    assert ej.key()[0] == ERR_CYCLES
    np.testing.assert_array_equal(vs.get(mj, 0, "c"), r["c"])


def test_amp_in_a_loop_builds_a_matmul_of_row_blocks():
    # Blocks of 8 rows, as a vertex feeding an 8-row AMP would issue them.
    cs = pop("""
codelet Blocked(in a: f32[m, k], in b: f32[k, n], out c: f32[m, n]) {
    for i in 0..m { for j in 0..n { c[i, j] = 0.0; } }
    for i in 0..m step 8 {
        amp(c[i, 0], a[i, 0], b[0, 0], min(8, m - i), k, n);
    }
}""")
    rng = np.random.default_rng(3)
    rows = [{"a": rng.standard_normal((m, 5)).astype(np.float32), "b": rng.standard_normal((5, 6)).astype(np.float32),
             "c": np.full((m, 6), np.nan, np.float32), "m": m, "k": 5, "n": 6} for m in (1, 8, 13)]
    vs = Vertices(cs["Blocked"], rows)
    mj, mr, cj, cr, ej, er = both(list(cs.values()), "Blocked", vs)
    assert_same(vs, mj, mr, cj, cr, ej, er, rtol=1e-5)
    for v, r in enumerate(rows):
        np.testing.assert_allclose(vs.get(mj, v, "c"), r["a"] @ r["b"], rtol=1e-5, atol=1e-5)



# ---------------------------------------------------------------- the partitioner's costs

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(o=st.integers(1, 20), c=st.integers(1, 20), rb=st.integers(1, 4), ow=st.integers(1, 9),
       kh=st.integers(1, 3), kw=st.integers(1, 3), s=st.integers(1, 2), ox=st.integers(0, 3))
def test_the_partitioner_costs_a_conv_vertex_as_the_model_charges_it(o, c, rb, ow, kh, kw, s, ox):
    wp = (ox + ow - 1) * s + kw
    rin = (rb - 1) * s + kh
    rng = np.random.default_rng(0)
    x = rng.standard_normal((c, rin, wp)).astype(np.float32)
    w = rng.standard_normal((o, c, kh, kw)).astype(np.float32)
    r = {"x": x.reshape(c, -1), "w": w.reshape(o, -1), "y": np.full((o, rb * ow), np.nan, np.float32),
         "kh": kh, "kw": kw, "s": s, "wp": wp, "ow": ow, "ox": ox,
         "c": c, "xs": rin * wp, "o": o, "ckk": c * kh * kw, "ys": rb * ow}
    vs = Vertices(PRIMS["Conv2dBlock"], [r])
    mem, cyc = vs.mem.copy(), np.zeros(1, np.int64)
    ev.run_vertices(PRIMS["Conv2dBlock"], mem, vs.table, 0, 1, cyc, {})
    assert cyc[0] == conv_vertex_cycles(o, c, rb, ow, kh, kw)
    # And it computes the convolution's output columns ox..ox+ow of its rows.
    win = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), (kh, kw), axis=(1, 2))[:, ::s, ::s]
    want = np.einsum("cyxij,ocij->oyx", win, w.astype(np.float64))[:, :rb, ox:ox + ow].reshape(o, -1)
    np.testing.assert_allclose(vs.get(mem, 0, "y"), want, rtol=1e-4, atol=1e-4 * c * kh * kw)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 20), k=st.integers(1, 20), p=st.integers(1, 20))
def test_the_partitioner_costs_a_matmul_vertex_as_the_model_charges_it(m, k, p):
    r = {"a": np.ones((m, k), np.float32), "b": np.ones((k, p), np.float32), "c": np.zeros((m, p), np.float32),
         "m": m, "k": k, "p": p}
    vs = Vertices(PRIMS["MatMul"], [r])
    cyc = np.zeros(1, np.int64)
    ev.run_vertices(PRIMS["MatMul"], vs.mem.copy(), vs.table, 0, 1, cyc, {})
    assert cyc[0] == linalg.vertex_cycles(m, k, p)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(o=st.integers(1, 12), c=st.integers(1, 12), nb=st.integers(1, 2), oh=st.integers(1, 4),
       ow=st.integers(1, 7), kh=st.integers(1, 3), kw=st.integers(1, 3), s=st.integers(1, 2))
def test_the_backward_conv_vertices_compute_their_gradients_as_costed(o, c, nb, oh, ow, kh, kw, s):
    """Conv2dGradX (amp_at) and Conv2dGradW (amp_bt) against numpy, their cycles as
    `conv_grad.grad_x_vertex_cycles` / `grad_w_vertex_cycles` say."""
    wp, hp = (ow - 1) * s + kw, (oh - 1) * s + kh
    rng = np.random.default_rng(o * 1000 + c)
    x = rng.standard_normal((nb, c, hp, wp)).astype(np.float32)
    w = rng.standard_normal((o, c, kh, kw)).astype(np.float32)
    gr = rng.standard_normal((nb, o, oh, ow)).astype(np.float32)
    # The gradients in float64: every window's products, added where they came from.
    dx = np.zeros((c, hp, wp))
    dw = np.zeros((o, c, kh, kw))
    for ky in range(kh):
        for kx in range(kw):
            win = x[:, :, ky:ky + (oh - 1) * s + 1:s, kx:kx + (ow - 1) * s + 1:s].astype(np.float64)
            dx[:, ky:ky + (oh - 1) * s + 1:s, kx:kx + (ow - 1) * s + 1:s] += np.einsum(
                "oc,oyx->cyx", w[:, :, ky, kx].astype(np.float64), gr[0].astype(np.float64))
            dw[:, :, ky, kx] = np.einsum("noyx,ncyx->oc", gr.astype(np.float64), win)
    rx = {"g": gr[0].reshape(o, -1), "w": w.reshape(o, -1), "dx": np.full((c, hp * wp), np.nan, np.float32),
          "kh": kh, "kw": kw, "s": s, "wp": wp, "ow": ow,
          "o": o, "ys": oh * ow, "ckk": c * kh * kw, "c": c, "xs": hp * wp}
    rw = {"x": x.reshape(nb * c, -1), "g": gr.reshape(nb * o, -1), "dw": np.full((o, c * kh * kw), np.nan, np.float32),
          "kh": kh, "kw": kw, "s": s, "wp": wp, "ow": ow,
          "r": nb * c, "xs": hp * wp, "q": nb * o, "ys": oh * ow, "o": o, "ckk": c * kh * kw}
    for name, r, field, want, cycles in (
            ("Conv2dGradX", rx, "dx", dx.reshape(c, -1), conv_grad.grad_x_vertex_cycles(o, c, oh, ow, kh, kw, s)),
            ("Conv2dGradW", rw, "dw", dw.reshape(o, -1), conv_grad.grad_w_vertex_cycles(o, c, nb, oh, ow, kh, kw, s))):
        vs = Vertices(PRIMS[name], [r])
        mem, cyc = vs.mem.copy(), np.zeros(1, np.int64)
        ev.run_vertices(PRIMS[name], mem, vs.table, 0, 1, cyc, {})
        assert cyc[0] == cycles, name
        np.testing.assert_allclose(vs.get(mem, 0, field), want, rtol=1e-4, atol=1e-4 * o * c * kh * kw * nb, err_msg=name)


@pytest.mark.parametrize("k, s", [(2, 2), (3, 2), (3, 1), (5, 1)])
def test_a_max_pool_gradient_vertex_costs_about_what_its_plan_assumes(k, s):
    """MaxPoolGradRows over one block of padded rows (starting `off` rows into the
    x rows its windows read) against numpy, and its cycles per window element near
    `conv_grad._POOL_GRAD_CYCLES`, which plans its tasks (within a factor of two:
    the count depends on how often a window's maximum moves)."""
    c, oh, ow = 2, 6, 7
    wp, xr = (ow - 1) * s + k, (oh - 1) * s + k
    off, rows = 1, xr - 2                      # the block: x rows [1, xr - 1)
    rng = np.random.default_rng(k * 10 + s)
    x = rng.permutation(c * xr * wp).reshape(c, xr, wp).astype(np.float32)
    gr = rng.standard_normal((c, oh, ow)).astype(np.float32)
    want = np.zeros((c, xr, wp))
    for ci in range(c):
        for oy in range(oh):
            for ox in range(ow):
                win = x[ci, oy * s:oy * s + k, ox * s:ox * s + k]
                ky, kx = np.unravel_index(int(np.argmax(win)), win.shape)
                want[ci, oy * s + ky, ox * s + kx] += gr[ci, oy, ox]
    r = {"x": x.reshape(c, -1), "g": gr.reshape(c, -1), "dx": np.full((c, rows * wp), np.nan, np.float32),
         "k": k, "s": s, "wp": wp, "ow": ow, "off": off, "c": c, "xs": xr * wp, "ys": oh * ow, "ds": rows * wp}
    vs = Vertices(PRIMS["MaxPoolGradRows"], [r])
    mem, cyc = vs.mem.copy(), np.zeros(1, np.int64)
    ev.run_vertices(PRIMS["MaxPoolGradRows"], mem, vs.table, 0, 1, cyc, {})
    np.testing.assert_allclose(vs.get(mem, 0, "dx"), want[:, off:off + rows].reshape(c, -1), rtol=1e-5, atol=1e-6)
    per_element = cyc[0] / (c * oh * ow * k * k)
    assert conv_grad._POOL_GRAD_CYCLES / 2 < per_element < conv_grad._POOL_GRAD_CYCLES * 2, per_element


@pytest.mark.parametrize("tiles,n,c,o,h,k", [(2, 4, 8, 8, 8, 3), (4, 8, 16, 8, 6, 3), (3, 6, 8, 16, 4, 1)])
def test_the_partitioner_costs_a_tile_of_several_conv_tasks_as_the_model_charges_it(tiles, n, c, o, h, k):
    """More tasks than tiles (a big batch): the plan's cost for a tile's tasks is the
    model's packing of all their vertices on the workers -- what one simulated step
    charges the busiest tile -- not each task a whole tile's time for one."""
    from types import SimpleNamespace
    import popdsl
    from popdsl.ir.target import get_target
    from popdsl.ops.conv import _conv_plan, conv_tile_cycles
    pad = k // 2
    src = (f"graph g(tiles = {tiles}) {{ input x: f32[{n}, {c}, {h}, {h}]; param w: f32[{o}, {c}, {k}, {k}] = "
           f"he_normal(); output y = conv2d(x, w, padding = {pad}); }}")
    p = SimpleNamespace(g=SimpleNamespace(target=get_target("gc200", tiles=tiles)), tiles=tiles)
    go, gr, gc = _conv_plan(p, n, o, c, h, h, k, 1, h + 2 * pad, k * k)
    assert gc == 1 and o % go == 0 and h % gr == 0      # alike tasks, one compute set
    tasks = n * go * gr
    assert tasks % tiles == 0 and tasks > tiles
    row = next(r for r in popdsl.compile(src, cache=False).partition_report().rows if r["op"] == "conv2d")
    assert row["max_cycles"] == conv_tile_cycles(o // go, c, h // gr, h, k, k, 6, tasks // tiles)
