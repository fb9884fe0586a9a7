"""Native execution of copy tables: exchange and on-tile rearrangement.

Requires the simulator memory and runs (src, dst, nbytes arrays of global byte
addresses); produces the copies, in order, by one native loop of memmoves (the
call releases the GIL).  The same loop moves host arrays in and out of the memory
(`scatter_runs`, `gather_runs`) by runs of consecutive addresses.  Addresses are
checked against the memory before the call, so a bad table is an error, never a
crash.
"""
from __future__ import annotations

import ctypes
import functools

import llvmlite.binding as llvm
import numpy as np

from popdsl.codegen import jit

# Short runs of these sizes copy inline (a fixed-size memmove is a few vector
# moves); the rest call memmove.
_INLINE_SIZES = (4, 8, 16, 32, 64, 128)


def _move(label: str, n: str) -> str:
    return (f"{label}:\n  call void @llvm.memmove.p0.p0.i64(ptr %to, ptr %from, i64 {n}, i1 false)\n"
            "  br label %next_run\n")


_IR = """
declare void @llvm.memmove.p0.p0.i64(ptr, ptr, i64, i1)

define void @popdsl_copy_runs(ptr %to_mem, ptr %from_mem, ptr noalias %src, ptr noalias %dst, ptr noalias %len, i64 %count) {
entry:
  %empty = icmp sle i64 %count, 0
  br i1 %empty, label %done, label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %next, %next_run ]
  %sp = getelementptr i64, ptr %src, i64 %i
  %dp = getelementptr i64, ptr %dst, i64 %i
  %lp = getelementptr i64, ptr %len, i64 %i
  %s = load i64, ptr %sp
  %d = load i64, ptr %dp
  %n = load i64, ptr %lp
  %from = getelementptr i8, ptr %from_mem, i64 %s
  %to = getelementptr i8, ptr %to_mem, i64 %d
  switch i64 %n, label %any [ """ + " ".join(f"i64 {n}, label %c{n}" for n in _INLINE_SIZES) + """ ]
""" + _move("any", "%n") + "".join(_move(f"c{n}", str(n)) for n in _INLINE_SIZES) + """next_run:
  %next = add i64 %i, 1
  %more = icmp slt i64 %next, %count
  br i1 %more, label %loop, label %done
done:
  ret void
}
"""

_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_int64)


@functools.cache
def _copy_fn():
    with jit._LOCK:
        tm = jit._target_machine()
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
        engine.add_object_file(llvm.ObjectFileRef.from_data(jit._compile_object(_IR)))
        engine.finalize_object()
        fn = _PROTO(engine.get_function_address("popdsl_copy_runs"))
    return engine, fn


def check_runs(mem_size: int, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> None:
    """Raise ValueError unless every run lies inside a memory of `mem_size` bytes."""
    for a in (src, dst, nbytes):
        if a.dtype != np.int64 or not a.flags.c_contiguous or a.shape != src.shape:
            raise ValueError("copy runs must be contiguous int64 arrays of one length")
    if src.size and (nbytes.min() < 0 or min(src.min(), dst.min()) < 0
                     or max((src + nbytes).max(), (dst + nbytes).max()) > mem_size):
        raise ValueError("a copy reaches outside the simulator's memory")


def independent(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> bool:
    """Whether the runs may be done in any order, or at once: no run writes bytes
    another run reads or writes.  (Sources may overlap: a broadcast reads one block
    many times.)"""
    keep = nbytes > 0
    src, dst, nbytes = src[keep], dst[keep], nbytes[keep]
    order = np.argsort(dst, kind="stable")
    d0, d1 = dst[order], dst[order] + nbytes[order]
    if np.any(d0[1:] < d1[:-1]):
        return False
    # A source overlaps a destination iff the last destination starting before the
    # source's end ends after the source's start.
    k = np.searchsorted(d0, src + nbytes, side="left") - 1
    hit = k >= 0
    return not np.any(d1[k[hit]] > src[hit])


def split_runs(nbytes: np.ndarray, parts: int) -> np.ndarray:
    """Run indices cutting the runs into `parts` pieces of about equal bytes."""
    cum = np.cumsum(nbytes)
    total = int(cum[-1]) if cum.size else 0
    cuts = np.searchsorted(cum, [total * i // parts for i in range(1, parts)], side="right")
    return np.concatenate(([0], cuts, [nbytes.size])).astype(np.int64)


def copy_runs(mem: np.ndarray, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray,
              checked: bool = True) -> None:
    """mem[dst[i] : dst[i]+nbytes[i]] = mem[src[i] : ...], for i in order.  Pass
    checked=False only for runs already passed through `check_runs`."""
    if not src.size:
        return
    if checked:
        check_runs(mem.size, src, dst, nbytes)
    _, fn = _copy_fn()
    p = jit._ptr
    fn(p(mem), p(mem), p(src), p(dst), p(nbytes), src.size)


def element_runs(addrs: np.ndarray, itemsize: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elements at byte addresses `addrs` (in order) as runs: (offset in the
    contiguous array, address, bytes) per run of consecutive addresses."""
    a = addrs.reshape(-1).astype(np.int64)
    if not a.size:
        z = np.zeros(0, np.int64)
        return z, z, z
    starts = np.concatenate(([0], np.nonzero(np.diff(a) != itemsize)[0] + 1))
    ends = np.concatenate((starts[1:], [a.size]))
    return starts * itemsize, a[starts], (ends - starts) * itemsize


def scatter_runs(mem: np.ndarray, values: np.ndarray, runs) -> None:
    """Copy the bytes of contiguous `values` into `mem` by `element_runs` runs."""
    off, addr, nbytes = runs
    if not off.size:
        return
    if (not values.flags.c_contiguous or int((off + nbytes).max()) > values.nbytes
            or int(addr.min()) < 0 or int((addr + nbytes).max()) > mem.size):
        raise ValueError("runs reach outside their arrays")
    _, fn = _copy_fn()
    fn(mem.ctypes.data, values.ctypes.data, off.ctypes.data, addr.ctypes.data, nbytes.ctypes.data, off.size)


def gather_runs(mem: np.ndarray, out: np.ndarray, runs) -> None:
    """The inverse of `scatter_runs`: fill contiguous `out` from `mem`."""
    off, addr, nbytes = runs
    if not off.size:
        return
    if (not out.flags.c_contiguous or not out.flags.writeable or int((off + nbytes).max()) > out.nbytes
            or int(addr.min()) < 0 or int((addr + nbytes).max()) > mem.size):
        raise ValueError("runs reach outside their arrays")
    _, fn = _copy_fn()
    fn(out.ctypes.data, mem.ctypes.data, addr.ctypes.data, off.ctypes.data, nbytes.ctypes.data, off.size)
