"""Codelet intrinsics, in one table: everything else looks them up.

An entry says what a codelet may call (`exp(x)`, `max(a, b)`), on which types, what
it costs on the IPU model, how the reference evaluator computes it and how code
generation emits it.  The checker (`sema.codelets`), the IR verifier (`ir.verify`),
the cycle model (`ir.cost`), the reference evaluator (`ir.codelet_eval`), the code
generator (`codegen.llvm`) and the JIT's symbol table (`codegen.jit`) all read this
table; adding an intrinsic is one entry here plus its tests.

Requires nothing but numpy; produces `INTRINSICS` (name → `Intrinsic`).

How an entry is computed:
- `ref(*args)` (numpy scalars: np.float32 for f32, Python int for i32) defines the
  value for the reference evaluator, rounded to the result type there; or
- `expand(*args)` rewrites the call into other codelet IR (`sigmoid(x)` is
  `1 / (1 + exp(-x))`); the evaluator and the code generator both run the
  expansion, so they agree by construction.  The cycle cost stays the entry's own.
- `llvm[ty]` names the LLVM intrinsic the code generator calls for operand type
  `ty` (`"llvm.exp.f32"`); `libm` names a C function instead (`"erff"`), which the
  JIT links in; `lowering` names one of the code generator's own lowerings
  (`"round_f16"`: a truncation to half and back).  `links` lists the C symbols an LLVM intrinsic may lower to on the
  host (`llvm.tanh.f32` becomes a call of `tanhf`), so the JIT can resolve them.
"""
from __future__ import annotations

import math
from dataclasses import field
from typing import Callable

import numpy as np

from popdsl.ir import codelet as ir
from popdsl.node import node

# Costs in cycles of one IPU worker instruction stream (an estimate, see ir.cost).
OP = 1                  # a cheap ALU operation
DIV = 8                 # division: no single-cycle divider
SQRT = 8
TRANSCENDENTAL = 20     # evaluated in software or over several cycles on the IPU


@node
class Intrinsic:
    name: str
    arity: int
    types: tuple[str, ...]                    # operand types accepted; all operands and the result share one
    cost: int                                 # cycles, besides the operands'
    doc: str
    ref: Callable | None = None               # reference value (see the module docstring)
    expand: Callable[..., ir.Expr] | None = None
    llvm: dict[str, str] = field(default_factory=dict)    # operand type -> LLVM intrinsic
    libm: str | None = None                   # C function (f32) the code calls instead
    links: tuple[str, ...] = ()               # C symbols the LLVM intrinsic may lower to
    lowering: str | None = None               # a code generator's own way ("round_f16")

    def accepts(self, ty: str) -> bool:
        return ty in self.types


_VEC = ("f32x2", "f16x4")
_LLVM_VEC = {"f32x2": "v2f32", "f16x4": "v4f16"}


def _lanewise(entry: Intrinsic) -> Intrinsic:
    """`entry` on the vector types too, lane by lane (LLVM's vector forms)."""
    llvm = dict(entry.llvm)
    for v in _VEC:
        llvm[v] = entry.llvm["f32"].replace(".f32", "." + _LLVM_VEC[v])
    return Intrinsic(entry.name, entry.arity, entry.types + _VEC, entry.cost, entry.doc + "; lane by lane on vectors",
                     ref=entry.ref, expand=entry.expand, llvm=llvm, libm=entry.libm, links=entry.links,
                     lowering=entry.lowering)


def _f32(name: str, cost: int, doc: str, ref, arity: int = 1, links: tuple[str, ...] = ()) -> Intrinsic:
    """An f32 intrinsic emitted as the LLVM intrinsic of the same name."""
    return Intrinsic(name, arity, ("f32",), cost, doc, ref=ref, llvm={"f32": f"llvm.{name}.f32"}, links=links)


def _ieee_max(a, b):
    """IEEE 754-2019 maximum (LLVM's llvm.maximum): NaN propagates, +0 > -0."""
    if np.isnan(a) or np.isnan(b):
        return np.float32(np.nan)
    if a == b:
        return b if np.signbit(a) else a
    return max(a, b)


def _ieee_min(a, b):
    if np.isnan(a) or np.isnan(b):
        return np.float32(np.nan)
    if a == b:
        return a if np.signbit(a) else b
    return min(a, b)


def _one(ty: str) -> ir.Const:
    return ir.Const(1.0, ty)


_TABLE = (
    _f32("exp", TRANSCENDENTAL, "e to the power x", np.exp, links=("expf", "exp2f")),
    _f32("log", TRANSCENDENTAL, "natural logarithm", np.log, links=("logf", "log2f", "log10f")),
    _lanewise(_f32("sqrt", SQRT, "square root", np.sqrt, links=("sqrtf",))),
    Intrinsic("rsqrt", 1, ("f32",), SQRT + DIV, "1 / sqrt(x)",
              expand=lambda x: ir.Binary("/", _one("f32"), ir.Intrinsic("sqrt", (x,), "f32"), "f32")),
    _f32("tanh", TRANSCENDENTAL, "hyperbolic tangent", np.tanh, links=("tanhf",)),
    Intrinsic("sigmoid", 1, ("f32",), TRANSCENDENTAL + DIV, "1 / (1 + exp(-x))",
              expand=lambda x: ir.Binary("/", _one("f32"), ir.Binary(
                  "+", _one("f32"), ir.Intrinsic("exp", (ir.Unary("neg", x, "f32"),), "f32"), "f32"), "f32")),
    _f32("sin", TRANSCENDENTAL, "sine", np.sin, links=("sinf",)),
    _f32("cos", TRANSCENDENTAL, "cosine", np.cos, links=("cosf",)),
    Intrinsic("erf", 1, ("f32",), TRANSCENDENTAL, "the error function", ref=lambda x: math.erf(x), libm="erff"),
    _f32("floor", OP, "largest integer <= x", np.floor, links=("floorf",)),
    _f32("ceil", OP, "smallest integer >= x", np.ceil, links=("ceilf",)),
    _f32("pow", TRANSCENDENTAL, "x to the power y", np.power, arity=2, links=("powf",)),
    _lanewise(Intrinsic("fma", 3, ("f32",), OP, "x * y + z rounded once",
                        ref=lambda a, b, c: np.float64(a) * np.float64(b) + np.float64(c),
                        llvm={"f32": "llvm.fma.f32"}, links=("fmaf", "__truncdfhf2"))),
    Intrinsic("f16", 1, ("f32",), OP, "x rounded to the nearest half (what an f16 store keeps); f16(x) in codelets",
              ref=lambda x: np.float16(x), lowering="round_f16", links=("__truncsfhf2", "__extendhfsf2")),
    _lanewise(Intrinsic("abs", 1, ("f32", "i32"), OP, "absolute value (i32: wraps at -2^31)",
                        ref=lambda x: np.abs(x) if isinstance(x, np.floating) else abs(x),
                        llvm={"f32": "llvm.fabs.f32", "i32": "llvm.abs.i32"})),
    _lanewise(Intrinsic("min", 2, ("f32", "i32"), OP, "the smaller of x and y (f32: NaN if either is, as "
                        "numpy's minimum; -0 below +0)",
                        ref=lambda a, b: _ieee_min(a, b) if isinstance(a, np.floating) else min(a, b),
                        llvm={"f32": "llvm.minimum.f32", "i32": "llvm.smin.i32"}, links=("fminf",))),
    _lanewise(Intrinsic("max", 2, ("f32", "i32"), OP, "the larger of x and y (f32: NaN if either is, as "
                        "numpy's maximum; +0 above -0)",
                        ref=lambda a, b: _ieee_max(a, b) if isinstance(a, np.floating) else max(a, b),
                        llvm={"f32": "llvm.maximum.f32", "i32": "llvm.smax.i32"}, links=("fmaxf",))),
)

INTRINSICS: dict[str, Intrinsic] = {e.name: e for e in _TABLE}


def reference(name: str, args: list, ty: str):
    """The value of intrinsic `name` at `args` (compute-type values), as the
    reference evaluator defines it; expansions are evaluated by the caller.  On a
    vector, lane by lane."""
    e = INTRINSICS[name]
    if ty in ir.VECTORS:
        lane, n = ir.VECTORS[ty]
        with np.errstate(all="ignore"):
            out = [e.ref(*[np.float32(a[i]) for a in args]) for i in range(n)]
        # Each lane's value rounded once to the lane type, from the precision `ref`
        # computes in: what LLVM's promotion of half vectors does (fma through f64).
        return np.array([np.asarray(v).astype(ir.NUMPY_DTYPE[lane]) for v in out])
    with np.errstate(all="ignore"):
        v = e.ref(*args)
    if ty == "f32":
        return np.float32(v)
    return ((int(v) + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def link_symbols() -> tuple[str, ...]:
    """C symbols native code may call because of an intrinsic."""
    out: list[str] = []
    for e in _TABLE:
        out += [s for s in (e.libm, *e.links) if s and s not in out]
    return tuple(out)
