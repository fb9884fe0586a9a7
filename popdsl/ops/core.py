"""What an entry of the operation table is, and the machinery every entry shares.

Requires the tensor-program IR (`ir.tensor`) and diagnostics; produces:
- `OpDef`: one tensor-program operation (a node `op`): its numpy reference, its
  partition rule (how it becomes vertices on tiles), the prims codelets that rule
  places, its cost model, its gradient rule, and the slot the reuse capability
  fills (reuse key);
- `Function` and `Param`: what a user calls (`sum(x, axis = 1)`): its signature,
  checked generically by `bind`, and the shape rule that builds nodes;
- `Builder`: what a shape rule works with (the node table and the diagnostics).

A shape rule reports a user's mistake at the call site naming the shapes involved
(`'@': shapes [8, 64] and [65, 10] do not match (64 != 65)`) and raises `OpError`,
which the elaborator turns into "abandon this statement".
"""
from __future__ import annotations

from dataclasses import field
from typing import Callable

import numpy as np

from popdsl.diagnostics import Diagnostics, Span
from popdsl.ir import tensor as T
from popdsl.ir.tensor import Node, NodeTable
from popdsl.node import node

FLOATS = ("f32", "f16")


class OpError(Exception):
    """A user error, already reported."""


def shape_str(s) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def describe(n: Node) -> str:
    return f"{n.dtype}{shape_str(n.shape)}"


def float_result(*dtypes: str) -> str:
    """f16 only when every floating operand is f16 (as numpy promotes)."""
    floats = [d for d in dtypes if d in FLOATS]
    return "f16" if floats and all(d == "f16" for d in floats) else "f32"


# PopART's subgraph values (popart Op::getHighSubgraphValue / getLowSubgraphValue).
HIGH_VALUE, LOW_VALUE = 1000.0, 0.1


@node
class OpDef:
    """One operation of the tensor-program IR.

    ref(attrs, *values) -> value: the numpy definition (values are numpy arrays of
    the operands' dtypes; the result is cast to the node's dtype by the caller).
    partition(p, node) -> View: gives the node vertices on tiles (`passes.partition`
    passes itself as `p`); None for element-wise ops, which the partitioner fuses
    into generated codelets with `emit`, and for views and leaves.
    emit(args, ty, attrs) -> codelet IR of one element (element-wise ops only).
    cost: the cost model the partition rule plans with (None: the cycles of the
    codelets it places, counted by `ir.cost`).
    grad(b, n, g, i) -> Node | None: the reverse-mode rule (`passes.autodiff`):
    given g, the gradient of the loss with respect to node n (n's shape and
    dtype), the gradient with respect to operand i, built with the same shape
    rules users get, in the operand's shape or in n's (the pass sums broadcast
    axes away and casts to the operand's dtype); None where it is zero.  Only
    floating operands that depend on what is differentiated are asked for, so
    integer operands (indices, labels) and conditions never are.  A grad of None:
    the op has no rule, and differentiating through it is an error at its call
    site.
    value: what building it once and calling it is worth, for outlining
    (passes.outline): PopART's subgraph values, 1000 for a convolution or a
    matrix product (many vertices, much code and exchange), 0.1 for anything
    else (a relu); a repeated part is outlined when its ops add up to 1.
    explain: messages for runtime errors of its codelets (a label out of range)."""
    name: str
    kind: str                          # "leaf" | "view" | "elementwise" | "compute"
    doc: str
    ref: Callable | None = None
    partition: Callable | None = None
    emit: Callable | None = None
    codelets: tuple[str, ...] = ()
    cost: Callable | None = None
    grad: Callable | None = None
    value: float = LOW_VALUE
    # Floating-point operations of one node (multiply-adds count two), for reports;
    # None: one per element of the result.
    flops: Callable | None = None
    # What a runtime error of one of its codelets means to the user, by (codelet,
    # field, axis) of the failing index: a message with {index} and {size}.
    explain: dict = field(default_factory=dict)


REQUIRED = object()


@node
class Param:
    """A parameter of a function users call.

    kind: "tensor"  a tensor (a number becomes a constant tensor)
          "operand" a tensor or a number; a number takes the dtype of the first
                    tensor among the call's operands (`x * 2` with x: f32 is f32)
          "int" "float" "bool"  a compile-time value
          "tensors" a list of tensors
          "any"     a compile-time value the shape rule checks itself"""
    name: str
    kind: str
    default: object = REQUIRED


@node
class Function:
    """A function users call by name.  `build(b, args, span)` receives the bound
    arguments by parameter name; `applies(npos, kwnames)`, when given, says whether
    this overload takes a call (`max(x)` reduces, `max(a, b)` is element-wise)."""
    name: str
    params: tuple[Param, ...]
    build: Callable
    doc: str
    applies: Callable[[int, set], bool] | None = None


class Builder:
    """What shape rules build with: interned nodes and the diagnostics."""

    def __init__(self, table: NodeTable, diags: Diagnostics):
        self.t, self.d = table, diags

    def err(self, span: Span, msg: str, *notes) -> None:
        self.d.error(span, msg, *notes)
        raise OpError

    def make(self, op: str, args=(), attrs=(), shape=(), dtype="f32") -> Node:
        return self.t.make(op, tuple(args), attrs, shape, dtype)

    def const(self, value, dtype: str) -> Node:
        v = float(value) if dtype in FLOATS else (bool(value) if dtype == "bool" else int(value))
        return self.t.make("const", (), (v,), (), "f32" if dtype == "f16" else dtype)

    def broadcast(self, span: Span, what: str, *xs: Node) -> tuple[int, ...]:
        shape = T.broadcast_shapes(*(x.shape for x in xs))
        if shape is None:
            self.err(span, f"{what}: shapes {' and '.join(shape_str(x.shape) for x in xs)} do not broadcast",
                     "numpy broadcasting: trailing dimensions must be equal or 1")
        return shape

    def axes(self, x: Node, axis, span: Span, op: str) -> tuple[int, ...]:
        """`axis` (None: all, an int, or a list of ints; negative counts from the
        end) as sorted axes of x."""
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


def applies_to(fn: Function, npos: int, kwnames: set) -> bool:
    if fn.applies is not None:
        return fn.applies(npos, kwnames)
    return True


def bind(fn: Function, pos: list, kw: dict, span: Span, d: Diagnostics, to_node, is_tensor) -> dict:
    """Arguments of a call by parameter name, checked against `fn`'s signature.

    pos: [(value, span)], kw: {name: (value, span)}; to_node(value, span, like)
    turns a tensor or a number into a node; is_tensor(value) says which values are
    tensors.  Raises OpError after reporting."""
    names = [p.name for p in fn.params]
    extra = set(kw) - set(names)
    if extra:
        d.error(span, f"{fn.name}: unknown argument '{sorted(extra)[0]}'",
                f"{fn.name} takes {', '.join(names) or 'no keyword arguments'}")
        raise OpError
    if len(pos) > len(names):
        d.error(span, f"{fn.name} takes at most {len(names)} arguments, given {len(pos)}")
        raise OpError
    given: dict[str, tuple] = {}
    for p, (v, sp) in zip(fn.params, pos):
        if p.name in kw:
            d.error(kw[p.name][1], f"{fn.name}: argument '{p.name}' given twice")
            raise OpError
        given[p.name] = (v, sp)
    given.update(kw)
    # A number next to a tensor takes its type: the first tensor among the operands.
    like = None
    for p in fn.params:
        if p.kind == "operand" and p.name in given and is_tensor(given[p.name][0]):
            like = to_node(given[p.name][0], given[p.name][1], None)
            break
    out = {}
    for p in fn.params:
        if p.name not in given:
            if p.default is REQUIRED:
                d.error(span, f"{fn.name}: missing argument '{p.name}'")
                raise OpError
            out[p.name] = p.default
            continue
        v, sp = given[p.name]
        out[p.name] = _convert(fn, p, v, sp, d, to_node, is_tensor, like)
    return out


def _convert(fn: Function, p: Param, v, sp: Span, d: Diagnostics, to_node, is_tensor, like):
    def kind_of(x) -> str:
        return "a tensor" if is_tensor(x) else type(x).__name__
    if p.kind == "tensor":
        return to_node(v, sp, None)
    if p.kind == "operand":
        return to_node(v, sp, like)
    if p.kind == "tensors":
        if not isinstance(v, list):
            d.error(sp, f"{fn.name} takes a list of tensors: {fn.name}([a, b], axis = 0)")
            raise OpError
        return [to_node(x, sp, None) for x in v]
    if p.kind == "int":
        if not isinstance(v, int) or isinstance(v, bool):
            d.error(sp, f"{fn.name}: '{p.name}' must be a compile-time integer, found {kind_of(v)}")
            raise OpError
        return v
    if p.kind == "float":
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            d.error(sp, f"{fn.name}: '{p.name}' must be a number, found {kind_of(v)}")
            raise OpError
        return float(v)
    if p.kind == "bool":
        if not isinstance(v, bool):
            d.error(sp, f"{fn.name}: '{p.name}' must be true or false, found {kind_of(v)}")
            raise OpError
        return v
    return v


def numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype({"f32": np.float32, "f16": np.float16, "i32": np.int32, "bool": np.bool_}[dtype])
