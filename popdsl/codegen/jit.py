"""JIT: codelet IR → native code in this process, with an on-disk object cache.

Requires llvmlite >= 0.44 (its new pass manager; tested with 0.50 and LLVM 22), numpy, ctypes, and
`popdsl.codegen.llvm.emit_module`.  Produces `NativeCodelets` — every codelet of a
program compiled in ONE module (each LLVM compile leaks ~100 KB, so never one per
codelet) — and re-exports `VertexError`.

Compilation: O3 for the host CPU (Numba's target machine), a fresh pass builder and
module pass manager per run (reusing one aborts the process).  Object code is cached
under $POPDSL_CACHE_DIR (default ~/.cache/popdsl) by sha256 of IR text, triple, host
CPU name and features, llvmlite version and `CODEGEN_VERSION`; files are written
atomically (temp file + rename) and carry a checksum, so a damaged one is recompiled.
The target machine, the pipeline, the cache's files and the lock every LLVM compile
takes are `ir.host_llvm`'s, shared with the compiler's own native kernels.
The object is loaded with `ExecutionEngine.add_object_file`.  `compile_ahead`
starts a compile on a background thread (one at a time, all LLVM calls under one
lock), which a later `object_code` for the same text waits for instead of compiling.

Running: one ctypes call per (codelet, row range).  ctypes releases the GIL during
the call, so callers may run disjoint row ranges on threads.  Every call passes the
control block of `codegen.llvm` (the address of the process's stop flag and the
vertex cycle budget): `request_stop()` — from any thread, or from whatever watches
for Ctrl-C (`runtime.interrupt`) — makes every running vertex stop at its next
check point, and the call then raises KeyboardInterrupt.  The caller must keep
`mem`, `table` and `cycles` alive during the call and guarantee that every address in
the table lies inside `mem` (tables come from the memory planner; only indices are
checked natively).

Code size: every exported function is emitted into its own section
(`.text.<symbol>`), so `object_code_size` reads real machine-code bytes from the
object file's section table: the driver (with its inlined body and inlined scalar
calls) plus any scalar-codelet function that survived inlining.  Those bytes (the
memory plan's code, a stand-in for IPU code) come from a second object compiled for
one fixed machine, `SIZE_MACHINE`, never the host's: otherwise whether a graph fits
its tiles would depend on the CPU that compiled it (an AVX-512 host's code is
larger).  It is compiled and cached like the host's object, only when asked for.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import llvmlite
import llvmlite.binding as llvm
import numpy as np

from popdsl.codegen.llvm import ERR_SLOTS, emit_module, spec_symbol
from popdsl.ir import codelet as ir
from popdsl.ir.host_llvm import LOCK as _LOCK, optimize_ir
from popdsl.ir.host_llvm import new_target_machine as _new_target_machine, target_machine as _target_machine
from popdsl.ir.host_llvm import cache_dir, host as _host, read_cached as _read_cache, write_cached as _write_cache
from popdsl.ir.errors import VertexError
from popdsl.limits import MAX_CYCLES

__all__ = ["NativeCodelets", "VertexError", "aligned_zeros", "cache_dir", "CODEGEN_VERSION",
           "request_stop", "clear_stop"]

CODEGEN_VERSION = "popdsl-codegen-3"
_SIZE_TM = None
# The machine whose object code the memory plan charges: x86-64 at its baseline
# features (SSE2), in every llvmlite build, whatever the host.
SIZE_MACHINE = ("x86_64-unknown-linux-gnu", "x86-64", "")
_ALIGN = 64

_DRIVE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                          ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)
_STORAGE_NP = {k: np.dtype(v) for k, v in ir.NUMPY_DTYPE.items()}
_U8, _I64 = np.dtype(np.uint8), np.dtype(np.int64)


def _size_target_machine():
    global _SIZE_TM
    if _SIZE_TM is None:
        _target_machine()
        llvm.initialize_all_targets()
        llvm.initialize_all_asmprinters()
        triple, cpu, features = SIZE_MACHINE
        _SIZE_TM = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=3)
    return _SIZE_TM


def cache_key(ir_text: str, machine: tuple[str, ...] | None = None) -> str:
    """The object cache's key of `ir_text` compiled for `machine` (the host's by
    default; `SIZE_MACHINE` for the sizes)."""
    h = hashlib.sha256()
    for part in (CODEGEN_VERSION, ir_text, *(machine or _host()), llvmlite.__version__):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _compile_object(ir_text: str, sizes: bool = False) -> bytes:
    """IR text → host object code, or `SIZE_MACHINE`'s (the expensive step the cache
    avoids)."""
    tm = _size_target_machine() if sizes else _target_machine()
    return tm.emit_object(optimize_ir(ir_text, tm))


def object_code(codelets: Sequence[ir.Codelet], unchecked: bool = False,
                contract: bool = True, specs: Sequence[tuple[str, tuple]] = (),
                generic: bool = True, sizes: bool = False) -> tuple[bytes, bool]:
    """(object code, came from cache) for `codelets` (see `emit_module`): the host's,
    or with `sizes` `SIZE_MACHINE`'s."""
    # llvmlite.ir is plain Python: text and key need no lock (a compile ahead may hold it).
    text = _module_text(codelets, unchecked, contract, tuple(specs), generic)
    key = cache_key(text, SIZE_MACHINE if sizes else None)
    ahead = _AHEAD.pop(key, None)
    if ahead is not None:
        # Waited for outside the lock, which the compile holds.
        obj = ahead.result()
        if obj:
            return obj, False
    with _LOCK:
        path = cache_dir() / f"{key}.o"
        obj = _read_cache(path)
        if obj is not None:
            return obj, True
        obj = _compile_object(text, sizes)
        _write_cache(path, obj)
        return obj, False


# The last modules' texts, by the identities of their codelets and the flags: each
# codelet object kept alive with its text, so that its id stays its own.
_TEXTS: dict[tuple, tuple[tuple, str]] = {}


def _module_text(codelets: Sequence[ir.Codelet], unchecked: bool, contract: bool = True,
                 specs: tuple = (), generic: bool = True) -> str:
    """`emit_module`'s text, made once for a compile ahead and the object code asked
    for after it, of the same codelets (making and printing ResNet-50's module took
    0.3 s; the cache key is a hash of the text)."""
    key = (tuple(map(id, codelets)), unchecked, contract, specs, generic)
    hit = _TEXTS.get(key)
    if hit is not None:
        return hit[1]
    text = str(emit_module(codelets, unchecked, contract=contract, specs=specs, generic=generic))
    if len(_TEXTS) >= 4:
        del _TEXTS[next(iter(_TEXTS))]
    _TEXTS[key] = (tuple(codelets), text)
    return text


# Object code being compiled ahead (`compile_ahead`), by cache key.
_AHEAD: dict[str, Future] = {}
_POOL: ThreadPoolExecutor | None = None


def compile_ahead(codelets: Sequence[ir.Codelet], unchecked: bool = False) -> None:
    """Start compiling, on a background thread, the object code a later
    `object_code(codelets, unchecked)` (a `NativeCodelets`) will ask for, and the
    object its code sizes come from, unless the cache holds them.  LLVM's work runs
    in ctypes calls, which release the GIL: it overlaps whatever the caller does
    next (the compiler lowers the vertex graph meanwhile) on a second core.  Only a
    speed-up: if nobody asks, the objects are just cached; if a compile fails,
    `object_code` compiles again and raises."""
    global _POOL
    text = _module_text(codelets, unchecked)
    for sizes in (False, True):
        key = cache_key(text, SIZE_MACHINE if sizes else None)
        path = cache_dir() / f"{key}.o"
        if key in _AHEAD or path.exists():
            continue
        if _POOL is None:
            # Not a daemon: an interpreter exiting mid-compile waits for LLVM to finish.
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="popdsl-llvm")
        _AHEAD[key] = _POOL.submit(_compile_and_cache, text, path, sizes)


def _forget_pool_in_child() -> None:
    """A forked child has none of its parent's threads: its pool is made anew on
    first use, and compiles that were running in the parent are not waited for
    (`object_code` compiles what it does not find)."""
    global _POOL
    _POOL = None
    for key in [k for k, f in _AHEAD.items() if not f.done()]:
        del _AHEAD[key]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def finish_ahead() -> None:
    """Wait for the compiles `compile_ahead` started (what an exiting interpreter
    would do; for a process that leaves with `os._exit`)."""
    if _POOL is not None:
        _POOL.shutdown(wait=True)


def _compile_and_cache(text: str, path: Path, sizes: bool = False) -> bytes | None:
    try:
        with _LOCK:
            obj = _compile_object(text, sizes)
            _write_cache(path, obj)
            return obj
    except Exception:           # noqa: BLE001 - compiled again, in the caller's thread, which reports it
        return None


_ERR = ctypes.c_int64 * ERR_SLOTS
# The stop flag every native loop polls at its check points (`ir.checkpoints`).
_STOP = ctypes.c_int32(0)
_STOP_ADDR = ctypes.addressof(_STOP)


def request_stop() -> None:
    """Make running and future native calls stop at their next check point (and
    raise KeyboardInterrupt) until `clear_stop()`."""
    _STOP.value = 1


def clear_stop() -> None:
    _STOP.value = 0


def _control(budget: int = 0):
    err = _ERR()
    err[5], err[6] = _STOP_ADDR, budget
    return err


def _stopped(err) -> None:
    if err[0] == ir.ERR_INTERRUPT:
        raise KeyboardInterrupt
_PTRS: dict[int, tuple] = {}     # id(array) -> (weakref, data pointer)


def _ptr(a: np.ndarray) -> int:
    """a.ctypes.data costs ~2 us; the simulator passes the same arrays again and
    again, so remember pointers (weakly: a dead array's id may be reused)."""
    hit = _PTRS.get(id(a))
    if hit is not None and hit[0]() is a:
        return hit[1]
    p = a.ctypes.data
    if len(_PTRS) > 1024:
        _PTRS.clear()
    _PTRS[id(a)] = (weakref.ref(a), p)
    return p


def aligned_zeros(nbytes: int, align: int = _ALIGN) -> np.ndarray:
    """A zeroed 1-D uint8 array whose data starts on an `align`-byte boundary."""
    buf = np.zeros(nbytes + align, np.uint8)
    skip = (-buf.ctypes.data) % align
    return buf[skip:skip + nbytes]


def _section_sizes(obj: bytes) -> dict[str, int]:
    of = llvm.ObjectFileRef.from_data(obj)
    return {(s.name() or b"").decode(): s.size() for s in of.sections()}


class NativeCodelets:
    """Native code for a set of codelets (scalar codelets they call included)."""

    def __init__(self, codelets: Sequence[ir.Codelet], unchecked: bool = False, *,
                 contract: bool = True, specs: Sequence[tuple[str, tuple]] = (),
                 generic: bool = True):
        # contract=False: no FMA contraction, for bit-exact comparison with the
        # reference evaluator in tests.  `specs`: drivers specialised to constant
        # table columns (`runtime.specialise`); generic=False: only those.
        self.codelets = {c.name: c for c in codelets}
        self.unchecked, self.contract = unchecked, contract
        specs = tuple(sorted(set(specs)))
        obj, self.from_cache = object_code(codelets, unchecked, contract, specs, generic)
        self._built_with = (list(codelets), unchecked, contract, specs, generic)
        self._sections: dict[str, int] | None = None
        with _LOCK:
            _target_machine()
            # The engine takes ownership of its target machine (and frees it with
            # itself), so each engine gets its own, never the shared compile one.
            self._engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""),
                                                      _new_target_machine())
            self._engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
            self._engine.finalize_object()
            self._drivers, self._maps = {}, {}
            for name, consts in specs:
                c = self.codelets[name]
                addr = self._engine.get_function_address(spec_symbol(name, consts))
                self._drivers[(name, consts)] = (_DRIVE(addr), len(ir.table_layout(c)),
                                                 tuple(f.name for f in c.fields))
            for c in codelets:
                if c.ret is None:
                    if not generic:
                        continue
                    addr = self._engine.get_function_address(f"popdsl_drive_{c.name}")
                    self._drivers[c.name] = (_DRIVE(addr), len(ir.table_layout(c)),
                                             tuple(f.name for f in c.fields))
                else:
                    proto = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64,
                                             *[ctypes.c_void_p] * (2 + len(c.fields)))
                    addr = self._engine.get_function_address(f"popdsl_map_{c.name}")
                    self._maps[c.name] = (proto(addr), _STORAGE_NP[c.ret],
                                          tuple(_STORAGE_NP[f.dtype] for f in c.fields))

    def specialised(self, specs: Sequence[tuple[str, tuple]]) -> "NativeCodelets":
        """Drivers of these codelets specialised to `specs` ((name, consts) pairs)
        and nothing else; run them with `run(..., consts=...)`."""
        return NativeCodelets(list(self.codelets.values()), self.unchecked,
                              contract=self.contract, specs=specs, generic=False)

    def run(self, name: str, mem: np.ndarray, table: np.ndarray, begin: int, end: int,
            cycles: np.ndarray, consts: tuple = (), max_cycles: int = MAX_CYCLES) -> None:
        """Run rows begin..end of vertex codelet `name`; cycles[row] gets each
        vertex's cycle count.  Raises VertexError for the first failing row (rows
        before it have run) — ERR_CYCLES when a vertex passes `max_cycles` — and
        KeyboardInterrupt after `request_stop()`.  With `consts` (a specialisation
        this object was built with) the caller guarantees every row holds those
        values in those columns."""
        fn, ncols, fields = self._drivers[(name, consts) if consts else name]
        mp = _ptr(mem)
        if ((mem.dtype is not _U8 and mem.dtype != _U8) or mem.ndim != 1 or not mem.flags.c_contiguous
                or mp % _ALIGN or not mem.flags.writeable):
            raise ValueError("mem must be a 1-D, contiguous, writeable, 64-byte aligned "
                             "uint8 array")
        if ((table.dtype is not _I64 and table.dtype != _I64) or table.ndim != 2 or table.shape[1] != ncols
                or not table.flags.c_contiguous):
            raise ValueError(f"table of {name} must be C-contiguous int64 (nverts, {ncols})")
        if ((cycles.dtype is not _I64 and cycles.dtype != _I64) or cycles.ndim != 1 or not cycles.flags.c_contiguous
                or cycles.shape[0] < table.shape[0] or not cycles.flags.writeable):
            raise ValueError("cycles must be a contiguous, writeable int64 array with a "
                             "slot per row")
        if not 0 <= begin <= end <= table.shape[0]:
            raise ValueError(f"row range {begin}..{end} outside the table")
        err = _control(max_cycles)
        row = fn(mp, _ptr(table), begin, end, _ptr(cycles), err)
        if row >= 0:
            _stopped(err)
            k = err[1]
            raise VertexError(err[0], row, fields[k] if 0 <= k < len(fields) else "",
                              err[2], err[3], err[4], codelet=name)

    def map(self, name: str, out: np.ndarray, *ins: np.ndarray) -> None:
        """out[i] = name(ins[0][i], ...) over equal-length contiguous 1-D arrays of
        the codelet's storage types.  Raises VertexError (vertex = element index)."""
        fn, out_dt, in_dts = self._maps[name]
        n = out.shape[0]
        if len(ins) != len(in_dts):
            raise ValueError(f"{name} takes {len(in_dts)} argument(s)")
        for a, dt in zip((out,) + ins, (out_dt,) + in_dts):
            if a.dtype != dt or a.ndim != 1 or a.shape[0] != n or not a.flags.c_contiguous:
                raise ValueError(f"{name}: arrays must be contiguous 1-D {dt} of length {n}")
        err = _control()
        i = fn(n, err, _ptr(out), *[_ptr(a) for a in ins])
        if i >= 0:
            _stopped(err)
            raise VertexError(err[0], i, "", err[2], err[3], err[4], codelet=name)

    def object_code_size(self, name: str) -> int:
        """Bytes of machine code of codelet `name` compiled for `SIZE_MACHINE`: its
        driver (vertex) or map (scalar) section plus the sections of scalar codelets
        it calls that were not inlined away."""
        if self._sections is None:
            codelets, unchecked, contract, specs, generic = self._built_with
            obj, _ = object_code(codelets, unchecked, contract, specs, generic, sizes=True)
            with _LOCK:
                self._sections = _section_sizes(obj)
        c = self.codelets[name]
        own = f".text.popdsl_{'drive' if c.ret is None else 'map'}_{name}"
        total = self._sections.get(own, 0)
        for callee in sorted(_callees(c, self.codelets)):
            total += self._sections.get(f".text.popdsl_scalar_{callee}", 0)
        return total


def _callees(c: ir.Codelet, by_name: dict) -> set[str]:
    from popdsl.ir.verify import direct_calls
    out, todo = set(), [c]
    if c.ret is not None:
        out.add(c.name)
    while todo:
        for n in direct_calls(todo.pop()):
            if n not in out:
                out.add(n)
                todo.append(by_name[n])
    return out
