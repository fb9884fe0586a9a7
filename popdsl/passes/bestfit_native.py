"""Best fit's placement loop as native code: `bestfit.best_fit`, for one problem.

Requires a problem whose sizes and program points fit in i32 and whose alignments
are powers of two (memplan's are 8 and 64); produces the same offsets and top as
the numpy definition, `bestfit.best_fit` (tests/test_memplan.py compares them on
random problems, intervals per call included).

The placed allocations are kept in offset order (ties: lower index first) as
three i32 arrays — start and end of their span of life, and index — so that the
scan for the allocations alive with the one being placed tests LANES of them at
once (one vector compare of each bound, a mask; the lanes set are handled one by
one, in order).  Most placed allocations are not alive with a given one (a
tenth were, over ResNet-50's training step at batch 8), so the scan costs little
beside the shifts that keep the arrays in order; the insertion point is found by
binary search over (offset, index).  Offsets and tops are read through the index
from `off`, which the loop fills.  Until 2026-12-03 the same loop ran as a popdsl
codelet (one scalar test per placed allocation, an insertion shifting one array
element by element): the 1472 problems of that step took 4.8 s on two threads
for one order, here 2.8 s on one.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from popdsl.ir.host_llvm import engine_for

LANES = 16
# i32 arithmetic: problems whose bytes or points could reach 2**31 use numpy.
LIMIT = 1 << 30
_FREE = np.iinfo(np.int32).max          # a slot past the placed ones: alive with nothing

# What the IR below does, per allocation i in `order` (bs, be, bi: the placed
# allocations' spans of life and indices, in offset order; `cursor`, the first free
# byte above every conflicting allocation seen so far, so the gap below conflict j
# is off[j] - align_up(cursor)):
#
#   cursor = 0; best = -1
#   for each block of LANES placed slots, for each lane where bs <= end[i] and be >= start[i]:
#       j = bi[r]
#       if i or j lives in several intervals and none of theirs meet: skip
#       at = align_up(cursor, align[i]); gap = off[j] - at
#       if gap >= size[i] and (best < 0 or gap < bestgap): best, bestgap = at, gap
#           (a gap of exactly size[i] ends the scan)
#       cursor = max(cursor, off[j] + size[j])
#   off[i] = best if best >= 0 else align_up(cursor, align[i])
#   insert (start[i], end[i], i) where (off, index) keeps the slots sorted
#   (binary search, then one memmove per array)
_IR = """
declare i32 @llvm.cttz.i32(i32, i1)
declare void @llvm.memmove.p0.p0.i64(ptr, ptr, i64, i1)

define i32 @popdsl_best_fit(ptr noalias %size, ptr noalias %align, ptr noalias %start, ptr noalias %end,
                            ptr noalias %ptr, ptr noalias %istart, ptr noalias %iend, ptr noalias %order,
                            i32 %n, i1 %anymany, ptr noalias %off, ptr noalias %bs, ptr noalias %be,
                            ptr noalias %bi) {
entry:
  %q.a = alloca i32
  %placed.a = alloca i32
  %peak.a = alloca i32
  %cursor.a = alloca i32
  %best.a = alloca i32
  %bestgap.a = alloca i32
  %blk.a = alloca i32
  %bits.a = alloca i32
  %hit.a = alloca i1
  %x.a = alloca i32
  %y.a = alloca i32
  %r.a = alloca i32
  %lo.a = alloca i32
  store i32 0, ptr %q.a
  store i32 0, ptr %placed.a
  store i32 0, ptr %peak.a
  br label %outer
outer:
  %q = load i32, ptr %q.a
  %qmore = icmp slt i32 %q, %n
  br i1 %qmore, label %alloc, label %finish
alloc:
  %op = getelementptr i32, ptr %order, i32 %q
  %i = load i32, ptr %op
  %szp = getelementptr i32, ptr %size, i32 %i
  %s = load i32, ptr %szp
  %alp = getelementptr i32, ptr %align, i32 %i
  %a = load i32, ptr %alp
  %am1 = sub i32 %a, 1
  %amask = sub i32 0, %a
  %stp = getelementptr i32, ptr %start, i32 %i
  %S = load i32, ptr %stp
  %enp = getelementptr i32, ptr %end, i32 %i
  %E = load i32, ptr %enp
  %pip = getelementptr i32, ptr %ptr, i32 %i
  %pi0 = load i32, ptr %pip
  %i1 = add i32 %i, 1
  %pip1 = getelementptr i32, ptr %ptr, i32 %i1
  %pi1 = load i32, ptr %pip1
  %ni = sub i32 %pi1, %pi0
  %manyi = icmp sgt i32 %ni, 1
  %Ev0 = insertelement <W x i32> poison, i32 %E, i64 0
  %Ev = shufflevector <W x i32> %Ev0, <W x i32> poison, <W x i32> zeroinitializer
  %Sv0 = insertelement <W x i32> poison, i32 %S, i64 0
  %Sv = shufflevector <W x i32> %Sv0, <W x i32> poison, <W x i32> zeroinitializer
  store i32 0, ptr %cursor.a
  store i32 -1, ptr %best.a
  store i32 0, ptr %bestgap.a
  store i32 0, ptr %blk.a
  %placed = load i32, ptr %placed.a
  br label %block
block:
  %blk = load i32, ptr %blk.a
  %bmore = icmp slt i32 %blk, %placed
  br i1 %bmore, label %blockbody, label %place
blockbody:
  %vsp = getelementptr i32, ptr %bs, i32 %blk
  %vs = load <W x i32>, ptr %vsp, align 4
  %vep = getelementptr i32, ptr %be, i32 %blk
  %ve = load <W x i32>, ptr %vep, align 4
  %c1 = icmp sle <W x i32> %vs, %Ev
  %c2 = icmp sge <W x i32> %ve, %Sv
  %m = and <W x i1> %c1, %c2
  %mb = bitcast <W x i1> %m to iW
  %mb32 = zext iW %mb to i32
  store i32 %mb32, ptr %bits.a
  br label %lanes
lanes:
  %bits = load i32, ptr %bits.a
  %nobits = icmp eq i32 %bits, 0
  br i1 %nobits, label %nextblock, label %lane
nextblock:
  %blk2 = add i32 %blk, W
  store i32 %blk2, ptr %blk.a
  br label %block
lane:
  %l = call i32 @llvm.cttz.i32(i32 %bits, i1 true)
  %bm1 = sub i32 %bits, 1
  %bits2 = and i32 %bits, %bm1
  store i32 %bits2, ptr %bits.a
  %r = add i32 %blk, %l
  %bip = getelementptr i32, ptr %bi, i32 %r
  %j = load i32, ptr %bip
  br i1 %anymany, label %manycheck, label %conflict
manycheck:
  %pjp = getelementptr i32, ptr %ptr, i32 %j
  %pj0 = load i32, ptr %pjp
  %j1 = add i32 %j, 1
  %pjp1 = getelementptr i32, ptr %ptr, i32 %j1
  %pj1 = load i32, ptr %pjp1
  %nj = sub i32 %pj1, %pj0
  %manyj = icmp sgt i32 %nj, 1
  %many = or i1 %manyi, %manyj
  br i1 %many, label %ivs, label %conflict
ivs:
  store i1 false, ptr %hit.a
  store i32 %pi0, ptr %x.a
  br label %xloop
xloop:
  %x = load i32, ptr %x.a
  %hit0 = load i1, ptr %hit.a
  %xin = icmp slt i32 %x, %pi1
  %nothit = xor i1 %hit0, true
  %xgo = and i1 %xin, %nothit
  br i1 %xgo, label %xbody, label %ivsdone
xbody:
  %isxp = getelementptr i32, ptr %istart, i32 %x
  %isx = load i32, ptr %isxp
  %iexp = getelementptr i32, ptr %iend, i32 %x
  %iex = load i32, ptr %iexp
  store i32 %pj0, ptr %y.a
  br label %yloop
yloop:
  %y = load i32, ptr %y.a
  %hit1 = load i1, ptr %hit.a
  %yin = icmp slt i32 %y, %pj1
  %nothit1 = xor i1 %hit1, true
  %ygo = and i1 %yin, %nothit1
  br i1 %ygo, label %ybody, label %xnext
ybody:
  %isyp = getelementptr i32, ptr %istart, i32 %y
  %isy = load i32, ptr %isyp
  %ieyp = getelementptr i32, ptr %iend, i32 %y
  %iey = load i32, ptr %ieyp
  %h1 = icmp sle i32 %isy, %iex
  %h2 = icmp sge i32 %iey, %isx
  %h = and i1 %h1, %h2
  store i1 %h, ptr %hit.a
  %y2 = add i32 %y, 1
  store i32 %y2, ptr %y.a
  br label %yloop
xnext:
  %x2 = add i32 %x, 1
  store i32 %x2, ptr %x.a
  br label %xloop
ivsdone:
  %hitf = load i1, ptr %hit.a
  br i1 %hitf, label %conflict, label %lanes
conflict:
  %cursor = load i32, ptr %cursor.a
  %cu1 = add i32 %cursor, %am1
  %at = and i32 %cu1, %amask
  %ojp = getelementptr i32, ptr %off, i32 %j
  %offj = load i32, ptr %ojp
  %gap = sub i32 %offj, %at
  %fits = icmp sge i32 %gap, %s
  %best = load i32, ptr %best.a
  %bestgap = load i32, ptr %bestgap.a
  %nobest = icmp slt i32 %best, 0
  %smaller = icmp slt i32 %gap, %bestgap
  %better0 = or i1 %nobest, %smaller
  %better = and i1 %fits, %better0
  br i1 %better, label %takegap, label %advance
takegap:
  store i32 %at, ptr %best.a
  store i32 %gap, ptr %bestgap.a
  %exact = icmp eq i32 %gap, %s
  br i1 %exact, label %place, label %advance
advance:
  %szjp = getelementptr i32, ptr %size, i32 %j
  %szj = load i32, ptr %szjp
  %topj = add i32 %offj, %szj
  %cmax = icmp sgt i32 %topj, %cursor
  %cnew = select i1 %cmax, i32 %topj, i32 %cursor
  store i32 %cnew, ptr %cursor.a
  br label %lanes
place:
  %bestf = load i32, ptr %best.a
  %cursorf = load i32, ptr %cursor.a
  %cf1 = add i32 %cursorf, %am1
  %ontop = and i32 %cf1, %amask
  %hasbest = icmp sge i32 %bestf, 0
  %pos = select i1 %hasbest, i32 %bestf, i32 %ontop
  %offp = getelementptr i32, ptr %off, i32 %i
  store i32 %pos, ptr %offp
  %topi = add i32 %pos, %s
  %peak = load i32, ptr %peak.a
  %pk = icmp sgt i32 %topi, %peak
  %peak2 = select i1 %pk, i32 %topi, i32 %peak
  store i32 %peak2, ptr %peak.a
  store i32 0, ptr %lo.a
  store i32 %placed, ptr %r.a
  br label %findpos
findpos:
  %flo = load i32, ptr %lo.a
  %fhi = load i32, ptr %r.a
  %fgo = icmp slt i32 %flo, %fhi
  br i1 %fgo, label %findtest, label %insert
findtest:
  %fsum = add i32 %flo, %fhi
  %mid = lshr i32 %fsum, 1
  %mip = getelementptr i32, ptr %bi, i32 %mid
  %mj = load i32, ptr %mip
  %mop = getelementptr i32, ptr %off, i32 %mj
  %mo = load i32, ptr %mop
  %below = icmp slt i32 %mo, %pos
  %same = icmp eq i32 %mo, %pos
  %earlier = icmp slt i32 %mj, %i
  %se = and i1 %same, %earlier
  %after = or i1 %below, %se
  %mid1 = add i32 %mid, 1
  %nlo = select i1 %after, i32 %mid1, i32 %flo
  %nhi = select i1 %after, i32 %fhi, i32 %mid
  store i32 %nlo, ptr %lo.a
  store i32 %nhi, ptr %r.a
  br label %findpos
insert:
  %ins = load i32, ptr %lo.a
  %cnt = sub i32 %placed, %ins
  %cnt64 = sext i32 %cnt to i64
  %nbytes = shl i64 %cnt64, 2
  %ins1 = add i32 %ins, 1
  %s0 = getelementptr i32, ptr %bs, i32 %ins
  %s1 = getelementptr i32, ptr %bs, i32 %ins1
  call void @llvm.memmove.p0.p0.i64(ptr %s1, ptr %s0, i64 %nbytes, i1 false)
  %e0 = getelementptr i32, ptr %be, i32 %ins
  %e1 = getelementptr i32, ptr %be, i32 %ins1
  call void @llvm.memmove.p0.p0.i64(ptr %e1, ptr %e0, i64 %nbytes, i1 false)
  %x0 = getelementptr i32, ptr %bi, i32 %ins
  %x1 = getelementptr i32, ptr %bi, i32 %ins1
  call void @llvm.memmove.p0.p0.i64(ptr %x1, ptr %x0, i64 %nbytes, i1 false)
  store i32 %S, ptr %s0
  store i32 %E, ptr %e0
  store i32 %i, ptr %x0
  %placed2 = add i32 %placed, 1
  store i32 %placed2, ptr %placed.a
  %qn = add i32 %q, 1
  store i32 %qn, ptr %q.a
  br label %outer
finish:
  %pf = load i32, ptr %peak.a
  ret i32 %pf
}
""".replace("<W x", f"<{LANES} x").replace("iW", f"i{LANES}").replace("%blk, W", f"%blk, {LANES}")

_P = ctypes.c_void_p
_FN = ctypes.CFUNCTYPE(ctypes.c_int32, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int32, ctypes.c_bool,
                       _P, _P, _P, _P)


@functools.cache
def _kernel():
    engine = engine_for(_IR)
    return engine, _FN(engine.get_function_address("popdsl_best_fit"))


def fits(sizes, aligns, starts, ends) -> bool:
    """Whether the kernel may place the problem: i32 bytes and points, alignments
    powers of two."""
    return not len(sizes) or (int(sizes.sum()) + int(aligns.max()) * len(sizes) < LIMIT
                              and max(int(starts.max()), int(ends.max())) < LIMIT and int(aligns.min()) > 0
                              and not (aligns & (aligns - 1)).any())


def best_fit(sizes, aligns, starts, ends, order, lives) -> tuple[np.ndarray, int]:
    """`bestfit.best_fit` natively, for a problem that `fits` (`lives`: a
    `bestfit.Lives`).  Malformed arrays (an order that is no permutation,
    intervals that do not match the allocations) are a compiler bug."""
    n = len(sizes)
    ptr, istart, iend = lives.ptr, lives.istart, lives.iend
    assert len(aligns) == len(starts) == len(ends) == len(order) == n and len(ptr) == n + 1 and ptr[0] == 0 and ptr[-1] == len(istart) == len(iend) \
        and (n == 0 or (int(order.min()) >= 0 and int(order.max()) < n and (np.diff(ptr) >= 1).all())), \
        "malformed best-fit problem"
    args = [np.ascontiguousarray(a, np.int32) for a in (sizes, aligns, starts, ends, ptr, istart, iend, order)]
    slots = -(-(n + 1) // LANES) * LANES
    work = [np.full(slots, _FREE, np.int32), np.zeros(slots, np.int32), np.zeros(slots, np.int32)]
    off = np.zeros(n, np.int32)
    _, fn = _kernel()
    top = fn(*(a.ctypes.data for a in args), n, len(istart) > n, off.ctypes.data, *(w.ctypes.data for w in work))
    return off.astype(np.int64), int(top)
