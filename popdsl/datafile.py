"""Reading `.npy` and `.npz` files that may be damaged or hostile.

Requires numpy and the standard library; produces `load_npy`, `open_npz` and
`ZipArrays` (the arrays of an open zip: an `.npz`, or the members of a `.popx`).

Every array's header (dtype, shape) is read and handed to the caller's `check`
before a byte of its data is read or inflated, and the data must be exactly as long
as the header says (the file's or the zip member's declared size), so a header
claiming terabytes, or a 3 MB zip bomb that inflates to gigabytes, is refused
without allocating anything.  No object arrays (pickles) and no records; which
number types fit is the caller's check.  Every failure, whatever its cause (truncation,
a flipped byte inside a deflate stream, an unsupported zip feature, a bad CRC), is a
`DataFileError` with a sentence a user can act on.
"""
from __future__ import annotations

import ast
import re
import struct
import zipfile
import zlib
from typing import BinaryIO, Callable

import numpy as np

from popdsl.limits import MAX_INFLATE_RATIO, ZIP_BOMB_BYTES
from popdsl.node import node

_MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 1 << 16
MAX_RANK = 32
# Whatever goes wrong inside zipfile and zlib when a zip is damaged or unusual.
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError,
              RuntimeError, OSError, ValueError, KeyError, struct.error, OverflowError)


class DataFileError(Exception):
    """The file is not a readable array file (a user error)."""


@node
class Header:
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool
    nbytes: int            # of the data, from the header (Python ints: no overflow)
    size: int              # of the header itself, magic included


Check = Callable[[Header], None]

# The header numpy itself writes (np.save, np.savez, the .popx writer), read without
# Python's parser, which took 1.3 s of loading a ResNet-50 training step's .popx
# (28,650 arrays).  Exactly what `ast.literal_eval` would read from such text, no
# more (no leading zeros, no other spacing); any other header goes to the parser.
_NUMPY_HEADER = re.compile(r"\{'descr': '([<>|=][a-z][1-9][0-9]*)', 'fortran_order': (False|True), "
                           r"'shape': \(((?:0|[1-9][0-9]*)(?:, (?:0|[1-9][0-9]*))*,?|)\), \}[ \n]*")


def _header_dict(text: str) -> dict:
    m = _NUMPY_HEADER.fullmatch(text)
    if m is None:
        return ast.literal_eval(text)
    descr, fortran, shape = m.groups()
    if shape and "," not in shape:
        return ast.literal_eval(text)             # "(3)" is an int, not a tuple: let Python say
    return {"descr": descr, "fortran_order": fortran == "True",
            "shape": tuple(int(n) for n in shape.replace(",", " ").split())}


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DataFileError("truncated")
    return data


def read_header(f: BinaryIO) -> Header:
    """The header of the .npy at the current position of `f`, checked."""
    if _read_exact(f, 6) != _MAGIC:
        raise DataFileError("not a .npy array (no NUMPY magic)")
    major, _minor = _read_exact(f, 2)
    if major == 1:
        (hlen,), lead = struct.unpack("<H", _read_exact(f, 2)), 10
    elif major in (2, 3):
        (hlen,), lead = struct.unpack("<I", _read_exact(f, 4)), 12
    else:
        raise DataFileError(f"unknown .npy format version {major}")
    if hlen > MAX_HEADER_BYTES:
        raise DataFileError("damaged .npy header (too long)")
    try:
        text = _read_exact(f, hlen).decode("utf-8" if major == 3 else "latin1")
        d = _header_dict(text)
    except (ValueError, SyntaxError, UnicodeDecodeError, RecursionError, MemoryError, TypeError):
        raise DataFileError("damaged .npy header") from None
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise DataFileError("damaged .npy header")
    try:
        dtype = np.lib.format.descr_to_dtype(d["descr"])
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        raise DataFileError("damaged .npy header (unknown dtype)") from None
    if dtype.hasobject:
        raise DataFileError("holds Python objects (a pickle), which popc never loads")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise DataFileError(f"holds records ({dtype}); popc reads arrays of numbers")
    shape, fortran = d["shape"], d["fortran_order"]
    if not isinstance(shape, tuple) or len(shape) > MAX_RANK or not isinstance(fortran, bool) \
            or any(type(n) is not int or n < 0 for n in shape):
        raise DataFileError("damaged .npy header (bad shape)")
    count = 1
    for n in shape:
        count *= n
    return Header(dtype, shape, fortran, count * dtype.itemsize, lead + hlen)


def read_body(f: BinaryIO, h: Header) -> np.ndarray:
    """The data after header `h`, as a writeable array of h's dtype and shape."""
    buf = np.empty(h.nbytes, np.uint8)
    view, pos = memoryview(buf), 0
    while pos < h.nbytes:
        n = f.readinto(view[pos:])
        if not n:
            raise DataFileError("truncated")
        pos += n
    a = buf.view(h.dtype)
    return a.reshape(h.shape[::-1]).T if h.fortran else a.reshape(h.shape)


def load_npy(path: str, check: Check = lambda h: None) -> np.ndarray:
    """The array in the .npy file `path`.  `check(header)` may raise (anything) to
    refuse it before its data is read.  Raises DataFileError, FileNotFoundError,
    IsADirectoryError or OSError."""
    with open(path, "rb") as f:
        h = read_header(f)
        f.seek(0, 2)
        have = f.tell() - h.size
        if have < h.nbytes:
            raise DataFileError(f"truncated (the header promises {h.nbytes:,} bytes of data, "
                                f"the file holds {have:,})")
        check(h)
        f.seek(h.size)
        return read_body(f, h)


class ZipArrays:
    """The `NAME.npy` members of an open zip file, read one at a time."""

    def __init__(self, z: zipfile.ZipFile, refuse_bombs: bool = True):
        # A .popx holds arrays that compress a thousandfold (initial zeros) and has
        # limits of its own; a data file is refused when it would inflate like a bomb.
        self.z, self.refuse_bombs = z, refuse_bombs
        self.infos = {}
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            if key in self.infos:
                raise DataFileError(f"two members named '{info.filename}'")
            self.infos[key] = info

    @property
    def keys(self) -> list[str]:
        return list(self.infos)

    def declared_bytes(self, key: str) -> int:
        return self.infos[key].file_size

    def header(self, key: str) -> Header:
        """Only the header of member `key` is inflated."""
        info = self.infos[key]
        try:
            with self.z.open(info) as f:
                h = read_header(f)
        except DataFileError as e:
            raise DataFileError(f"member '{info.filename}': {e}") from None
        except ZIP_ERRORS as e:
            raise DataFileError(f"member '{info.filename}' is damaged ({_why(e)})") from None
        if h.size + h.nbytes != info.file_size:
            raise DataFileError(f"member '{info.filename}' is damaged (its header promises "
                                f"{h.nbytes:,} bytes of data, the zip says {info.file_size - h.size:,})")
        return h

    def array(self, key: str, check: Check = lambda h: None) -> np.ndarray:
        h = self.header(key)
        check(h)
        info = self.infos[key]
        if self.refuse_bombs and info.file_size > ZIP_BOMB_BYTES \
                and info.file_size > MAX_INFLATE_RATIO * max(info.compress_size, 1):
            raise DataFileError(f"member '{info.filename}' would inflate {info.file_size // max(info.compress_size, 1):,} "
                                f"times, to {info.file_size:,} bytes: refused as a likely zip bomb (save real "
                                "data uncompressed, with np.savez)")
        try:
            with self.z.open(info) as f:
                f.read(h.size)
                return read_body(f, h)
        except DataFileError as e:
            raise DataFileError(f"member '{info.filename}': {e}") from None
        except ZIP_ERRORS as e:
            raise DataFileError(f"member '{info.filename}' is damaged ({_why(e)})") from None


def open_npz(path: str) -> tuple[zipfile.ZipFile, ZipArrays]:
    """An .npz opened for `ZipArrays` reading (close the zip when done).  Raises
    DataFileError, FileNotFoundError or IsADirectoryError."""
    try:
        z = zipfile.ZipFile(path)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except ZIP_ERRORS as e:
        raise DataFileError(f"not an .npz archive, or damaged ({_why(e)})") from None
    try:
        arrays = ZipArrays(z)
        others = [i.filename for i in z.infolist() if not i.filename.endswith(".npy")]
        if others:
            raise DataFileError(f"member '{others[0]}' is not an .npy array")
    except BaseException:
        z.close()
        raise
    return z, arrays


def _why(e: BaseException) -> str:
    if isinstance(e, zlib.error):
        return "its compressed data is corrupt"
    if isinstance(e, NotImplementedError):
        return f"an unsupported zip feature: {e}"
    if isinstance(e, RuntimeError) and "encrypted" in str(e):
        return "it is encrypted"
    if isinstance(e, (EOFError, struct.error)):
        return "truncated"
    return str(e) or type(e).__name__
