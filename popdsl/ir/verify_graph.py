"""Verifiers of what the front half of the pipeline promises: checked programs and
tensor graphs (after `elaborate` and after `partition`).

Requires the stage's result (a `sema.Program`, taken duck-typed: it has
`.codelets`; or an `ir.graph.TensorGraph`).  Produces nothing: each verifier raises
AssertionError naming the stage, the object and the broken invariant.  A failure
is a bug of the compiler, never of the user's program (the CLI reports it as an
internal error).  `ir.verify_lowered` verifies the back half.

Everything runs in numpy over whole arrays.  The one loop per vertex is over the
Poplar-level form of a connection (a list of Views, one per vertex the user wrote):
elaboration already spent far more on each of those; the partitioner's Stacked
connections are checked as arrays.
"""
from __future__ import annotations

import math

import numpy as np

from popdsl.ir.index import Batch, RunBatch, Strided, unique
from popdsl.ir.mapping import Mapping

from popdsl.ir import codelet as cir
from popdsl.ir import graph as g
from popdsl.ir.tensor import Node
from popdsl.ir.verify import verify_codelet

KINDS = ("var", "input", "param", "temp")


class Check:
    """Raises AssertionError("after STAGE: what: message") when a condition fails.
    A message that shows array contents is given as a function, formatted only
    then: formatting arrays on every passing check cost more than the checks."""

    def __init__(self, stage: str):
        self.stage = stage

    def __call__(self, ok, what: str, msg) -> None:
        if not ok:
            raise AssertionError(f"after {self.stage}: {what}: {msg() if callable(msg) else msg}")

    def none(self, bad: np.ndarray, what: str, msg, at: int = 0) -> None:
        """No entry of the boolean array `bad` is set; else msg(k) describes the
        first that is (position k + at of a flat array)."""
        if bad.any():
            k = at + int(np.flatnonzero(bad)[0])
            self(False, what, lambda: msg(k))

    def index(self, idx, n: int, what: str) -> None:
        """`idx` is an integer array, a strided view or a batch of them, of positions
        in [0, n)."""
        if isinstance(idx, Strided):
            if idx.size:
                lo, hi = idx.bounds()
                self(0 <= lo and hi < n, what, f"indices span [{lo}, {hi}], outside [0, {n})")
            return
        if isinstance(idx, RunBatch):
            self(idx.ptr.size >= 1 and idx.ptr[0] == 0 and (np.diff(idx.ptr) >= 0).all() and idx.ptr[-1] == idx.starts.size
                 and idx.lengths.size == idx.starts.size, what, "runs per vertex do not match the runs")
            self((idx.lengths > 0).all(), what, "a run is empty")
            if idx.field_shape is not None:
                size = math.prod(idx.field_shape)
                self((idx.sizes == size).all(), what, f"a vertex's runs do not hold its {size} elements")
            if idx.starts.size:
                lo, hi = int(idx.starts.min()), int((idx.starts + idx.lengths).max()) - 1
                self(0 <= lo and hi < n, what, f"indices span [{lo}, {hi}], outside [0, {n})")
            return
        if isinstance(idx, Batch):
            if idx.offsets.size and Strided(0, idx.field_shape, idx.strides).size:
                a, b = Strided(0, idx.field_shape, idx.strides).bounds()
                lo, hi = int(idx.offsets.min()) + a, int(idx.offsets.max()) + b
                self(0 <= lo and hi < n, what, f"indices span [{lo}, {hi}], outside [0, {n})")
            return
        self(isinstance(idx, np.ndarray) and idx.dtype.kind in "iu", what,
             lambda: f"index is {type(idx).__name__} {getattr(idx, 'dtype', '')}, not an integer array")
        if idx.size:
            lo, hi = int(idx.min()), int(idx.max())
            self(0 <= lo and hi < n, what, f"indices span [{lo}, {hi}], outside [0, {n})")

    def values(self, a: np.ndarray, lo: int, hi: int, what: str, name: str) -> None:
        """Every entry of `a` is in [lo, hi); names the first that is not."""
        a = np.asarray(a)
        if a.size and not (lo <= a.min() and a.max() < hi):
            flat = a.ravel()
            k = int(np.flatnonzero((flat < lo) | (flat >= hi))[0])
            where = k if a.ndim == 1 else list(np.unravel_index(k, a.shape))
            self(False, what, f"{name} {int(flat[k])} at {where} is outside [{lo}, {hi})")


# ---------------------------------------------------------------- check

def verify_checked(prog) -> None:
    """Every codelet of the program is valid codelet IR, calling only the program's
    scalar codelets."""
    check = Check("check")
    scalars = {n: c for n, c in prog.codelets.items() if c.ret is not None}
    for name, c in prog.codelets.items():
        check(c.name == name, f"codelet '{name}'", f"is filed under another name ('{c.name}')")
        try:
            verify_codelet(c, scalars)
        except ValueError as e:
            check(False, f"codelet '{name}'", str(e))


# ---------------------------------------------------------------- tensor graphs

def verify_elaborated(graph: g.TensorGraph) -> None:
    _verify_tensor_graph(graph, partitioned=False)


def verify_partitioned(graph: g.TensorGraph) -> None:
    _verify_tensor_graph(graph, partitioned=True)


def _verify_tensor_graph(graph: g.TensorGraph, partitioned: bool) -> None:
    """The invariants of a tensor graph; `partitioned` adds what partitioning
    promises: no Step left, every element on a tile, every output a View, vertex
    connections shaped by their codelet and symbols, ops and in-place records that
    name existing compute sets and tensors."""
    check = Check("partition" if partitioned else "elaborate")
    _tensors(check, graph, partitioned)
    for name, c in graph.codelets.items():
        check(c.name == name, f"codelet '{name}'", f"is filed under another name ('{c.name}')")
    for name, cs in graph.compute_sets.items():
        check(cs.name == name, f"compute set '{name}'", f"is filed under another name ('{cs.name}')")
        for k, grp in enumerate(cs.groups):
            _group(check, graph, grp, f"compute set '{name}' group {k} ({grp.codelet})")
    _program(check, graph, graph.program, partitioned)
    names = [n for n, _ in graph.outputs]
    check(len(set(names)) == len(names), "outputs", f"names repeat: {names}")
    for name, v in graph.outputs:
        if isinstance(v, g.View):
            _view(check, graph, v, f"output '{name}'")
        else:
            check(not partitioned, f"output '{name}'", f"is a {type(v).__name__}, not a View")
            check(isinstance(v, Node) and graph.nodes is not None and v.id < len(graph.nodes.nodes)
                  and graph.nodes.nodes[v.id] is v, f"output '{name}'",
                  f"is a {type(v).__name__}, neither a View nor a node of the graph's tensor program")
    if graph.nodes is not None:
        _nodes(check, graph)
    if partitioned:
        _records(check, graph)


def _mapping(check: Check, m, t: g.Tensor, what: str, ntiles: int, partitioned: bool) -> None:
    """A Mapping of t's elements: runs from 0, ascending, inside the tensor, each on a
    tile (or unmapped, before partitioning), neighbours on different tiles."""
    check(isinstance(m, Mapping) and m.numel == t.numel, what,
          lambda: f"mapping is {type(m).__name__} of {getattr(m, 'numel', '?')} elements, not a Mapping of {t.numel}")
    s, tl = m.starts, m.tiles
    check(isinstance(s, np.ndarray) and s.dtype == np.int64 and isinstance(tl, np.ndarray) and tl.dtype == np.int32
          and s.shape == tl.shape and s.ndim == 1 and s.size >= 1, what,
          lambda: f"mapping runs are {getattr(s, 'dtype', '?')}{getattr(s, 'shape', '')} starts and "
          f"{getattr(tl, 'dtype', '?')}{getattr(tl, 'shape', '')} tiles, not int64 and int32 of one length >= 1")
    check(s[0] == 0 and bool(np.all(s[1:] > s[:-1])) and (t.numel == 0 or s[-1] < t.numel), what,
          lambda: f"mapping runs start at {s[:8].tolist()}: not ascending from 0 inside {t.numel} elements")
    check(not np.any(tl[1:] == tl[:-1]), what, "mapping has neighbouring runs on one tile (not coalesced)")
    check.values(tl, 0 if partitioned else -1, ntiles, what, "tile" if partitioned else "tile (or -1, unmapped)")


def _runs(m: Mapping) -> str:
    return " ".join(f"[{a}:{b}]->{t}" for a, b, t in zip(m.starts[:4].tolist(), m.ends[:4].tolist(),
                                                         m.tiles[:4].tolist())) + (" ..." if len(m.starts) > 4 else "")


def _tensors(check: Check, graph: g.TensorGraph, partitioned: bool) -> None:
    n, ntiles = len(graph.tensors), graph.target.tiles
    for i, t in enumerate(graph.tensors):
        what = f"tensor {i} ('{t.name}')"
        check(t.id == i, what, f"has id {t.id} at position {i}")
        check(t.dtype in cir.ELEM_BYTES, what, f"has unknown dtype {t.dtype!r}")
        check(all(isinstance(s, int) and s >= 0 for s in t.shape), what, f"has shape {t.shape}")
        check(t.kind in KINDS, what, f"has unknown kind {t.kind!r}")
        _mapping(check, graph.mappings.get(i), t, what, ntiles, partitioned)
        if i in graph.init:
            # Drawn values are checked by their recipe's shape and dtype, not drawn here.
            want = np.dtype(cir.NUMPY_DTYPE[t.dtype])
            shape, dtype = graph.init.spec(i)
            check(shape == t.shape and dtype == want, what,
                  f"initial value is {dtype} of shape {shape}, not {want} of shape {t.shape}")
    check(set(graph.mappings) == set(range(n)), "mappings",
          lambda: f"keys {sorted(set(graph.mappings) ^ set(range(n)))[:8]} are not exactly the tensors' ids")
    check(set(graph.init) <= set(range(n)), "init", "holds values for tensors that do not exist")
    for name, tid in graph.inputs.items():
        check(0 <= tid < n and graph.tensors[tid].kind == "input", f"input '{name}'",
              f"names tensor {tid}, which is not an input tensor")
    for tid in graph.params:
        check(0 <= tid < n and graph.tensors[tid].kind == "param", "params", f"lists tensor {tid}, not a param")


def _view(check: Check, graph: g.TensorGraph, v, what: str) -> g.Tensor:
    check(isinstance(v, (g.View, g.Stacked)), what, f"is a {type(v).__name__}, not a View")
    check(isinstance(v.tensor, (int, np.integer)) and 0 <= v.tensor < len(graph.tensors), what,
          f"names tensor {v.tensor}, which does not exist")
    t = graph.tensors[v.tensor]
    check.index(v.index, t.numel, f"{what} (a view of '{t.name}', {t.numel} elements)")
    return t


def _group(check: Check, graph: g.TensorGraph, grp: g.VertexGroup, what: str) -> None:
    c = graph.codelets.get(grp.codelet)
    check(c is not None and c.ret is None, what, f"codelet '{grp.codelet}' is not a vertex codelet of the graph")
    tiles = np.asarray(grp.tiles)
    nv = len(tiles)
    check(tiles.shape == (nv,) and (nv == 0 or tiles.dtype.kind in "iu"), what, "tiles are not one integer per vertex")
    check.values(tiles, 0, graph.target.tiles, what, "tile")
    span_ids = np.asarray(grp.span_ids)
    check(span_ids.shape == (nv,), what, f"has {span_ids.shape} span ids for {nv} vertices")
    check.values(span_ids, 0, len(graph.spans), what, "span id")
    edges = [f for f in c.fields if f.direction != "state"]
    states = [f.name for f in c.fields if f.direction == "state"]
    for kind, got, want in (("connections", grp.connections, [f.name for f in edges]),
                            ("state", grp.state, states), ("syms", grp.syms, list(c.symbols))):
        check(set(got) == set(want), what, f"{kind} are for {sorted(got)}, the codelet's are {sorted(want)}")
    syms = {}
    for s in c.symbols:
        syms[s] = np.asarray(grp.syms[s])
        check(syms[s].shape == (nv,), what, f"symbol '{s}' has {syms[s].shape} values for {nv} vertices")
        check.values(syms[s], 0, 1 << 31, what, f"symbol '{s}' value")
    for f in states:
        check(len(grp.state[f]) == nv, what, f"state '{f}' has {len(grp.state[f])} values for {nv} vertices")
    for f in edges:
        conn, fwhat = grp.connections[f.name], f"{what} field '{f.name}'"
        if isinstance(conn, g.Stacked):
            t = _view(check, graph, conn, fwhat)
            check(conn.index.ndim == 1 + f.rank and conn.index.shape[0] == nv, fwhat,
                  f"stacked index of shape {conn.index.shape} for {nv} vertices of rank {f.rank}")
            if isinstance(conn.index, RunBatch) and conn.index.field_shape is None:
                sizes = conn.index.sizes
                check(f.rank == 1 and f.lanes == 1, fwhat, "vertices of different sizes on a field not of one axis")
                want = syms[f.dims[0]] if isinstance(f.dims[0], str) else f.dims[0]
                check(np.array_equal(np.broadcast_to(want, sizes.shape), sizes), fwhat,
                      f"its vertices' sizes are not the field's {f.dims[0]}")
            else:
                _field_shape(check, f, conn.index.shape[1:], syms, slice(None), fwhat)
            check(t.dtype == cir.lane_type(f.dtype), fwhat, f"is {f.dtype}, connected to '{t.name}' of {t.dtype}")
            continue
        check(isinstance(conn, list) and len(conn) == nv, fwhat,
              lambda: f"has {type(conn).__name__} {len(conn) if isinstance(conn, list) else ''} connections "
              f"for {nv} vertices")
        for k, v in enumerate(conn):
            t = _view(check, graph, v, f"{fwhat} vertex {k}")
            check(t.dtype == cir.lane_type(f.dtype), fwhat, f"is {f.dtype}, connected to '{t.name}' of {t.dtype}")
            check(v.index.ndim == f.rank, fwhat, f"vertex {k}: view of shape {v.index.shape} for rank {f.rank}")
            # Lowering places a field's elements by one tensor's layout.
            check(v.tensor == conn[0].tensor, fwhat,
                  lambda: f"vertex {k} is connected to tensor {v.tensor}, vertex 0 to {conn[0].tensor}")
            _field_shape(check, f, v.index.shape, syms, k, f"{fwhat} vertex {k}")


def _field_shape(check: Check, f: cir.Field, shape, syms, rows, what: str) -> None:
    if f.lanes > 1 and len(shape):
        check(shape[-1] % f.lanes == 0, what, f"last axis of {shape[-1]} elements is not whole {f.dtype} vectors")
        shape = tuple(shape[:-1]) + (shape[-1] // f.lanes,)
    for axis, (d, n) in enumerate(zip(f.dims, shape)):
        if isinstance(d, str):
            check(np.all(syms[d][rows] == n), what, lambda: f"axis {axis} has size {n}, symbol '{d}' says "
                  f"{unique(syms[d][rows])[:4].tolist()}")
        else:
            check(d == n, what, f"axis {axis} has size {n}, the codelet says {d}")


def _program(check: Check, graph: g.TensorGraph, p, partitioned: bool) -> None:
    check(isinstance(p, g.Seq) and isinstance(p.body, tuple), "program", f"{type(p).__name__} where a Seq belongs")
    for n in p.body:
        if isinstance(n, g.Seq):
            _program(check, graph, n, partitioned)
        elif isinstance(n, g.Execute):
            check(n.cs in graph.compute_sets, "program", f"executes unknown compute set '{n.cs}'")
        elif isinstance(n, g.Copy):
            s, d = _view(check, graph, n.src, "copy source"), _view(check, graph, n.dst, "copy destination")
            check(n.src.index.size == n.dst.index.size and s.dtype == d.dtype, f"copy {s.name} -> {d.name}",
                  f"copies {n.src.index.size} {s.dtype} elements to {n.dst.index.size} {d.dtype} elements")
        elif isinstance(n, g.Repeat):
            check(isinstance(n.count, int) and n.count >= 0, "program", f"repeat count {n.count!r}")
            _program(check, graph, n.body, partitioned)
        elif isinstance(n, (g.While, g.If)):
            what = f"{type(n).__name__.lower()} condition"
            t = _view(check, graph, n.cond, what)
            check(t.dtype == "bool" and n.cond.index.size == 1, what, f"is {n.cond.index.size} {t.dtype} elements, "
                  "not one bool")
            for body in ((n.body,) if isinstance(n, g.While) else (n.then, n.orelse)):
                _program(check, graph, body, partitioned)
        elif isinstance(n, g.Print):
            _view(check, graph, n.view, f"print {n.label}")
        elif isinstance(n, g.Step):
            check(not partitioned, "program", "still holds a Step")
        else:
            check(False, "program", f"holds a {type(n).__name__}")


def _nodes(check: Check, graph: g.TensorGraph) -> None:
    for i, n in enumerate(graph.nodes.nodes):
        what = f"tensor-program node %{i} ({n.op})"
        check(n.id == i, what, f"has id {n.id} at position {i}")
        for a in n.args:
            check(a.id < i and graph.nodes.nodes[a.id] is a, what, f"argument %{a.id} is not an earlier node")
        if n.op in ("tensor", "view"):
            tid = n.attrs[0]
            check(0 <= tid < len(graph.tensors), what, f"names tensor {tid}, which does not exist")
            if n.op == "view":
                check.index(n.index, graph.tensors[tid].numel, what)


def _records(check: Check, graph: g.TensorGraph) -> None:
    for op in graph.ops:
        for name in op["compute_sets"]:
            check(name in graph.compute_sets, f"op record of %{op.get('node')} ({op.get('op')})",
                  f"names unknown compute set '{name}'")
    n = len(graph.tensors)
    for out, inp, cs in graph.inplace:
        what = f"in-place record ({out}, {inp}, '{cs}')"
        check(0 <= out < n and 0 <= inp < n and cs in graph.compute_sets, what,
              "names a tensor or compute set that does not exist")
        a, b = graph.tensors[out], graph.tensors[inp]
        check(a.shape == b.shape and a.elem_bytes == b.elem_bytes, what,
              f"'{a.name}' {a.dtype}{list(a.shape)} cannot take the bytes of '{b.name}' {b.dtype}{list(b.shape)}")
        # Lowering lays a tensor's elements out per tile in index order, so equal
        # mappings are what makes the output's element k land on the input's.
        mo, mi = graph.mappings[out], graph.mappings[inp]
        check(mo.same(mi), what, lambda: f"'{a.name}' and '{b.name}' are mapped differently (runs "
              f"{_runs(mo)} vs {_runs(mi)})")
