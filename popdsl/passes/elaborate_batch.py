"""Compile-time loops that only place vertices, elaborated in one step per vertex
statement instead of one interpreter pass per iteration.

    compute scale {
        for t in 0..1472 { for j in 0..680 {
            Scale(x = v[2720*t + 4*j : 2720*t + 4*j + 4], k = 2.0) on tile t;
        } }
    }

is a million vertices; interpreting it costs ~30 µs each.  Here the loop variables
are numpy arrays over the whole iteration space, the tile, slice bounds and state
are evaluated once as arrays, and the vertices of a statement become one group
with `Stacked` connections — what the partitioner builds for its own vertices.

Requires the elaborator (`passes.elaborate`: scopes, `expr`, diagnostics, `vertex`
for its checks' wording) and produces exactly what the iteration-by-iteration path
would: the same vertices in the same order, the same compute-time steps counted.
It is an accelerator, not a second definition.  It takes a loop only when
everything in it is the plain case: a body of `for` loops with compile-time bounds
that do not depend on other loop variables, `let`s, and vertex statements whose
expressions are integer arithmetic and indexing; every value in range, every shape
alike, every check passing.  Anything else — an `if`, a call, a float computed
from a loop variable, one out-of-range slice, a field whose shape differs between
iterations — returns None *before anything is changed*, and the elaborator runs the
loop iteration by iteration, which reports any mistake with its usual message.
`POPDSL_NO_BATCH=1` turns this off (the differential tests compare both paths).
"""
from __future__ import annotations

import math
import os

import numpy as np

from popdsl.frontend import ast
from popdsl.ir import codelet as cir
from popdsl.ir import graph as g
from popdsl.ir.tensor import Node
from popdsl.node import node

# Below this many vertices the interpreter is as fast.
MIN_ITERATIONS = 64
# Iterations of one nest, and elements of one field's views over them, past which the
# arrays here would cost more memory than the interpreter's per-vertex views.
MAX_ITERATIONS = 1 << 24
MAX_FIELD_ELEMENTS = 1 << 26


class NoBatch(Exception):
    """This loop is not the plain case: elaborate it iteration by iteration."""


@node
class BView:
    """One view per iteration: index[k] is iteration k's view (flat element indices)."""
    tensor: int
    index: np.ndarray           # (n, *shape)


@node
class Nest:
    """The loops around a statement: iteration k's value of each loop variable."""
    n: int
    env: dict                   # name -> int, float, bool, View, array (n,) or BView


def enabled() -> bool:
    return os.environ.get("POPDSL_NO_BATCH", "") in ("", "0")


def _trunc_div(a, b):
    q = np.abs(a) // np.abs(b)
    return np.where((a >= 0) == (b >= 0), q, -q)


class BatchMixin:
    """Needs: self.d, self.graph, self.target, self.scopes, self.prog, self.cs,
    self.expr, self.tick, self.vertices, self.budgets, self.Bad."""

    def batch_for(self, s: ast.ForStmt) -> bool:
        """Elaborate loop `s` (in a compute set) in one step; False (and nothing
        changed) if it is not the plain case."""
        try:
            steps, stmts = self._plan_nest(s, Nest(1, {}), [])
            names = [vs.call.fn.id if isinstance(vs.call, ast.Call) and isinstance(vs.call.fn, ast.Name)
                     else None for vs, _ in stmts]
            nverts = sum(nest.n for _, nest in stmts)
            # One codelet placed by two statements interleaves in one group: the
            # interpreter's order.  Few iterations: nothing to win.
            if len(set(names)) != len(names) or nverts < MIN_ITERATIONS \
                    or self.vertices + nverts > self.budgets.vertices \
                    or self.unrolled + steps > self.budgets.unroll:
                return False
            made = [self._batch_vertex(vs, nest) for vs, nest in stmts]
        except NoBatch:
            return False
        # Everything checked: commit.
        self.tick(s.span, "in loops", steps)
        for (vs, _), parts in zip(stmts, made):
            if parts is not None:
                self._add_group(vs, *parts)
        self.vertices += nverts
        return True

    # ---------------------------------------------------------------- the nest
    def _plan_nest(self, s: ast.ForStmt, outer: Nest, out: list) -> tuple[int, list]:
        """(compile-time steps, [(vertex statement, its Nest)]) of loop `s` inside
        `outer`; NoBatch if it is not the plain case."""
        start, stop, step = (self._invariant_int(e, outer.env) if e is not None else 1
                             for e in (s.start, s.stop, s.step))
        if step == 0:
            raise NoBatch
        # Count before building: a bound beyond int64 is legal (the loop is then empty
        # or over budget) but numpy cannot hold it, nor len() count it.
        m = max(0, -((start - stop) // step))
        if outer.n * m > MAX_ITERATIONS or not -2**62 < start < 2**62:
            raise NoBatch
        values = np.arange(start, stop, step, dtype=np.int64)
        # Iteration order: an outer loop's variable varies slowest.
        env = {k: (np.repeat(v, m, axis=0) if isinstance(v, np.ndarray) else
                   BView(v.tensor, np.repeat(v.index, m, axis=0)) if isinstance(v, BView) else v)
               for k, v in outer.env.items()}
        env[s.var] = np.tile(values, outer.n)
        n = outer.n * m
        steps = n                           # the interpreter ticks once per iteration
        lets: set[str] = set()
        for st in s.body.stmts:
            if isinstance(st, ast.LetStmt) and isinstance(st.name, str) and st.type is None \
                    and st.name not in lets:   # a second one is "already defined"
                lets.add(st.name)
                env[st.name] = self._bexpr(st.value, Nest(n, env))
            elif isinstance(st, ast.VertexStmt):
                out.append((st, Nest(n, dict(env))))
            elif isinstance(st, ast.ForStmt):
                steps += self._plan_nest(st, Nest(n, dict(env)), out)[0]
            else:
                raise NoBatch
        return steps, out

    def _invariant_int(self, e, env) -> int:
        if _mentions_any(e, env) is not False:
            raise NoBatch
        v = self._scalar(e)
        if not isinstance(v, int) or isinstance(v, bool):
            raise NoBatch
        return v

    def _scalar(self, e):
        """`e` evaluated by the interpreter, with no diagnostic left behind."""
        n = len(self.d.items)
        try:
            return self.expr(e)
        except self.Bad:
            del self.d.items[n:]
            raise NoBatch

    # ---------------------------------------------------------------- expressions
    def _bexpr(self, e, nest: Nest):
        """`e` for every iteration: a scalar or View (the same for all), an int
        array (n,), or a BView."""
        if isinstance(e, (ast.IntLit, ast.FloatLit, ast.BoolLit)):
            return e.value
        if isinstance(e, ast.Name):
            if e.id in nest.env:
                return nest.env[e.id]
            return self._scalar(e)
        if _mentions_any(e, nest.env) is False:
            v = self._scalar(e)
            if isinstance(v, Node):
                raise NoBatch
            return v
        if isinstance(e, ast.Neg):
            v = self._bexpr(e.x, nest)
            if not isinstance(v, np.ndarray):
                raise NoBatch
            return -v
        if isinstance(e, ast.Binary):
            a, b = self._bexpr(e.a, nest), self._bexpr(e.b, nest)
            if not all(isinstance(x, np.ndarray) or type(x) is int for x in (a, b)):
                raise NoBatch
            if e.op == "+":
                r = np.add(a, b)
            elif e.op == "-":
                r = np.subtract(a, b)
            elif e.op == "*":
                r = np.multiply(a, b)
            elif e.op in ("/", "%"):
                if np.any(np.asarray(b) == 0):
                    raise NoBatch
                q = _trunc_div(a, b)
                r = q if e.op == "/" else a - q * b
            else:
                raise NoBatch
            # Compile-time integers are Python's (unbounded); stay far from int64's edge.
            if np.abs(r).max(initial=0) >= 1 << 62:
                raise NoBatch
            return r
        if isinstance(e, ast.IndexExpr):
            return self._bindex(e, nest)
        raise NoBatch

    def _bindex(self, e: ast.IndexExpr, nest: Nest):
        base = self._bexpr(e.base, nest)
        if isinstance(base, g.View):
            src, shape, batched = base.index, base.shape, False
        elif isinstance(base, BView):
            src, shape, batched = base.index, base.index.shape[1:], True
        else:
            raise NoBatch
        if len(e.index) > len(shape):
            raise NoBatch
        n = nest.n
        kept: list[tuple[np.ndarray, int]] = []    # (start per iteration, length) of kept axes
        picks: list[np.ndarray | None] = []        # per axis: index per iteration, or None (kept)
        for axis, dim in enumerate(shape):
            ix = e.index[axis] if axis < len(e.index) else ast.Slice(None, None, e.span)
            if isinstance(ix, ast.Slice):
                lo = self._bexpr(ix.start, nest) if ix.start is not None else 0
                hi = self._bexpr(ix.stop, nest) if ix.stop is not None else dim
                lo, hi = (np.broadcast_to(np.asarray(x), (n,)) for x in (lo, hi))
                if lo.dtype.kind not in "iu" or hi.dtype.kind not in "iu" or n == 0:
                    raise NoBatch
                length = int(hi[0] - lo[0])
                if not ((0 <= lo) & (lo < hi) & (hi <= dim)).all() or not (hi - lo == length).all():
                    raise NoBatch
                kept.append((lo, length))
                picks.append(None)
            else:
                i = np.broadcast_to(np.asarray(self._bexpr(ix, nest)), (n,))
                if i.dtype.kind not in "iu" or not ((-dim <= i) & (i < dim)).all():
                    raise NoBatch
                picks.append(i % dim)
        nk = len(kept)
        lead = (n,) + (1,) * nk
        pos, k = [], 0
        for p in picks:
            if p is None:
                lo, length = kept[k]
                shp = [n] + [1] * nk
                shp[1 + k] = length
                pos.append((lo[:, None] + np.arange(length)).reshape(shp))
                k += 1
            else:
                pos.append(p.reshape(lead))
        if batched:
            pos.insert(0, np.arange(n).reshape(lead))
        if n * math.prod(length for _, length in kept) > MAX_FIELD_ELEMENTS:
            raise NoBatch
        return BView(base.tensor, np.asarray(src[tuple(pos)], np.int64))

    # ---------------------------------------------------------------- vertices
    def _batch_vertex(self, s: ast.VertexStmt, nest: Nest):
        """The group parts of vertex statement `s` over `nest`, all checked, or
        NoBatch.  The checks are the interpreter's (`PoplarMixin.vertex`); here a
        failing one only says: not the plain case."""
        n = nest.n
        call = s.call
        if not isinstance(call, ast.Call) or not isinstance(call.fn, ast.Name):
            raise NoBatch
        c = self.prog.codelets.get(call.fn.id)
        if c is None or c.ret is not None:
            raise NoBatch
        if any(x.codelet == c.name for x in self.cs.groups):
            raise NoBatch                   # joining an existing group: the interpreter's way
        given = {a.name: a for a in call.args if isinstance(a, ast.Kwarg)}
        if len(given) != len(call.args) or set(given) != {f.name for f in c.fields}:
            raise NoBatch
        if n == 0:
            return None
        tile = np.broadcast_to(np.asarray(self._bexpr(s.tile, nest)), (n,))
        if tile.dtype.kind not in "iu" or not ((0 <= tile) & (tile < self.target.tiles)).all():
            raise NoBatch
        conns, state, syms = {}, {}, {}
        for f in c.fields:
            v = self._bexpr(given[f.name].value, nest)
            if f.direction == "state":
                state[f.name] = self._batch_state(f, v, n)
            else:
                conns[f.name] = self._batch_connect(f, v, n, syms, given[f.name].value.span)
        if any(k not in syms for k in c.symbols):
            raise NoBatch
        return c, tile.astype(np.int32), conns, state, {k: np.full(n, syms[k], np.int64) for k in c.symbols}, n

    def _batch_state(self, f: cir.Field, v, n: int) -> np.ndarray:
        if f.dtype == "bool":
            if not isinstance(v, bool):
                raise NoBatch
        elif isinstance(v, np.ndarray):
            if f.dtype != "i32" or ((v < -2**31) | (v >= 2**31)).any():
                raise NoBatch
            return v.copy()
        elif isinstance(v, bool) or not isinstance(v, {"i32": int}.get(f.dtype, (int, float))) \
                or f.dtype == "i32" and not -2**31 <= v < 2**31:
            raise NoBatch
        return np.full(n, v)

    def _batch_connect(self, f: cir.Field, v, n: int, syms: dict, span):
        if isinstance(v, g.View):
            if n * v.index.size > MAX_FIELD_ELEMENTS:
                raise NoBatch
            v = BView(v.tensor, np.broadcast_to(v.index, (n,) + v.index.shape).copy())
        if not isinstance(v, BView) or self.graph.tensors[v.tensor].dtype != cir.lane_type(f.dtype):
            raise NoBatch
        shape = v.index.shape[1:]
        if f.lanes > 1:
            if len(shape) != f.rank or shape[-1] % f.lanes:
                raise NoBatch                 # the interpreter says what is wrong
            shape = tuple(shape[:-1]) + (shape[-1] // f.lanes,)
        if f.rank == 0 and math.prod(shape) == 1:
            return g.Stacked(v.tensor, v.index.reshape(n), span)
        if len(shape) != f.rank:
            raise NoBatch
        for dim, m in zip(f.dims, shape):
            if isinstance(dim, int):
                if dim != m:
                    raise NoBatch
            elif m == 0 or syms.setdefault(dim, m) != m:
                raise NoBatch
        return g.Stacked(v.tensor, v.index, span)

    def _add_group(self, s: ast.VertexStmt, c, tiles, conns, state, syms, n) -> None:
        grp = g.VertexGroup(c.name)
        grp.tiles = tiles
        grp.span_ids = np.full(n, self.graph.span_id(s.span), np.int32)
        grp.connections = conns
        grp.state = state
        grp.syms = syms
        self.cs.groups.append(grp)


def _mentions_any(e, names) -> bool | None:
    """Whether expression `e` reads any of `names`; None if it holds a call (which
    may do anything and is left to the interpreter)."""
    stack, found = [e], False
    while stack:
        x = stack.pop()
        if x is None or isinstance(x, (ast.IntLit, ast.FloatLit, ast.BoolLit, ast.StringLit)):
            continue
        if isinstance(x, ast.Name):
            found = found or x.id in names
        elif isinstance(x, ast.Call):
            return None
        elif isinstance(x, (ast.Neg, ast.Not)):
            stack.append(x.x)
        elif isinstance(x, ast.Binary):
            stack += (x.a, x.b)
        elif isinstance(x, ast.IndexExpr):
            stack.append(x.base)
            stack += x.index
        elif isinstance(x, ast.Slice):
            stack += (x.start, x.stop)
        elif isinstance(x, (ast.ListLit, ast.TupleLit)):
            stack += x.items
        else:
            return None
    return found
