"""The host's LLVM, shared by everything in popdsl that makes native code.

Requires llvmlite; produces the one lock every LLVM compile in the process takes
(llvmlite compiles are not thread-safe: `codegen.jit` compiles codelets ahead on a
thread while the compiler's own kernels, `ir.native_runs`, may compile theirs),
the host's target machine (with the C symbols native code may call resolved) and
the O3 pipeline.  It sits in the ir layer so that the compiler's data structures
(`ir.mapping`) may use native kernels without importing codegen, which is above
them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

import llvmlite.binding as llvm

from popdsl.ir.intrinsics import link_symbols

LOCK = threading.RLock()
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
    """An execution engine holding `ir_text` compiled for the host (uncached: for
    the few small kernels of the compiler itself, tens of milliseconds)."""
    with LOCK:
        obj = target_machine().emit_object(optimize_ir(ir_text))
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), new_target_machine())
        engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        engine.finalize_object()
    return engine
