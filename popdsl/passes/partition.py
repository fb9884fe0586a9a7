"""Partitioning: the tensor program → compute sets of vertices over the tiles.

Requires an elaborated `TensorGraph` whose outputs may be tensor-program nodes and
whose program may hold `Step`s; produces the same graph in Poplar-level terms: a
new tensor per materialised result, its tile mapping, compute sets whose vertex
groups hold stacked views (numpy arrays, never an object per vertex), and each
`Step` replaced by the sequence of compute sets and copies that computes the
outputs.

- Every operation follows its partition rule in the operation table (`popdsl.ops`):
  shape operations (reshape, transpose, index, broadcast) are views, no copy;
  reductions, matmul, convolutions, pooling, padding... place vertices.
- Chains of element-wise work fuse into one generated codelet (`passes.fuse`; each
  op's `emit` gives its codelet IR); its output is mapped like its first full-size
  operand (so no exchange) or spread evenly.
- A vertex group's index arrays are kept as Batches for the vertices whose views
  are strided alike; tile mappings are runs (`ir.mapping`).
- Tensors still unmapped at the end (parameters nobody mapped) spread linearly.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np

from popdsl import ops, resources
from popdsl.diagnostics import Span
from popdsl.ir import codelet as cir
from popdsl.ir import graph as g
from popdsl.ir.index import (Batch, RunBatch, Strided, affine_rows, as_array, first_elements, ramps, take_rows,
                              unique)
from popdsl.ir.mapping import Mapping
from popdsl.ir.tensor import Node
from popdsl.ops.blocks import GRAIN, one_to_one, vertex_split
from popdsl.passes.fuse import partition_fused



def _cut(starts, run_at, begin, size, field_shape) -> RunBatch:
    """Vertices of elements [begin, begin + size) of runs `starts` laid end to end
    (run i from position run_at[i]): each vertex's runs, cut at its ends."""
    r0 = np.searchsorted(run_at, begin, side="right") - 1
    r1 = np.searchsorted(run_at, begin + size, side="left")
    n = r1 - r0
    run = np.repeat(r0, n) + ramps(n)
    v_lo, v_hi = np.repeat(begin, n), np.repeat(begin + size, n)
    a = np.maximum(run_at[run], v_lo)
    b = np.minimum(run_at[run + 1], v_hi)
    ptr = np.concatenate(([0], np.cumsum(n))).astype(np.int64)
    return RunBatch(ptr, starts[run] + (a - run_at[run]), b - a, field_shape)


def _rows(state: dict | None, rows: np.ndarray, nv: int) -> dict | None:
    """Per-vertex state values of the vertices `rows` (scalars stay scalars)."""
    if not state:
        return state
    return {f: (np.asarray(v)[rows] if np.ndim(v) and np.shape(v)[0] == nv else v) for f, v in state.items()}


@functools.cache
def prim_codelets() -> dict[str, cir.Codelet]:
    from popdsl.sema import compile_codelets
    path = resources.resource("stdlib", "prims.pop")
    return {c.name: c for c in compile_codelets(path.read_text(), "<stdlib>/prims.pop")}


def _consecutive(index) -> int | None:
    """The first element of a view whose elements are consecutive in flat order (a
    strided view of stride 1 once flattened), else None."""
    if isinstance(index, Strided):
        f = index.view_reshape((index.size,))
        if f is not None and (f.size <= 1 or f.strides[0] == 1):
            return int(f.offset)
    return None


def _broadcast_of_consecutive(index) -> tuple[int, np.ndarray] | None:
    """For a strided view broadcasting consecutive elements (its axes of stride 0
    aside, a contiguous slice): (its first element, the flat position in the view
    where each of its elements, in order, first appears), else None."""
    if not isinstance(index, Strided) or not index.size:
        return None
    keep = [k for k, (n, s) in enumerate(zip(index.shape, index.strides)) if s and n > 1]
    first = _consecutive(Strided(index.offset, tuple(index.shape[k] for k in keep),
                                 tuple(index.strides[k] for k in keep)))
    if first is None:
        return None
    after = np.cumprod((1,) + index.shape[::-1])[::-1][1:]          # positions one step of each axis moves
    pos = Strided(0, tuple(index.shape[k] for k in keep), tuple(int(after[k]) for k in keep)).array()
    return first, pos.reshape(-1)


class Partitioner:
    def __init__(self, graph: g.TensorGraph):
        self.g = graph
        self.tiles = graph.target.tiles
        self.workers = graph.target.workers
        self.mat: dict[int, g.View] = {}
        self.seq: list = []
        self.consumers: dict[int, int] = {}
        self.users: dict[int, list[Node]] = {}          # node id -> the nodes reading it
        self.leaves: dict[int, list[Node]] = {}         # tensor id -> the leaves (it, views of it) read
        self.ncs = 0
        self.span = Span("<tensor program>", 0, 0, 0, 0)
        self.rotor = 0
        self.names: dict[str, int] = {}
        self.node_names: dict = {}          # node id (or (function, node id)) -> name
        # Functions (passes.outline): the instance each output node is made by, and
        # each function once built; `building` is the function being built, whose
        # body sees its own parameters, never the caller's values.
        self.call_of: dict[int, tuple[int, int]] = {
            o.id: (fi, ii) for fi, f in enumerate(graph.functions)
            for ii, inst in enumerate(f.instances) for o in inst.outputs}
        self.built: dict[int, tuple] = {}
        self.own: dict[str, tuple[int, int]] = {}       # function -> the tensor ids its build made
        self.building: str | None = None

    # ---------------------------------------------------------------- driver
    def run(self) -> g.TensorGraph:
        roots = [v for _, v in self.g.outputs if isinstance(v, Node)] + list(self.g.updates.values())
        self.count_consumers(roots)
        self.spread_trained_params()
        outs = []
        for name, v in self.g.outputs:
            if isinstance(v, Node):
                v = self.value(v)
            outs.append((name, v))
        # A var takes its new value as soon as nothing left to compute reads its old
        # one, not all at the end: a training step held every weight's and
        # momentum's new value at once (ResNet-50 at batch 8: 100 KB a tile at the
        # peak of the tiles over).
        shown = {v.tensor for _, v in outs}
        updates = list(self.g.updates.items())
        pending: list[tuple[int, g.View]] = []
        for k, (tid, node) in enumerate(updates):
            pending.append((tid, self.value(node)))
            read_later = self.to_compute([n for _, n in updates[k + 1:]])
            still = []
            for t, src in pending:
                if t not in shown and self.readers(t, self.leaves.get(t, ())).isdisjoint(read_later):
                    self.write_var(t, src)
                else:
                    still.append((t, src))
            pending = still
        # Outputs read after the step: one that shows a var's old value is kept
        # before the var takes its new one.
        outs = [(name, self.kept(v) if v.tensor in self.g.updates else v) for name, v in outs]
        for tid, src in pending:
            self.write_var(tid, src)
        self.g.outputs = outs
        self.g.updates = {}
        self.g.function_summary = [self.summary(fi) for fi in sorted(self.built)]
        step = g.Seq(tuple(self.seq))
        self.g.program = self.replace_steps(self.g.program, step)
        # Whatever elaboration let through unmapped (parameters and inputs of the
        # tensor program that no op placed) spreads evenly.
        for t in self.g.tensors:
            m = self.g.mappings[t.id]
            if not m.fully_mapped():
                lin = self.linear_mapping(t.numel)
                m.assign(lin.starts, lin.lengths, lin.tiles, only_unmapped=True)
        return self.g

    def spread_trained_params(self) -> None:
        """A training step's parameters spread evenly over the tiles, before any op
        maps them where its first task runs.  A step keeps each weight two or three
        times for the whole program (its value, its gradient's momentum, Adam's
        moments: always-live, mapped as the parameter) and updates it element by
        element, but only a few convolutions read it, their weight blocks then
        exchanged.  Mapped by their forward convolutions, ResNet-50's stage-4
        weights and momenta put 278 KB on some tiles at batch 2 (143 KB on average)
        and 123 tiles were over with every segment recomputed; spread, the busiest
        tile needs 554 KB."""
        for tid in self.g.params:
            m = self.g.mappings[tid]
            if tid in self.g.updates and m.numel and m.unmapped_count() == m.numel:
                self.g.mappings[tid] = self.linear_mapping(m.numel)

    def copied(self, v: g.View, name: str, where_they_are: bool = True) -> g.View:
        """A copy of v's elements in a new tensor of v's shape, made now: mapped
        where they are (an on-tile copy), or left for the caller to map."""
        self.ensure_mapped(v)
        out = self.new_tensor(name, self.g.tensors[v.tensor].dtype, v.index.shape)
        if where_they_are:
            self.set_tiles(out.tensor, self.tiles_of(v))
        self.seq.append(g.Copy(v, out, self.span))
        return out

    def kept(self, v: g.View) -> g.View:
        """A copy of v's elements in a new tensor, made now (a var's value before
        the step updates it)."""
        return self.copied(v, self.g.tensors[v.tensor].name + ".before")

    def readers(self, tid: int, leaves) -> set[int]:
        """Ids of the nodes whose value is tensor tid's: its leaves and the views of
        them made so far (what reads one of those reads tid)."""
        out, stack = set(), list(leaves)
        while stack:
            n = stack.pop()
            out.add(n.id)
            for u in self.users.get(n.id, ()):
                v = self.mat.get(u.id)
                if v is not None and v.tensor == tid and u.id not in out:
                    stack.append(u)
        return out

    def to_compute(self, roots) -> set[int]:
        """Ids of the nodes read by what the values of `roots` still need computed:
        every node not in `mat` on the way.  A node that was only inlined into a
        fused codelet is not in `mat`: as a root of its own (a momentum's new value,
        inlined into its weight's update) it is computed again, and its reads
        count."""
        reads, seen, stack = set(), set(), list(roots)
        while stack:
            n = stack.pop()
            if n.id in seen or n.id in self.mat:
                continue
            seen.add(n.id)
            reads.update(a.id for a in n.args)
            stack.extend(n.args)
        return reads

    def write_var(self, tid: int, src: g.View) -> None:
        """The step's last action for a var the tensor program assigns: its new value
        copied in (after every read of the old one)."""
        t = self.g.tensors[tid]
        # Strided, not an index per element: a training step writes every weight and
        # its momentum (51M elements for ResNet-50, 409 MB of indices).
        dst = g.View(tid, Strided.whole(t.shape), t.span)
        if src.tensor == tid and (src.index.is_whole(t.numel) if isinstance(src.index, Strided)
                                  else np.array_equal(np.ravel(src.index), np.arange(t.numel))):
            return                              # `h = h;`
        self.ensure_mapped(src)
        if not self.g.mappings[tid].fully_mapped():
            self.ensure_mapped(dst, self.tiles_of(src).reshape(t.shape))
        self.seq.append(g.Copy(src, dst, t.span))

    def replace_steps(self, p, step):
        body = []
        for n in p.body:
            if isinstance(n, g.Step):
                body.extend(step.body)
            elif isinstance(n, g.Repeat):
                body.append(g.Repeat(n.count, self.replace_steps(n.body, step)))
            elif isinstance(n, g.While):
                body.append(g.While(n.cond, self.replace_steps(n.body, step)))
            elif isinstance(n, g.If):
                body.append(g.If(n.cond, self.replace_steps(n.then, step), self.replace_steps(n.orelse, step)))
            else:
                body.append(n)
        return g.Seq(tuple(body))

    def count_consumers(self, roots) -> None:
        seen = set()
        stack = list(roots)
        while stack:
            n = stack.pop()
            if n.id in seen:
                continue
            seen.add(n.id)
            if n.op in ("tensor", "view"):
                self.leaves.setdefault(n.attrs[0], []).append(n)
            for a in n.args:
                self.consumers[a.id] = self.consumers.get(a.id, 0) + 1
                self.users.setdefault(a.id, []).append(n)
                stack.append(a)

    # ---------------------------------------------------------------- tensors and mapping
    def new_tensor(self, name: str, dtype: str, shape, kind: str = "temp") -> g.View:
        gr = self.g
        t = g.Tensor(len(gr.tensors), name, dtype, tuple(int(s) for s in shape), kind, self.span)
        gr.tensors.append(t)
        gr.mappings[t.id] = Mapping.unmapped(t.numel)
        return g.View(t.id, Strided.whole(t.shape), self.span)

    def linear(self, n: int, grain: int = GRAIN) -> np.ndarray:
        """Tiles for n elements spread evenly, at least `grain` per tile, starting
        where the previous op's tiles ended (so small tensors do not all pile up
        on tile 0)."""
        used = max(1, min(self.tiles, -(-n // grain)))
        return ((self.rotate(used) + np.arange(n, dtype=np.int64) * used // max(n, 1)) % self.tiles).astype(np.int32)

    def linear_mapping(self, n: int, grain: int = GRAIN) -> Mapping:
        """`linear(n)` as runs: tile k of the `used` takes elements from ceil(k n / used)."""
        used = max(1, min(self.tiles, -(-n // grain)))
        k = np.arange(used, dtype=np.int64)
        tiles = ((self.rotate(used) + k) % self.tiles).astype(np.int32)
        return Mapping(n, -(-k * n // used), tiles)

    def rotate(self, used: int) -> int:
        start = self.rotor
        self.rotor = (self.rotor + used) % self.tiles
        return start

    def spread(self, ntasks: int, together: np.ndarray | None = None) -> np.ndarray:
        """Tiles for ntasks tasks: round robin, or evenly spaced when there are fewer
        tasks than tiles, starting at the rotor.  `together` (a key per task): when
        tiles get several tasks, tasks of one key go to the same tiles, a tile's
        tasks a contiguous run of them in key order — tasks that read one block
        (a convolution's weights) then share the one copy the exchange brings."""
        if ntasks > self.tiles and together is not None:
            rank = np.empty(ntasks, np.int64)
            rank[np.argsort(together, kind="stable")] = np.arange(ntasks)
            base = rank * self.tiles // ntasks
        elif ntasks >= self.tiles:
            base = np.arange(ntasks) % self.tiles
        else:
            base = np.arange(ntasks) * self.tiles // ntasks
        return ((base + self.rotate(min(ntasks, self.tiles))) % self.tiles).astype(np.int32)

    def ensure_mapped(self, v: g.View, tiles: np.ndarray | None = None) -> None:
        """Map v's still-unmapped elements: to `tiles` (same shape as v) or linearly."""
        m = self.g.mappings[v.tensor]
        if m.fully_mapped():
            return
        # A view of every element once, in any order, of a tensor not mapped at all:
        # linear by element.  (A broadcast as large as its tensor is not one.)
        if tiles is None and m.unmapped_count() == m.numel and v.index.size == m.numel and one_to_one(v.index):
            self.g.mappings[v.tensor] = self.linear_mapping(m.numel)
            return
        first = _consecutive(v.index)
        if first is not None:
            # The view's elements consecutive (a contiguous slice): as runs.
            size = v.index.size
            if m.all_mapped(first, first + size):
                return
            like = self.linear_mapping(size) if tiles is None else \
                Mapping.from_elements(np.broadcast_to(tiles, v.index.shape))
            m.assign(first + like.starts, like.lengths, like.tiles, only_unmapped=True)
            return
        spread = _broadcast_of_consecutive(v.index) if tiles is None else None
        if spread is not None:
            # A broadcast of consecutive elements (a channel's scale over a batch's
            # positions): each element takes the linear tile of the first position
            # it is at, as element by element, computed for the elements alone.
            first, pos = spread
            if m.all_mapped(first, first + pos.size):
                return
            size = v.index.size
            used = max(1, min(self.tiles, -(-size // GRAIN)))
            at = ((self.rotate(used) + pos * used // size) % self.tiles).astype(np.int32)
            m.assign_elements(first + np.arange(pos.size), at, only_unmapped=True)
            return
        flat = as_array(v.index).ravel()
        free = m.tile_of(flat) < 0
        if not free.any():
            return
        tiles = self.linear(flat.size) if tiles is None else np.broadcast_to(tiles, v.index.shape).ravel()
        # An element two blocks want keeps the first block's tile.
        m.assign_elements(flat[free], tiles[free], only_unmapped=True)

    def map_like(self, v: g.View, like: Mapping) -> None:
        """`ensure_mapped(v, tiles)` with the tiles of v's elements in flat order
        given as runs (`like`, a mapping of v.index.size positions)."""
        m = self.g.mappings[v.tensor]
        first = _consecutive(v.index)
        if first is None:
            self.ensure_mapped(v, like.elements().reshape(v.index.shape))
        elif not m.fully_mapped():
            # Already mapped elements keep their tiles, as `ensure_mapped`'s do.
            m.assign(first + like.starts, like.lengths, like.tiles, only_unmapped=True)

    def map_first_come(self, tensor: int, pieces: list) -> None:
        """`ensure_mapped(view, tile)` for each (element array, tile) of `pieces` in
        order, as one update: an element keeps its tile if it has one, else takes
        the first piece's that holds it."""
        m = self.g.mappings[tensor]
        if not pieces or m.fully_mapped():
            return
        elements = np.concatenate([e for e, _ in pieces])
        tiles = np.concatenate([np.full(e.size, t, np.int32) for e, t in pieces])
        free = m.tile_of(elements) < 0
        m.assign_elements(elements[free], tiles[free], only_unmapped=True)

    def tiles_of(self, v: g.View) -> np.ndarray:
        """The tile of each element of v (an array of v's shape)."""
        return self.g.mappings[v.tensor].tiles_at(v.index)

    def set_tiles(self, tensor: int, tiles) -> None:
        """Map a new tensor: `tiles` gives the tile of each element, in flat order."""
        self.g.mappings[tensor] = Mapping.from_elements(np.asarray(tiles).reshape(-1))

    def name(self, n: Node) -> str:
        """What the tensors and compute sets made for `n` are called: its call path
        and the function that made it (`stage_2.bottleneck_1.conv_bn_1.conv_1.conv2d`),
        numbered when one place makes several (`softmax_1.sub`, `softmax_1.sub.2`)."""
        key = n.id if self.building is None else (self.building, n.id)
        given = self.node_names.get(key)
        if given is not None:
            return given
        site = self.g.nodes.sites.get(n.id) if self.g.nodes is not None else None
        base = site or f"%{n.id}.{n.op.replace(':', '_')}"
        if self.building is not None:       # a function's own tensors: `block:block_1.conv_bn_1.conv2d`
            base = f"{self.building}:{base}"
        k = self.names.get(base, 0) + 1
        self.names[base] = k
        given = self.node_names[key] = base if k == 1 else f"{base}.{k}"
        return given

    def new_cs(self, label: str) -> g.ComputeSet:
        self.ncs += 1
        cs = g.ComputeSet(f"{label}.{self.ncs}", self.span)
        self.g.compute_sets[cs.name] = cs
        self.seq.append(g.Execute(cs.name, self.span))
        return cs

    def add_codelet(self, c: cir.Codelet) -> str:
        """The name `c` goes by in the graph: its own, unless the program already has
        a different codelet of that name (a user's `codelet MatMul`), then a fresh one."""
        name, k = c.name, 1
        while name in self.g.codelets and self.g.codelets[name] != replace(c, name=name):
            k += 1
            name = f"{c.name}_{k}"
        self.g.codelets.setdefault(name, replace(c, name=name))
        return name

    def prim(self, name: str) -> str:
        return self.add_codelet(prim_codelets()[name])

    def group(self, cs: g.ComputeSet, codelet: str, tiles, conns: dict, state: dict | None = None,
              syms: dict | None = None) -> None:
        """Add a group of vertices: conns[field] = (tensor, index (nv, *shape)).  Index
        arrays are kept as Batches (O(vertices) numbers) for the vertices whose views
        are strided alike; the others, if any, form a second group."""
        tiles = np.asarray(tiles, np.int32)
        nv = len(tiles)
        if not nv:
            return
        # (RunBatches of several axes, `blocks.stacked`'s, are never affine per vertex.)
        dense = {f: idx for f, (t, idx) in conns.items() if not isinstance(idx, (Batch, Strided))
                 and not (isinstance(idx, RunBatch) and (idx.field_shape is None or len(idx.field_shape) != 1))}
        if dense:
            fit, strides = np.ones(nv, bool), {}
            for f, idx in dense.items():
                strides[f], ok = affine_rows(idx)
                fit &= ok
            if fit.any():
                rows, rest = np.nonzero(fit)[0], np.nonzero(~fit)[0]
                if rest.size:
                    self._group(cs, codelet, tiles[rest], {f: (t, take_rows(idx, rest)) for f, (t, idx) in conns.items()},
                                _rows(state, rest, nv))
                    tiles, state = tiles[rows], _rows(state, rows, nv)
                    conns = {f: (t, take_rows(idx, rows)) for f, (t, idx) in conns.items()}
                conns = {f: (t, Batch(first_elements(idx), tuple(np.shape(idx)[1:]), strides[f]) if f in dense else idx)
                         for f, (t, idx) in conns.items()}
        self._group(cs, codelet, tiles, conns, state)

    def _group(self, cs: g.ComputeSet, codelet: str, tiles, conns: dict, state: dict | None = None) -> None:
        nv = len(tiles)
        if not nv:
            return
        c = self.g.codelets[codelet]
        grp = g.VertexGroup(codelet)
        grp.tiles = tiles
        sid = self.g.span_id(self.span)
        grp.span_ids = np.full(nv, sid, np.int32)
        grp.connections = {f: g.Stacked(t, idx, self.span) for f, (t, idx) in conns.items()}
        grp.state = {f: np.broadcast_to(np.asarray(v), (nv,)) for f, v in (state or {}).items()}
        found: dict[str, np.ndarray] = {}
        for f in c.fields:
            if f.direction == "state":
                continue
            tensor, index = conns[f.name]
            # A partition rule connecting a field to data of another type would make
            # the codelet read the bytes wrongly: a bug of ours, never the user's.
            assert self.g.tensors[tensor].dtype == cir.lane_type(f.dtype), \
                f"{codelet}.{f.name} is {f.dtype} but is connected to {self.g.tensors[tensor].dtype} data"
            if isinstance(index, RunBatch) and index.field_shape is None:
                if isinstance(f.dims[0], str):
                    found.setdefault(f.dims[0], index.sizes)    # a size symbol per vertex
                continue
            shape = index.shape[1:]
            if f.lanes > 1:                   # a vector field's last axis counts vectors
                assert shape[-1] % f.lanes == 0, f"{codelet}.{f.name}: {shape[-1]} elements are not whole vectors"
                shape = tuple(shape[:-1]) + (shape[-1] // f.lanes,)
            for d, n in zip(f.dims, shape):
                if isinstance(d, str):
                    found.setdefault(d, np.full(nv, n, np.int64))
        grp.syms = {s: found[s] for s in c.symbols}
        cs.groups.append(grp)

    def chunks(self, tile_of: np.ndarray, grain: int = GRAIN, max_size: int | None = None):
        """Split elements (by their tiles) into vertices (`blocks.vertex_split`).  Yields
        (size, positions (nv, size), tiles (nv,)) per distinct size, where positions
        index `tile_of` and run in flat order within each tile."""
        order = np.argsort(tile_of, kind="stable")
        tiles, counts = np.unique(tile_of, return_counts=True)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        owner, size, offset = vertex_split(counts, self.workers, grain, max_size)
        vert_tile = tiles[owner]
        begin = starts[owner] + offset
        for s in unique(size):
            sel = size == s
            pos = order[begin[sel][:, None] + np.arange(s)[None, :]]
            yield int(s), pos, vert_tile[sel]

    def chunk_runs(self, m: Mapping, grain: int = GRAIN):
        """`chunks` of a new tensor's elements, by its mapping `m`'s runs instead of
        an element array.  Yields (size, RunBatch of each vertex's elements, tiles
        (nv,)) per distinct size, the vertices in the order `chunks` gives them."""
        lengths = m.lengths
        o = np.lexsort((m.starts, m.tiles))
        o = o[lengths[o] > 0]
        starts, lengths, run_tiles = m.starts[o], lengths[o], m.tiles[o]
        tiles, first_run = np.unique(run_tiles, return_index=True)
        run_at = np.concatenate(([0], np.cumsum(lengths)))      # position of each run among all
        counts = np.diff(np.append(run_at[first_run], run_at[-1]))
        owner, size, offset = vertex_split(counts, self.workers, grain)
        vert_tile = tiles[owner]
        begin = run_at[first_run][owner] + offset
        for s in unique(size):
            sel = np.nonzero(size == s)[0]
            yield int(s), _cut(starts, run_at, begin[sel], size[sel], (int(s),)), vert_tile[sel]

    # ---------------------------------------------------------------- values
    def value(self, n: Node) -> g.View:
        v = self.mat.get(n.id)
        if v is None and self.building is None and n.id in self.call_of:
            self.call(*self.call_of[n.id])
            return self.mat[n.id]
        if v is None:
            if self.g.needs:
                self.operands_first(n)
            # What a rule makes after computing its operands still points at its own
            # source line, not at the operand's.
            saved = self.span
            try:
                v = self.mat[n.id] = self.compute(n)
            finally:
                self.span = saved
        return v

    def operands_first(self, n: Node) -> None:
        """With recomputation (passes.recompute): n's materialised operands, those
        needing later recomputed segments (or none) first, so each segment is
        recomputed when the backward pass reaches it, not when some rule happens to
        ask for its operand first."""
        leaves: list[Node] = []
        stack = list(reversed(n.args))
        fused = ops.is_elementwise(n.op)
        while stack:
            a = stack.pop()
            if a.op == "const" or a.id in self.mat:
                continue
            if fused and ops.is_elementwise(a.op) and self.consumers.get(a.id, 0) <= 1 and not self.called(a):
                stack.extend(reversed(a.args))     # fused into n's codelet: its operands are n's
            else:
                leaves.append(a)
        needs = self.g.needs
        if any(a.id in needs for a in leaves):
            for a in sorted(leaves, key=lambda a: -needs.get(a.id, 1 << 30)):
                self.value(a)

    def compute(self, n: Node) -> g.View:
        # Tensors and vertices made for this node point at the source that made it.
        self.span = self.g.nodes.spans.get(n.id, self.span) if self.g.nodes is not None else self.span
        entry = ops.op(n.op)
        if entry.kind == "elementwise" or n.op == "const":
            return partition_fused(self, n)
        return entry.partition(self, n)

    # ---------------------------------------------------------------- functions
    def called(self, n: Node) -> bool:
        """n is what a function call makes (so never fused into its user's codelet)."""
        return self.building is None and n.id in self.call_of

    def call(self, fi: int, ii: int) -> None:
        """Instance ii of function fi, as Poplar's `Call`: its inputs copied into the
        function's parameters (those every call shares are bound once, no copy), its
        compute sets run, its outputs copied out into tensors of the caller (the
        next call overwrites the function's own)."""
        f = self.g.functions[fi]
        inst = f.instances[ii]
        args = [self.value(a) for a in inst.inputs]
        if fi not in self.built:
            self.built[fi] = self.build(f, inst, args)
        params, results, body = self.built[fi]
        span = self.g.nodes.spans.get(inst.body[0], self.span)
        for a, p, shared in zip(args, params, f.shared):
            if not shared:
                # A weight nobody placed yet spreads evenly: placed where the function
                # reads it, every call's weights would pile up on the same tiles.
                self.ensure_mapped(a)
                self.seq.append(g.Copy(a, p, span))
        self.seq.extend(body)
        saved = self.span
        for o, r in zip(inst.outputs, results):
            self.span = self.g.nodes.spans.get(o.id, span)     # the result points at its own source
            out = self.new_tensor(self.name(o), o.dtype, o.shape)
            self.set_tiles(out.tensor, self.tiles_of(r))
            self.seq.append(g.Copy(r, out, span))
            self.mat[o.id] = out
        self.span = saved

    def build(self, f, inst, args: list[g.View]) -> tuple:
        """Partition f's body once, from instance `inst`: (parameters, results, the
        body's program).  Its ops are recorded once, with the number of calls."""
        saved = self.mat, self.seq, self.span
        self.mat, self.seq, self.building = {}, [], f.name
        nops, t0 = len(self.g.ops), len(self.g.tensors)
        try:
            self.span = self.g.nodes.spans.get(inst.body[0], self.span)    # parameters: where the part begins
            params = []
            for k, (a, v, shared) in enumerate(zip(inst.inputs, args, f.shared)):
                p = v if shared else self.new_tensor(f"{f.name}.in{k}", a.dtype, a.shape)
                if not shared and self.g.tensors[v.tensor].kind == "param" and p.index.size:
                    # A weight spreads evenly, as the step's parameters do
                    # (spread_trained_params): placed where its first task runs, a
                    # stage-4 convolution's 9.4 MB took 55 KB on each of 184 tiles.
                    self.g.mappings[p.tensor] = self.linear_mapping(p.index.size)
                self.mat[a.id] = p
                params.append(p)
            results = [self.value(o) for o in inst.outputs]
            for p in params:                  # what the body never placed spreads evenly
                self.ensure_mapped(p)
            body = tuple(self.seq)
        finally:
            self.mat, self.seq, self.span = saved
            self.building = None
        for op in self.g.ops[nops:]:
            op["function"], op["calls"] = f.name, len(f.instances)
        self.own[f.name] = (t0, len(self.g.tensors))
        return params, results, body

    def summary(self, fi: int) -> dict:
        """What the reports and the memory plan know of function fi: `tensors`, the
        range of tensor ids its build made (live during each call only)."""
        f = self.g.functions[fi]
        params, results, body = self.built[fi]
        nbytes = lambda v: int(v.index.size) * self.g.tensors[v.tensor].elem_bytes  # noqa: E731
        return {"name": f.name, "kind": f.kind, "calls": len(f.instances),
                "instances": [i.label for i in f.instances],
                "compute_sets": [p.cs for p in body if isinstance(p, g.Execute)],
                "copy_in_bytes": sum(nbytes(p) for p, sh in zip(params, f.shared) if not sh),
                "copy_out_bytes": sum(nbytes(r) for r in results),
                "shared_inputs": sum(f.shared), "ops": f.ops, "tensors": list(self.own[f.name]),
                "recompute_calls": sum(i.label.endswith(".recompute") for i in f.instances)}

    # ---------------------------------------------------------------- statistics
    def record(self, n: Node, *css: g.ComputeSet, flops: int | None = None) -> None:
        """What the reports say of an op: its compute sets, vertices, tiles, FLOPs."""
        verts = sum(len(grp.tiles) for cs in css for grp in cs.groups)
        tiles = set()
        for cs in css:
            for grp in cs.groups:
                tiles.update(unique(grp.tiles).tolist())
        span = self.g.nodes.spans.get(n.id) if self.g.nodes is not None else None
        if flops is None:
            rule = ops.op(n.op).flops
            flops = rule(n) if rule is not None else n.numel
        wm = self.g.backward_from
        phase = ("recompute" if n.id in self.g.recomputed else
                 "backward" if wm is not None and n.id >= wm else "forward")
        self.g.ops.append({"node": n.id, "op": n.op, "phase": phase, "shape": list(n.shape), "dtype": n.dtype,
                           "compute_sets": [cs.name for cs in css], "vertices": verts, "tiles": len(tiles),
                           "flops": int(flops), "name": self.name(n), "function": "", "calls": 1,
                           "source": str(span) if span is not None and span.line else ""})


def partition(graph: g.TensorGraph) -> g.TensorGraph:
    """A new graph; `graph` is left as it was."""
    return Partitioner(graph.copy()).run()
