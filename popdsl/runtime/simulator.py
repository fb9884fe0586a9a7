"""The IPU model: a bulk-synchronous simulator over real tile memories.

Requires an `Executable` and its compiled codelets; runs the program tree.  All
tiles' memories are one 64-byte aligned byte array (tile t owns the window
[t × stride, (t+1) × stride), `runtime.layout`), so a tensor's element lives exactly
at the offset in its tile the memory plan gave it, and a planning bug shows as
wrong numbers.

One native call per (compute set, codelet, row range); row ranges run on threads
(native calls release the GIL).  Groups whose sizes, strides and state are the same
in every row run a driver specialised to them (`runtime.specialise`).  Copies are
native loops of memmoves; a big copy whose runs are independent is split between
the threads.  Every phase adds to the cycle estimate (`ir.cost`).  After a
DeviceError the memory is unspecified (other threads' rows may have run).

A vertex that counts more than `max_cycles` cycles stops at its next check point
(`ir.checkpoints`) with a DeviceError naming it; Ctrl-C during a step stops native
code too (`runtime.interrupt`) and raises KeyboardInterrupt.

`Machine.trace`, when set, is told every program action and phase as it runs, with
the cycle it starts at (`report.trace.TraceRecorder` makes a trace of them): the
hook costs nothing when unset and runs no second simulation.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from popdsl.runtime.copies import (check_runs, copy_runs, element_runs, gather_runs, independent,
                                   scatter_runs, split_runs)
from popdsl.codegen.jit import NativeCodelets, aligned_zeros, request_stop
from popdsl.runtime.specialise import group_specs
from popdsl.diagnostics import Diagnostic, Span
from popdsl.ir.codelet import ERR_BOUNDS, ERR_CYCLES, NUMPY_DTYPE
from popdsl.ir.errors import VertexError
from popdsl.ir import executable as X
from popdsl.ops import explain
from popdsl.passes.partition import prim_codelets
from popdsl.ir.cost import compute_cycles
from popdsl.limits import MAX_CYCLES
from popdsl.runtime.interrupt import interruptible
from popdsl.runtime.layout import host_copy, host_table, to_host, window_stride

# Below these a thread hand-off costs more than it saves.  A group's work is judged
# by the cycles its vertices counted the last time it ran (vectorised host code
# runs many model instructions per nanosecond).
PARALLEL_MIN_ROWS = 256
PARALLEL_MIN_CYCLES = 4_000_000
PARALLEL_MIN_BYTES = 1 << 18


class HostMemoryError(Exception):
    """The IPU model's memory does not fit in this machine's (a user error)."""


class DeviceError(Exception):
    """A vertex failed at run time; `diagnostic` says where and why (user error)."""

    def __init__(self, diagnostic: Diagnostic):
        self.diagnostic = diagnostic
        super().__init__(diagnostic.render())


@dataclass
class CycleCounts:
    compute: int = 0
    exchange: int = 0
    sync: int = 0
    steps: int = 0
    per_compute_set: dict[str, int] = field(default_factory=dict)
    exchange_bytes: int = 0        # copied between tiles
    local_bytes: int = 0           # rearranged within a tile

    @property
    def total(self) -> int:
        return self.compute + self.exchange + self.sync


class Machine:
    def __init__(self, exe: X.Executable, native: NativeCodelets | None = None,
                 threads: int | None = None, out=None, max_cycles: int = MAX_CYCLES):
        self.exe = exe
        self.max_cycles = max_cycles
        self.native = native or NativeCodelets(list(exe.codelets.values()), exe.unchecked)
        # Groups whose sizes, strides and state are constant run a driver compiled
        # with them folded in (runtime.specialise: same cycles, faster host code).
        self._consts = group_specs(exe)
        specs = {(g.codelet, k) for cs, ks in zip(exe.compute_sets, self._consts)
                 for g, k in zip(cs.groups, ks) if k}
        self._special = self.native.specialised(sorted(specs)) if specs else None
        t = exe.target
        # Tile t's memory is the window [t × stride, (t+1) × stride) of `mem`
        # (runtime.layout): tables and copies are rewritten to host offsets once.
        tm = t.tile_memory
        self.stride = window_stride(exe)
        try:
            self.mem = aligned_zeros(t.tiles * self.stride)
        except MemoryError:
            raise HostMemoryError(f"the IPU model of this program needs {t.tiles * self.stride:,} bytes "
                                  f"of host memory ({t.tiles} tiles x {self.stride:,} B used of each); "
                                  "this machine could not allocate them") from None
        self._groups = [[X.VertexTable(g.codelet, host_table(exe.codelets[g.codelet], g.table, tm, self.stride),
                                       g.tiles, g.span_ids) for g in cs.groups] for cs in exe.compute_sets]
        self._pre = [host_copy(cs.pre, tm, self.stride) for cs in exe.compute_sets]
        self._post = [host_copy(cs.post, tm, self.stride) for cs in exe.compute_sets]
        self._copies = [host_copy(c, tm, self.stride) for c in exe.copies]
        self.threads = max(1, threads or 2)
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None
        self.out = out or sys.stdout
        self.cycles = CycleCounts()
        # A recorder told of every action (.action(node, cycle)), exchange or copy
        # phase (.copy(kind, index, cycle)), compute phase (.compute(cs, cycle,
        # per-tile cycles)) and step (.step(n, start, end)); None: no trace.
        self.trace = None
        self.tile_cycles: dict[int, np.ndarray] = {}     # compute set → its last run's cycles per tile
        # Per compute set: one cycle slot per vertex (a view per group), its
        # vertices' tiles and their order, for the cycle model; and the last
        # slots seen with their per-tile cycles, since most compute sets count the
        # same cycles every time they run.
        self._cycle_bufs, self._cs_tiles, self._last = [], [], []
        for cs in exe.compute_sets:
            sizes = [len(g.tiles) for g in cs.groups]
            buf = np.zeros(sum(sizes), np.int64)
            cuts = np.cumsum([0] + sizes)
            self._cycle_bufs.append((buf, [buf[a:b] for a, b in zip(cuts[:-1], cuts[1:])]))
            tiles = np.concatenate([g.tiles for g in cs.groups]) if cs.groups else np.zeros(0, np.int32)
            self._cs_tiles.append((tiles, np.argsort(tiles, kind="stable")))
            self._last.append(None)
        # Copy tables are checked once here, not on every run; big ones whose runs
        # are independent are split between the threads.
        self._copy_parts: dict[int, np.ndarray] = {}
        self._run_cache: dict[int, tuple] = {}
        self._tensor_cache: dict[int, tuple] = {}
        for c in self._pre + self._post + self._copies:
            check_runs(self.mem.size, c.src, c.dst, c.nbytes)
            if (self.threads > 1 and int(c.nbytes.sum()) >= PARALLEL_MIN_BYTES
                    and independent(c.src, c.dst, c.nbytes)):
                self._copy_parts[id(c)] = split_runs(c.nbytes, self.threads)
        for tid, values in exe.init.items():
            self._put(tid, values)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # ---------------------------------------------------------------- host access
    def _runs(self, addrs: np.ndarray, itemsize: int):
        """`addrs` as runs of consecutive bytes (cached: the same tensors are fed
        and read every step)."""
        hit = self._run_cache.get(id(addrs))
        if hit is None or hit[0] is not addrs:
            hit = self._run_cache[id(addrs)] = (addrs, element_runs(self.host_offsets(addrs), itemsize))
        return hit[1]

    def host_offsets(self, addrs: np.ndarray) -> np.ndarray:
        """Where the bytes at global addresses `addrs` live in `mem`."""
        return to_host(np.asarray(addrs, np.int64), self.exe.target.tile_memory, self.stride)

    def _tensor_runs(self, i: int):
        """Tensor i's runs as host runs (offset in a flat array, host address, bytes),
        cached: the same tensors are fed and read every step."""
        hit = self._tensor_cache.get(i)
        if hit is None:
            r = self.exe.tensor_runs[i]
            es = X.cir.ELEM_BYTES[self.exe.tensors[i].dtype]
            hit = self._tensor_cache[i] = (r.starts * es, self.host_offsets(r.addrs), r.counts * es)
        return hit

    def _put(self, i: int, values) -> None:
        arr = np.ascontiguousarray(np.asarray(values, dtype=NUMPY_DTYPE[self.exe.tensors[i].dtype])).reshape(-1)
        scatter_runs(self.mem, arr, self._tensor_runs(i))

    def _get(self, i: int) -> np.ndarray:
        t = self.exe.tensors[i]
        out = np.empty(t.shape, NUMPY_DTYPE[t.dtype])
        gather_runs(self.mem, out, self._tensor_runs(i))
        return out

    def _store(self, addrs: np.ndarray, values: np.ndarray, dtype: str) -> None:
        arr = np.ascontiguousarray(np.asarray(values, dtype=NUMPY_DTYPE[dtype])).reshape(-1)
        scatter_runs(self.mem, arr, self._runs(addrs, arr.dtype.itemsize))

    def _load(self, addrs: np.ndarray, dtype: str) -> np.ndarray:
        out = np.empty(addrs.shape, NUMPY_DTYPE[dtype])
        gather_runs(self.mem, out, self._runs(addrs, out.dtype.itemsize))
        return out

    def _tensor(self, name: str) -> int:
        i = self.exe.tensor_index(name)
        if i is None:
            import difflib
            names = [t.name for t in self.exe.tensors if t.kind != "temp"]
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
            raise KeyError(f"no tensor named '{name}' ({hint}tensors: {shown or 'none'})")
        return i

    def write(self, name: str, value) -> None:
        i = self._tensor(name)
        t = self.exe.tensors[i]
        arr = np.asarray(value)
        if arr.shape != t.shape:
            raise ValueError(f"'{name}' has shape {list(t.shape)}, given {list(arr.shape)}")
        self._put(i, arr)

    def read(self, name: str) -> np.ndarray:
        return self._get(self._tensor(name))

    # ---------------------------------------------------------------- running
    def run_step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, arr in feeds.items():
            self.write(name, arr)
        start = self.cycles.total
        with interruptible():
            self._run(self.exe.program)
        if self.trace is not None:
            self.trace.step(self.cycles.steps, start, self.cycles.total)
        self.cycles.steps += 1
        return {name: self._read(r).copy() for name, r in self.exe.outputs.items()}

    def _read(self, r: int) -> np.ndarray:
        rd = self.exe.reads[r]
        return self._load(rd.addrs, rd.dtype)

    def _run(self, p: X.PSeq) -> None:
        trace = self.trace
        for n in p.body:
            if trace is not None and not isinstance(n, (X.PRepeat, X.PSeq)):
                trace.action(n, self.cycles.total)
            if isinstance(n, X.PExecute):
                self._execute(n.cs)
            elif isinstance(n, X.PCopy):
                self._copy(self._copies[n.copy], "copy", n.copy)
            elif isinstance(n, X.PRepeat):
                for _ in range(n.count):
                    self._run(n.body)
            elif isinstance(n, X.PWhile):
                start, tests = self.cycles.total, 0
                while bool(self._read(n.cond)):
                    self._run(n.body)
                    if trace is not None:
                        trace.action(n, self.cycles.total)
                    # A test counts a cycle at least, so an empty body ends too.
                    tests += 1
                    if self.cycles.total - start + tests > self.max_cycles:
                        raise DeviceError(self._endless(n, self.cycles.total - start + tests))
            elif isinstance(n, X.PIf):
                self._run(n.then if bool(self._read(n.cond)) else n.orelse)
            elif isinstance(n, X.PPrint):
                rd = self.exe.reads[n.read]
                print(f"{rd.label}: {format_array(self._read(n.read))}", file=self.out)
            else:
                raise AssertionError(f"unhandled program node {n!r}")

    def _endless(self, n: X.PWhile, counted: int) -> Diagnostic:
        label = self.exe.reads[n.cond].label
        i = self.exe.tensor_index(label)
        span = self.exe.tensors[i].span if i is not None else Span(self.exe.name, 0, 0, 0, 0)
        return Diagnostic(span, f"a device while loop on '{label}' ran more than {self.max_cycles:,} cycles "
                          f"(it had counted {counted:,})", "error",
                          ("stopped at run time by the cycle budget (a loop that never ends?); "
                           "raise it with --max-cycles",))

    def _copy(self, c: X.CopyTable, kind: str = "", index: int = -1) -> None:
        if not c:
            return
        if self.trace is not None:
            self.trace.copy(kind, index, self.cycles.total)
        parts = self._copy_parts.get(id(c))
        if parts is None:
            copy_runs(self.mem, c.src, c.dst, c.nbytes, checked=False)
        else:
            self._parallel(lambda a, b: copy_runs(self.mem, c.src[a:b], c.dst[a:b], c.nbytes[a:b],
                                                  checked=False), parts)
        sync = self.exe.target.sync_cycles
        self.cycles.exchange += c.cycles - sync
        self.cycles.sync += sync
        self.cycles.exchange_bytes += c.exchange_bytes
        self.cycles.local_bytes += c.local_bytes

    def _parallel(self, fn, cuts) -> None:
        """fn(cuts[i], cuts[i+1]) for every piece: the first here, the others on the
        pool.  Raises the VertexError of the lowest failing row, if any.  On Ctrl-C
        every piece is told to stop and waited for before KeyboardInterrupt goes on
        (no native code may outlive the step)."""
        futs = [self._pool.submit(fn, int(a), int(b)) for a, b in zip(cuts[1:-1], cuts[2:])]
        errors, stop = [], None
        try:
            fn(int(cuts[0]), int(cuts[1]))
        except VertexError as e:
            errors.append(e)
        except BaseException as e:           # noqa: BLE001 — re-raised below
            request_stop()
            stop = e
        for f in futs:
            while True:
                try:
                    f.result()
                except VertexError as e:
                    errors.append(e)
                except BaseException as e:   # noqa: BLE001 — the piece's, or Ctrl-C while waiting
                    request_stop()
                    stop = stop or e
                    if not f.done():
                        continue
                break
        if stop is not None:
            raise stop
        if errors:
            raise min(errors, key=lambda e: e.vertex)

    def _execute(self, csi: int) -> None:
        cs = self.exe.compute_sets[csi]
        target = self.exe.target
        self._copy(self._pre[csi], "pre", csi)
        buf, views = self._cycle_bufs[csi]
        for grp, cyc, consts in zip(self._groups[csi], views, self._consts[csi]):
            self._run_group(cs, grp, cyc, consts)
        phase = 0
        if cs.groups:
            # All codelets of a compute set share the tiles' workers in one phase.
            last = self._last[csi]
            if last is None or not np.array_equal(last[0], buf):
                tiles, order = self._cs_tiles[csi]
                per_tile = compute_cycles(tiles, buf, target, order)
                last = self._last[csi] = (buf.copy(), per_tile, int(per_tile.max()))
            self.tile_cycles[csi] = last[1]
            phase = last[2]
        if self.trace is not None:
            self.trace.compute(csi, self.cycles.total, self.tile_cycles.get(csi) if cs.groups else None)
        self.cycles.compute += phase
        self.cycles.sync += target.sync_cycles
        self.cycles.per_compute_set[cs.name] = self.cycles.per_compute_set.get(cs.name, 0) + phase
        self._copy(self._post[csi], "post", csi)

    def _run_group(self, cs: X.ComputeSetExec, grp: X.VertexTable, cyc: np.ndarray,
                   consts: tuple) -> None:
        n = len(grp.tiles)
        native = self._special if consts else self.native
        try:
            if (self._pool is None or n < PARALLEL_MIN_ROWS
                    or 0 < int(cyc.sum()) < PARALLEL_MIN_CYCLES):
                native.run(grp.codelet, self.mem, grp.table, 0, n, cyc, consts, self.max_cycles)
            else:
                self._parallel(lambda a, b: native.run(grp.codelet, self.mem, grp.table, a, b, cyc, consts,
                                                       self.max_cycles),
                               np.linspace(0, n, self.threads + 1).astype(int))
        except VertexError as e:
            raise DeviceError(self._describe(cs, grp, e)) from None

    def _describe(self, cs, grp: X.VertexTable, e: VertexError) -> Diagnostic:
        tile = int(grp.tiles[e.vertex])
        span = self.exe.spans[int(grp.span_ids[e.vertex])]
        where = f"in codelet {grp.codelet}, vertex {e.vertex} of compute set '{cs.name}', on tile {tile}"
        notes = ["raised at run time by the vertex placed here"]
        if e.kind == ERR_BOUNDS:
            msg = (f"index {e.index} is out of range for axis {e.axis} of field '{e.field}' "
                   f"(size {e.size}) {where}")
            # A primitive's codelet: say what the index means to the user.
            if prim_codelets().get(grp.codelet) == self.exe.codelets[grp.codelet]:
                meaning = explain(grp.codelet, e.field, e.axis, e.index, e.size)
                if meaning is not None:
                    msg, notes = meaning, [msg] + notes
        elif e.kind == ERR_CYCLES:
            return Diagnostic(span, f"vertex ran more than {e.size:,} cycles (it had counted {e.index:,}) {where}",
                              "error", ("stopped at run time by the cycle budget (a loop that never ends?); "
                                        "raise it with --max-cycles",))
        else:
            msg = f"integer division by zero {where}"
        return Diagnostic(span, msg, "error", tuple(notes))


def format_array(a: np.ndarray) -> str:
    """Numbers as a person writes them: 1000 not 1000.0, nested brackets for rank > 1."""
    a = np.asarray(a)
    if a.dtype == np.bool_:
        fmt = lambda x: "true" if x else "false"                    # noqa: E731
    elif a.dtype.kind in "iu":
        fmt = str
    else:
        fmt = lambda x: np.format_float_positional(np.float32(x), trim="-", precision=7) \
            if np.isfinite(x) and (x == 0 or 1e-5 <= abs(x) < 1e12) else str(np.float32(x))  # noqa: E731
    if a.ndim == 0:
        return fmt(a.item())

    def rec(x):
        if x.ndim == 1:
            return "[" + " ".join(fmt(v) for v in x.tolist()) + "]"
        return "[" + " ".join(rec(r) for r in x) + "]"
    return rec(a)
