"""Random parameter initializers every host regenerates bit for bit from a seed.

Requires numpy only; produces `Recipe` (an initializer, its seed and the tensor it
fills), `Recipe.values()`, and `InitialValues`, the tensor id → initial values map
graphs and executables hold, where a drawn tensor stays its recipe until it is
read.  A model's parameters are most of its executable — ResNet-50's 25.5M f32
weights are 102 MB of noise that no compression shrinks — so a `.popx` stores a
parameter drawn by a recipe as the recipe, and the loader draws it again.  That is only honest if the draw is the same everywhere, so the values
come from the PCG64 bit generator's raw 64-bit stream (which numpy keeps stable
across versions, unlike its distributions) through arithmetic IEEE 754 rounds the
same way on every host:

* `glorot_uniform`: low + (high - low) * u with u = (raw >> 11) * 2^-53 — exactly
  what numpy's `Generator.uniform` computes, so the values are numpy's;
* `he_normal`: (u1 + u2 + u3 + u4 - 2) * sqrt(3) * std with 32-bit uniforms, the
  Irwin–Hall approximation of a normal with He's variance (2 / fan_in):
  bell-shaped, mean 0, the right variance, bounded at ±3.46 σ.  No exp, log or
  cos, whose last bits vary between math libraries.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import MutableMapping

import numpy as np

from popdsl.node import node

KINDS = ("glorot_uniform", "he_normal")
_DTYPES = {"f32": np.float32, "f16": np.float16}
MAX_SEED = 1 << 63


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight: a vector's length, a matrix's rows and columns,
    OIHW convolution weights' C*H*W and O*H*W."""
    if len(shape) < 2:
        n = int(shape[0]) if shape else 1
        return n, n
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    rf = math.prod(shape[2:])
    return int(shape[1]) * rf, int(shape[0]) * rf


@node
class Recipe:
    kind: str
    seed: int
    shape: tuple[int, ...]
    dtype: str

    def values(self) -> np.ndarray:
        n = math.prod(self.shape)
        fan_in, fan_out = fans(self.shape)
        bits = np.random.PCG64(self.seed)
        out = np.empty(n, _DTYPES[self.dtype])
        if self.kind == "glorot_uniform":
            lim = math.sqrt(6.0 / (fan_in + fan_out))
            for i, m in _chunks(n):
                u = (bits.random_raw(m) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
                out[i:i + m] = -lim + (2 * lim) * u
        else:
            scale = math.sqrt(3.0) * math.sqrt(2.0 / fan_in)
            for i, m in _chunks(n):
                # Four 32-bit uniforms (k + 1/2) / 2^32 per value, from two raw draws:
                # their sum less 2 is exact in float64, so only the scaling rounds.
                k = bits.random_raw(2 * m).view(np.uint32).reshape(m, 4).sum(axis=1, dtype=np.uint64)
                out[i:i + m] = (k.astype(np.float64) * 2.0 ** -32 + 2.0 ** -31 - 2.0) * scale
        return out.reshape(self.shape)

    def to_json(self) -> dict:
        return {"kind": self.kind, "seed": self.seed}

    @staticmethod
    def from_json(d, shape: tuple[int, ...], dtype: str) -> "Recipe":
        """The recipe `d` (a .popx's) for a tensor of `shape` and `dtype`; ValueError
        if it is not one this module makes."""
        if not isinstance(d, dict) or set(d) != {"kind", "seed"} or d["kind"] not in KINDS \
                or type(d["seed"]) is not int or not 0 <= d["seed"] < MAX_SEED or dtype not in _DTYPES \
                or (d["kind"] == "he_normal" and fans(shape)[0] == 0):
            raise ValueError("not an initializer popdsl writes")
        return Recipe(d["kind"], d["seed"], tuple(shape), dtype)


def checksum(values: np.ndarray) -> int:
    """CRC-32 of a tensor's bytes: what the tests pin `Recipe.values()` to, so a change
    to the draw (which would change every .popx's parameters) cannot go unnoticed."""
    return zlib.crc32(np.ascontiguousarray(values).view(np.uint8))


class InitialValues(MutableMapping):
    """Tensor id → initial values (an array of the tensor's shape and dtype).

    A value may be stored as the `Recipe` that draws it: it is drawn each time it is
    read, not when the graph is built.  ResNet-50's 25.5M drawn weights are 102 MB
    that no compile stage reads — only the simulator, the reference evaluator and a
    `.popx` writer (which stores the recipe) need them.  Storing an array in place
    of a recipe (new parameters, a test's edit) drops the recipe: what is written is
    always what would be read."""
    __slots__ = ("_d",)

    def __init__(self, items=()):
        self._d = dict(items)

    def __getitem__(self, k: int) -> np.ndarray:
        v = self._d[k]
        return v.values() if isinstance(v, Recipe) else v

    def __setitem__(self, k: int, v) -> None:
        self._d[k] = v

    def __delitem__(self, k: int) -> None:
        del self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def recipe(self, k: int) -> Recipe | None:
        """The recipe tensor k's values are drawn by, or None where they are an array."""
        v = self._d.get(k)
        return v if isinstance(v, Recipe) else None

    def spec(self, k: int) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of tensor k's values, without drawing them."""
        v = self._d[k]
        if isinstance(v, Recipe):
            return v.shape, np.dtype(_DTYPES[v.dtype])
        return getattr(v, "shape", None), getattr(v, "dtype", type(v).__name__)

    def copy(self) -> "InitialValues":
        return InitialValues(self._d)

    def __repr__(self) -> str:
        return f"InitialValues({len(self._d)} tensors, {sum(isinstance(v, Recipe) for v in self._d.values())} drawn)"


def _chunks(n: int, step: int = 1 << 18):
    """(start, length) of n draws in chunks: a big tensor never holds all its raw
    draws at once, and each chunk's arithmetic stays in cache."""
    return ((i, min(step, n - i)) for i in range(0, n, step))
