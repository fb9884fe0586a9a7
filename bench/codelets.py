"""Benchmark of JIT-compiled codelets against references measured in the same run.

Requires popdsl (sema + codegen), numpy, and optionally numba (bench-only).  Prints:
(a) fused element-wise c[i] = a[i]*b[i] + a[i] over 1e6 f32 in one vertex vs numpy
    `a*b+a` (allocating) and numpy into a preallocated output;
(b) a 128x128x128 MatMulBlock codelet (i-k-j loops) vs the same loops in Numba.
Both for unchecked=True and the default checked build.  Times are the best of
several repeats (wall clock, one thread).  Run: `python bench/codelets.py`.
"""
from __future__ import annotations

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


def best(fn, repeats: int, inner: int = 1) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


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

    t_np = best(lambda: a * b + a, 20)
    def np_out():
        np.multiply(a, b, out=out)
        np.add(out, a, out=out)
    t_np_out = best(np_out, 20)
    print(f"(a) fused c = a*b + a, n = {n:,} f32, one vertex")
    print(f"    numpy a*b+a (allocating)      {t_np * 1e6:9.1f} us")
    print(f"    numpy into preallocated out   {t_np_out * 1e6:9.1f} us")
    for mode, nc in native.items():
        t = best(lambda: nc.run("Fused", mem, table, 0, 1, cycles), 20)
        assert np.allclose(c, a * b + a, rtol=1e-6, atol=1e-6)
        print(f"    popdsl JIT ({mode:9s})         {t * 1e6:9.1f} us   "
              f"speed-up vs numpy {t_np / t:5.2f}x, vs numpy-out {t_np_out / t:5.2f}x")


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

    def jit_fn(nc):
        return lambda: nc.run("MatMulBlock", mem, table, 0, 1, cycles)

    c[:] = 0
    native["unchecked"].run("MatMulBlock", mem, table, 0, 1, cycles)
    assert np.allclose(c, a @ b, rtol=1e-4, atol=1e-4)
    times = {mode: best(jit_fn(nc), 10, 20) for mode, nc in native.items()}
    for mode, t in times.items():
        print(f"    popdsl JIT ({mode:9s})         {t * 1e6:9.1f} us  {flops / t / 1e9:6.1f} GFLOP/s")
    try:
        import numba
    except ImportError:
        print("    numba is not importable (pip install numba): skipping the Numba ratio")
        return

    @numba.njit(cache=False)
    def mm(a, b, c):
        for i in range(a.shape[0]):
            for kk in range(a.shape[1]):
                av = a[i, kk]
                for j in range(b.shape[1]):
                    c[i, j] += av * b[kk, j]

    an, bn, cn = a.copy(), b.copy(), np.zeros_like(c)
    t_nb = best(lambda: mm(an, bn, cn), 10, 20)
    print(f"    numba {numba.__version__} same loops         {t_nb * 1e6:9.1f} us  "
          f"{flops / t_nb / 1e9:6.1f} GFLOP/s")
    for mode, t in times.items():
        print(f"    ratio JIT({mode}) / numba        {t / t_nb:5.2f}x  (target <= 1.10)")


def main() -> None:
    codelets = compile_codelets(SOURCE, "<bench>")
    t0 = time.perf_counter()
    native = {"unchecked": NativeCodelets(codelets, unchecked=True),
              "checked": NativeCodelets(codelets, unchecked=False)}
    print(f"compile (or cache load) of both builds: {time.perf_counter() - t0:.2f} s")
    for mode, nc in native.items():
        print(f"object code ({mode}): Fused {nc.object_code_size('Fused')} B, "
              f"MatMulBlock {nc.object_code_size('MatMulBlock')} B")
    bench_fused(native)
    bench_matmul(native)


if __name__ == "__main__":
    main()
