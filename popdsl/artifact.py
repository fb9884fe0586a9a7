"""`.popx` files: a planned executable, versioned.

A `.popx` is a zip archive: `popx.json` (format name and version, the target, the
codelets as codelet IR, the program tree and every small record) and one `.npy`
member per array (vertex tables, addresses, initial values).  It never holds native
code: loading verifies the codelet IR and checks that every address a table, copy
or read can touch lies inside the target's memory, so a damaged or hostile file is
an error, never a crash.  The file's claims about which bounds checks are
unnecessary are not trusted either: loading proves them again, and a file built
with --unchecked runs checked unless whoever runs it asks for --unchecked too.
Writes are atomic (a temporary file renamed into place).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from dataclasses import fields as dc_fields, is_dataclass, replace

import numpy as np

from popdsl.diagnostics import Span
from popdsl.frontend.parser import MAX_NESTING
from popdsl.ir import codelet as cir
from popdsl.ir.verify import verify_codelet
from popdsl.ir import executable as X
from popdsl.ir.target import Target

MAGIC = "popdsl-executable"
VERSION = 2
MAX_MEMBER_BYTES = 1 << 34
_MEMORY_ARRAYS = X.CATEGORIES + ("planned", "lower_bound", "naive_data", "timeline")
# JSON levels of one codelet's IR: sema makes at most two per level of source
# nesting (a node and a list), and the parser allows MAX_NESTING levels.  Deeper IR
# would only exhaust the stack of the passes that walk it.
MAX_IR_DEPTH = 2 * MAX_NESTING + 100


class ArtifactError(Exception):
    """The file is not a valid `.popx` of this version (a user error)."""


# ---------------------------------------------------------------- writing

class _Arrays:
    def __init__(self):
        self.items: list[np.ndarray] = []

    def ref(self, a: np.ndarray) -> str:
        self.items.append(np.ascontiguousarray(a))
        return f"a{len(self.items) - 1}"


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


def _span_json(s: Span):
    return [s.path, s.line, s.col, s.end_line, s.end_col]


def save(exe: X.Executable, path: str) -> None:
    A = _Arrays()
    doc = {
        "format": MAGIC, "version": VERSION, "name": exe.name, "target": exe.target.to_json(),
        "unchecked": exe.unchecked,
        "codelets": [cir.to_json(c) for c in exe.codelets.values()],
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "kind": t.kind,
                     "span": _span_json(t.span), "addrs": A.ref(a)}
                    for t, a in zip(exe.tensors, exe.tensor_addrs)],
        "init": {str(k): A.ref(v) for k, v in exe.init.items()},
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
        "memory": {**{k: A.ref(getattr(exe.memory, k)) for k in _MEMORY_ARRAYS},
                   "timeline_labels": list(exe.memory.timeline_labels),
                   "timeline_categories": {k: A.ref(v) for k, v in exe.memory.timeline_categories.items()}},
        "ops": exe.ops,
    }
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".popx-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("popx.json", json.dumps(doc))
            for i, a in enumerate(A.items):
                buf = io.BytesIO()
                np.lib.format.write_array(buf, a, allow_pickle=False)
                z.writestr(f"a{i}.npy", buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------- reading

def load(path: str, unchecked: bool = False) -> X.Executable:
    """Read and validate a `.popx`.  Raises ArtifactError with a clear message.
    `unchecked`: honour the file's --unchecked (drop bounds checks), which the file
    alone cannot ask for."""
    try:
        with zipfile.ZipFile(path) as z:
            exe = _Loader(z).executable()
            exe.unchecked = exe.unchecked and unchecked
            return exe
    except ArtifactError:
        raise
    except FileNotFoundError:
        raise ArtifactError("no such file") from None
    except IsADirectoryError:
        raise ArtifactError("is a directory") from None
    except (zipfile.BadZipFile, EOFError):
        raise ArtifactError("not a popdsl executable (not a .popx archive, or truncated)") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OSError, zipfile.LargeZipFile) as e:
        raise ArtifactError(f"damaged .popx file ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise ArtifactError("damaged .popx file (nested too deeply)") from None


class _Loader:
    def __init__(self, z: zipfile.ZipFile):
        self.z = z
        try:
            self.doc = json.loads(z.read("popx.json"))
        except KeyError:
            raise ArtifactError("not a popdsl executable (no popx.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ArtifactError("damaged .popx file (popx.json is not valid JSON)") from None
        d = self.doc
        if not isinstance(d, dict) or d.get("format") != MAGIC:
            raise ArtifactError("not a popdsl executable")
        if d.get("version") != VERSION:
            raise ArtifactError(f"made by a different popdsl (.popx version {d.get('version')}, "
                                f"this popc reads version {VERSION}); rebuild it with 'popc build'")

    def array(self, ref, dtype, ndim=None) -> np.ndarray:
        if not isinstance(ref, str) or not ref.startswith("a"):
            raise ValueError(f"bad array reference {ref!r}")
        info = self.z.getinfo(ref + ".npy")
        if info.file_size > MAX_MEMBER_BYTES:
            raise ValueError("array member too large")
        a = np.lib.format.read_array(io.BytesIO(self.z.read(info)), allow_pickle=False)
        if dtype is not None and a.dtype != np.dtype(dtype):
            raise ValueError(f"array {ref} has dtype {a.dtype}, expected {np.dtype(dtype)}")
        if ndim is not None and a.ndim != ndim:
            raise ValueError(f"array {ref} has {a.ndim} dimensions, expected {ndim}")
        return np.ascontiguousarray(a)

    def executable(self) -> X.Executable:
        d = self.doc
        target = Target.from_json(d["target"])
        if not (1 <= target.tiles <= 1 << 16 and 64 <= target.tile_memory <= 1 << 28
                and target.tile_memory % 64 == 0 and target.workers >= 1):
            raise ValueError("implausible target")
        self.memsize = target.tiles * target.tile_memory
        codelets = {}
        for cj in d["codelets"]:
            if _json_depth(cj) > MAX_IR_DEPTH:
                raise ValueError("codelet IR nested deeper than any program popc compiles")
            c = cir.from_json(cj)
            if not isinstance(c, cir.Codelet):
                raise ValueError("codelet entry is not a codelet")
            codelets[c.name] = c
        scalars = {n: c for n, c in codelets.items() if c.ret is not None}
        for c in codelets.values():
            try:
                verify_codelet(c, scalars)
            except ValueError as e:
                raise ArtifactError(f"codelet '{c.name}' failed verification: {e}") from None
        codelets = {n: reprove_checks(c) for n, c in codelets.items()}
        spans = [Span(str(s[0]), int(s[1]), int(s[2]), int(s[3]), int(s[4])) for s in d["spans"]]
        tensors, addrs = [], []
        for t in d["tensors"]:
            dtype = t["dtype"]
            if dtype not in cir.SCALARS:
                raise ValueError(f"unknown dtype {dtype!r}")
            shape = tuple(int(x) for x in t["shape"])
            a = self.array(t["addrs"], np.int64)
            if a.size != int(np.prod(shape, dtype=np.int64)):
                raise ValueError(f"tensor {t['name']!r}: address count does not match its shape")
            self.in_memory(a, cir.ELEM_BYTES[dtype])
            addrs.append(a.reshape(-1))
            sp = t["span"]
            tensors.append(X.TensorInfo(str(t["name"]), dtype, shape, str(t["kind"]),
                                        Span(str(sp[0]), *map(int, sp[1:]))))
        init = {}
        for k, ref in d["init"].items():
            i = int(k)
            a = self.array(ref, cir.NUMPY_DTYPE[tensors[i].dtype])
            if a.shape != tensors[i].shape:
                raise ValueError(f"initial value of {tensors[i].name!r} has the wrong shape")
            init[i] = a
        css = []
        for cs in d["compute_sets"]:
            groups = []
            for gj in cs["groups"]:
                c = codelets[gj["codelet"]]
                if c.ret is not None:
                    raise ValueError(f"{c.name} is not a vertex codelet")
                table = self.array(gj["table"], np.int64, 2)
                tiles = self.array(gj["tiles"], np.int32, 1)
                span_ids = self.array(gj["span_ids"], np.int32, 1)
                if table.shape[0] != tiles.size or tiles.size != span_ids.size:
                    raise ValueError("vertex table, tiles and spans differ in length")
                if tiles.size and (tiles.min() < 0 or tiles.max() >= target.tiles):
                    raise ValueError("vertex on a tile outside the target")
                if span_ids.size and (span_ids.min() < 0 or span_ids.max() >= len(spans)):
                    raise ValueError("bad vertex span")
                self.check_table(c, table)
                groups.append(X.VertexTable(c.name, table, tiles, span_ids))
            sp = cs["span"]
            css.append(X.ComputeSetExec(str(cs["name"]), Span(str(sp[0]), *map(int, sp[1:])), groups,
                                        self.copy_table(cs["pre"]), self.copy_table(cs["post"])))
        copies = [self.copy_table(c) for c in d["copies"]]
        reads = []
        for r in d["reads"]:
            if r["dtype"] not in cir.SCALARS:
                raise ValueError("bad read dtype")
            a = self.array(r["addrs"], np.int64)
            self.in_memory(a, cir.ELEM_BYTES[r["dtype"]])
            reads.append(X.Read(str(r["label"]), r["dtype"], a))
        program = self.prog(d["program"], len(css), len(copies), len(reads))
        inputs = {str(k): int(v) for k, v in d["inputs"].items()}
        outputs = {str(k): int(v) for k, v in d["outputs"].items()}
        if any(not 0 <= v < len(tensors) for v in inputs.values()) or \
                any(not 0 <= v < len(reads) for v in outputs.values()):
            raise ValueError("bad input or output reference")
        arrays = {k: self.array(d["memory"][k], np.int64, 1) for k in _MEMORY_ARRAYS}
        if any(a.size != target.tiles for k, a in arrays.items() if k != "timeline"):
            raise ValueError("memory plan does not match the target's tiles")
        labels = [str(x) for x in d["memory"]["timeline_labels"]]
        cats = {str(k): self.array(v, np.int64, 1)
                for k, v in d["memory"].get("timeline_categories", {}).items()}
        if any(k not in X.CATEGORIES or a.size != arrays["timeline"].size for k, a in cats.items()):
            raise ValueError("memory timeline categories do not match the timeline")
        mem = X.MemoryPlan(**arrays, timeline_labels=labels, timeline_categories=cats)
        ops = []
        for op in d.get("ops", []):
            if any(not 0 <= int(i) < len(css) for i in op["compute_sets"]):
                raise ValueError("bad compute set reference in an op")
            ops.append({"op": str(op["op"]), "shape": [int(x) for x in op["shape"]], "dtype": str(op["dtype"]),
                        "node": int(op["node"]), "vertices": int(op["vertices"]), "tiles": int(op["tiles"]),
                        "source": str(op["source"]), "flops": int(op.get("flops", 0)),
                        "compute_sets": [int(i) for i in op["compute_sets"]]})
        return X.Executable(str(d["name"]), target, codelets, tensors, addrs, init, css, copies,
                            reads, program, inputs, outputs, spans, mem, bool(d["unchecked"]), ops)

    def in_memory(self, a: np.ndarray, es: int) -> None:
        if a.size and (a.min() < 0 or a.max() > self.memsize - es or (a % es).any()):
            raise ValueError("an address lies outside the target's memory")

    def copy_table(self, cj) -> X.CopyTable:
        src, dst = self.array(cj["src"], np.int64, 1), self.array(cj["dst"], np.int64, 1)
        nbytes = self.array(cj["nbytes"], np.int64, 1)
        if not src.size == dst.size == nbytes.size:
            raise ValueError("copy runs differ in length")
        if src.size and (nbytes.min() < 1 or min(src.min(), dst.min()) < 0
                         or max((src + nbytes).max(), (dst + nbytes).max()) > self.memsize):
            raise ValueError("a copy reaches outside the target's memory")
        return X.CopyTable(src, dst, nbytes, cycles=int(cj["cycles"]),
                           exchange_bytes=int(cj["exchange_bytes"]), local_bytes=int(cj["local_bytes"]))

    def check_table(self, c: cir.Codelet, table: np.ndarray) -> None:
        """Every byte a vertex may touch (given its sizes) is inside memory."""
        layout = cir.table_layout(c)
        if table.shape[1] != len(layout):
            raise ValueError(f"vertex table of {c.name} has {table.shape[1]} columns, expected {len(layout)}")
        col = {(k.kind, k.name): j for j, k in enumerate(layout)}
        for s in c.symbols:
            v = table[:, col[("sym", s)]]
            if v.size and (v.min() < 1 or v.max() >= 2**31):
                raise ValueError(f"size symbol {s} of {c.name} out of range")
        for f in c.fields:
            if f.rank == 2 and f.direction != "state":
                stride = table[:, col[("stride", f.name)]]
                if stride.size and stride.min() < 0:
                    raise ValueError("negative row stride")
        for f, addr, extent in X.field_extents(c, table):
            es = cir.ELEM_BYTES[f.dtype]
            if addr.size and (addr.min() < 0 or (addr % es).any() or (addr + extent).max() > self.memsize):
                raise ValueError(f"field {f.name} of {c.name} reaches outside the target's memory")

    def prog(self, p, ncs, ncopies, nreads) -> X.PNode:
        def rec(p):
            if "seq" in p:
                return X.PSeq(tuple(rec(n) for n in p["seq"]))
            if "execute" in p:
                return X.PExecute(_idx(p["execute"], ncs))
            if "copy" in p:
                return X.PCopy(_idx(p["copy"], ncopies))
            if "repeat" in p:
                n = int(p["repeat"])
                if n < 0:
                    raise ValueError("negative repeat")
                return X.PRepeat(n, rec(p["body"]))
            if "while" in p:
                return X.PWhile(_idx(p["while"], nreads), rec(p["body"]))
            if "if" in p:
                return X.PIf(_idx(p["if"], nreads), rec(p["then"]), rec(p["else"]))
            if "print" in p:
                return X.PPrint(_idx(p["print"], nreads))
            raise ValueError("unknown program node")
        out = rec(p)
        if not isinstance(out, X.PSeq):
            raise ValueError("program is not a sequence")
        return out


def reprove_checks(c: cir.Codelet) -> cir.Codelet:
    """`c` with every `checked` flag derived again from the IR: an access goes
    unchecked only when each index is a constant inside a constant dimension, or
    a loop variable counting up from a non-negative constant to that dimension
    (the proofs `sema.codelets` makes).  A loop variable whose name is declared or
    assigned anywhere else in the codelet proves nothing."""
    dims = {f.name: f.dims for f in c.fields}
    loops: dict[str, int] = {}
    other: set[str] = set()

    def names(node) -> None:
        if isinstance(node, tuple):
            for x in node:
                names(x)
        elif is_dataclass(node):
            if isinstance(node, cir.For):
                loops[node.var] = loops.get(node.var, 0) + 1
            elif isinstance(node, (cir.Declare, cir.Assign)):
                other.add(node.name)
            for f in dc_fields(node):
                names(getattr(node, f.name))
    names(c.body)
    trusted = {v for v, n in loops.items() if n == 1 and v not in other}

    def proven(field: str, index, bounds) -> bool:
        fd = dims.get(field)
        if fd is None or len(index) != len(fd):
            return False
        for i, d in zip(index, fd):
            if isinstance(i, cir.Const) and type(i.value) is int:
                if not (type(d) is int and 0 <= i.value < d):
                    return False
            elif isinstance(i, cir.Local) and i.name in bounds:
                b = bounds[i.name]
                if not (b == d and type(b) is type(d) or type(b) is int and type(d) is int and b <= d):
                    return False
            else:
                return False
        return True

    def rec(node, bounds):
        if isinstance(node, tuple):
            return tuple(rec(x, bounds) for x in node)
        if not is_dataclass(node):
            return node
        inner = bounds
        if isinstance(node, cir.For) and node.var in trusted and type(node.step) is int \
                and node.step > 0 and isinstance(node.start, cir.Const) \
                and type(node.start.value) is int and node.start.value >= 0:
            if isinstance(node.stop, cir.Sym):
                inner = {**bounds, node.var: node.stop.name}
            elif isinstance(node.stop, cir.Const) and type(node.stop.value) is int:
                inner = {**bounds, node.var: node.stop.value}
        new = {f.name: rec(getattr(node, f.name), inner if isinstance(node, cir.For) and f.name == "body"
                           else bounds) for f in dc_fields(node)}
        if isinstance(node, (cir.Load, cir.Store)):
            new["checked"] = not proven(node.field, new["index"], bounds)
        return replace(node, **new)

    return replace(c, body=rec(c.body, {}))


def _json_depth(x) -> int:
    deepest, stack = 0, [(x, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((c, depth + 1) for c in (node.values() if isinstance(node, dict) else node))
    return deepest


def _idx(v, n: int) -> int:
    v = int(v)
    if not 0 <= v < n:
        raise ValueError("reference out of range")
    return v
