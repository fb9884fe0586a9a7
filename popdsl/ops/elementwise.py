"""Element-wise operations: one table row each.

Requires `ops.core`; produces the element-wise `OpDef`s and the `Function`s users
call.  A row gives an operation's name, how many operands it takes, its dtype rule,
its codelet IR for one element (`emit`: the partitioner fuses chains of these into
one generated codelet), its numpy reference, its gradient rule (built from the rows
themselves: `exp`'s is g * exp(x)), and, where an operator spells it, the operator
(`+`).  Comparisons, logic and `%` have no gradient rule: their results are bool or
i32, which no gradient flows through.  Adding an element-wise primitive is a row here (and an intrinsic in
`ir.intrinsics` if the codelet language has no way to compute it yet).

Dtype rules (operands broadcast as numpy's do):
  float    f32/f16 operands; the result is f16 only if every operand is
  numeric  f32/f16/i32, not mixing floats and integers; the result the operands'
  int      i32 only
  compare  numeric (or bool for == and !=) operands; the result bool
  logic    bool operands; the result bool
"""
from __future__ import annotations

import math

import numpy as np

from popdsl.ir import codelet as cir
from popdsl.node import node
from popdsl.ops.core import FLOATS, Builder, Function, OpDef, Param, describe, float_result, shape_str


@node
class Row:
    name: str
    arity: int
    rule: str                          # see the module docstring
    emit: object                       # (args: list[cir.Expr], ty: str, attrs) -> cir.Expr
    ref: object                        # numpy: (attrs, *arrays) -> array
    doc: str
    symbol: str | None = None          # the operator that spells it, if any
    callable: bool = True              # users may call it by name
    attrs: tuple[Param, ...] = ()      # compile-time parameters after the operands
    grad: object = None                # (b, n, g, i) -> gradient of operand i (OpDef.grad)


def _intr(name):
    return lambda args, ty, attrs: cir.Intrinsic(name, tuple(args), ty)


def _bin(sym, result=None):
    return lambda args, ty, attrs: cir.Binary(sym, args[0], args[1], result or ty)


def _zero(ty):
    return cir.Const(0.0 if ty == "f32" else 0, ty)


def _trunc_div(attrs, a, b):
    if a.dtype.kind == "f":
        return np.divide(a, b)
    q = np.abs(a.astype(np.int64)) // np.maximum(np.abs(b.astype(np.int64)), 1)
    return np.where((a < 0) != (b < 0), -q, q)


def _trunc_mod(attrs, a, b):
    return a.astype(np.int64) - _trunc_div(attrs, a, b) * b.astype(np.int64)


_erf = np.vectorize(math.erf, otypes=[np.float64])


# ---------------------------------------------------------------- gradient rules
# (b, n, g, i): the gradient with respect to operand i of node n, given g, the
# gradient with respect to n (OpDef.grad).  Built from the rows themselves.

def _ap(b: Builder, name: str, *xs):
    return apply(b, name, list(xs), None)


def _num(b: Builder, v: float):
    return b.const(v, "f32")


def _where(b: Builder, cond, g):
    """g where cond holds, else 0."""
    return select(b, cond, g, _num(b, 0.0), None)


def _g_sub(b, n, g, i):
    return g if i == 0 else _ap(b, "neg", g)


def _g_div(b, n, g, i):
    x, y = n.args
    return _ap(b, "div", g, y) if i == 0 else _ap(b, "neg", _ap(b, "mul", _ap(b, "div", g, y), n))


def _g_pow(b, n, g, i):
    x, y = n.args
    if i == 0:       # y * x^(y - 1)
        return _ap(b, "mul", g, _ap(b, "mul", y, _ap(b, "pow", x, _ap(b, "sub", y, _num(b, 1.0)))))
    return _ap(b, "mul", g, _ap(b, "mul", n, _ap(b, "log", x)))


def _g_minmax(keeps_a: str):
    """max(a, b) passes g to a where a >= b (a tie goes to a)."""
    def rule(b, n, g, i):
        x, y = n.args
        wins = _ap(b, keeps_a, x, y)
        return _where(b, wins if i == 0 else _ap(b, "not", wins), g)
    return rule


def _g_abs(b, n, g, i):
    x = n.args[0]          # sign(x) * g, 0 at 0 (as PyTorch)
    return _where(b, _ap(b, "ne", x, _num(b, 0.0)),
                  select(b, _ap(b, "gt", x, _num(b, 0.0)), g, _ap(b, "neg", g), None))


def _g_erf(b, n, g, i):
    x = n.args[0]
    bell = _ap(b, "exp", _ap(b, "neg", _ap(b, "square", x)))          # d erf / dx = 2 / sqrt(pi) e^(-x^2)
    return _ap(b, "mul", g, _ap(b, "mul", _num(b, 2 / math.sqrt(math.pi)), bell))


def _g_leaky(b, n, g, i):
    x = n.args[0]
    return select(b, _ap(b, "gt", x, _num(b, 0.0)), g, _ap(b, "mul", g, _num(b, n.attrs[0])), None)


def _by(f):
    """g times f(b, x, y) of the operand x and the result y."""
    return lambda b, n, g, i: _ap(b, "mul", g, f(b, n.args[0], n))


def _zero_almost_everywhere(b, n, g, i):
    return None          # piecewise constant (floor, ceil): PyTorch's choice too


def _g_relu(b, n, g, i):
    # relu(x) > 0 exactly where x > 0 (NaN neither): asking the result, as PyTorch's
    # in-place ReLU does, keeps for the backward pass what the next layer keeps
    # anyway, not the input too (ResNet-50: batch norm's outputs, 31 % of its
    # activations).
    return _where(b, _ap(b, "gt", n, _num(b, 0.0)), g)


ROWS: tuple[Row, ...] = (
    # -- arithmetic
    Row("add", 2, "numeric", _bin("+"), lambda at, a, b: a + b, "a + b", "+", callable=False,
        grad=lambda b, n, g, i: g),
    Row("sub", 2, "numeric", _bin("-"), lambda at, a, b: a - b, "a - b", "-", callable=False,
        grad=_g_sub),
    Row("mul", 2, "numeric", _bin("*"), lambda at, a, b: a * b, "a * b", "*", callable=False,
        grad=lambda b, n, g, i: _ap(b, "mul", g, n.args[1 - i])),
    Row("div", 2, "numeric", _bin("/"), _trunc_div, "a / b (integers: truncated toward zero)", "/",
        callable=False, grad=_g_div),
    Row("mod", 2, "int", _bin("%"), _trunc_mod, "a % b, the sign of a (as C, not numpy)", "%",
        callable=False),
    Row("pow", 2, "float", _intr("pow"), lambda at, a, b: np.power(a, b), "a to the power b",
        grad=_g_pow),
    Row("min", 2, "numeric", _intr("min"), lambda at, a, b: np.minimum(a, b),
        "the smaller of a and b (minimum)",
        grad=_g_minmax("le")),
    Row("max", 2, "numeric", _intr("max"), lambda at, a, b: np.maximum(a, b),
        "the larger of a and b (maximum)",
        grad=_g_minmax("ge")),
    # -- comparisons and logic
    Row("eq", 2, "compare", _bin("==", "bool"), lambda at, a, b: a == b, "a == b", "==", callable=False),
    Row("ne", 2, "compare", _bin("!=", "bool"), lambda at, a, b: a != b, "a != b", "!=", callable=False),
    Row("lt", 2, "compare", _bin("<", "bool"), lambda at, a, b: a < b, "a < b", "<", callable=False),
    Row("le", 2, "compare", _bin("<=", "bool"), lambda at, a, b: a <= b, "a <= b", "<=", callable=False),
    Row("gt", 2, "compare", _bin(">", "bool"), lambda at, a, b: a > b, "a > b", ">", callable=False),
    Row("ge", 2, "compare", _bin(">=", "bool"), lambda at, a, b: a >= b, "a >= b", ">=", callable=False),
    Row("and", 2, "logic", _bin("&&", "bool"), lambda at, a, b: a & b, "a && b", "&&", callable=False),
    Row("or", 2, "logic", _bin("||", "bool"), lambda at, a, b: a | b, "a || b", "||", callable=False),
    # -- unary
    Row("neg", 1, "numeric", lambda args, ty, at: cir.Unary("neg", args[0], ty), lambda at, x: -x, "-x",
        callable=False,
        grad=lambda b, n, g, i: _ap(b, "neg", g)),
    Row("not", 1, "logic", lambda args, ty, at: cir.Unary("not", args[0], "bool"), lambda at, x: ~x, "!x",
        callable=False),
    Row("abs", 1, "numeric", _intr("abs"), lambda at, x: np.abs(x), "absolute value",
        grad=_g_abs),
    Row("relu", 1, "numeric", lambda args, ty, at: cir.Intrinsic("max", (args[0], _zero(ty)), ty),
        lambda at, x: np.maximum(x, 0), "max(x, 0); NaN stays NaN (numpy's maximum)",
        grad=_g_relu),
    Row("square", 1, "numeric", lambda args, ty, at: cir.Binary("*", args[0], args[0], ty),
        lambda at, x: x * x, "x * x",
        grad=_by(lambda b, x, y: _ap(b, "mul", x, _num(b, 2.0)))),
    Row("exp", 1, "float", _intr("exp"), lambda at, x: np.exp(x), "e to the power x",
        grad=_by(lambda b, x, y: y)),
    Row("log", 1, "float", _intr("log"), lambda at, x: np.log(x), "natural logarithm",
        grad=lambda b, n, g, i: _ap(b, "div", g, n.args[0])),
    Row("sqrt", 1, "float", _intr("sqrt"), lambda at, x: np.sqrt(x), "square root",
        grad=lambda b, n, g, i: _ap(b, "div", _ap(b, "mul", g, _num(b, 0.5)), n)),
    Row("rsqrt", 1, "float", _intr("rsqrt"), lambda at, x: 1 / np.sqrt(x), "1 / sqrt(x)",
        grad=_by(lambda b, x, y: _ap(b, "mul", _num(b, -0.5), _ap(b, "mul", y, _ap(b, "square", y))))),
    Row("tanh", 1, "float", _intr("tanh"), lambda at, x: np.tanh(x), "hyperbolic tangent",
        grad=_by(lambda b, x, y: _ap(b, "sub", _num(b, 1.0), _ap(b, "square", y)))),
    Row("sigmoid", 1, "float", _intr("sigmoid"), lambda at, x: 1 / (1 + np.exp(-x)), "1 / (1 + exp(-x))",
        grad=_by(lambda b, x, y: _ap(b, "mul", y, _ap(b, "sub", _num(b, 1.0), y)))),
    Row("sin", 1, "float", _intr("sin"), lambda at, x: np.sin(x), "sine",
        grad=_by(lambda b, x, y: _ap(b, "cos", x))),
    Row("cos", 1, "float", _intr("cos"), lambda at, x: np.cos(x), "cosine",
        grad=_by(lambda b, x, y: _ap(b, "neg", _ap(b, "sin", x)))),
    Row("erf", 1, "float", _intr("erf"), lambda at, x: _erf(x), "the error function",
        grad=_g_erf),
    Row("leaky_relu", 1, "float",
        lambda args, ty, at: cir.Select(cir.Binary(">", args[0], _zero(ty), "bool"), args[0],
                                        cir.Binary("*", args[0], cir.Const(at[0], ty), ty), ty),
        lambda at, x: np.where(x > 0, x, x * np.float32(at[0])), "x where x > 0, else alpha * x",
        attrs=(Param("alpha", "float", 0.01),),
        grad=_g_leaky),
    Row("floor", 1, "float", _intr("floor"), lambda at, x: np.floor(x), "round down",
        grad=_zero_almost_everywhere),
    Row("ceil", 1, "float", _intr("ceil"), lambda at, x: np.ceil(x), "round up",
        grad=_zero_almost_everywhere),
)
ROW = {r.name: r for r in ROWS}
BY_SYMBOL = {r.symbol: r for r in ROWS if r.symbol}


# ---------------------------------------------------------------- dtype rules

def result_dtype(b: Builder, row: Row, xs, span, what: str) -> str:
    """The result dtype of `row` on operand nodes `xs`, or a reported error."""
    dts = [x.dtype for x in xs]
    floats = [d in FLOATS for d in dts]
    if row.rule == "logic":
        if any(d != "bool" for d in dts):
            if row.arity == 1:
                b.err(span, f"'!' needs a bool tensor, found {describe(xs[0])}")
            b.err(span, f"{what} needs bool tensors, found {' and '.join(dts)}")
        return "bool"
    if row.arity == 1:
        if row.rule == "float" and not floats[0]:
            b.err(span, f"{row.name} needs a floating-point tensor, found {describe(xs[0])}", "convert with f32(x)")
        if dts[0] == "bool":
            b.err(span, f"{row.name} is not defined on bool tensors")
        return dts[0]
    a, c = xs
    if (a.dtype == "bool") != (c.dtype == "bool") or (a.dtype == "bool" and row.name not in ("eq", "ne")):
        b.err(span, f"{what} is not defined on {a.dtype} and {c.dtype}")
    if floats[0] != floats[1]:
        b.err(span, f"{what} mixes {describe(a)} and {describe(c)}", "convert one side with f32(...) or i32(...)")
    if row.rule == "int" and floats[0]:
        b.err(span, f"{what} needs i32 tensors")
    if row.rule == "float" and not floats[0]:
        b.err(span, f"{what} needs floating-point tensors, found {a.dtype} and {c.dtype}", "convert with f32(...)")
    if row.rule == "compare":
        return "bool"
    return float_result(*dts) if floats[0] else a.dtype


def apply(b: Builder, name: str, xs, span, attrs=()):
    """The node of element-wise op `name` on operand nodes `xs`."""
    row = ROW[name]
    what = f"'{row.symbol}'" if row.symbol else f"'{name}'" if row.arity > 1 else name
    shape = b.broadcast(span, what, *xs) if len(xs) > 1 else xs[0].shape
    dtype = result_dtype(b, row, xs, span, what)
    return b.make(name, xs, tuple(attrs), shape, dtype)


def select(b: Builder, c, x, y, span):
    if c.dtype != "bool":
        b.err(span, f"select: the condition must be bool, found {describe(c)}")
    if (x.dtype in FLOATS) != (y.dtype in FLOATS) or (x.dtype == "bool") != (y.dtype == "bool"):
        b.err(span, f"select: branches are {x.dtype} and {y.dtype}")
    shape = b.broadcast(span, "select", c, x, y)
    dtype = float_result(x.dtype, y.dtype) if x.dtype in FLOATS else x.dtype
    return b.make("select", (c, x, y), (), shape, dtype)


CASTS = {"f32": "cast_f32", "i32": "cast_i32", "bool": "cast_bool", "f16": "cast_f16"}


def cast(b: Builder, to: str, x):
    if x.dtype == to:
        return x
    return b.make(CASTS[to], (x,), (), x.shape, to)


def call_scalar(b: Builder, codelet, args, span):
    """A scalar codelet applied element-wise (op `call:NAME`)."""
    if len(args) != len(codelet.fields):
        b.err(span, f"'{codelet.name}' takes {len(codelet.fields)} arguments, given {len(args)}")
    for a, f in zip(args, codelet.fields):
        if (a.dtype in FLOATS) != (f.dtype in FLOATS) or (a.dtype == "bool") != (f.dtype == "bool"):
            b.err(span, f"'{codelet.name}': argument '{f.name}' is {f.dtype}, given {describe(a)}")
    shape = b.broadcast(span, codelet.name, *args)
    return b.make("call:" + codelet.name, tuple(args), (), shape, codelet.ret)


# ---------------------------------------------------------------- the table's entries

def _cast_emit(args, ty, attrs):
    return args[0] if args[0].ty == ty else cir.Cast(args[0], ty)


def _cast_f16_emit(args, ty, attrs):
    """Computed in f32, so a cast to f16 rounds to half (f32(f16(x)) is not x)."""
    x = args[0] if args[0].ty == "f32" else cir.Cast(args[0], "f32")
    return cir.Intrinsic("f16", (x,), "f32")


def _select_emit(args, ty, attrs):
    return cir.Select(args[0], args[1], args[2], ty)


def _g_select(b, n, g, i):
    c = n.args[0]
    return _where(b, c, g) if i == 1 else _where(b, _ap(b, "not", c), g)


def op_defs() -> list[OpDef]:
    out = [OpDef(r.name, "elementwise", r.doc, ref=r.ref, emit=r.emit, grad=r.grad) for r in ROWS]
    out.append(OpDef("select", "elementwise", "select(cond, a, b): a where cond, else b",
                     ref=lambda at, c, x, y: np.where(c, x, y), emit=_select_emit, grad=_g_select))
    for to, op in CASTS.items():
        # Between floating types the gradient passes back (the pass casts it to the
        # operand's type); integer and bool results carry no gradient.
        out.append(OpDef(op, "elementwise", f"convert to {to}", ref=lambda at, x, to=to: _cast_ref(x, to),
                         emit=_cast_f16_emit if to == "f16" else _cast_emit,
                         grad=(lambda b, n, g, i: g) if to in FLOATS else None))
    out.append(OpDef("const", "leaf", "a number broadcast where it is used",
                     ref=lambda at: np.asarray(at[0])))
    return out


def _cast_ref(x, to):
    if x.dtype == np.float64 and to in FLOATS:
        return x          # the reference evaluator's float64 mode: every float is float64
    if to == "i32" and x.dtype.kind == "f":
        # Saturating, NaN to 0: what native code does.
        with np.errstate(invalid="ignore"):
            return np.nan_to_num(np.clip(x.astype(np.float64), -2**31, 2**31 - 1), nan=0).astype(np.int32)
    return x.astype({"f32": np.float32, "f16": np.float16, "i32": np.int32, "bool": np.bool_}[to])


def functions() -> list[Function]:
    out = []
    for r in ROWS:
        if not r.callable:
            continue
        operands = ("x",) if r.arity == 1 else ("a", "b")

        def build(b, a, span, r=r, operands=operands):
            return apply(b, r.name, [a[o] for o in operands], span, tuple(a[p.name] for p in r.attrs))
        out.append(Function(r.name, tuple(Param(o, "operand") for o in operands) + r.attrs, build, r.doc,
                            applies=(lambda npos, kw: npos >= 2 or "b" in kw) if r.name in ("min", "max") else None))
    out.append(Function("maximum", (Param("a", "operand"), Param("b", "operand")),
                        lambda b, a, span: apply(b, "max", [a["a"], a["b"]], span), "the larger of a and b"))
    out.append(Function("minimum", (Param("a", "operand"), Param("b", "operand")),
                        lambda b, a, span: apply(b, "min", [a["a"], a["b"]], span), "the smaller of a and b"))
    out.append(Function("select", (Param("cond", "tensor"), Param("a", "operand"), Param("b", "operand")),
                        lambda b, a, span: select(b, a["cond"], a["a"], a["b"], span), "a where cond, else b"))
    for to in CASTS:
        out.append(Function(to, (Param("x", "tensor"),), lambda b, a, span, to=to: cast(b, to, a["x"]),
                            f"convert to {to}"))
    return out


__all__ = ["ROWS", "ROW", "BY_SYMBOL", "CASTS", "apply", "select", "cast", "call_scalar", "op_defs",
           "functions", "shape_str"]
