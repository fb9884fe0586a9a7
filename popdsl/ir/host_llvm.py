"""The host's LLVM, shared by everything in popdsl that makes native code.

Requires llvmlite; produces the one lock every LLVM compile in the process takes
(llvmlite compiles are not thread-safe: `codegen.jit` compiles codelets ahead on a
thread while the compiler's own kernels, `ir.native_runs` and
`passes.bestfit_native`, may compile theirs), the host's target machine (with the
C symbols native code may call resolved), the O3 pipeline and the on-disk object
cache (under $POPDSL_CACHE_DIR, default ~/.cache/popdsl; files written atomically,
with a checksum, so a damaged one is compiled again).  It sits in the ir layer so
that the compiler's data structures (`ir.mapping`) may use native kernels without
importing codegen, which is above them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import tempfile
import threading
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm

from popdsl.ir.intrinsics import link_symbols

LOCK = threading.RLock()
# A fork (`popdsl.forked`) waits for the compile that holds the lock, so the
# child never starts with it held by a thread it does not have.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=LOCK.acquire, after_in_parent=LOCK.release, after_in_child=LOCK.release)
_MAGIC = b"POPDSLO1"
# The compiler's own kernels' texts are their cache keys' (with the host's): a
# changed kernel is a new key.
_KERNELS = "popdsl-kernels-1"
# C symbols native code may call: those intrinsics lower to (ir.intrinsics), the
# float remainder and the half-precision conversions.
LIBM_SYMBOLS = ("fmodf", "__extendhfsf2", "__truncsfhf2") + link_symbols()
_TM = None


def target_machine():
    """The host's target machine for compiles (never give it to an engine, which
    would free it: `new_target_machine` makes one to give)."""
    global _TM
    if _TM is None:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        # libm functions reached through LLVM intrinsics that lower to calls (tanhf,
        # powf, ...) must resolve when the object is linked in.
        libs = []
        for name in ("m", "gcc_s"):     # half conversions live in libgcc on old CPUs
            try:
                libs.append(ctypes.CDLL(ctypes.util.find_library(name) or f"lib{name}.so"))
            except OSError:
                pass
        for sym in LIBM_SYMBOLS:
            for lib in libs:
                fn = getattr(lib, sym, None)
                if fn is not None:
                    llvm.add_symbol(sym, ctypes.cast(fn, ctypes.c_void_p).value)
                    break
        _TM = new_target_machine()
    return _TM


def new_target_machine():
    target = llvm.Target.from_triple(llvm.get_process_triple())
    return target.create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(),
        opt=3, jit=True)


def optimize_ir(ir_text: str, tm=None) -> "llvm.ModuleRef":
    """Parse, verify and O3-optimise `ir_text` for the host, or for target machine
    `tm` (for tests and dumps)."""
    tm = tm or target_machine()
    mod = llvm.parse_assembly(ir_text)
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    # llvmlite leaves the SLP vectoriser off; straight-line code after full
    # unrolling (specialised drivers) needs it to use vector registers at all.
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)          # fresh per run: reuse aborts
    pb.getModulePassManager().run(mod, pb)
    return mod


def engine_for(ir_text: str) -> "llvm.ExecutionEngine":
    """An execution engine holding `ir_text` compiled for the host, through the
    object cache (the compiler's own small kernels)."""
    h = hashlib.sha256()
    for part in (_KERNELS, ir_text, *host(), llvmlite.__version__):
        h.update(part.encode())
        h.update(b"\0")
    path = cache_dir() / f"{h.hexdigest()}.o"
    with LOCK:
        obj = read_cached(path)
        if obj is None:
            obj = target_machine().emit_object(optimize_ir(ir_text))
            write_cached(path, obj)
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), new_target_machine())
        engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        engine.finalize_object()
    return engine


def cache_dir() -> Path:
    return Path(os.environ.get("POPDSL_CACHE_DIR") or Path.home() / ".cache" / "popdsl")


_HOST: tuple[str, ...] | None = None


def host() -> tuple[str, ...]:
    """What object code depends on besides its IR: asked of LLVM once, under the lock,
    so keys can be computed while a compile runs on another thread."""
    global _HOST
    if _HOST is None:
        with LOCK:
            tm = target_machine()
            _HOST = (tm.triple, llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten())
    return _HOST


def read_cached(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head, digest, obj = data[:8], data[8:40], data[40:]
    if head != _MAGIC or hashlib.sha256(obj).digest() != digest or not obj:
        return None
    return obj


def write_cached(path: Path, obj: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".o")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + hashlib.sha256(obj).digest() + obj)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass    # an unwritable cache only costs time
