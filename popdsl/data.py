"""Data files a training run reads: IDX, the format MNIST is distributed in.

Requires numpy only; produces `read_idx` (an IDX file, gzipped or not, as a numpy
array) and `is_idx` (whether a file looks like one, by its first bytes).  `popc run
--feed images=train-images-idx3-ubyte.gz` reads one this way; so does
`popdsl.read_idx` for users who build their own `.npz`.

IDX (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code (0x08 u8,
0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64), the number of dimensions, each
dimension as a big-endian u32, then the values, big-endian, row-major.  Anything
else — a short file, trailing bytes, an unknown type — is a ValueError that says
what is wrong.
"""
from __future__ import annotations

import gzip
import math
import os

import numpy as np

TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
         0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
GZIP_MAGIC = b"\x1f\x8b"
MAX_BYTES = 1 << 33            # a header claiming more is not a data set we can hold


def _raw(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == GZIP_MAGIC:
            try:
                return gzip.decompress(f.read())
            except (OSError, EOFError) as e:
                raise ValueError(f"a broken gzip file ({e})") from None
        return f.read()


def is_idx(path: str | os.PathLike) -> bool:
    """True when the file (or the gzip stream it holds) starts like an IDX file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head[:2] == GZIP_MAGIC:
                f.seek(0)
                with gzip.open(f) as z:
                    head = z.read(4)
    except (OSError, EOFError):
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in TYPES and head[3] >= 1


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array an IDX file holds, in native byte order.  Raises ValueError for a
    file that is not a well-formed IDX file, OSError when it cannot be read."""
    raw = _raw(path)
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise ValueError("not an IDX file (it does not start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in TYPES:
        raise ValueError(f"not an IDX file (unknown type code 0x{code:02x})")
    if ndim < 1:
        raise ValueError("an IDX file with no dimensions")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"the IDX header promises {ndim} dimensions but the file ends first")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dt = TYPES[code]
    want = math.prod(shape) * dt.itemsize          # Python ints: a hostile header does not overflow
    if want > MAX_BYTES:
        raise ValueError(f"the IDX header claims {list(shape)} values ({want:,} bytes)")
    if len(raw) - head != want:
        raise ValueError(f"the IDX header says {list(shape)} ({want:,} bytes of data) but the file holds "
                         f"{len(raw) - head:,}")
    return np.frombuffer(raw, dt, offset=head).reshape(shape).astype(dt.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` as an IDX file (gzipped when the name ends in .gz): what the
    tests use to make MNIST-like files."""
    a = np.asarray(array)
    code = next((c for c, dt in TYPES.items() if dt.newbyteorder("=") == a.dtype.newbyteorder("=")), None)
    if code is None:
        raise ValueError(f"IDX has no type for {a.dtype}")
    body = bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, ">u4").tobytes() + a.astype(TYPES[code]).tobytes()
    if str(path).endswith(".gz"):
        body = gzip.compress(body)
    with open(path, "wb") as f:
        f.write(body)
