"""Built-in tensor operations: their argument rules, shapes and dtypes.

Requires operand nodes (`ir.tensor.Node`) and compile-time arguments; produces new
interned nodes, or a diagnostic at the call site that names the shapes involved.
The partitioner (`passes.partition`) gives every op here its vertices; numpy is the
definition of each op's meaning.
"""
from __future__ import annotations

import numpy as np

from popdsl.diagnostics import Diagnostics, Span
from popdsl.ir import tensor as T
from popdsl.ir.tensor import Node, NodeTable

FLOAT_UNARY = {"exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "sin", "cos", "floor", "ceil"}
NUM_UNARY = {"abs", "relu", "square", "neg"}
REDUCE = {"sum", "mean", "max", "min", "argmax"}
CAST_OPS = {"f32": "cast_f32", "i32": "cast_i32", "bool": "cast_bool", "f16": "cast_f16"}
BINOPS = {"+": "add", "-": "sub", "*": "mul", "/": "div", "%": "mod", "==": "eq", "!=": "ne",
          "<": "lt", "<=": "le", ">": "gt", ">=": "ge", "&&": "and", "||": "or"}
NAMES = sorted(FLOAT_UNARY | NUM_UNARY | REDUCE | set(CAST_OPS) | {
    "pow", "select", "matmul", "conv2d", "max_pool2d", "avg_pool2d", "reshape", "transpose",
    "slice", "concat", "pad", "gather", "one_hot", "maximum", "minimum"})


class PrimError(Exception):
    """Already reported."""


def shape_str(s) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def _float_result(*dtypes: str) -> str:
    floats = [d for d in dtypes if d in ("f32", "f16")]
    return "f16" if floats and all(d == "f16" for d in floats) else "f32"


class Prims:
    def __init__(self, table: NodeTable, diags: Diagnostics):
        self.t, self.d = table, diags

    def err(self, span: Span, msg: str, *notes) -> None:
        self.d.error(span, msg, *notes)
        raise PrimError

    def const(self, value, dtype: str) -> Node:
        v = float(value) if dtype in ("f32", "f16") else (bool(value) if dtype == "bool" else int(value))
        return self.t.make("const", (), (v,), (), "f32" if dtype == "f16" else dtype)

    # ---------------------------------------------------------------- element-wise
    def unify(self, span: Span, op: str, *xs: Node) -> tuple[int, ...]:
        shape = T.broadcast_shapes(*(x.shape for x in xs))
        if shape is None:
            self.err(span, f"{op}: shapes {' and '.join(shape_str(x.shape) for x in xs)} do not broadcast",
                     "numpy broadcasting: trailing dimensions must be equal or 1")
        return shape

    def unary(self, op: str, x: Node, span: Span) -> Node:
        if op == "not":
            if x.dtype != "bool":
                self.err(span, f"'!' needs a bool tensor, found {x.dtype}{shape_str(x.shape)}")
            return self.t.make("not", (x,), (), x.shape, "bool")
        if op in FLOAT_UNARY:
            if x.dtype not in ("f32", "f16"):
                self.err(span, f"{op} needs a floating-point tensor, found {x.dtype}{shape_str(x.shape)}",
                         "convert with f32(x)")
            return self.t.make(op, (x,), (), x.shape, x.dtype)
        if x.dtype == "bool":
            self.err(span, f"{op} is not defined on bool tensors")
        return self.t.make(op, (x,), (), x.shape, x.dtype)

    def binary(self, sym: str, a: Node, b: Node, span: Span) -> Node:
        op = BINOPS.get(sym, sym)
        shape = self.unify(span, f"'{sym}'", a, b)
        if op in ("and", "or"):
            if a.dtype != "bool" or b.dtype != "bool":
                self.err(span, f"'{sym}' needs bool tensors, found {a.dtype} and {b.dtype}")
            return self.t.make(op, (a, b), (), shape, "bool")
        if (a.dtype == "bool") != (b.dtype == "bool") or (a.dtype == "bool" and op not in ("eq", "ne")):
            self.err(span, f"'{sym}' is not defined on {a.dtype} and {b.dtype}")
        af, bf = a.dtype in ("f32", "f16"), b.dtype in ("f32", "f16")
        if af != bf:
            self.err(span, f"'{sym}' mixes {a.dtype}{shape_str(a.shape)} and {b.dtype}{shape_str(b.shape)}",
                     "convert one side with f32(...) or i32(...)")
        if op == "mod" and af:
            self.err(span, "'%' needs i32 tensors")
        dtype = _float_result(a.dtype, b.dtype) if af else a.dtype
        if op in ("eq", "ne", "lt", "le", "gt", "ge"):
            return self.t.make(op, (a, b), (), shape, "bool")
        return self.t.make(op, (a, b), (), shape, dtype)

    def select(self, c: Node, a: Node, b: Node, span: Span) -> Node:
        if c.dtype != "bool":
            self.err(span, f"select: the condition must be bool, found {c.dtype}{shape_str(c.shape)}")
        if (a.dtype in ("f32", "f16")) != (b.dtype in ("f32", "f16")) or (a.dtype == "bool") != (b.dtype == "bool"):
            self.err(span, f"select: branches are {a.dtype} and {b.dtype}")
        shape = self.unify(span, "select", c, a, b)
        dtype = _float_result(a.dtype, b.dtype) if a.dtype in ("f32", "f16") else a.dtype
        return self.t.make("select", (c, a, b), (), shape, dtype)

    def cast(self, to: str, x: Node) -> Node:
        if x.dtype == to:
            return x
        return self.t.make(CAST_OPS[to], (x,), (), x.shape, to)

    def call_scalar(self, codelet, args: list[Node], span: Span) -> Node:
        if len(args) != len(codelet.fields):
            self.err(span, f"'{codelet.name}' takes {len(codelet.fields)} arguments, given {len(args)}")
        for a, f in zip(args, codelet.fields):
            want_float = f.dtype in ("f32", "f16")
            if (a.dtype in ("f32", "f16")) != want_float or (a.dtype == "bool") != (f.dtype == "bool"):
                self.err(span, f"'{codelet.name}': argument '{f.name}' is {f.dtype}, given {a.dtype}{shape_str(a.shape)}")
        shape = self.unify(span, codelet.name, *args)
        return self.t.make("call:" + codelet.name, tuple(args), (), shape, codelet.ret)

    # ---------------------------------------------------------------- reductions
    def axes(self, x: Node, axis, span: Span, op: str) -> tuple[int, ...]:
        if axis is None:
            return tuple(range(len(x.shape)))
        ax = axis if isinstance(axis, list) else [axis]
        out = []
        for a in ax:
            if not isinstance(a, int) or isinstance(a, bool) or not -len(x.shape) <= a < len(x.shape):
                self.err(span, f"{op}: axis {a} is out of range for shape {shape_str(x.shape)}")
            out.append(a % len(x.shape))
        if len(set(out)) != len(out):
            self.err(span, f"{op}: repeated axis")
        return tuple(sorted(out))

    def reduce(self, op: str, x: Node, axis, keepdims: bool, span: Span) -> Node:
        if x.dtype == "bool" and op != "argmax":
            self.err(span, f"{op} of a bool tensor: convert it with f32(...) or i32(...) first")
        if not x.shape:
            self.err(span, f"{op} needs a tensor with at least one dimension")
        axes = self.axes(x, axis, span, op)
        if op == "argmax" and len(axes) != 1:
            self.err(span, "argmax reduces exactly one axis: give axis = N")
        shape = tuple(1 if i in axes else n for i, n in enumerate(x.shape) if keepdims or i not in axes)
        if op == "mean":
            s = self.t.make("reduce", (x,), ("sum", axes, keepdims), shape, x.dtype)
            k = int(np.prod([x.shape[i] for i in axes]))
            return self.binary("/", s, self.const(k, "f32" if x.dtype in ("f32", "f16") else "i32"), span) \
                if x.dtype in ("f32", "f16") else self.err(span, "mean of an i32 tensor: convert with f32(...)")
        dtype = "i32" if op == "argmax" else x.dtype
        return self.t.make("reduce", (x,), (op, axes, keepdims), shape, dtype)

    # ---------------------------------------------------------------- linear algebra
    def matmul(self, a: Node, b: Node, span: Span) -> Node:
        if len(a.shape) < 1 or len(b.shape) < 1:
            self.err(span, f"'@' needs tensors of rank >= 1, found {shape_str(a.shape)} and {shape_str(b.shape)}")
        if a.dtype not in ("f32", "f16") or b.dtype not in ("f32", "f16"):
            self.err(span, f"'@' needs floating-point tensors, found {a.dtype} and {b.dtype}")
        a2 = a if len(a.shape) > 1 else self.t.make("reshape", (a,), ((1, a.shape[0]),), (1, a.shape[0]), a.dtype)
        b2 = b if len(b.shape) > 1 else self.t.make("reshape", (b,), ((b.shape[0], 1),), (b.shape[0], 1), b.dtype)
        if a2.shape[-1] != b2.shape[-2]:
            self.err(span, f"'@': shapes {shape_str(a.shape)} and {shape_str(b.shape)} do not match "
                     f"({a2.shape[-1]} != {b2.shape[-2]})")
        batch = T.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        if batch is None:
            self.err(span, f"'@': batch dimensions of {shape_str(a.shape)} and {shape_str(b.shape)} do not broadcast")
        shape = batch + (a2.shape[-2], b2.shape[-1])
        out = self.t.make("matmul", (a2, b2), (), shape, _float_result(a.dtype, b.dtype))
        if len(a.shape) == 1 or len(b.shape) == 1:
            final = shape[:-2] + ((a2.shape[-2],) if len(a.shape) > 1 else ()) + ((b2.shape[-1],) if len(b.shape) > 1 else ())
            out = self.t.make("reshape", (out,), (final,), final, out.dtype)
        return out

    def conv2d(self, x: Node, w: Node, stride: int, padding: int, groups: int, span: Span) -> Node:
        if len(x.shape) != 4 or len(w.shape) != 4:
            self.err(span, f"conv2d needs x as [N, C, H, W] and weights as [O, C/groups, KH, KW]; "
                     f"found {shape_str(x.shape)} and {shape_str(w.shape)}")
        n, c, h, wd = x.shape
        o, cg, kh, kw = w.shape
        if groups < 1 or c % groups or o % groups:
            self.err(span, f"conv2d: groups = {groups} must divide input channels {c} and output channels {o}")
        if cg != c // groups:
            self.err(span, f"conv2d: weights {shape_str(w.shape)} expect {cg * groups} input channels "
                     f"(with groups = {groups}), x {shape_str(x.shape)} has {c}")
        if stride < 1 or padding < 0:
            self.err(span, "conv2d: stride must be >= 1 and padding >= 0")
        oh, ow = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
        if oh < 1 or ow < 1:
            self.err(span, f"conv2d: a {kh}x{kw} kernel does not fit input {shape_str(x.shape)} with padding {padding}")
        if x.dtype not in ("f32", "f16") or w.dtype not in ("f32", "f16"):
            self.err(span, "conv2d needs floating-point tensors")
        return self.t.make("conv2d", (x, w), (stride, padding, groups), (n, o, oh, ow), "f32")

    def pool(self, kind: str, x: Node, kernel: int, stride: int, padding: int, span: Span) -> Node:
        if len(x.shape) != 4:
            self.err(span, f"{kind}_pool2d needs x as [N, C, H, W], found {shape_str(x.shape)}")
        if kernel < 1 or stride < 1 or padding < 0 or padding * 2 > kernel:
            self.err(span, f"{kind}_pool2d: kernel >= 1, stride >= 1, 0 <= padding <= kernel / 2")
        n, c, h, w = x.shape
        oh, ow = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
        if oh < 1 or ow < 1:
            self.err(span, f"{kind}_pool2d: kernel {kernel} does not fit {shape_str(x.shape)}")
        if x.dtype not in ("f32", "f16"):
            self.err(span, f"{kind}_pool2d needs a floating-point tensor")
        return self.t.make("pool", (x,), (kind, kernel, stride, padding), (n, c, oh, ow), "f32")

    # ---------------------------------------------------------------- shapes
    def reshape(self, x: Node, shape, span: Span) -> Node:
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            self.err(span, "reshape: the shape must be a list of integers")
        shape = list(shape)
        if shape.count(-1) > 1 or any(s < -1 or s == 0 for s in shape):
            self.err(span, f"reshape: bad shape {shape_str(shape)}")
        known = int(np.prod([s for s in shape if s != -1]))
        if -1 in shape:
            if known == 0 or x.numel % known:
                self.err(span, f"cannot reshape {shape_str(x.shape)} to {shape_str(shape)}")
            shape[shape.index(-1)] = x.numel // known
        if int(np.prod(shape)) != x.numel:
            self.err(span, f"cannot reshape {shape_str(x.shape)} ({x.numel} elements) to {shape_str(shape)}")
        if tuple(shape) == x.shape:
            return x
        return self.t.make("reshape", (x,), (tuple(shape),), tuple(shape), x.dtype)

    def transpose(self, x: Node, perm, span: Span) -> Node:
        r = len(x.shape)
        perm = list(range(r))[::-1] if perm is None else perm
        if not isinstance(perm, list) or sorted(perm) != list(range(r)):
            self.err(span, f"transpose: perm must be a permutation of 0..{r - 1} for shape {shape_str(x.shape)}")
        if perm == list(range(r)):
            return x
        return self.t.make("transpose", (x,), (tuple(perm),), tuple(x.shape[p] for p in perm), x.dtype)

    def index(self, x: Node, key: list, span: Span) -> Node:
        """key: per leading axis an int or (lo, hi), already range-checked."""
        shape = []
        for i, n in enumerate(x.shape):
            if i < len(key) and isinstance(key[i], int):
                continue
            if i < len(key):
                shape.append(key[i][1] - key[i][0])
            else:
                shape.append(n)
        return self.t.make("index", (x,), (tuple(tuple(k) if isinstance(k, tuple) else k for k in key),),
                           tuple(shape), x.dtype)

    def slice(self, x: Node, axis: int, start: int, stop: int, span: Span) -> Node:
        if not -len(x.shape) <= axis < len(x.shape):
            self.err(span, f"slice: axis {axis} is out of range for shape {shape_str(x.shape)}")
        axis %= len(x.shape)
        n = x.shape[axis]
        if not 0 <= start < stop <= n:
            self.err(span, f"slice: {start}:{stop} is out of range for axis {axis} of {shape_str(x.shape)}")
        key = [(0, x.shape[i]) for i in range(axis)] + [(start, stop)]
        return self.index(x, key, span)

    def concat(self, xs: list[Node], axis: int, span: Span) -> Node:
        if not xs:
            self.err(span, "concat needs at least one tensor")
        r = len(xs[0].shape)
        if not -r <= axis < r:
            self.err(span, f"concat: axis {axis} is out of range for shape {shape_str(xs[0].shape)}")
        axis %= r
        for x in xs[1:]:
            if len(x.shape) != r or any(a != b for i, (a, b) in enumerate(zip(x.shape, xs[0].shape)) if i != axis) \
                    or x.dtype != xs[0].dtype:
                self.err(span, f"concat: {xs[0].dtype}{shape_str(xs[0].shape)} and {x.dtype}{shape_str(x.shape)} "
                         f"differ outside axis {axis}")
        shape = list(xs[0].shape)
        shape[axis] = sum(x.shape[axis] for x in xs)
        return self.t.make("concat", tuple(xs), (axis,), tuple(shape), xs[0].dtype)

    def pad(self, x: Node, pads, value: float, span: Span) -> Node:
        r = len(x.shape)
        if isinstance(pads, int) and not isinstance(pads, bool):
            pads = [[pads, pads]] * r
        ok = isinstance(pads, list) and len(pads) == r and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(q, int) and not isinstance(q, bool) and q >= 0 for q in p)
            for p in pads)
        if not ok:
            self.err(span, f"pad: give one [before, after] pair of non-negative integers per axis of {shape_str(x.shape)}")
        pads_t = tuple((p[0], p[1]) for p in pads)
        shape = tuple(n + a + b for n, (a, b) in zip(x.shape, pads_t))
        return self.t.make("pad", (x,), (pads_t, float(value)), shape, x.dtype)

    def gather(self, x: Node, idx: Node, axis: int, span: Span) -> Node:
        if idx.dtype != "i32":
            self.err(span, f"gather: indices must be i32, found {idx.dtype}")
        if not x.shape or not -len(x.shape) <= axis < len(x.shape):
            self.err(span, f"gather: axis {axis} is out of range for shape {shape_str(x.shape)}")
        axis %= len(x.shape)
        shape = x.shape[:axis] + idx.shape + x.shape[axis + 1:]
        return self.t.make("gather", (x, idx), (axis,), shape, x.dtype)

    def one_hot(self, y: Node, depth: int, span: Span) -> Node:
        if y.dtype != "i32":
            self.err(span, f"one_hot: labels must be i32, found {y.dtype}")
        if depth < 1:
            self.err(span, "one_hot: depth must be positive")
        return self.t.make("one_hot", (y,), (depth,), y.shape + (depth,), "f32")
