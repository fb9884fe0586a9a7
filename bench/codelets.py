"""Benchmark of JIT-compiled codelets against references measured in the same run.

Requires popdsl (sema + codegen), numpy, and optionally numba (bench-only).  Prints:
(a) fused element-wise c[i] = a[i]*b[i] + a[i] over 1e6 f32 in one vertex vs numpy
    `a*b+a` (allocating) and numpy into a preallocated output;
(b) a 128x128x128 MatMulBlock codelet (i-k-j loops) vs the same loops in Numba.
For unchecked=True, the default checked build (the front end proves these indices in
range, so it drops their checks) and "all-chk": every index forced checked.  Times are the best of
several repeats (wall clock, one thread).  Run: `python bench/codelets.py`.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from popdsl.codegen.jit import NativeCodelets, aligned_zeros  # noqa: E402
from popdsl.sema import compile_codelets  # noqa: E402

SOURCE = """
codelet Fused(in a: f32[n], in b: f32[n], out c: f32[n]) {
    for i in 0..n { c[i] = a[i] * b[i] + a[i]; }
}
codelet MatMulBlock(in a: f32[m, k], in b: f32[k, p], inout c: f32[m, p]) {
    for i in 0..m {
        for kk in 0..k {
            let av = a[i, kk];
            for j in 0..p { c[i, j] += av * b[kk, j]; }
        }
    }
}
"""


def force_checked(node):
    """The same IR with every index checked, as if the compiler had proven nothing."""
    if isinstance(node, tuple):
        return tuple(force_checked(x) for x in node)
    if dataclasses.is_dataclass(node):
        changes = {f.name: force_checked(getattr(node, f.name)) for f in dataclasses.fields(node)}
        if "checked" in changes:
            changes["checked"] = True
        return dataclasses.replace(node, **changes)
    return node


def race(fns: dict, rounds: int, inner: int = 1) -> dict[str, float]:
    """Best time per call of each function, measured interleaved round by round so
    that a noisy machine (other processes, frequency changes) hurts all alike."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / inner)
    return best


def carve(mem: np.ndarray, offsets: list[int], nbytes: int) -> list[np.ndarray]:
    return [mem[o:o + nbytes].view(np.float32) for o in offsets]


def bench_fused(native: dict[str, NativeCodelets]) -> None:
    n = 1_000_000
    nb = 4 * n
    offs = [0, nb, 2 * nb]
    mem = aligned_zeros(3 * nb)
    a, b, c = carve(mem, offs, nb)
    rng = np.random.default_rng(0)
    a[:] = rng.standard_normal(n, dtype=np.float32)
    b[:] = rng.standard_normal(n, dtype=np.float32)
    table = np.array([offs + [n]], dtype=np.int64)
    cycles = np.zeros(1, np.int64)
    out = np.empty(n, np.float32)

    def np_out():
        np.multiply(a, b, out=out)
        np.add(out, a, out=out)
    fns = {"numpy": lambda: a * b + a, "numpy-out": np_out}
    for mode, nc in native.items():
        fns[mode] = lambda nc=nc: nc.run("Fused", mem, table, 0, 1, cycles)
    t = race(fns, 30)
    assert np.allclose(c, a * b + a, rtol=1e-6, atol=1e-6)
    print(f"(a) fused c = a*b + a, n = {n:,} f32, one vertex")
    print(f"    numpy a*b+a (allocating)      {t['numpy'] * 1e6:9.1f} us")
    print(f"    numpy into preallocated out   {t['numpy-out'] * 1e6:9.1f} us")
    for mode in native:
        print(f"    popdsl JIT ({mode:9s})         {t[mode] * 1e6:9.1f} us   "
              f"speed-up vs numpy {t['numpy'] / t[mode]:5.2f}x, "
              f"vs numpy-out {t['numpy-out'] / t[mode]:5.2f}x")


def bench_matmul(native: dict[str, NativeCodelets]) -> None:
    m = k = p = 128
    nb = 4 * m * k
    offs = [0, nb, 2 * nb]
    mem = aligned_zeros(3 * nb)
    a, b, c = (x.reshape(m, k) for x in carve(mem, offs, nb))
    rng = np.random.default_rng(1)
    a[:] = rng.standard_normal((m, k), dtype=np.float32)
    b[:] = rng.standard_normal((k, p), dtype=np.float32)
    table = np.array([[offs[0], k, offs[1], p, offs[2], p, m, k, p]], dtype=np.int64)
    cycles = np.zeros(1, np.int64)
    flops = 2 * m * k * p
    print(f"(b) MatMulBlock {m}x{k}x{p} (i-k-j), c += a @ b")

    c[:] = 0
    native["unchecked"].run("MatMulBlock", mem, table, 0, 1, cycles)
    assert np.allclose(c, a @ b, rtol=1e-4, atol=1e-4)
    fns = {mode: (lambda nc=nc: nc.run("MatMulBlock", mem, table, 0, 1, cycles))
           for mode, nc in native.items()}
    try:
        import numba
    except ImportError:
        numba = None
        print("    numba is not importable (pip install numba): skipping the Numba ratio")
    if numba is not None:
        @numba.njit(cache=False)
        def mm(a, b, c):
            for i in range(a.shape[0]):
                for kk in range(a.shape[1]):
                    av = a[i, kk]
                    for j in range(b.shape[1]):
                        c[i, j] += av * b[kk, j]

        an, bn, cn = a.copy(), b.copy(), np.zeros_like(c)
        fns["numba"] = lambda: mm(an, bn, cn)
    t = race(fns, 30, 10)
    for mode in native:
        print(f"    popdsl JIT ({mode:9s})         {t[mode] * 1e6:9.1f} us  "
              f"{flops / t[mode] / 1e9:6.1f} GFLOP/s")
    if numba is not None:
        print(f"    numba {numba.__version__} same loops         {t['numba'] * 1e6:9.1f} us  "
              f"{flops / t['numba'] / 1e9:6.1f} GFLOP/s")
        for mode in native:
            print(f"    ratio JIT({mode}) / numba time  {t[mode] / t['numba']:5.2f}x  "
                  f"(target <= 1.10)")


def main() -> None:
    codelets = compile_codelets(SOURCE, "<bench>")
    t0 = time.perf_counter()
    native = {"unchecked": NativeCodelets(codelets, unchecked=True),
              "checked": NativeCodelets(codelets, unchecked=False),
              "all-chk": NativeCodelets(force_checked(tuple(codelets)), unchecked=False)}
    print(f"compile (or cache load) of both builds: {time.perf_counter() - t0:.2f} s")
    for mode, nc in native.items():
        print(f"object code ({mode}): Fused {nc.object_code_size('Fused')} B, "
              f"MatMulBlock {nc.object_code_size('MatMulBlock')} B")
    bench_fused(native)
    bench_matmul(native)


if __name__ == "__main__":
    main()
