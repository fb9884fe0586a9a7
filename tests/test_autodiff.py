"""Every gradient rule in the operation table against central differences.

Each case builds one primitive on random shapes (hypothesis; broadcasting included
where the op broadcasts) with the shape rules users get, takes the loss
L = sum(op(...) * R) for a fixed random R, and compares the autodiff pass's
gradient with (L(x + eps) - L(x - eps)) / 2 eps for every element of every
floating operand, both evaluated by the reference evaluator in float64.
Tolerances are PyTorch gradcheck's (eps 1e-6, atol 1e-5, rtol 1e-3).  Points where
an op is not differentiable (relu at 0, ties of max, floor at integers) are
assumed away.  A test checks that every op with a rule has a case here.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

from popdsl import ops
from popdsl.diagnostics import Diagnostics
from popdsl.ir.tensor import NodeTable
from popdsl.ops import conv, elementwise, gather, linalg, reduce
from popdsl.ops import shape as S
from popdsl.ops.core import Builder
from popdsl.ops.evaluate import evaluate
from popdsl.passes.autodiff import gradients

EPS, ATOL, RTOL = 1e-6, 1e-5, 1e-3
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))


class Case:
    """A little tensor program: leaves with values, a result node, the loss."""

    def __init__(self):
        self.b = Builder(NodeTable(), Diagnostics())
        self.values: dict[int, np.ndarray] = {}
        self.shapes: dict[int, tuple] = {}
        self.rng = np.random.default_rng(0)

    def leaf(self, value, dtype="f32", differentiate=True):
        value = np.asarray(value)
        tid = len(self.values)
        self.values[tid] = value
        if differentiate:
            self.shapes[tid] = (value.shape, dtype)
        return self.b.make("tensor", (), (tid,), value.shape, dtype)

    def check(self, out):
        """The gradient of sum(out * R) against central differences."""
        b = self.b
        r = self.leaf(self.rng.standard_normal(out.shape), differentiate=False)
        loss = elementwise.apply(b, "mul", [out, r], None)
        if loss.shape:
            loss = reduce.reduction(b, "sum", loss, None, False, None)
        missing = []
        grads = gradients(b, loss, self.shapes, missing.append)
        assert not missing, [n.op for n in missing]
        tids = sorted(self.shapes)
        roots = [grads[t] for t in tids if t in grads]
        got = dict(zip([t for t in tids if t in grads], evaluate(roots, self.values, float64=True)))
        for t in tids:
            x = self.values[t]
            numeric = np.zeros(x.shape)
            for i in np.ndindex(x.shape):
                vals = []
                for sign in (1, -1):
                    moved = dict(self.values)
                    moved[t] = x.astype(np.float64).copy()
                    moved[t][i] += sign * EPS
                    vals.append(evaluate([loss], moved, float64=True)[0])
                numeric[i] = (vals[0] - vals[1]) / (2 * EPS)
            analytic = np.broadcast_to(got[t], x.shape) if t in got else np.zeros(x.shape)
            np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL, err_msg=f"operand {t}")


def values(shape, seed, lo=-2.0, hi=2.0):
    return np.random.default_rng(seed).uniform(lo, hi, shape)


def distinct(shape, seed, gap=0.01):
    """Values at least `gap` apart (no ties for max, min and pooling)."""
    n = int(np.prod(shape, dtype=np.int64))
    return (np.random.default_rng(seed).permutation(n) * gap * 3 - n * gap).reshape(shape) + 0.001


def far_from(x, points, margin=1e-3) -> bool:
    return bool(np.all(np.abs(x[..., None] - np.asarray(points)) > margin))


COVERED: set[str] = set()


def covers(*names):
    COVERED.update(names)
    return lambda f: f


# ---------------------------------------------------------------- element-wise

BINARY = ["add", "sub", "mul", "div", "pow", "min", "max"]


@covers(*BINARY)
@pytest.mark.parametrize("name", BINARY)
@SETTINGS
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3),
       seed=st.integers(0, 1000))
def test_binary_elementwise(name, shapes, seed):
    (sa, sb), out = shapes
    c = Case()
    a, b = values(sa, seed), values(sb, seed + 1)
    if name in ("div", "pow"):
        b = np.where(np.abs(b) < 0.3, 0.5, b)
    if name == "pow":
        a = np.abs(a) + 0.2                    # a real power of a positive base
    if name in ("min", "max"):
        assume(np.all(np.abs(np.broadcast_to(a, out) - np.broadcast_to(b, out)) > 1e-3))
    c.check(elementwise.apply(c.b, name, [c.leaf(a), c.leaf(b)], None))


UNARY = {"neg": None, "abs": [0], "relu": [0], "square": None, "exp": None, "log": "pos", "sqrt": "pos",
         "rsqrt": "pos", "tanh": None, "sigmoid": None, "sin": None, "cos": None, "erf": None,
         "leaky_relu": [0], "floor": "int", "ceil": "int"}


@covers(*UNARY)
@pytest.mark.parametrize("name", sorted(UNARY))
@SETTINGS
@given(shape=array_shapes(min_dims=0, max_dims=3, max_side=4), seed=st.integers(0, 1000))
def test_unary_elementwise(name, shape, seed):
    c = Case()
    x = values(shape, seed)
    kink = UNARY[name]
    if kink == "pos":
        x = np.abs(x) + 0.1
    elif kink == "int":
        assume(far_from(x, np.arange(-3, 4)))
    elif kink is not None:
        assume(far_from(x, kink))
    attrs = (0.05,) if name == "leaky_relu" else ()
    c.check(elementwise.apply(c.b, name, [c.leaf(x)], None, attrs))


@covers("select")
@SETTINGS
@given(shapes=mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, max_side=3), seed=st.integers(0, 99))
def test_select(shapes, seed):
    (sc, sa, sb), _ = shapes
    c = Case()
    cond = c.leaf(np.random.default_rng(seed).random(sc) < 0.5, "bool", differentiate=False)
    c.check(elementwise.select(c.b, cond, c.leaf(values(sa, seed)), c.leaf(values(sb, seed + 1)), None))


@covers("cast_f32", "cast_f16")
@pytest.mark.parametrize("frm,to", [("f16", "f32"), ("f32", "f16")])
def test_casts_between_floats(frm, to):
    c = Case()
    c.check(elementwise.cast(c.b, to, elementwise.apply(c.b, "exp", [c.leaf(values((2, 3), 5), frm)], None)))


# ---------------------------------------------------------------- reductions, matmul

@covers("reduce")
@pytest.mark.parametrize("kind", ["sum", "mean", "max", "min"])
@SETTINGS
@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=4), data=st.data())
def test_reductions(kind, shape, data):
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True))
    keepdims = data.draw(st.booleans())
    c = Case()
    x = c.leaf(distinct(shape, data.draw(st.integers(0, 99))))
    c.check(reduce.reduction(c.b, kind, x, axes, keepdims, None))


@covers("matmul")
@SETTINGS
@given(m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 4),
       batch=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=3),
       vector=st.sampled_from(["", "a", "b"]))
def test_matmul(m, k, n, batch, vector):
    (ba, bb), _ = batch
    c = Case()
    sa = (k,) if vector == "a" else ba + (m, k)
    sb = (k,) if vector == "b" else bb + (k, n)
    c.check(linalg.matmul(c.b, c.leaf(values(sa, 1)), c.leaf(values(sb, 2)), None))


# ---------------------------------------------------------------- convolution and pooling

@covers("conv2d")
@SETTINGS
@given(n=st.integers(1, 2), cg=st.integers(1, 2), og=st.integers(1, 2), groups=st.integers(1, 2),
       hw=st.integers(3, 6), k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1))
def test_conv2d(n, cg, og, groups, hw, k, stride, padding):
    assume(hw + 2 * padding >= k)
    c = Case()
    x = c.leaf(values((n, cg * groups, hw, hw + 1), 3))
    w = c.leaf(values((og * groups, cg, k, k), 4))
    c.check(conv.conv2d(c.b, x, w, stride, padding, groups, None))


@covers("pool")
@pytest.mark.parametrize("kind", ["max", "avg"])
@SETTINGS
@given(n=st.integers(1, 2), ch=st.integers(1, 2), hw=st.integers(2, 6), k=st.integers(1, 3),
       stride=st.integers(1, 3), padding=st.integers(0, 1))
def test_pooling(kind, n, ch, hw, k, stride, padding):
    assume(padding * 2 <= k and hw + 2 * padding >= k)
    c = Case()
    c.check(conv.pool(c.b, kind, c.leaf(distinct((n, ch, hw, hw), 7)), k, stride, padding, None))


# ---------------------------------------------------------------- views and data movement

@covers("reshape", "transpose", "index", "broadcast")
@SETTINGS
@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=4), data=st.data())
def test_views(shape, data):
    c = Case()
    x = c.leaf(values(shape, 9))
    perm = data.draw(st.permutations(range(len(shape))))
    y = S.transpose(c.b, x, list(perm), None)
    y = S.reshape(c.b, y, [-1], None)
    y = S.reshape(c.b, y, list(shape), None)
    key = []
    for ax, size in enumerate(shape):
        if data.draw(st.booleans()):
            i = data.draw(st.integers(0, size - 1))
            key.append(i if data.draw(st.booleans()) else (i, data.draw(st.integers(i + 1, size))))
        else:
            key.append((0, size))
    y = S.index(c.b, y, key, None)
    c.check(S.broadcast_to(c.b, y, (2,) + y.shape))


@covers("pad")
@SETTINGS
@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=3), data=st.data())
def test_pad(shape, data):
    c = Case()
    pads = [[data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))] for _ in shape]
    c.check(S.pad(c.b, c.leaf(values(shape, 11)), pads, 1.5, None))


@covers("concat")
@SETTINGS
@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=3), data=st.data())
def test_concat(shape, data):
    """The same tensor twice among the parts gets both parts' gradients."""
    axis = data.draw(st.integers(0, len(shape) - 1))
    other = list(shape)
    other[axis] = data.draw(st.integers(1, 3))
    c = Case()
    x = c.leaf(values(shape, 11))
    c.check(S.concat(c.b, [x, c.leaf(values(other, 12)), x], axis, None))


@covers("gather")
@SETTINGS
@given(shape=array_shapes(min_dims=1, max_dims=3, max_side=4), idx_shape=array_shapes(min_dims=0, max_dims=2, max_side=3),
       data=st.data())
def test_gather(shape, idx_shape, data):
    """Rows gathered twice get both gradients (scatter-add); negative indices count
    from the end."""
    axis = data.draw(st.integers(0, len(shape) - 1))
    n = shape[axis]
    idx = np.random.default_rng(data.draw(st.integers(0, 99))).integers(-n, n, idx_shape).astype(np.int32)
    c = Case()
    c.check(gather.gather(c.b, c.leaf(values(shape, 13)), c.leaf(idx, "i32", differentiate=False), axis, None))


def test_a_view_leaf_sends_its_gradient_back_to_its_tensor():
    """A program's view of a param (reshape(gamma, [C, 1, 1]), w[1]) is a view leaf;
    its gradient goes back with `place`, zeros where the view does not reach."""
    c = Case()
    w = values((3, 4), 21)
    tid = len(c.values)
    c.values[tid] = w
    c.shapes[tid] = (w.shape, "f32")
    idx = np.arange(12).reshape(3, 4)[::-1, ::2]            # a strided part of w, rows reversed
    v = c.b.t.make("view", (), (tid,), idx.shape, "f32", index=idx)
    whole = c.b.make("tensor", (), (tid,), (3, 4), "f32")
    c.check(elementwise.apply(c.b, "mul", [v, linalg.matmul(c.b, whole, c.leaf(values((4, 2), 22)), None)], None))


def test_every_op_with_a_gradient_rule_has_a_case():
    ruled = {name for name, entry in ops.OPS.items() if entry.grad is not None}
    assert ruled <= COVERED, f"gradient rules without a finite-difference case: {sorted(ruled - COVERED)}"


def test_whole_programs_with_defs_loops_and_batch_norm():
    """Gradients of a whole program — a def with shared params called in a
    compile-time loop (an RNN), popnn's batch_norm in training mode (views of its
    params, batch statistics), conv, pooling, concat, dense — against central
    differences of the program's own loss, in float64 with each param's initial
    value moved.  The gradient is read off one step of sgd(lr = 1): p - new p."""
    from popdsl.ir.target import get_target
    from popdsl.ops.evaluate import step_graph
    from popdsl.pipeline import compile_source
    src = """import "popnn";
def cell(x: f32[B, I], h: f32[B, H]) -> f32[B, H] {
    shared param wx: f32[I, H] = glorot_uniform();
    shared param wh: f32[H, H] = glorot_uniform();
    return tanh(x @ wx + h @ wh);
}
graph g(tiles = 4) {
    input xs: f32[3, 2, 4];
    input img: f32[2, 1, 4, 4];
    input y: i32[2];
    var h: f32[2, 5] = zeros();
    for t in 0..3 { h = cell(xs[t], h); }
    let f = avg_pool2d(relu(conv_bn(img, 2, 3, 1, 1)), 2);
    let logits = dense(concat([h, reshape(f, [2, 8])], axis = 1), 3);
    let loss = mean(cross_entropy(logits, y));
    output loss;
    minimize loss with sgd(lr = 1.0);
}
"""
    graph = compile_source(src, "<string>", get_target("gc200", tiles=4), stop_after="autodiff")
    rng = np.random.default_rng(0)
    feeds = {"xs": rng.standard_normal((3, 2, 4)), "img": rng.standard_normal((2, 1, 4, 4)),
             "y": np.array([0, 2], np.int32)}
    _, new = step_graph(graph, feeds, float64=True)
    params = [t for t in graph.tensors if t.kind == "param"]
    assert {t.name for t in params} == {"cell.wx", "cell.wh", "conv_bn_1.conv_1.w", "conv_bn_1.batch_norm_1.gamma",
                                        "conv_bn_1.batch_norm_1.beta", "dense_1.w", "dense_1.b"}
    assert {"h", "conv_bn_1.batch_norm_1.running_mean", "conv_bn_1.batch_norm_1.running_var"} <= set(new)
    for t in params:
        base = np.asarray(graph.init[t.id], np.float64)
        analytic = base - new[t.name]
        for i in list(np.ndindex(t.shape))[::3]:
            vals = []
            for sign in (1, -1):
                moved = base.copy()
                moved[i] += sign * EPS
                graph.init[t.id] = moved
                vals.append(step_graph(graph, feeds, float64=True)[0]["loss"])
            graph.init[t.id] = base
            np.testing.assert_allclose(analytic[i], (vals[0] - vals[1]) / (2 * EPS), rtol=RTOL, atol=ATOL,
                                       err_msg=f"{t.name}{list(i)}")


def test_every_batch_norm_writes_its_own_running_statistics():
    """Twelve batch norms in a row, each a def call whose scope dies before the next
    is made: each writes its own running mean and variance (the elaborator once
    keyed what a name assigns by id(scope), and a new scope at a dead one's address
    wrote the old one's var)."""
    from popdsl.ir.target import get_target
    from popdsl.pipeline import compile_source
    layers = "\n".join(f"    let h{i} = batch_norm(h{i - 1});" for i in range(1, 13))
    text = f"""import "popnn";
graph g(tiles = 4) {{
    input x: f32[2, 3, 4, 4];
    let h0 = x;
{layers}
    let loss = mean(h12 * h12);
    output loss;
    minimize loss with sgd(lr = 0.1);
}}
"""
    for _ in range(3):
        graph = compile_source(text, "bn.pop", get_target(), stop_after="autodiff")
        running = {t.id for t in graph.tensors if t.name.endswith(("running_mean", "running_var"))}
        assert len(running) == 24
        assert running <= set(graph.updates)
        for tid in running:
            leaves = {n.attrs[0] for n in _walk(graph.updates[tid]) if n.op == "tensor"}
            assert tid in leaves, graph.tensors[tid].name
            assert not (leaves & running - {tid}), graph.tensors[tid].name


def _walk(root):
    from popdsl.passes.autodiff import topological
    return topological([root])
