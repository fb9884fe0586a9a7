"""`.popx` files: a planned executable, versioned.

A `.popx` is a zip archive: `popx.json` (format name and version, the target, the
codelets as codelet IR, the program tree and every small record) and one `.npy`
member per array (vertex tables, addresses, initial values).  It never holds native
code.  Writes are atomic (`popdsl.atomic`) and reproducible: the same executable
gives the same bytes (fixed member timestamps and attributes).

A `.popx` is untrusted input.  Loading (`load`) proves, before anything runs, that
every address a vertex field, a copy run, a tensor or a read can touch lies inside
its own tile's window of the target's memory — with every input bounded first, so
that no sum can overflow — and bounds every count, size and target figure.  Sizes
come from the zip's directory and each array's header, checked before anything is
inflated; the codelet IR is verified, and the file's claims about which bounds
checks are unnecessary are proven again (a file built with --unchecked runs checked
unless whoever runs it asks for --unchecked too).  Every failure is an
`ArtifactError` naming what is wrong; none is a crash.
"""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np

from popdsl import datafile
from popdsl.artifact_load import DELTA_MIN, DELTA_TYPES, MAGIC, MEMORY_ARRAYS, VERSION, ArtifactError, Loader, damaged
from popdsl.atomic import write_atomically
from popdsl.diagnostics import Span
from popdsl.ir import codelet as cir
from popdsl.ir import executable as X

__all__ = ["ArtifactError", "MAGIC", "VERSION", "dumps", "load", "save"]
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)   # the zip format's epoch: builds are reproducible
# Deflate's fastest level: on delta-coded arrays it is within a few per cent of the
# default level's size at a third of its time (and parameters are noise either way).
COMPRESS_LEVEL = 1
_DELTA_RANGES = tuple((int(np.iinfo(t).min), int(np.iinfo(t).max)) for t in DELTA_TYPES)


# ---------------------------------------------------------------- writing

class _Arrays:
    """The arrays of one file, each a member `aN.npy`.  An integer array of at least
    DELTA_MIN elements is stored as the differences along its first axis in the
    narrowest integer type that holds them (ref `aN:d`): vertex tables sorted by
    tile, addresses and runs mostly grow by small steps, so the deltas are a few
    bytes each and deflate to a fraction of the raw int64s (ResNet-50's arrays: 520
    MB raw, 54 MB deflated as they are, under 7 MB as deltas)."""

    def __init__(self):
        self.items: list[np.ndarray] = []

    def ref(self, a: np.ndarray) -> str:
        a = np.asarray(a)          # a 0-d array stays 0-d (ascontiguousarray would not)
        name = f"a{len(self.items)}"
        if a.dtype.kind in "iu" and a.ndim >= 1 and a.size >= DELTA_MIN and a.dtype.itemsize <= 8 \
                and (a.dtype.kind == "i" or a.dtype.itemsize < 8):
            d = np.empty(a.shape, np.int64)
            d[0] = a[0]
            np.subtract(a[1:], a[:-1], out=d[1:], dtype=np.int64)
            lo, hi = int(d.min()), int(d.max())
            narrow = next(t for t, (tlo, thi) in zip(DELTA_TYPES, _DELTA_RANGES) if tlo <= lo and hi <= thi)
            self.items.append(d if narrow is np.int64 else d.astype(narrow))
            return name + ":d"
        self.items.append(a if a.flags.c_contiguous else a.copy(order="C"))
        return name


def _prog_json(p):
    if isinstance(p, X.PSeq):
        return {"seq": [_prog_json(n) for n in p.body]}
    if isinstance(p, X.PExecute):
        return {"execute": p.cs}
    if isinstance(p, X.PCopy):
        return {"copy": p.copy}
    if isinstance(p, X.PRepeat):
        return {"repeat": p.count, "body": _prog_json(p.body)}
    if isinstance(p, X.PWhile):
        return {"while": p.cond, "body": _prog_json(p.body)}
    if isinstance(p, X.PIf):
        return {"if": p.cond, "then": _prog_json(p.then), "else": _prog_json(p.orelse)}
    if isinstance(p, X.PPrint):
        return {"print": p.read}
    raise AssertionError(p)


def _copy_json(c: X.CopyTable, A: _Arrays):
    return {"src": A.ref(c.src), "dst": A.ref(c.dst), "nbytes": A.ref(c.nbytes), "cycles": c.cycles,
            "exchange_bytes": c.exchange_bytes, "local_bytes": c.local_bytes}


def _init_json(exe: X.Executable, k: int, A: _Arrays):
    """A tensor's initial values: the recipe that draws them (the loader keeps it, and
    they are drawn again when read), else the values."""
    r = exe.init.recipe(k)
    if r is not None:
        return {"recipe": r.to_json()}
    return A.ref(exe.init[k])


def _span_json(s: Span):
    return [s.path, s.line, s.col, s.end_line, s.end_col]


def _member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3                 # unix, wherever it was built
    info.external_attr = 0o644 << 16
    return info


def save(exe: X.Executable, path: str) -> None:
    """Write `exe` to `path` (atomically).  Raises OSError."""
    write_atomically(path, lambda f: _write(exe, f))


def dumps(exe: X.Executable) -> bytes:
    """The bytes `save` writes (the build cache stores them and copies them out)."""
    buf = io.BytesIO()
    _write(exe, buf)
    return buf.getvalue()


def _write(exe: X.Executable, f) -> None:
    A = _Arrays()
    doc = {
        "format": MAGIC, "version": VERSION, "name": exe.name, "target": exe.target.to_json(),
        "unchecked": exe.unchecked,
        "codelets": [cir.to_json(c) for c in exe.codelets.values()],
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "kind": t.kind,
                     "span": _span_json(t.span),
                     "runs": {"starts": A.ref(r.starts), "counts": A.ref(r.counts), "addrs": A.ref(r.addrs)}}
                    for t, r in zip(exe.tensors, exe.tensor_runs)],
        "init": {str(k): _init_json(exe, k, A) for k in sorted(exe.init)},
        "compute_sets": [{"name": cs.name, "span": _span_json(cs.span),
                          "groups": [{"codelet": g.codelet, "table": A.ref(g.table), "tiles": A.ref(g.tiles),
                                      "span_ids": A.ref(g.span_ids)} for g in cs.groups],
                          "pre": _copy_json(cs.pre, A), "post": _copy_json(cs.post, A)}
                         for cs in exe.compute_sets],
        "copies": [_copy_json(c, A) for c in exe.copies],
        "reads": [{"label": r.label, "dtype": r.dtype, "addrs": A.ref(r.addrs)} for r in exe.reads],
        "program": _prog_json(exe.program),
        "inputs": exe.inputs, "outputs": exe.outputs,
        "spans": [_span_json(s) for s in exe.spans],
        "memory": {**{k: A.ref(getattr(exe.memory, k)) for k in MEMORY_ARRAYS},
                   "timeline_labels": list(exe.memory.timeline_labels),
                   "timeline_categories": {k: A.ref(v) for k, v in exe.memory.timeline_categories.items()}},
        "ops": exe.ops,
        "recompute": exe.recompute,
        "functions": exe.functions,
    }

    with zipfile.ZipFile(f, "w") as z:
        z.writestr(_member("popx.json"), json.dumps(doc))
        for i, a in enumerate(A.items):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a, allow_pickle=False)
            z.writestr(_member(f"a{i}.npy"), buf.getvalue(), compresslevel=COMPRESS_LEVEL)


# ---------------------------------------------------------------- reading

def load(path, unchecked: bool = False) -> X.Executable:
    """Read and validate a `.popx` (a path, or a binary file object: the build cache
    loads its entries from memory).  Raises ArtifactError with a clear message.
    `unchecked`: honour the file's --unchecked (drop bounds checks), which the file
    alone cannot ask for."""
    try:
        z = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ArtifactError("no such file") from None
    except IsADirectoryError:
        raise ArtifactError("is a directory") from None
    except PermissionError:
        raise ArtifactError("permission denied") from None
    except datafile.ZIP_ERRORS:
        raise ArtifactError("not a popdsl executable (not a .popx archive, or truncated)") from None
    try:
        with z:
            exe = Loader(z).executable()
    except ArtifactError:
        raise
    except datafile.DataFileError as e:
        raise damaged(str(e)) from None
    except MemoryError:
        raise ArtifactError("too large to load into this machine's memory") from None
    except RecursionError:
        raise damaged("nested too deeply") from None
    except datafile.ZIP_ERRORS + (TypeError, IndexError, AttributeError) as e:
        raise damaged(f"{type(e).__name__}: {e}") from None
    exe.unchecked = exe.unchecked and unchecked
    return exe
