"""Native kernels for the compiler's own loops over runs: of elements, and of copies.

Requires numpy and `ir.host_llvm`; produces three kernels, each with its numpy
definition elsewhere, which the tests compare it with on random inputs, and each
used only for inputs large enough to pay for a native call (`MIN_RUNS`):

- `split_runs` — `Mapping.split_runs` (definition: `Mapping.split_runs_numpy`):
  runs of elements cut where a tile mapping's runs end, in one native pass that
  counts the pieces and one that writes them (with a field's regions, byte
  offsets and positions folded in, for `TensorLayout.pieces`), where numpy made a
  binary search per run and a dozen passes over the pieces (lowering ResNet-50's
  training step at batch 8 cuts 139M runs into 181M pieces: 9.5 s of its 29 s
  lowering in numpy).  The search for a run's first mapping run starts from
  where the last run ended (a vertex's runs ascend), gallops forward or searches
  below; a run's pieces are then the mapping runs up to its end, walked.
- `tile_bytes` — `cost._sums`: the bytes each tile receives, moves on the tile
  and sends in a copy table, with the tile memory a constant of the module.
- `copy_addresses` — `CopyElems.merged()` and a gather: a copy table's runs at
  their regions' addresses, from the parts as lowering left them.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from popdsl.ir.host_llvm import engine_for

# Below this many runs numpy's searches cost less than the checks a native call
# needs.
MIN_RUNS = 1 << 12

_IR = """
define i64 @popdsl_split_count(ptr noalias %ms, i64 %R, ptr noalias %st, ptr noalias %ln, i64 %n,
                               ptr noalias %first, ptr noalias %count, ptr noalias %nzero) {
entry:
  br label %head
head:
  %i = phi i64 [ 0, %entry ], [ %i1, %next ]
  %h = phi i64 [ 0, %entry ], [ %h1, %next ]
  %tot = phi i64 [ 0, %entry ], [ %tot1, %next ]
  %zer = phi i64 [ 0, %entry ], [ %zer1, %next ]
  %more = icmp slt i64 %i, %n
  br i1 %more, label %body, label %done
body:
  %sp = getelementptr i64, ptr %st, i64 %i
  %s = load i64, ptr %sp
  %lp = getelementptr i64, ptr %ln, i64 %i
  %L = load i64, ptr %lp
  %fp = getelementptr i64, ptr %first, i64 %i
  %cp = getelementptr i64, ptr %count, i64 %i
  %pos = icmp sgt i64 %L, 0
  br i1 %pos, label %hint, label %empty
empty:
  store i64 0, ptr %fp
  store i64 0, ptr %cp
  br label %next
hint:
  %mhp = getelementptr i64, ptr %ms, i64 %h
  %mh = load i64, ptr %mhp
  %h1p = add i64 %h, 1
  %mh1p = getelementptr i64, ptr %ms, i64 %h1p
  %mh1 = load i64, ptr %mh1p
  %ge = icmp sle i64 %mh, %s
  %lt = icmp slt i64 %s, %mh1
  %in = and i1 %ge, %lt
  br i1 %in, label %found, label %narrow
narrow:
  br i1 %ge, label %gallop, label %back
back:
  br label %bs
gallop:
  %glo = phi i64 [ %h1p, %narrow ], [ %gprobe, %gstep ]
  %gw = phi i64 [ 1, %narrow ], [ %gw2, %gstep ]
  %gprobe = add i64 %glo, %gw
  %gin = icmp slt i64 %gprobe, %R
  br i1 %gin, label %gtest, label %gend
gtest:
  %gpp = getelementptr i64, ptr %ms, i64 %gprobe
  %gpv = load i64, ptr %gpp
  %gle = icmp sle i64 %gpv, %s
  br i1 %gle, label %gstep, label %gend
gstep:
  %gw2 = shl i64 %gw, 1
  br label %gallop
gend:
  %ghi = select i1 %gin, i64 %gprobe, i64 %R
  br label %bs
bs:
  %lo = phi i64 [ 0, %back ], [ %glo, %gend ], [ %lo2, %bsstep ]
  %hi = phi i64 [ %h, %back ], [ %ghi, %gend ], [ %hi2, %bsstep ]
  %w = sub i64 %hi, %lo
  %wide = icmp sgt i64 %w, 1
  br i1 %wide, label %bsstep, label %found
bsstep:
  %half = lshr i64 %w, 1
  %mid = add i64 %lo, %half
  %mmp = getelementptr i64, ptr %ms, i64 %mid
  %mm = load i64, ptr %mmp
  %le = icmp sle i64 %mm, %s
  %lo2 = select i1 %le, i64 %mid, i64 %lo
  %hi2 = select i1 %le, i64 %hi, i64 %mid
  br label %bs
found:
  %f = phi i64 [ %h, %hint ], [ %lo, %bs ]
  store i64 %f, ptr %fp
  %e = add i64 %s, %L
  br label %walk
walk:
  %l = phi i64 [ %f, %found ], [ %l1, %walk ]
  %l1 = add i64 %l, 1
  %nxp = getelementptr i64, ptr %ms, i64 %l1
  %nx = load i64, ptr %nxp
  %cont = icmp slt i64 %nx, %e
  br i1 %cont, label %walk, label %walked
walked:
  %c = sub i64 %l1, %f
  store i64 %c, ptr %cp
  br label %next
next:
  %h1 = phi i64 [ %h, %empty ], [ %l, %walked ]
  %add = phi i64 [ 0, %empty ], [ %c, %walked ]
  %z = phi i64 [ 1, %empty ], [ 0, %walked ]
  %tot1 = add i64 %tot, %add
  %zer1 = add i64 %zer, %z
  %i1 = add i64 %i, 1
  br label %head
done:
  store i64 %zer, ptr %nzero
  ret i64 %tot
}

define void @popdsl_split_fill(ptr noalias %ms, ptr noalias %st, ptr noalias %ln, i64 %n, ptr noalias %first,
                               ptr noalias %count, ptr noalias %olo, ptr noalias %on, ptr noalias %osrc,
                               ptr noalias %opos, ptr noalias %orun, ptr noalias %rr, ptr noalias %ro,
                               i64 %rfirst, i64 %eb, ptr noalias %base, ptr noalias %tag) {
entry:
  %hasr = icmp ne ptr %rr, null
  %hasbase = icmp ne ptr %base, null
  %hastag = icmp ne ptr %tag, null
  br label %head
head:
  %i = phi i64 [ 0, %entry ], [ %i1, %next ]
  %p = phi i64 [ 0, %entry ], [ %q, %next ]
  %more = icmp slt i64 %i, %n
  br i1 %more, label %body, label %done
body:
  %cp = getelementptr i64, ptr %count, i64 %i
  %c = load i64, ptr %cp
  %sp = getelementptr i64, ptr %st, i64 %i
  %s = load i64, ptr %sp
  %lp = getelementptr i64, ptr %ln, i64 %i
  %L = load i64, ptr %lp
  %e = add i64 %s, %L
  %fp = getelementptr i64, ptr %first, i64 %i
  %f = load i64, ptr %fp
  br i1 %hasbase, label %getbase, label %gotbase
getbase:
  %bp = getelementptr i64, ptr %base, i64 %i
  %bv = load i64, ptr %bp
  br label %gotbase
gotbase:
  %b = phi i64 [ 0, %body ], [ %bv, %getbase ]
  %sb = sub i64 %s, %b
  br i1 %hastag, label %gettag, label %gottag
gettag:
  %tp = getelementptr i64, ptr %tag, i64 %i
  %tv = load i64, ptr %tp
  br label %gottag
gottag:
  %src = phi i64 [ %i, %gotbase ], [ %tv, %gettag ]
  br label %khead
khead:
  %k = phi i64 [ 0, %gottag ], [ %k1, %kstore ]
  %q = phi i64 [ %p, %gottag ], [ %q1, %kstore ]
  %kmore = icmp slt i64 %k, %c
  br i1 %kmore, label %kbody, label %next
kbody:
  %run = add i64 %f, %k
  %a0p = getelementptr i64, ptr %ms, i64 %run
  %a0 = load i64, ptr %a0p
  %run1 = add i64 %run, 1
  %b0p = getelementptr i64, ptr %ms, i64 %run1
  %b0 = load i64, ptr %b0p
  %agt = icmp sgt i64 %a0, %s
  %lo = select i1 %agt, i64 %a0, i64 %s
  %blt = icmp slt i64 %b0, %e
  %hi = select i1 %blt, i64 %b0, i64 %e
  %len = sub i64 %hi, %lo
  %pos = sub i64 %lo, %sb
  br i1 %hasr, label %kregion, label %kstore
kregion:
  %rrp = getelementptr i64, ptr %rr, i64 %run
  %rrv = load i64, ptr %rrp
  %reg = add i64 %rfirst, %rrv
  %rop = getelementptr i64, ptr %ro, i64 %run
  %rov = load i64, ptr %rop
  %into = sub i64 %lo, %a0
  %eoff = add i64 %rov, %into
  %boff = mul i64 %eoff, %eb
  br label %kstore
kstore:
  %out1 = phi i64 [ %lo, %kbody ], [ %reg, %kregion ]
  %out5 = phi i64 [ %run, %kbody ], [ %boff, %kregion ]
  %x1 = getelementptr i64, ptr %olo, i64 %q
  store i64 %out1, ptr %x1
  %x2 = getelementptr i64, ptr %on, i64 %q
  store i64 %len, ptr %x2
  %x3 = getelementptr i64, ptr %osrc, i64 %q
  store i64 %src, ptr %x3
  %x4 = getelementptr i64, ptr %opos, i64 %q
  store i64 %pos, ptr %x4
  %x5 = getelementptr i64, ptr %orun, i64 %q
  store i64 %out5, ptr %x5
  %q1 = add i64 %q, 1
  %k1 = add i64 %k, 1
  br label %khead
next:
  %i1 = add i64 %i, 1
  br label %head
done:
  ret void
}
"""

_P, _I = ctypes.c_void_p, ctypes.c_int64
_COUNT = ctypes.CFUNCTYPE(_I, _P, _I, _P, _P, _I, _P, _P, _P)
_FILL = ctypes.CFUNCTYPE(None, _P, _P, _P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _P, _P)


@functools.cache
def _kernels():
    engine = engine_for(_IR)
    return (engine, _COUNT(engine.get_function_address("popdsl_split_count")),
            _FILL(engine.get_function_address("popdsl_split_fill")))


def split_runs(run_starts: np.ndarray, numel: int, starts: np.ndarray, lengths: np.ndarray,
               regions: tuple | None = None, base: np.ndarray | None = None, tag: np.ndarray | None = None):
    """`Mapping.split_runs` of runs `starts`, `lengths` (int64, flat) over a mapping
    whose runs start at `run_starts` (ascending, the first 0) and end at `numel`:
    (piece start, length, run index, position in the run, mapping run) per piece.
    None where a run leaves [0, numel) (the numpy definition says what happens).
    `regions` = (region index of each mapping run, its element offset there, the
    first region, bytes per element): each piece's region and byte offset instead
    of its start and mapping run (`TensorLayout.pieces`).  `base`, `tag` (per run):
    added to each piece's position, and given as its run instead of the index."""
    n = starts.size
    if not n or not run_starts.size or run_starts[0] != 0:
        return None
    # The kernel reads these per run and per mapping run: a shorter array is our bug.
    assert all(a is None or len(a) == n for a in (base, tag)) and lengths.size == n \
        and (regions is None or len(regions[0]) == len(regions[1]) == run_starts.size), "split_runs: array lengths"
    if int(starts.min()) < 0 or int((starts + lengths).max()) > numel:
        # Only runs of some length must lie inside (the kernel skips the others).
        positive = lengths > 0
        s, e = starts[positive], starts[positive] + lengths[positive]
        if s.size and (int(s.min()) < 0 or int(e.max()) > numel):
            return None
    starts = np.ascontiguousarray(starts, np.int64)
    lengths = np.ascontiguousarray(lengths, np.int64)
    bounds = np.append(run_starts, numel).astype(np.int64)
    first, count, nzero = np.empty(n, np.int64), np.empty(n, np.int64), np.zeros(1, np.int64)
    _, count_fn, fill_fn = _kernels()
    ptr = _address
    total = count_fn(ptr(bounds), run_starts.size, ptr(starts), ptr(lengths), n, ptr(first), ptr(count), ptr(nzero))
    if total == n and not nzero[0] and regions is None and base is None and tag is None:
        return starts, lengths, np.arange(n), np.zeros(n, np.int64), first     # no run cut
    out = [np.empty(total, np.int64) for _ in range(5)]
    extra = [None, None, 0, 0]
    if regions is not None:
        run_region, run_off, first_region, elem_bytes = regions
        extra = [np.ascontiguousarray(run_region, np.int64), np.ascontiguousarray(run_off, np.int64),
                 int(first_region), int(elem_bytes)]
    per_run = [None if a is None else np.ascontiguousarray(a, np.int64) for a in (base, tag)]
    fill_fn(ptr(bounds), ptr(starts), ptr(lengths), n, ptr(first), ptr(count), *map(ptr, out),
            *(ptr(a) if isinstance(a, np.ndarray) else a for a in extra), *map(ptr, per_run))
    return tuple(out)


def _address(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


# ---------------------------------------------------------------- copy runs' bytes per tile

# The tile memory is a constant of the module (one compile per target), so that
# LLVM divides by it with a multiply: two divisions a run were most of the numpy
# version's time over a training step's hundred million copy runs.
_TILE_IR = """
define i64 @popdsl_tile_bytes(ptr noalias %src, ptr noalias %dst, ptr noalias %nb, i64 %n, i64 %T,
                              ptr noalias %into, ptr noalias %sent, ptr noalias %cross) {
entry:
  br label %head
head:
  %i = phi i64 [ 0, %entry ], [ %i1, %body ]
  %moved = phi i64 [ 0, %entry ], [ %moved1, %body ]
  %more = icmp slt i64 %i, %n
  br i1 %more, label %body, label %done
body:
  %sp = getelementptr i64, ptr %src, i64 %i
  %s = load i64, ptr %sp
  %dp = getelementptr i64, ptr %dst, i64 %i
  %d = load i64, ptr %dp
  %bp = getelementptr i64, ptr %nb, i64 %i
  %b = load i64, ptr %bp
  %st = udiv i64 %s, TILE_MEMORY
  %dt = udiv i64 %d, TILE_MEMORY
  %c = icmp ne i64 %st, %dt
  %dtl = add i64 %dt, %T
  %slot = select i1 %c, i64 %dt, i64 %dtl
  %ip = getelementptr i64, ptr %into, i64 %slot
  %iv = load i64, ptr %ip
  %iv1 = add i64 %iv, %b
  store i64 %iv1, ptr %ip
  %sent_b = select i1 %c, i64 %b, i64 0
  %tp = getelementptr i64, ptr %sent, i64 %st
  %tv = load i64, ptr %tp
  %tv1 = add i64 %tv, %sent_b
  store i64 %tv1, ptr %tp
  %moved1 = add i64 %moved, %sent_b
  %c8 = zext i1 %c to i8
  %cp = getelementptr i8, ptr %cross, i64 %i
  store i8 %c8, ptr %cp
  %i1 = add i64 %i, 1
  br label %head
done:
  ret i64 %moved
}
"""
_TILE = ctypes.CFUNCTYPE(_I, _P, _P, _P, _I, _I, _P, _P, _P)


@functools.cache
def _tile_kernel(tile_memory: int):
    engine = engine_for(_TILE_IR.replace("TILE_MEMORY", str(int(tile_memory))))
    return engine, _TILE(engine.get_function_address("popdsl_tile_bytes"))


def tile_bytes(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, tile_memory: int, tiles: int):
    """Per tile of copy runs (global byte addresses, each run within one tile):
    (bytes received, bytes moved on the tile, bytes sent counting every run,
    which runs cross tiles, bytes crossing): `cost._sums`, natively.  None
    where an address is outside the tiles' memory."""
    n = src.size
    assert dst.size == nbytes.size == n, "tile_bytes: array lengths"
    if n and (min(int(src.min()), int(dst.min())) < 0
              or max(int(src.max()), int(dst.max())) >= tile_memory * tiles):
        return None
    src, dst, nbytes = (np.ascontiguousarray(a, np.int64) for a in (src, dst, nbytes))
    into, sent, cross = np.zeros(2 * tiles, np.int64), np.zeros(tiles, np.int64), np.empty(n, np.bool_)
    _, fn = _tile_kernel(tile_memory)
    moved = fn(*map(_address, (src, dst, nbytes)), n, tiles, _address(into), _address(sent), _address(cross))
    return into[:tiles], into[tiles:], sent, cross, int(moved)


# ---------------------------------------------------------------- copy runs at their addresses

# One function per width of (source offset, destination offset, length), as
# `ir.lowered.CopyElems` keeps each part of its runs (int32 where they fit).
_ADDR_IR = """
define void @popdsl_copy_addresses_NAME(ptr noalias %sr, ptr noalias %so, ptr noalias %dr, ptr noalias %do,
                                        ptr noalias %nb, i64 %n, ptr noalias %addr, ptr noalias %osrc,
                                        ptr noalias %odst, ptr noalias %onb) {
entry:
  br label %head
head:
  %i = phi i64 [ 0, %entry ], [ %i1, %body ]
  %more = icmp slt i64 %i, %n
  br i1 %more, label %body, label %done
body:
  %srp = getelementptr i32, ptr %sr, i64 %i
  %srv = load i32, ptr %srp
  %sri = sext i32 %srv to i64
  %sap = getelementptr i64, ptr %addr, i64 %sri
  %sa = load i64, ptr %sap
  %sop = getelementptr SO, ptr %so, i64 %i
  %sov = load SO, ptr %sop
  %soi = sext SO %sov to i64
  %s = add i64 %sa, %soi
  %drp = getelementptr i32, ptr %dr, i64 %i
  %drv = load i32, ptr %drp
  %dri = sext i32 %drv to i64
  %dap = getelementptr i64, ptr %addr, i64 %dri
  %da = load i64, ptr %dap
  %dop = getelementptr DO, ptr %do, i64 %i
  %dov = load DO, ptr %dop
  %doi = sext DO %dov to i64
  %d = add i64 %da, %doi
  %nbp = getelementptr NB, ptr %nb, i64 %i
  %nbv = load NB, ptr %nbp
  %nbi = sext NB %nbv to i64
  %x1 = getelementptr i64, ptr %osrc, i64 %i
  store i64 %s, ptr %x1
  %x2 = getelementptr i64, ptr %odst, i64 %i
  store i64 %d, ptr %x2
  %x3 = getelementptr i64, ptr %onb, i64 %i
  store i64 %nbi, ptr %x3
  %i1 = add i64 %i, 1
  br label %head
done:
  ret void
}
"""
_WIDTHS = [(a, b, c) for a in (32, 64) for b in (32, 64) for c in (32, 64)]
_ADDR = ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P, _I, _P, _P, _P, _P)


def _addr_name(widths) -> str:
    return "_".join(map(str, widths))


@functools.cache
def _addr_kernels():
    def variant(w):
        text = _ADDR_IR.replace("NAME", _addr_name(w))
        for name, bits in zip(("SO", "DO", "NB"), w):
            # A 64-bit column needs no extension (LLVM has no i64-to-i64 sext).
            text = text.replace(f"sext {name} ", "bitcast i64 " if bits == 64 else f"sext i{bits} ")
            text = text.replace(name, f"i{bits}")
        return text
    text = "".join(variant(w) for w in _WIDTHS)
    engine = engine_for(text)
    return engine, {w: _ADDR(engine.get_function_address(f"popdsl_copy_addresses_{_addr_name(w)}")) for w in _WIDTHS}


def copy_addresses(parts: list[tuple[np.ndarray, ...]], region_addr: np.ndarray):
    """Runs of copies kept as parts of (source region, offset, destination region,
    offset, bytes) arrays (regions int32; the rest int32 or int64, each within
    its region's bytes) at the regions' addresses: (source, destination, bytes),
    int64, the parts end to end.  None for arrays of other types."""
    ok = (np.dtype(np.int32), np.dtype(np.int64))
    for p in parts:
        assert len(p) == 5 and all(a.size == p[0].size for a in p), "copy_addresses: array lengths"
        if p[0].dtype != ok[0] or p[2].dtype != ok[0] or any(p[k].dtype not in ok for k in (1, 3, 4)) \
                or not all(a.flags.c_contiguous for a in p):
            return None
        if p[0].size and min(int(p[0].min()), int(p[2].min())) < 0 \
                or p[0].size and max(int(p[0].max()), int(p[2].max())) >= region_addr.size:
            return None
    total = sum(p[0].size for p in parts)
    out = [np.empty(total, np.int64) for _ in range(3)]
    addr = np.ascontiguousarray(region_addr, np.int64)
    _, fns = _addr_kernels()
    at = 0
    for p in parts:
        n = p[0].size
        if n:
            fn = fns[tuple(p[k].dtype.itemsize * 8 for k in (1, 3, 4))]
            fn(*map(_address, p), n, _address(addr), *(_address(o[at:]) for o in out))
        at += n
    return tuple(out)
