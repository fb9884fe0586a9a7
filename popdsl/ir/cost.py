"""The cycle model (README: "The IPU model"), estimated and saying so: what a vertex, a tile's
compute phase and an exchange phase cost.

Requires `popdsl.ir.codelet` and the target description; produces cost functions used
by the code generator (`popdsl.codegen.llvm`, which adds them to a per-vertex counter),
the reference evaluator (`popdsl.ir.codelet_eval`, which must count exactly the same),
the memory planner (exchange cycles of its copy tables) and the simulator.

Per vertex (an estimate of an IPU worker, not a measurement, and it says so):

* every load, store, arithmetic op, comparison, logic op, select and cast costs `OP`
  (1 cycle), on a scalar or a 64-bit vector alike (f32x2 and f16x4 loads, stores and
  arithmetic are single IPU instructions); constants, locals, sizes, `len` and a
  vector's lane are free (registers); building a vector costs `OP` per lane but one;
* division and remainder cost `DIV`; an intrinsic costs what its entry in
  `ir.intrinsics` says (cheap ones `OP`, transcendental ones many cycles);
* a call of a scalar codelet costs `CALL` plus the callee's static cost (its statements
  counted once each, loops as one iteration) — calls are usually inlined, so this is
  the cost of its straight-line work;
* an `if` costs its condition + `BRANCH`; a `while` costs condition + `BRANCH` at every
  test; a `for` costs its bounds + `LOOP_SETUP` once and `LOOP_ITER` per iteration
  (decrement and branch, the IPU's `brnzdec`), except that in a vertex a `for` whose
  body is straight-line code is a zero-overhead hardware loop (the IPU's `rpt`):
  `RPT_ITER` (0) per iteration;
* every vertex costs `VERTEX_OVERHEAD` (worker launch, reading the vertex state);
* an `amp` (the accumulating matrix product, `ir.codelet.Amp`) costs its operands'
  indices when it starts and then `amp_cycles(m, k, n)`, which depends on its sizes:
  the AMP holds an `AMP_ROWS` x `AMP_COLS` block of `a` (one *pass*), loads it, and
  streams the n columns of `b` through it at `AMP_ELEMENT` cycles each.  `amp_at` and
  `amp_bt` (a or b read transposed) and column steps cost the same: the held block is
  charged as 64-bit loads and the streamed columns at `AMP_ELEMENT` whatever their
  layout -- optimistic where a layout would need narrower loads, as a forward
  convolution's held block (its columns kh*kw apart) already is.

Counting rule shared by both consumers: a statement's `stmt_cost` is charged when the
statement starts executing; loop costs as described above.  Operands of `&&`/`||` and
both arms of `select` are charged whether evaluated or not (static cost).

Per tile and phase:

- A tile runs its vertices on `workers` barrel-scheduled contexts: one context issues
  every `workers` cycles, so a vertex of C instructions alone takes workers × C
  cycles and a full tile issues one instruction a cycle.  A tile's compute time is
  max(workers × longest vertex, sum of its vertices) — perfect packing.
- Exchange moves `exchange_bytes_per_cycle` bytes per cycle into and out of each tile;
  an exchange phase lasts as long as its busiest tile.  What a tile sends to several
  tiles it sends once (the exchange broadcasts; see `copy_cycles`).  On-tile
  rearrangement copies are charged at the same rate.
- Every compute or exchange phase ends with a sync of `sync_cycles`.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping

import numpy as np

from popdsl.ir import codelet as ir
from popdsl.ir import native_runs
from popdsl.ir.intrinsics import DIV, INTRINSICS, OP
from popdsl.ir.target import Target

VERTEX_OVERHEAD = 10
BRANCH = 1
LOOP_SETUP = 2
LOOP_ITER = 1
RPT_ITER = 0
CALL = 4

# The AMP unit of a GC200 tile, per operand type of `a` and `b` (f16 accumulates in
# f32).  A pass multiplies one held block of a (AMP_ROWS x AMP_COLS) by the columns
# of b, AMP_ELEMENT worker cycles a column: with six workers that is 8*8/4 = 16 f32
# or 16*16/4 = 64 f16 multiply-accumulates per tile cycle, the GC200's peak.  The
# constants are PopLibs' cycle estimates of its AMP convolution vertices
# (graphcore/poplibs lib/poplin/PerformanceEstimation.hpp, ConvPartialnx1): a worker
# spends 35 + 4 (n - 3) = 23 + 4 n cycles on a partition of n field elements, and
# the supervisor loads the block for all six workers in (its bytes / 8) + 15 cycles,
# which a vertex here is charged a sixth of.
AMP_ROWS = {"f32": 8, "f16": 16}
AMP_COLS = {"f32": 8, "f16": 16}
AMP_ELEMENT = 4
AMP_PASS = 23
AMP_LOAD_BYTES = 8        # bytes of the held block loaded per cycle (a 64-bit load)
AMP_LOAD_EXTRA = 15
AMP_SHARED_BY = 6         # workers that share one load of the held block


def expr_cost(e, scalars: Mapping[str, ir.Codelet] = {}) -> int:
    """Cycles to evaluate expression `e` once."""
    if isinstance(e, (ir.Const, ir.Local, ir.Sym, ir.Len)):
        return 0
    if isinstance(e, ir.Lane):                # half of a register pair
        return expr_cost(e.x, scalars)
    if isinstance(e, ir.Splat):
        return OP + expr_cost(e.x, scalars)
    if isinstance(e, ir.Vector):
        return OP * (len(e.xs) - 1) + sum(expr_cost(x, scalars) for x in e.xs)
    if isinstance(e, ir.Load):
        return OP + sum(expr_cost(i, scalars) for i in e.index)
    if isinstance(e, ir.Unary):
        return OP + expr_cost(e.x, scalars)
    if isinstance(e, ir.Binary):
        own = DIV if e.op in ("/", "%") else OP
        return own + expr_cost(e.a, scalars) + expr_cost(e.b, scalars)
    if isinstance(e, ir.Select):
        return OP + sum(expr_cost(x, scalars) for x in (e.cond, e.a, e.b))
    if isinstance(e, ir.Cast):
        return OP + expr_cost(e.x, scalars)
    if isinstance(e, ir.Intrinsic):
        return INTRINSICS[e.name].cost + sum(expr_cost(a, scalars) for a in e.args)
    if isinstance(e, ir.CallScalar):
        callee = scalars.get(e.name)
        body = static_cost(callee, scalars) if callee is not None else 0
        return CALL + body + sum(expr_cost(a, scalars) for a in e.args)
    raise TypeError(f"not an expression: {e!r}")


def stmt_cost(s, scalars: Mapping[str, ir.Codelet] = {}) -> int:
    """Cycles charged when statement `s` starts (excluding nested bodies and the
    per-test / per-iteration loop costs, which `loop_test_cost` and `LOOP_ITER` give)."""
    if isinstance(s, ir.Declare):
        return expr_cost(s.init, scalars) if s.init is not None else OP
    if isinstance(s, ir.Assign):
        return expr_cost(s.value, scalars)
    if isinstance(s, ir.Store):
        return OP + expr_cost(s.value, scalars) + sum(expr_cost(i, scalars) for i in s.index)
    if isinstance(s, ir.If):
        return BRANCH + expr_cost(s.cond, scalars)
    if isinstance(s, ir.For):
        return LOOP_SETUP + expr_cost(s.start, scalars) + expr_cost(s.stop, scalars)
    if isinstance(s, ir.Return):
        return expr_cost(s.value, scalars) if s.value is not None else 0
    if isinstance(s, ir.Amp):
        return sum(expr_cost(x, scalars) for x in (*s.c_at, *s.a_at, *s.b_at, *s.sizes()))
    if isinstance(s, (ir.While, ir.Break, ir.Continue)):
        return 0
    raise TypeError(f"not a statement: {s!r}")


class _Ints:
    """Integer arithmetic for `amp_cycles` on Python ints (the code generator passes
    an LLVM builder's equivalent, so the formula is written once)."""
    @staticmethod
    def const(v):
        return v

    @staticmethod
    def add(a, b):
        return a + b

    @staticmethod
    def mul(a, b):
        return a * b

    @staticmethod
    def ceil_div(a, d: int):
        return -(-a // d)


def amp_load_cycles(dtype: str) -> int:
    """A worker's share of loading one pass's held block of `dtype`."""
    rows, cols = AMP_ROWS[dtype], AMP_COLS[dtype]
    return -(-(rows * cols * ir.ELEM_BYTES[dtype] // AMP_LOAD_BYTES + AMP_LOAD_EXTRA) // AMP_SHARED_BY)


def amp_cycles(m, k, n, dtype: str, ops=_Ints):
    """Worker cycles of `amp` with sizes m, k, n (all positive; an amp with a size
    <= 0 does nothing and costs nothing beyond its operands) and operand type `dtype`
    of a and b: passes x (AMP_PASS + a share of loading the held block + AMP_ELEMENT
    per column)."""
    rows, cols = AMP_ROWS[dtype], AMP_COLS[dtype]
    load = amp_load_cycles(dtype)
    passes = ops.mul(ops.ceil_div(m, rows), ops.ceil_div(k, cols))
    return ops.mul(passes, ops.add(ops.const(AMP_PASS + load), ops.mul(n, ops.const(AMP_ELEMENT))))


def rpt_iteration(body, scalars: Mapping[str, ir.Codelet] = {}) -> int:
    """Cycles of one iteration of a vertex `for` whose body is straight-line code
    (`ir.checkpoints.straight`), a hardware loop: its statements, RPT_ITER."""
    return RPT_ITER + sum(stmt_cost(x, scalars) for x in body)


def while_test_cost(s: ir.While, scalars: Mapping[str, ir.Codelet] = {}) -> int:
    """Cycles charged at every evaluation of a while condition."""
    return BRANCH + expr_cost(s.cond, scalars)


def _block_static(body, scalars) -> int:
    total = 0
    for s in body:
        total += stmt_cost(s, scalars)
        if isinstance(s, ir.For):
            total += LOOP_ITER + _block_static(s.body, scalars)
        elif isinstance(s, ir.While):
            total += while_test_cost(s, scalars) + _block_static(s.body, scalars)
        elif isinstance(s, ir.If):
            total += max(_block_static(s.then, scalars), _block_static(s.orelse, scalars))
        elif isinstance(s, ir.Amp):
            raise TypeError("amp in a scalar codelet")   # sema allows it in vertex codelets only
    return total


def static_cost(c: ir.Codelet, scalars: Mapping[str, ir.Codelet] = {}) -> int:
    """A scalar codelet's cost per call: each statement once, loops as one
    iteration, the dearer arm of each `if`.  Cached per (codelet, scalar set)."""
    return _static_cached(c, tuple(sorted(scalars.items())) if scalars else ())


@lru_cache(maxsize=4096)
def _static_cached(c: ir.Codelet, scalar_items: tuple) -> int:
    return _block_static(c.body, dict(scalar_items))


# ---------------------------------------------------------------- the constants and their sources

JIA = "Jia et al. 2019, Dissecting the Graphcore IPU Architecture via Microbenchmarking (arXiv:1912.03413)"
POPLIBS_CONV = "graphcore/poplibs lib/poplin/PerformanceEstimation.hpp"
ASSUMED = "assumed (no published figure)"


def constants(target: Target) -> list[tuple[str, object, str, str]]:
    """Every constant of the cycle model: (name, value, what it is, its source)."""
    from popdsl.ir.intrinsics import DIV, OP, SQRT, TRANSCENDENTAL
    return [
        ("workers", target.workers, "worker contexts per tile, each issuing every `workers` cycles",
         f"{JIA}: six hardware threads, round-robin"),
        ("clock", f"{target.clock_hz / 1e9:.2f} GHz", "tile clock",
         "Graphcore datasheets (GC200 1.33 GHz, GC2 1.6 GHz)"),
        ("OP", OP, "a load, store, ALU or FP instruction of a worker", f"{JIA}: one instruction per thread turn"),
        ("DIV", DIV, "a division or remainder (no divider: a sequence)", ASSUMED),
        ("SQRT", SQRT, "a square root", ASSUMED),
        ("TRANSCENDENTAL", TRANSCENDENTAL, "exp, log, tanh, sin, cos, pow, erf (software sequences)", ASSUMED),
        ("VERTEX_OVERHEAD", VERTEX_OVERHEAD, "starting a vertex on a worker, reading its state",
         f"{ASSUMED}; PopLibs charges 16 per worker in ConvPartial1x1Out ({POPLIBS_CONV})"),
        ("BRANCH", BRANCH, "a conditional branch", ASSUMED),
        ("LOOP_SETUP", LOOP_SETUP, "entering a counted loop", ASSUMED),
        ("LOOP_ITER", LOOP_ITER, "one iteration of a loop with branches or loops inside (brnzdec: "
         "decrement and branch)", "graphcore/poplibs lib/popops/codelets/asm/Zero.S (brnzdec closes its loop)"),
        ("RPT_ITER", RPT_ITER, "one iteration of a loop over straight-line code, a hardware loop (rpt)",
         "graphcore/poplibs lib/popops/codelets/asm/Zero.S: rpt over one st64step stores 8 bytes a cycle"),
        ("CALL", CALL, "calling a scalar codelet that was not inlined", ASSUMED),
        ("AMP_ROWS x AMP_COLS", f"f32 {AMP_ROWS['f32']}x{AMP_COLS['f32']}, f16 {AMP_ROWS['f16']}x{AMP_COLS['f16']}",
         "block of a an amp pass holds (16 f32 / 64 f16 MACs per tile cycle at 4 cycles a column; "
         "GC200's AMP on every target)",
         "GC200 peaks, 62.5 TFLOPS f32 and 250 TFLOPS f16 (Graphcore datasheet) over 1472 tiles at 1.33 GHz"),
        ("AMP_ELEMENT", AMP_ELEMENT, "worker cycles per column of b in an amp pass",
         f"{POPLIBS_CONV}: ConvPartialnx1, 4 cycles per field element"),
        ("AMP_PASS", AMP_PASS, "worker cycles to start an amp pass",
         f"{POPLIBS_CONV}: ConvPartialnx1, 35 + 4 (n - 3) per worker partition"),
        ("AMP load", f"(block bytes / {AMP_LOAD_BYTES} + {AMP_LOAD_EXTRA}) / {AMP_SHARED_BY}",
         "a vertex's share of the supervisor loading the held block for six workers",
         f"{POPLIBS_CONV}: numLoads + 15 supervisor cycles per pass"),
        ("exchange_bytes_per_cycle", target.exchange_bytes_per_cycle, "bytes into and out of a tile per cycle",
         "Poplar IPUModel exchangeBytesPerCycle"),
        ("exchange broadcast", "a byte sent once", "what one tile sends to several tiles",
         "Graphcore US patent application 2019/0121777: packets carry no destination; receivers switch to the sender"),
        ("sync_cycles", target.sync_cycles, "one BSP sync, after every compute and exchange phase", ASSUMED),
    ]


# ---------------------------------------------------------------- tiles and phases

ASSUMPTIONS = (
    "vertex cycles: static instruction cost per executed codelet statement, amp by its sizes (estimated)",
    "tile compute: max(workers x longest vertex, sum of vertex cycles) (perfect packing on {workers} workers)",
    "exchange: {exchange_bytes_per_cycle} B/cycle in and out of each tile, a byte sent to several tiles sent once; "
    "busiest tile sets the phase",
    "sync: {sync_cycles} cycles per compute or exchange phase (assumed)",
    "clock: {clock_ghz:.2f} GHz",
)


def assumptions(target: Target) -> list[str]:
    return [a.format(workers=target.workers, exchange_bytes_per_cycle=target.exchange_bytes_per_cycle,
                     sync_cycles=target.sync_cycles, clock_ghz=target.clock_hz / 1e9) for a in ASSUMPTIONS]


def copy_cycles(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, target: Target) -> tuple[int, int, int]:
    """(cycles, bytes crossing tiles, on-tile bytes) of runs of copies: the busiest
    tile's bytes (`tile_bytes`) at the exchange rate, and a sync."""
    if not src.size:
        return 0, 0, 0
    per_tile, moved = _tile_bytes(src, dst, nbytes, target, busiest_only=True)
    busiest = int(np.max(per_tile))
    cycles = -(-busiest // target.exchange_bytes_per_cycle) + target.sync_cycles
    return cycles, moved, int(nbytes.sum()) - moved


def tile_bytes(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, target: Target) -> np.ndarray:
    """Per tile, the bytes that set its time in an exchange: the most of what it
    sends, receives and moves on the tile.

    A tile sends on its own exchange wires, with no destination: any number of
    tiles may listen at once (Graphcore's exchange, US patent application
    2019/0121777: a packet "having no destination identifier", received by tiles
    that switch their input to the sender's wires).  So a tile's send time counts
    each byte it sends once however many tiles receive it, while each receiver
    counts all it receives."""
    return _tile_bytes(src, dst, nbytes, target)[0]


def _tile_bytes(src, dst, nbytes, target: Target, busiest_only: bool = False) -> tuple[np.ndarray, int]:
    """`tile_bytes`, and the bytes that cross tiles.  `busiest_only`: only the
    largest figure is asked for (`copy_cycles`), and a tile whose sends, counted
    in full, are at most what some tile receives or moves cannot be it: its
    sends stay counted in full (where sorting every broadcasting tile's runs
    was most of the cost of a training step's copy tables)."""
    tm, T = target.tile_memory, target.tiles
    nbytes = np.asarray(nbytes, np.int64)
    sums = native_runs.tile_bytes(src, dst, nbytes, tm, T) if src.size >= native_runs.MIN_RUNS else None
    recv, local, sent, cross, moved = sums if sums is not None else _sums(src, dst, nbytes, tm, T)
    # Counting each byte once can only lower what a tile sends: worth computing
    # only on tiles where sending, counted in full, is the most.
    over = sent > (max(int(recv.max()), int(local.max())) if busiest_only else np.maximum(recv, local))
    if over.any():
        mine = cross & over[src // tm]
        sent[over] = _union_per_tile(src[mine], nbytes[mine], tm, T)[over]
    return np.maximum(np.maximum(sent, recv), local), moved


def _sums(src, dst, nbytes, tm: int, T: int):
    """Per tile, bytes received, moved on the tile and sent (every run counted),
    which runs cross tiles and the bytes that do: the definition of
    `native_runs.tile_bytes`, which large copy tables use."""
    st, dt = src // tm, dst // tm
    cross = st != dt
    # Received (first T) and moved on the tile (last T) in one pass.  (Integer
    # add.at: bincount's weights would go through float64, at twice the time.)
    into = np.zeros(2 * T, np.int64)
    np.add.at(into, dt + T * ~cross, nbytes)
    sent = np.zeros(T, np.int64)
    np.add.at(sent, st[cross], nbytes[cross])
    return into[:T], into[T:], sent, cross, int(nbytes[cross].sum())


def _union_per_tile(start: np.ndarray, nbytes: np.ndarray, tm: int, T: int) -> np.ndarray:
    """Per tile, the size of the union of the runs [start, start + nbytes) in it (a
    run lies in one tile).  The runs are sorted as one key, start then length,
    where both fit in 63 bits (a value sort, not an argsort and gathers: a ResNet-50
    training step's plan has tens of millions of runs)."""
    start, nbytes = start.astype(np.int64), nbytes.astype(np.int64)
    if not start.size:
        return np.zeros(T, np.int64)
    bits = max(1, int(nbytes.max()).bit_length())
    if int(start.max()) >> (62 - bits) == 0:
        key = np.sort((start << bits) | nbytes)
        start, end = key >> bits, (key >> bits) + (key & ((1 << bits) - 1))
    else:
        order = np.argsort(start, kind="stable")
        start, end = start[order], start[order] + nbytes[order]
    covered = np.maximum.accumulate(np.concatenate(([start[0]], end[:-1])))
    union = np.concatenate(([0], np.cumsum(np.clip(end - np.maximum(start, covered), 0, None))))
    at = np.searchsorted(start, np.arange(T + 1, dtype=np.int64) * tm)
    return union[at[1:]] - union[at[:-1]]


def compute_cycles(tiles: np.ndarray, vertex_cycles: np.ndarray, target: Target,
                   order: np.ndarray) -> np.ndarray:
    """Per-tile compute cycles of one compute-set execution (int64, length tiles);
    `order` is the stable argsort of `tiles` (fixed per compute set, so computed once)."""
    total = np.bincount(tiles, weights=vertex_cycles, minlength=target.tiles)
    longest = np.zeros(target.tiles, np.int64)
    if tiles.size:
        st = tiles[order]
        first = np.concatenate(([0], np.nonzero(st[1:] != st[:-1])[0] + 1))
        longest[st[first]] = np.maximum.reduceat(vertex_cycles[order], first)
    return np.maximum(total, target.workers * longest).astype(np.int64)
