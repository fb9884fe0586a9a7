"""Elaboration of Poplar-level graphs: tensor declarations, tile mapping and vertices.

Mixed into the graph elaborator (`passes.elaborate`): `var`/`input` declarations
with their initial values, `map` statements and the final check that every element
has a tile, and vertices — fields connected to views with size symbols bound and
checked, vertex state typed.  Requires the elaborator's scopes, diagnostics and
expression evaluation; produces tensors, mappings and vertex groups in the graph.
"""
from __future__ import annotations

import math

import numpy as np

from popdsl.diagnostics import Span
from popdsl.frontend import ast
from popdsl.ir import codelet as cir
from popdsl.ir import graph as g
from popdsl.ir.index import as_array
from popdsl.ir.mapping import Mapping
from popdsl.ir.tensor import Node

INITS = {"zeros", "ones", "full", "uniform", "normal", "arange"}


def kind_of(v) -> str:
    """How a compile-time value reads in a message."""
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, (g.View, Node)):
        return "tensor"
    return type(v).__name__


def type_text(dtype: str, dims) -> str:
    return f"{dtype}[{', '.join(map(str, dims))}]" if dims else dtype


def field_tensors(grp: g.VertexGroup) -> tuple[int, ...]:
    """The tensor each edge field of `grp` is connected to (a group has one per field)."""
    return tuple(c.tensor if isinstance(c, g.Stacked) else c[0].tensor for c in grp.connections.values())


def as_lists(grp: g.VertexGroup) -> None:
    """A group made in one step (arrays, `Stacked` connections) as one the
    interpreter extends vertex by vertex (lists, a View per vertex)."""
    grp.tiles = np.asarray(grp.tiles).tolist()
    grp.span_ids = np.asarray(grp.span_ids).tolist()
    grp.connections = {f: [g.View(st.tensor, np.asarray(st.index[k]), st.span) for k in range(len(st.index))]
                       for f, st in grp.connections.items()}
    grp.state = {f: np.asarray(v).tolist() for f, v in grp.state.items()}
    grp.syms = {s: np.asarray(v).tolist() for s, v in grp.syms.items()}


class PoplarMixin:
    """Needs: self.d, self.graph, self.target, self.scopes, self.prog, self.cs,
    self.expr, self.int_value, self.lookup, self.bind, self.poison, self.Bad."""

    # ---------------------------------------------------------------- tensors
    def shape_of(self, t: ast.TypeRef) -> tuple[str, tuple[int, ...]]:
        if t.name not in cir.SCALARS:
            self.d.error(t.span, f"unknown type '{t.name}'", "types are f32, f16, i32 and bool")
            raise self.Bad
        dims = []
        for d in t.dims or ():
            if isinstance(d, str):
                v = self.lookup(d, t.span)
                if not isinstance(v, int) or isinstance(v, bool):
                    self.d.error(t.span, f"dimension '{d}' must be a compile-time integer")
                    raise self.Bad
                d = v
            if d <= 0:
                self.d.error(t.span, f"dimensions must be positive, got {d}")
                raise self.Bad
            dims.append(d)
        if math.prod(dims) > (1 << 31):
            self.d.error(t.span, "tensor too large")
            raise self.Bad
        # Nothing bigger than the whole target can ever be placed (and elaboration
        # would build index arrays of its size on the host first).
        nbytes, total = math.prod(dims) * cir.ELEM_BYTES[t.name], self.target.tiles * self.target.tile_memory
        if nbytes > total:
            self.d.error(t.span, f"tensor too large: {nbytes:,} B is more than the memory of the "
                         f"whole target ({self.target.tiles} tiles of {self.target.tile_memory:,} B)")
            raise self.Bad
        return t.name, tuple(dims)

    def declare_tensor(self, s) -> None:
        if s.type is None:
            self.d.error(s.span, f"tensor '{s.name}' needs a type, e.g. 'var {s.name}: f32[8];'")
            raise self.Bad
        dtype, shape = self.shape_of(s.type)
        kind = "input" if isinstance(s, ast.InputStmt) else "var"
        init = None
        if kind == "var" and s.value is not None:
            init = self.initial_value(s.value, dtype, shape, s.name)
        gr = self.graph
        t = g.Tensor(len(gr.tensors), s.name, dtype, shape, kind, s.span)
        self.bind(s.name, g.View(t.id, np.arange(t.numel, dtype=np.int64).reshape(shape), s.span), s.span)
        gr.tensors.append(t)
        gr.mappings[t.id] = Mapping.unmapped(t.numel)
        if init is not None:
            gr.init[t.id] = init
        if kind == "input":
            gr.inputs[s.name] = t.id

    def initial_value(self, e, dtype: str, shape, name: str) -> np.ndarray:
        if isinstance(e, ast.Call) and isinstance(e.fn, ast.Name) and e.fn.id in INITS:
            return self.init_call(e, dtype, shape)
        v = self.expr(e)
        if isinstance(v, (int, float, bool)):
            return np.full(shape, self.converted(v, dtype, e, name, literal=True))
        if isinstance(v, list):
            arr = self.converted(v, dtype, e, name, literal=True)
            if arr.shape != tuple(shape):
                self.d.error(e.span, f"initializer has shape {list(arr.shape)}, "
                             f"'{name}' has shape {list(shape)}")
                raise self.Bad
            return arr
        self.d.error(e.span, "a tensor's initial value must be a number, a list or an "
                     "initializer such as zeros(), uniform(seed = 1)")
        raise self.Bad

    def converted(self, values, dtype: str, e, name: str, literal: bool) -> np.ndarray:
        """`values` (a number, nested lists of numbers, or an array) as an array of
        `dtype`, or an error when one does not fit: no silent wrap-around,
        truncation or overflow to infinity."""
        try:
            a = np.asarray(values)
        except (ValueError, TypeError, OverflowError):         # ragged lists
            a = None
        if a is None or a.dtype.kind not in "biuf":
            items = a.ravel().tolist() if a is not None else [None]
            if all(isinstance(x, (int, float)) for x in items):  # integers beyond 64 bits
                self.d.error(e.span, f"initial value {max(items, key=abs)} does not fit in {dtype}")
            else:
                self.d.error(e.span, "initializer must be a rectangular list of numbers")
            raise self.Bad
        kind = a.dtype.kind
        if dtype == "i32" and literal and kind == "f":
            self.d.error(e.span, f"'{name}' is i32; its initial values must be integers")
            raise self.Bad
        with np.errstate(all="ignore"):
            if dtype == "bool":
                if literal and kind != "b" or not ((a == 0) | (a == 1)).all():
                    self.d.error(e.span, f"'{name}' is bool; its initial values must be true or false")
                    raise self.Bad
                out = np.zeros(a.shape, bool)
            elif dtype == "i32":
                out = ~np.isfinite(a) | (a < -2**31) | (a >= 2**31)
            else:
                out = np.isfinite(a) & ~np.isfinite(a.astype(cir.NUMPY_DTYPE[dtype]))
        if out.any():
            self.d.error(e.span, f"initial value {a[out].ravel()[0].item()} does not fit in {dtype}")
            raise self.Bad
        return a.astype(cir.NUMPY_DTYPE[dtype])

    def init_call(self, e: ast.Call, dtype: str, shape) -> np.ndarray:
        fn = e.fn.id
        allowed = {"zeros": (), "ones": (), "full": ("value",), "uniform": ("low", "high", "seed"),
                   "normal": ("mean", "std", "seed"), "arange": ("start", "step")}[fn]
        kw: dict[str, float] = {}
        for i, a in enumerate(e.args):
            name = a.name if isinstance(a, ast.Kwarg) else (allowed[i] if i < len(allowed) else None)
            if name not in allowed:
                self.d.error(a.span, f"{fn}() takes {', '.join(allowed) or 'no arguments'}")
                raise self.Bad
            v = self.expr(a.value if isinstance(a, ast.Kwarg) else a)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                self.d.error(a.span, f"{fn}(): '{name}' must be a number")
                raise self.Bad
            if name == "seed" and (not isinstance(v, int) or v < 0):
                self.d.error(a.span, f"{fn}(): the seed must be a non-negative integer")
                raise self.Bad
            if name == "std" and v < 0:
                self.d.error(a.span, f"{fn}(): 'std' must not be negative")
                raise self.Bad
            kw[name] = v
        rng = np.random.default_rng(int(kw.get("seed", 0)))
        try:
            with np.errstate(all="ignore"):
                out = self.init_values(fn, e, kw, rng, shape)
        except (ValueError, OverflowError) as ex:
            self.d.error(e.span, f"{fn}(): {ex}")
            raise self.Bad
        return self.converted(out, dtype, e, f"{fn}()", literal=False)

    def init_values(self, fn: str, e, kw, rng, shape) -> np.ndarray:
        if fn == "zeros":
            out = np.zeros(shape)
        elif fn == "ones":
            out = np.ones(shape)
        elif fn == "full":
            if "value" not in kw:
                self.d.error(e.span, "full() needs a value")
                raise self.Bad
            out = np.full(shape, kw["value"])
        elif fn == "uniform":
            out = rng.uniform(kw.get("low", 0.0), kw.get("high", 1.0), size=shape)
        elif fn == "normal":
            out = rng.normal(kw.get("mean", 0.0), kw.get("std", 1.0), size=shape)
        else:
            n = int(np.prod(shape, dtype=np.int64))
            out = (kw.get("start", 0) + kw.get("step", 1) * np.arange(n, dtype=np.float64)).reshape(shape)
        return out

    def map_stmt(self, s: ast.MapStmt) -> None:
        v = self.tensor_value(s.target, "map")
        flat = v.index.reshape(-1)
        tiles = self.target.tiles
        if s.tile is None:
            chunk = -(-flat.size // tiles) if flat.size else 1
            dest = (np.arange(flat.size) // chunk).astype(np.int32)
        else:
            try:
                tile = self.int_value(s.tile, "a tile")
                if not 0 <= tile < tiles:
                    self.d.error(s.tile.span, f"tile {tile} is out of range: the target has "
                                 f"{tiles} tiles (0..{tiles - 1})")
                    raise self.Bad
            except self.Bad:
                self.bad_map.add(v.tensor)
                raise
            dest = np.int32(tile)
        self.pending_maps.setdefault(v.tensor, []).append((as_array(flat), dest))

    def apply_maps(self) -> None:
        """The 'map' statements so far, a later one winning where two map an element."""
        for tid, maps in self.pending_maps.items():
            elements = np.concatenate([np.asarray(e, np.int64).reshape(-1) for e, _ in maps])
            tiles = np.concatenate([np.broadcast_to(np.asarray(t, np.int32), np.shape(e)).reshape(-1)
                                    for e, t in maps])
            self.graph.mappings[tid].assign_elements(elements, tiles)
        self.pending_maps = {}

    def check_mapping(self) -> None:
        """Every element of every tensor is on a tile.  A vertex connected to
        unmapped elements is reported where it is connected; any other unmapped
        tensor where it is declared (not when a 'map' of it already failed).  An
        input no vertex reads and no `map` touched is spread by the partitioner: the
        host writes it, only copies, prints and tensor ops read it."""
        self.apply_maps()
        mappings = self.graph.mappings
        # Tensors of the tensor program are mapped by the partitioner.
        unmapped = {t.id for t in self.graph.tensors
                    if t.id not in self.bad_map and t.id not in self.op_tensors and t.kind != "param"
                    and not mappings[t.id].fully_mapped()}
        if not unmapped:
            return
        at_vertex: set[int] = set()
        for cs in self.graph.compute_sets.values():
            for grp in cs.groups:
                for fname, views in grp.connections.items():
                    for v in ([views] if isinstance(views, g.Stacked) else views):
                        if v.tensor in unmapped and (mappings[v.tensor].tiles_at(v.index) < 0).any():
                            t = self.graph.tensors[v.tensor]
                            self.d.error(v.span, f"field '{fname}' of {grp.codelet} is connected to "
                                         f"elements of '{t.name}' that are not mapped to any tile",
                                         f"map '{t.name}' with 'map {t.name} -> ...;'")
                            at_vertex.add(v.tensor)
        for t in self.graph.tensors:
            if t.id in unmapped and t.id not in at_vertex \
                    and not (t.kind == "input" and mappings[t.id].unmapped_count() == t.numel):
                n = mappings[t.id].unmapped_count()
                self.d.error(t.span, f"tensor '{t.name}' has {n} of {t.numel} elements "
                             "not mapped to any tile", f"add 'map {t.name} -> linear;' or map its "
                             "slices to tiles")

    # ---------------------------------------------------------------- vertices
    def vertex(self, s: ast.VertexStmt) -> None:
        call = s.call
        if not isinstance(call, ast.Call) or not isinstance(call.fn, ast.Name):
            self.d.error(s.span, "a vertex is written 'Codelet(field = tensor, ...) on tile T;'")
            raise self.Bad
        name = call.fn.id
        c = self.prog.codelets.get(name)
        if c is None:
            self.d.error(call.fn.span, f"unknown codelet '{name}'")
            raise self.Bad
        if c.ret is not None:
            self.d.error(call.fn.span, f"'{name}' is a scalar codelet (an element-wise "
                         "function), not a vertex")
            raise self.Bad
        tile = self.int_value(s.tile, "a tile")
        if not 0 <= tile < self.target.tiles:
            self.d.error(s.tile.span, f"tile {tile} is out of range: the target has "
                         f"{self.target.tiles} tiles (0..{self.target.tiles - 1})")
            raise self.Bad
        given: dict[str, ast.Kwarg] = {}
        ok = True
        for a in call.args:
            if not isinstance(a, ast.Kwarg):
                self.d.error(a.span, f"connect fields by name, e.g. {name}({c.fields[0].name if c.fields else 'x'} = ...)")
                raise self.Bad
            if a.name in given:
                self.d.error(a.span, f"field '{a.name}' is connected twice")
                ok = False
            given[a.name] = a
        fields = {f.name: f for f in c.fields}
        for n, a in given.items():
            if n not in fields:
                self.d.error(a.span, f"codelet '{name}' has no field '{n}'",
                             f"its fields are: {', '.join(fields)}")
                ok = False
        missing = [f.name for f in c.fields if f.name not in given]
        if missing:
            self.d.error(call.span, f"vertex {name}: field{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(repr(m) for m in missing)} not connected")
            ok = False
        if not ok:
            raise self.Bad
        conns: dict[str, g.View] = {}
        state: dict[str, object] = {}
        syms: dict[str, tuple[int, Span, str]] = {}
        for f in c.fields:
            a = given[f.name]
            try:
                v = self.expr(a.value)
                if f.direction == "state":
                    state[f.name] = self.state_value(f, v, a)
                    continue
                conns[f.name] = self.connect(name, f, v, a, syms)
            except self.Bad:
                ok = False
        if not ok:
            raise self.Bad
        # A group connects each field to one tensor (lowering places a field's
        # elements by that tensor's layout): vertices reaching other tensors form
        # another group of the codelet.
        key = tuple(v.tensor for v in conns.values())
        grp = next((x for x in self.cs.groups if x.codelet == name and field_tensors(x) == key), None)
        if grp is not None and not isinstance(grp.tiles, list):
            as_lists(grp)                   # made by a batched loop (`elaborate_batch`)
        if grp is None:
            grp = g.VertexGroup(name)
            self.cs.groups.append(grp)
            grp.connections = {f: [] for f in conns}
            grp.state = {f: [] for f in state}
            grp.syms = {s_: [] for s_ in c.symbols}
        grp.tiles.append(tile)
        grp.span_ids.append(self.graph.span_id(s.span))
        for f, v in conns.items():
            grp.connections[f].append(v)
        for f, v in state.items():
            grp.state[f].append(v)
        for s_ in c.symbols:
            grp.syms[s_].append(syms[s_][0])

    def state_value(self, f: cir.Field, v, a: ast.Kwarg):
        ok = {"f32": (int, float), "f16": (int, float), "i32": (int,), "bool": (bool,)}[f.dtype]
        if isinstance(v, bool) and f.dtype != "bool" or not isinstance(v, ok):
            self.d.error(a.value.span, f"vertex state '{f.name}' is {f.dtype}; got {kind_of(v)}")
            raise self.Bad
        if f.dtype == "i32" and not -2**31 <= v < 2**31:
            self.d.error(a.value.span, f"{v} does not fit in i32")
            raise self.Bad
        return v

    def connect(self, cname: str, f: cir.Field, v, a: ast.Kwarg, syms) -> g.View:
        if not isinstance(v, g.View):
            what = "tensor expression (connect a tensor declared with 'var' or 'input')" \
                if isinstance(v, Node) else kind_of(v)
            self.d.error(a.value.span, f"field '{f.name}' of {cname} is an '{f.direction}' edge; "
                         f"connect a tensor, not a {what}")
            raise self.Bad
        t = self.graph.tensors[v.tensor]
        if t.dtype != cir.lane_type(f.dtype):
            self.d.error(a.value.span, f"field '{f.name}' of {cname} is {type_text(f.dtype, f.dims)} "
                         f"but '{t.name}' is {t.dtype}")
            raise self.Bad
        shape = v.shape
        if f.lanes > 1 and len(shape) == f.rank:
            # A vector field's last axis counts vectors of `lanes` elements.
            if shape[-1] % f.lanes:
                self.d.error(a.value.span, f"field '{f.name}' of {cname} is {type_text(f.dtype, f.dims)}: the last "
                             f"axis of what it connects to must hold a multiple of {f.lanes} elements; "
                             f"connected to shape {list(shape)}")
                raise self.Bad
            shape = tuple(shape[:-1]) + (shape[-1] // f.lanes,)
        if f.rank == 0 and v.index.size == 1:
            return g.View(v.tensor, v.index.reshape(()), a.value.span)
        if len(shape) != f.rank:
            self.d.error(a.value.span, f"field '{f.name}' of {cname} has rank {f.rank} but is "
                         f"connected to shape {list(shape)}")
            raise self.Bad
        for axis, (dim, n) in enumerate(zip(f.dims, shape)):
            if isinstance(dim, int):
                if dim != n:
                    self.d.error(a.value.span, f"field '{f.name}' of {cname} needs size {dim} on "
                                 f"axis {axis}; connected to shape {list(shape)}")
                    raise self.Bad
            elif dim in syms and syms[dim][0] != n:
                self.d.error(a.value.span, f"size symbol '{dim}' of {cname} is {syms[dim][0]} "
                             f"from field '{syms[dim][2]}' but {n} from field '{f.name}'")
                raise self.Bad
            elif n == 0:
                self.d.error(a.value.span, f"field '{f.name}' of {cname} is connected to an empty tensor")
                raise self.Bad
            else:
                syms.setdefault(dim, (n, a.span, f.name))
        return g.View(v.tensor, v.index, a.value.span)

