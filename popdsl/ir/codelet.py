"""Codelet IR: the typed, checked form of one codelet.

Produced by `popdsl.sema.codelets.lower_codelet` from the AST; consumed by the code
generator (`popdsl.codegen.llvm`), the reference evaluator (`popdsl.ir.codelet_eval`)
and the `.popx` writer.  Every expression carries its scalar type, every name is
resolved, compound assignments are already expanded, so consumers never look back
at source text.

Types are the strings of `SCALARS` and `VECTORS`.  Integers are 32-bit in the
language; `f16` is a storage type only (loaded and stored as half, computed in f32),
so expressions never have type `f16`.  The vectors are the IPU's 64-bit ones: `f32x2`
(two f32 lanes) and `f16x4` (four f16 lanes, each operation rounded to f16).  A vector
field's last axis counts vectors: it connects to a tensor of its lane type whose last
axis holds `lanes` times as many elements.

The *vertex table* contract between this IR, the code generator and the simulator
lives in `table_layout` below: one int64 row per vertex.
"""
from __future__ import annotations

from dataclasses import fields as dc_fields, is_dataclass
from typing import Union

from popdsl.node import node

SCALARS = ("f32", "f16", "i32", "bool")
VECTORS = {"f32x2": ("f32", 2), "f16x4": ("f16", 4)}      # vector type -> (lane type, lanes)
FIELD_TYPES = SCALARS + tuple(VECTORS)
ELEM_BYTES = {"f32": 4, "f16": 2, "i32": 4, "bool": 1, "f32x2": 8, "f16x4": 8}
NUMPY_DTYPE = {"f32": "float32", "f16": "float16", "i32": "int32", "bool": "bool"}
DIRECTIONS = ("in", "out", "inout", "state")


def compute_type(dtype: str) -> str:
    """The type an element of storage type `dtype` has once loaded."""
    return "f32" if dtype == "f16" else dtype


def lanes(dtype: str) -> int:
    """Elements of the lane type in one element of `dtype` (1 for a scalar)."""
    return VECTORS[dtype][1] if dtype in VECTORS else 1


def lane_type(dtype: str) -> str:
    """The tensor element type a field of `dtype` connects to."""
    return VECTORS[dtype][0] if dtype in VECTORS else dtype


# ---------------------------------------------------------------- declarations

@node
class Field:
    """An edge of the vertex (`in`/`out`/`inout`) or vertex state (`state`).

    dims: one entry per axis, a size symbol (str) or a constant (int).  Rank 0 is a
    scalar.  State fields are always scalars.
    """
    name: str
    direction: str
    dtype: str
    dims: tuple[Union[str, int], ...]

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def lanes(self) -> int:
        """Tensor elements per field element (2 or 4 for a vector field)."""
        return lanes(self.dtype)


@node
class Codelet:
    """A vertex codelet (`ret is None`) or a scalar element-wise codelet.

    For a scalar codelet the fields are its parameters (all direction `in`, rank 0)
    and `body` ends in `Return`.
    symbols: size symbols in order of first appearance in the field list.
    """
    name: str
    fields: tuple[Field, ...]
    symbols: tuple[str, ...]
    ret: str | None
    body: tuple["Stmt", ...]


# ---------------------------------------------------------------- expressions

@node
class Const:
    value: Union[float, int, bool]
    ty: str


@node
class Local:
    """A local variable, loop variable or `let` binding (unique name per codelet)."""
    name: str
    ty: str


@node
class Sym:
    """The value of a size symbol for this vertex (i32)."""
    name: str
    ty: str = "i32"


@node
class Load:
    """Element `index` of field `field` (index empty for a scalar field or state).

    checked: False when the compiler proved every index in range.
    """
    field: str
    index: tuple["Expr", ...]
    ty: str
    checked: bool = True


@node
class Len:
    """Size of axis `axis` of a field (i32)."""
    field: str
    axis: int
    ty: str = "i32"


@node
class Unary:
    op: str          # "neg" | "not"
    x: "Expr"
    ty: str


@node
class Binary:
    """Arithmetic (`+ - * / %`) on equal operand types, result of that type;
    comparisons (`== != < <= > >=`) with result bool; logic (`&& ||`) on bools,
    short-circuiting."""
    op: str
    a: "Expr"
    b: "Expr"
    ty: str


@node
class Select:
    cond: "Expr"
    a: "Expr"
    b: "Expr"
    ty: str


@node
class Cast:
    x: "Expr"
    ty: str


@node
class Intrinsic:
    """exp log sqrt rsqrt tanh sigmoid sin cos abs min max floor ceil pow fma.

    abs/min/max also work on i32; the rest are f32 only."""
    name: str
    args: tuple["Expr", ...]
    ty: str


@node
class Splat:
    """A vector (`ty`) with every lane x (an f32; rounded to f16 for f16x4)."""
    x: "Expr"
    ty: str


@node
class Vector:
    """A vector (`ty`) of the lanes xs (f32s; rounded to f16 for f16x4): f32x2(a, b)."""
    xs: tuple["Expr", ...]
    ty: str


@node
class Lane:
    """Lane `index` (a constant) of vector x, as an f32 (f16 lanes widen exactly)."""
    x: "Expr"
    index: int
    ty: str = "f32"


@node
class CallScalar:
    """A call of a scalar codelet (by name) from another codelet."""
    name: str
    args: tuple["Expr", ...]
    ty: str


Expr = Union[Const, Local, Sym, Load, Len, Unary, Binary, Select, Cast, Intrinsic, Splat, Vector, Lane,
             CallScalar]

# ---------------------------------------------------------------- statements


@node
class Declare:
    """Introduce local `name` of type `ty`, initialised to `init` (zero if None)."""
    name: str
    ty: str
    init: Expr | None


@node
class Assign:
    name: str
    value: Expr


@node
class Store:
    """Write element `index` of an `out`/`inout` field (index empty for a scalar)."""
    field: str
    index: tuple[Expr, ...]
    value: Expr
    checked: bool = True


@node
class For:
    """for var in start..stop step step (i32; step is a positive or negative
    non-zero compile-time constant; the loop runs while var < stop for a positive
    step, var > stop for a negative one).  `var` is read-only in the body."""
    var: str
    start: Expr
    stop: Expr
    step: int
    body: tuple["Stmt", ...]


@node
class While:
    cond: Expr
    body: tuple["Stmt", ...]


@node
class If:
    cond: Expr
    then: tuple["Stmt", ...]
    orelse: tuple["Stmt", ...]


@node
class Amp:
    """The accumulating matrix product, an IPU tile's AMP unit (`amp(...)` in codelets):

        c[ci + p, cj + q*cstep] += sum over r < k of A[p, r] * B[r, q]

    for p < m, q < n, where A[p, r] = a[ai + p, aj + r*astep] and B[r, q] =
    b[bi + r, bj + q*bstep] -- or, read transposed (`amp_at` / `amp_bt`),
    A[p, r] = a[ai + r, aj + p*astep] and B[r, q] = b[bi + q, bj + r*bstep]: a step
    is always along its field's columns.  `c`, `a`, `b` are rank-2 fields, `*_at`
    their (row, column) origins.  Each c[p, q] adds its k products in f32 from the
    old c, r ascending (f16 operands are widened: their products are exact in f32),
    in memory: for p, for r, for q (so a `cstep` of 0 adds a row's products into one
    element in that order).  Nothing happens (and nothing is checked) unless m, k and
    n are all positive; then the first and last element each operand touches is
    checked on each axis.  Its cycles depend on m, k, n (`ir.cost.amp_cycles`):
    charged after its operands are evaluated, then a check point (`ir.checkpoints`)."""
    c: str
    c_at: tuple[Expr, Expr]
    a: str
    a_at: tuple[Expr, Expr]
    b: str
    b_at: tuple[Expr, Expr]
    m: Expr
    k: Expr
    n: Expr
    astep: Expr
    bstep: Expr
    cstep: Expr
    checked: bool = True
    a_transposed: bool = False
    b_transposed: bool = False

    def operands(self):
        """(field, origin) of c, a and b."""
        return ((self.c, self.c_at), (self.a, self.a_at), (self.b, self.b_at))

    def sizes(self):
        """m, k, n and the column steps of a, b and c."""
        return (self.m, self.k, self.n, self.astep, self.bstep, self.cstep)

    @property
    def intrinsic(self) -> str:
        """Its name in codelets."""
        return "amp_at" if self.a_transposed else "amp_bt" if self.b_transposed else "amp"

    def corners(self, at, m, k, n, astep, bstep, cstep, last, one):
        """(field, first row, last row, first column, last column) each operand
        touches: `at` its origins' values, in c, a, b order; `last(x0, count, step)`
        the last of `count` values from x0; `one` the value 1 (ints in the
        evaluator, LLVM values in the code generator)."""
        (c, (ci, cj)), (a, (ai, aj)), (b, (bi, bj)) = at
        a_rows, a_cols = (k, m) if self.a_transposed else (m, k)
        b_rows, b_cols = (n, k) if self.b_transposed else (k, n)
        return ((c, ci, last(ci, m, one), cj, last(cj, n, cstep)),
                (a, ai, last(ai, a_rows, one), aj, last(aj, a_cols, astep)),
                (b, bi, last(bi, b_rows, one), bj, last(bj, b_cols, bstep)))


@node
class Break:
    pass


@node
class Continue:
    pass


@node
class Return:
    value: Expr | None


Stmt = Union[Declare, Assign, Store, Amp, For, While, If, Break, Continue, Return]


# ---------------------------------------------------------------- vertex table

@node
class Column:
    """One int64 column of the vertex table.

    kind: "addr"   byte offset of the field's first element in simulator memory
          "stride" row stride, in elements, of a rank-2 field
          "state"  the state value: f32 as its IEEE bit pattern, i32/bool as integers
          "sym"    the value of a size symbol
    """
    kind: str
    name: str


# Bytes of vertex state per column of a vertex table on the IPU: one 32-bit word
# each — a field's pointer, a rank-2 field's row stride, a size symbol (Poplar's
# default Vector layout, SPAN, is a pointer and a 32-bit count: Poplar User Guide
# §5.1.2, Table 5.1), a scalar field (i32 or f32).  The host's table holds them as
# int64; the memory plan counts the IPU's words.
STATE_WORD_BYTES = 4


def table_layout(c: Codelet) -> tuple[Column, ...]:
    """Columns of `c`'s vertex table: per field in order, `addr` (+ `stride` for
    rank 2) or `state`; then one `sym` column per size symbol."""
    cols: list[Column] = []
    for f in c.fields:
        if f.direction == "state":
            cols.append(Column("state", f.name))
        else:
            cols.append(Column("addr", f.name))
            if f.rank == 2:
                cols.append(Column("stride", f.name))
    cols.extend(Column("sym", s) for s in c.symbols)
    return tuple(cols)


# Error kinds reported by native code (and the reference evaluator).
ERR_BOUNDS = 1
ERR_DIV_ZERO = 2
ERR_CYCLES = 3          # over the cycle budget at a check point (`ir.checkpoints`)
ERR_INTERRUPT = 4       # Ctrl-C seen at a check point (native code only)


# ---------------------------------------------------------------- (de)serialising

_NODES = {cls.__name__: cls for cls in (
    Field, Codelet, Const, Local, Sym, Load, Len, Unary, Binary, Select, Cast,
    Intrinsic, Splat, Vector, Lane, CallScalar, Declare, Assign, Store, Amp, For, While, If, Break, Continue, Return)}


def to_json(node):
    """IR → plain JSON-able data (tagged dicts and lists)."""
    if is_dataclass(node):
        d = {"_": type(node).__name__}
        for f in dc_fields(node):
            d[f.name] = to_json(getattr(node, f.name))
        return d
    if isinstance(node, tuple):
        return [to_json(x) for x in node]
    return node


def from_json(data):
    """Inverse of `to_json`.  Raises ValueError on anything malformed; the caller
    then verifies the result with `popdsl.ir.verify.verify_codelet`."""
    if isinstance(data, dict):
        cls = _NODES.get(data.get("_"))
        if cls is None:
            raise ValueError(f"unknown codelet IR node {data.get('_')!r}")
        names = [f.name for f in dc_fields(cls)]
        if set(data) - {"_"} != set(names):
            raise ValueError(f"malformed {cls.__name__} node")
        return cls(**{n: from_json(data[n]) for n in names})
    if isinstance(data, list):
        return tuple(from_json(x) for x in data)
    if data is None or isinstance(data, (int, float, str, bool)):
        return data
    raise ValueError(f"unexpected value {data!r} in codelet IR")
