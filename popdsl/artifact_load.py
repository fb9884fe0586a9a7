"""The validating reader of a `.popx`'s contents (`popdsl.artifact.load` opens the
zip and calls it).

Requires an open zip file; produces an `Executable` every part of which has been
checked, or raises `ArtifactError`.  The rule for arithmetic on the file's numbers:
every number is bounded before it takes part in a sum or product (addresses below
the target's memory, < 2^41; strides at most a tile's bytes, < 2^27; sizes < 2^31;
so an extent is < 2^61 and address + extent cannot wrap in int64), and counts the
file states are checked against the arrays' headers before their data is read.
Every access is proven to lie in its own tile's window: a vertex's fields in its
tile, a copy run in one tile at each end, each element of a tensor or a read in
memory and aligned (so in one tile).  This module knows nothing of the simulator:
what it proves is what the simulator's native code relies on.
"""
from __future__ import annotations

import json
import math
import re
import zipfile
from dataclasses import fields as dc_fields, is_dataclass, replace

import numpy as np

from popdsl import datafile
from popdsl.diagnostics import Span
from popdsl.limits import MAX_NESTING
from popdsl.ir import codelet as cir
from popdsl.ir import executable as X
from popdsl.ir.initializers import InitialValues, Recipe
from popdsl.ir.target import MAX_TILE_MEMORY, MAX_TILES, MIN_TILE_MEMORY, Target
from popdsl.ir.verify import verify_codelet

MAGIC = "popdsl-executable"
VERSION = 8
PHASES = ("forward", "backward", "recompute")           # of a tensor op (passes.partition)
RECOMPUTE_FIELDS = ("mode", "level", "segments", "recomputed_segments", "recomputed_elementwise", "kept_bytes",
                    "kept_bytes_without", "recomputed_ops", "recomputed_flops")
FUNCTION_FIELDS = ("name", "kind", "calls", "instances", "compute_sets", "copy_in_bytes", "copy_out_bytes",
                   "shared_inputs", "ops", "tensors", "recompute_calls")
MEMORY_ARRAYS = X.CATEGORIES + ("planned", "lower_bound", "naive_data", "timeline")
# JSON levels of one codelet's IR: sema makes at most two per level of source
# nesting (a node and a list), and the parser allows MAX_NESTING levels.  Deeper IR
# would only exhaust the stack of the passes that walk it.
MAX_IR_DEPTH = 2 * MAX_NESTING + 100
# What a loader will inflate: ResNet-50 on a GC200 needs well under a tenth of it.
MAX_JSON_BYTES = 1 << 28
MAX_ARRAY_BYTES = 1 << 32
MAX_MEMBERS = 1 << 20
MAX_RANK = 8
_I32 = (1 << 31) - 1
_BIG = 1 << 62            # cycle and byte figures: sums of a few stay inside int64
_REF = re.compile(r"(a[0-9]{1,7})(:d)?")
# Integer arrays of at least this many elements are stored as differences along their
# first axis (`artifact._Arrays`), in the narrowest of these types that holds them.
DELTA_MIN = 16
DELTA_TYPES = (np.int8, np.int16, np.int32, np.int64)
_KINDS = ("var", "input", "param", "temp")


class ArtifactError(Exception):
    """The file is not a valid `.popx` of this version (a user error)."""


def damaged(why: str) -> ArtifactError:
    return ArtifactError(f"damaged .popx file ({why})")


# ---------------------------------------------------------------- JSON values

def _int(v, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise damaged(f"{what} is {v!r}, not an integer in {lo}..{hi}")
    return v


def _str(v, what: str, longest: int = 1 << 16) -> str:
    if not isinstance(v, str) or len(v) > longest:
        raise damaged(f"{what} is not a string")
    return v


def _list(v, what: str) -> list:
    if not isinstance(v, list):
        raise damaged(f"{what} is not a list")
    return v


def _dict(v, what: str, keys=None) -> dict:
    if not isinstance(v, dict) or (keys is not None and set(v) != set(keys)):
        raise damaged(f"{what} is not a record of the expected fields")
    return v


def _span(v) -> Span:
    s = _list(v, "a span")
    if len(s) != 5:
        raise damaged("a span has the wrong length")
    return Span(_str(s[0], "a span's path"), *(_int(x, 0, _I32, "a span's line or column") for x in s[1:]))


def _index(v, n: int, what: str) -> int:
    return _int(v, 0, n - 1, what) if n else _int(v, 0, -1, what)


def target_from_json(v) -> Target:
    names = [f.name for f in dc_fields(Target)]
    t = _dict(v, "the target", names)
    clock = t["clock_hz"]
    if type(clock) not in (int, float) or not math.isfinite(clock) or not 1e6 <= clock <= 1e12:
        raise damaged(f"target clock {clock!r} Hz is not a clock between 1 MHz and 1 THz")
    tm = _int(t["tile_memory"], MIN_TILE_MEMORY, MAX_TILE_MEMORY, "tile memory")
    if tm % 64:
        raise damaged("tile memory is not a multiple of 64 bytes")
    return Target(_str(t["name"], "the target's name", 64), _int(t["tiles"], 1, MAX_TILES, "the tile count"),
                  tm, _int(t["workers"], 1, 64, "workers per tile"), float(clock),
                  _int(t["exchange_bytes_per_cycle"], 1, 1 << 16, "exchange bytes per cycle"),
                  _int(t["sync_cycles"], 0, 1 << 32, "sync cycles"),
                  _int(t["macs_per_cycle"], 1, 1 << 16, "multiply-accumulates per cycle"))


# ---------------------------------------------------------------- the loader

class Loader:
    def __init__(self, z: zipfile.ZipFile):
        self.z = z
        infos = z.infolist()
        if len(infos) > MAX_MEMBERS:
            raise damaged("too many members")
        if sum(i.file_size for i in infos if i.filename != "popx.json") > MAX_ARRAY_BYTES:
            raise ArtifactError(f"arrays larger than {MAX_ARRAY_BYTES:,} bytes: more than any "
                                "executable popc builds; not loaded")
        try:
            info = z.getinfo("popx.json")
        except KeyError:
            raise ArtifactError("not a popdsl executable (no popx.json)") from None
        if info.file_size > MAX_JSON_BYTES:
            raise damaged(f"popx.json is larger than {MAX_JSON_BYTES:,} bytes")
        try:
            with z.open(info) as f:
                text = f.read(MAX_JSON_BYTES + 1)
        except datafile.ZIP_ERRORS as e:
            raise damaged(f"popx.json cannot be read: {datafile._why(e)}") from None
        try:
            self.doc = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            raise damaged("popx.json is not valid JSON") from None
        d = self.doc
        if not isinstance(d, dict) or d.get("format") != MAGIC:
            raise ArtifactError("not a popdsl executable")
        if d.get("version") != VERSION:
            raise ArtifactError(f"made by a different popdsl (.popx version {d.get('version')}, "
                                f"this popc reads version {VERSION}); rebuild it with 'popc build'")
        self.arrays = datafile.ZipArrays(z, refuse_bombs=False)
        self.used: set[str] = set()
        self.widened = sum(i.file_size for i in infos if i.filename != "popx.json")

    def array(self, ref, dtype, ndim: int | None = None, shape=None, rows: int | None = None) -> np.ndarray:
        """Array member `ref`, refused from its header unless it has this dtype,
        rank, shape (or number of rows); each member is read at most once."""
        m = _REF.fullmatch(ref) if isinstance(ref, str) else None
        if m is None or m.group(1) not in self.arrays.infos:
            raise damaged(f"bad array reference {ref!r}")
        ref, delta = m.group(1), m.group(2) is not None
        if ref in self.used:
            raise damaged(f"array {ref} is used twice")
        self.used.add(ref)
        want = np.dtype(dtype)
        if delta and want.kind not in "iu":
            raise damaged(f"array {ref} is delta-coded but holds {want} values")

        def check(h: datafile.Header) -> None:
            ok = h.dtype in (np.dtype(t).newbyteorder("<") for t in DELTA_TYPES) if delta else h.dtype == want
            if not ok or h.fortran:
                raise damaged(f"array {ref} holds {h.dtype}, expected {'deltas of ' if delta else ''}{want}")
            if (ndim is not None and len(h.shape) != ndim) or len(h.shape) > MAX_RANK \
                    or (shape is not None and h.shape != tuple(shape)) \
                    or (rows is not None and (not h.shape or h.shape[0] != rows)) \
                    or (delta and not h.shape):
                raise damaged(f"array {ref} has shape {list(h.shape)}, which does not fit its use")
            # What the deltas widen to counts against the limit the members' sizes did.
            self.widened += math.prod(h.shape) * max(want.itemsize, 8 if delta else 0) - h.nbytes
            if self.widened > MAX_ARRAY_BYTES:
                raise ArtifactError(f"arrays larger than {MAX_ARRAY_BYTES:,} bytes: more than any "
                                    "executable popc builds; not loaded")
        a = self.arrays.array(ref, check)
        if not delta:
            return a
        # int64 sums wrap exactly as the writer's differences did: the values come back
        # bit for bit, and a forged file gets only what its checks below allow.
        full = np.cumsum(a, axis=0, dtype=np.int64)
        if want != np.int64:
            info = np.iinfo(want)
            if full.size and (full.min() < info.min or full.max() > info.max):
                raise damaged(f"array {ref} holds values beyond {want}")
            full = full.astype(want)
        return full

    def executable(self) -> X.Executable:
        d = _dict(self.doc, "popx.json")
        self.target = target = target_from_json(d["target"])
        self.tm = target.tile_memory
        self.memsize = target.tiles * target.tile_memory
        codelets = self.codelets(_list(d["codelets"], "codelets"))
        spans = [_span(s) for s in _list(d["spans"], "spans")]
        tensors, runs = [], []
        for t in _list(d["tensors"], "tensors"):
            t = _dict(t, "a tensor", ("name", "dtype", "shape", "kind", "span", "runs"))
            dtype = t["dtype"]
            if dtype not in cir.SCALARS:
                raise damaged(f"unknown dtype {dtype!r}")
            shape = tuple(_int(x, 0, _I32, "a tensor dimension") for x in _list(t["shape"], "a shape"))
            if len(shape) > MAX_RANK or math.prod(shape) > self.memsize:
                raise damaged(f"tensor {t['name']!r} is larger than the target's memory")
            if t["kind"] not in _KINDS:
                raise damaged(f"unknown tensor kind {t['kind']!r}")
            runs.append(self.tensor_runs(t["runs"], dtype, math.prod(shape), f"tensor {t['name']!r}"))
            tensors.append(X.TensorInfo(_str(t["name"], "a tensor name"), dtype, shape, t["kind"], _span(t["span"])))
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise damaged("two tensors have one name")
        init = InitialValues()
        for k, ref in _dict(d["init"], "initial values").items():
            if not re.fullmatch(r"[0-9]{1,9}", k) or int(k) >= len(tensors):
                raise damaged(f"initial value for tensor {k!r}, which is not there")
            t = tensors[int(k)]
            if isinstance(ref, dict):
                # Drawn again, bit for bit (ir.initializers); its size was bounded with the tensor's.
                try:
                    r = Recipe.from_json(_dict(ref, "an initializer", ("recipe",))["recipe"], t.shape, t.dtype)
                except ValueError as e:
                    raise damaged(f"initial value of {t.name!r}: {e}") from None
                self.widened += math.prod(t.shape) * cir.ELEM_BYTES[t.dtype]
                if self.widened > MAX_ARRAY_BYTES:
                    raise ArtifactError(f"arrays larger than {MAX_ARRAY_BYTES:,} bytes: more than any "
                                        "executable popc builds; not loaded")
                init[int(k)] = r
                continue
            # (A scalar's value was written as shape [1] by earlier versions.)
            a = self.array(ref, cir.NUMPY_DTYPE[t.dtype])
            if a.shape != t.shape and not (t.shape == () and a.shape == (1,)):
                raise damaged(f"initial value of {t.name!r} has the wrong shape")
            init[int(k)] = a.reshape(t.shape)
        css = [self.compute_set(cs, codelets, len(spans)) for cs in _list(d["compute_sets"], "compute sets")]
        copies = [self.copy_table(c) for c in _list(d["copies"], "copies")]
        reads = []
        for r in _list(d["reads"], "reads"):
            r = _dict(r, "a read", ("label", "dtype", "addrs"))
            if r["dtype"] not in cir.SCALARS:
                raise damaged("bad read dtype")
            a = self.array(r["addrs"], np.int64)
            self.elements(a, r["dtype"], "a read")
            reads.append(X.Read(_str(r["label"], "a read's label"), r["dtype"], a))
        if _json_depth(d["program"]) > MAX_IR_DEPTH:
            raise damaged("program nested deeper than any program popc compiles")
        program = self.prog(d["program"], len(css), len(copies), reads)
        inputs = {}
        for k, v in _dict(d["inputs"], "inputs").items():
            i = _index(v, len(tensors), "an input's tensor")
            if tensors[i].name != k or tensors[i].kind != "input":
                raise damaged(f"input {k!r} refers to tensor {tensors[i].name!r}")
            inputs[k] = i
        outputs = {_str(k, "an output name"): _index(v, len(reads), "an output's read")
                   for k, v in _dict(d["outputs"], "outputs").items()}
        return X.Executable(_str(d["name"], "the graph's name"), target, codelets, tensors, runs, init, css,
                            copies, reads, program, inputs, outputs, spans, self.memory(d["memory"]),
                            self.flag(d["unchecked"]), [self.op(op, len(css)) for op in _list(d.get("ops", []), "ops")],
                            self.recompute(d.get("recompute", {})),
                            [self.function(f, len(css), len(tensors)) for f in _list(d.get("functions", []), "functions")])

    @staticmethod
    def recompute(v) -> dict:
        """A training step's recomputation summary (passes.recompute): a mode and counts."""
        v = _dict(v, "the recomputation record")
        if not v:
            return {}
        v = _dict(v, "the recomputation record", RECOMPUTE_FIELDS)
        if v["mode"] not in ("none", "auto", "all"):
            raise damaged("the recomputation mode is not none, auto or all")
        return {k: v[k] if k == "mode" else _int(v[k], 0, 1 << 62, f"the recomputation record's {k}")
                for k in RECOMPUTE_FIELDS}

    @staticmethod
    def function(f, ncs: int, ntensors: int) -> dict:
        """A function built once and called (passes.outline)."""
        f = _dict(f, "a function", FUNCTION_FIELDS)
        t0, t1 = (_int(x, 0, ntensors, "a function's tensors") for x in _list(f["tensors"], "a function's tensors"))
        if t0 > t1:
            raise damaged("a function's tensors are not a range")
        return {"name": _str(f["name"], "a function's name"), "kind": _str(f["kind"], "a function's kind"),
                "calls": _int(f["calls"], 2, _BIG, "a function's calls"),
                "instances": [_str(x, "a function's instance") for x in _list(f["instances"], "a function's instances")],
                "compute_sets": [_index(i, ncs, "a function's compute set")
                                 for i in _list(f["compute_sets"], "a function's compute sets")],
                **{k: _int(f[k], 0, 1 << 62, f"a function's {k}")
                   for k in ("copy_in_bytes", "copy_out_bytes", "shared_inputs", "ops", "recompute_calls")},
                "tensors": [t0, t1]}

    @staticmethod
    def flag(v) -> bool:
        if not isinstance(v, bool):
            raise damaged("'unchecked' is not true or false")
        return v

    def codelets(self, items: list) -> dict[str, cir.Codelet]:
        codelets = {}
        for cj in items:
            if _json_depth(cj) > MAX_IR_DEPTH:
                raise damaged("codelet IR nested deeper than any program popc compiles")
            c = cir.from_json(cj)
            if not isinstance(c, cir.Codelet) or c.name in codelets:
                raise damaged("a codelet entry is not a codelet, or a codelet is there twice")
            codelets[c.name] = c
        scalars = {n: c for n, c in codelets.items() if c.ret is not None}
        for c in codelets.values():
            try:
                verify_codelet(c, scalars)
            except ValueError as e:
                raise ArtifactError(f"codelet '{c.name}' failed verification: {e}") from None
        return {n: reprove_checks(c) for n, c in codelets.items()}

    def tensor_runs(self, d, dtype: str, numel: int, what: str) -> X.TensorRuns:
        """A tensor's runs: they cover its `numel` elements once, in order, each
        inside one tile's memory and aligned to the element size."""
        d = _dict(d, "a tensor's runs", ("starts", "counts", "addrs"))
        starts = self.array(d["starts"], np.int64, 1)
        counts = self.array(d["counts"], np.int64, 1, rows=starts.size)
        addrs = self.array(d["addrs"], np.int64, 1, rows=starts.size)
        es = cir.ELEM_BYTES[dtype]
        ends = starts + counts
        if (counts < 1).any() or (starts.size and (starts[0] != 0 or (starts[1:] != ends[:-1]).any())) \
                or (int(ends[-1]) if starts.size else 0) != numel:
            raise damaged(f"the runs of {what} do not cover its {numel} elements once, in order")
        last = addrs + (counts - 1) * es
        if starts.size and (int(addrs.min()) < 0 or int(last.max()) > self.memsize - es or (addrs % es).any()
                            or (addrs // self.tm != last // self.tm).any()):
            raise damaged(f"a run of {what} lies outside the target's memory or across a tile's end")
        return X.TensorRuns(starts, counts, addrs)

    def elements(self, a: np.ndarray, dtype: str, what: str) -> None:
        """Every element address of `a` inside memory and aligned to its size,
        hence inside one tile (tile memory is a multiple of 64)."""
        es = cir.ELEM_BYTES[dtype]
        if a.size and (int(a.min()) < 0 or int(a.max()) > self.memsize - es or (a % es).any()):
            raise damaged(f"an element of {what} lies outside the target's memory")

    def compute_set(self, cs, codelets, nspans: int) -> X.ComputeSetExec:
        cs = _dict(cs, "a compute set", ("name", "span", "groups", "pre", "post"))
        name = _str(cs["name"], "a compute set's name")
        groups = []
        for gj in _list(cs["groups"], "groups"):
            gj = _dict(gj, "a vertex group", ("codelet", "table", "tiles", "span_ids"))
            c = codelets.get(gj["codelet"]) if isinstance(gj["codelet"], str) else None
            if c is None or c.ret is not None:
                raise damaged(f"compute set {name!r} runs {gj['codelet']!r}, which is not a vertex codelet here")
            table = self.array(gj["table"], np.int64, 2)
            if table.shape[1] != len(cir.table_layout(c)):
                raise damaged(f"vertex table of {c.name} has {table.shape[1]} columns, "
                              f"expected {len(cir.table_layout(c))}")
            tiles = self.array(gj["tiles"], np.int32, 1, rows=table.shape[0])
            span_ids = self.array(gj["span_ids"], np.int32, 1, rows=table.shape[0])
            if tiles.size and (tiles.min() < 0 or tiles.max() >= self.target.tiles):
                raise damaged("a vertex on a tile outside the target")
            if span_ids.size and (span_ids.min() < 0 or span_ids.max() >= nspans):
                raise damaged("a vertex with a bad span")
            self.check_table(c, table, tiles, name)
            groups.append(X.VertexTable(c.name, table, tiles, span_ids))
        return X.ComputeSetExec(name, _span(cs["span"]), groups, self.copy_table(cs["pre"]),
                                self.copy_table(cs["post"]))

    def check_table(self, c: cir.Codelet, table: np.ndarray, tiles: np.ndarray, cs: str) -> None:
        """Every byte a vertex may touch, given its sizes and strides, lies in its
        own tile.  Sizes and strides are bounded first, addresses next, and only
        then is address + extent formed."""
        col = {(k.kind, k.name): j for j, k in enumerate(cir.table_layout(c))}
        for s in c.symbols:
            v = table[:, col[("sym", s)]]
            if v.size and (v.min() < 1 or v.max() > _I32):
                raise damaged(f"size symbol {s} of {c.name} out of range")
        for f in c.fields:
            if f.rank == 2 and f.direction != "state":
                stride = table[:, col[("stride", f.name)]]
                if stride.size and (stride.min() < 0 or stride.max() > self.tm):
                    raise damaged(f"row stride of field {f.name} of {c.name} out of range")
        lo = tiles.astype(np.int64) * self.tm
        hi = lo + self.tm
        for f, addr, extent in X.field_extents(c, table):
            es = cir.ELEM_BYTES[f.dtype]
            outside = (addr < lo) | (addr > hi)
            outside |= ~outside & ((addr % es != 0) | (np.where(outside, 0, addr) + extent > hi))
            if outside.any():
                v = int(np.argmax(outside))
                raise ArtifactError(
                    f"damaged .popx file (field {f.name} of vertex {v} ({c.name}) in compute set {cs!r} "
                    f"reaches outside its tile {int(tiles[v])}'s memory)")

    def copy_table(self, cj) -> X.CopyTable:
        cj = _dict(cj, "a copy table", ("src", "dst", "nbytes", "cycles", "exchange_bytes", "local_bytes"))
        src = self.array(cj["src"], np.int64, 1)
        dst = self.array(cj["dst"], np.int64, 1, rows=src.size)
        nbytes = self.array(cj["nbytes"], np.int64, 1, rows=src.size)
        tm = self.tm
        if src.size:
            # Bounded one by one before any sum: then each run's end is < 2^42.
            if nbytes.min() < 1 or nbytes.max() > tm or min(src.min(), dst.min()) < 0 \
                    or max(src.max(), dst.max()) >= self.memsize:
                raise damaged("a copy reaches outside the target's memory")
            if ((src % tm + nbytes > tm) | (dst % tm + nbytes > tm)).any():
                raise damaged("a copy run crosses the end of a tile's memory")
        cycles = _int(cj["cycles"], 0, _BIG, "copy cycles")
        if src.size and cycles < self.target.sync_cycles:
            raise damaged("copy cycles below the sync they include")
        return X.CopyTable(src, dst, nbytes, cycles=cycles,
                           exchange_bytes=_int(cj["exchange_bytes"], 0, _BIG, "exchange bytes"),
                           local_bytes=_int(cj["local_bytes"], 0, _BIG, "on-tile bytes"))

    def prog(self, p, ncs: int, ncopies: int, reads: list) -> X.PSeq:
        def cond(v) -> int:
            r = _index(v, len(reads), "a condition")
            if reads[r].dtype != "bool" or reads[r].addrs.size != 1:
                raise damaged("a condition is not one bool")
            return r

        def rec(p):
            p = _dict(p, "a program node")
            if "seq" in p:
                return X.PSeq(tuple(rec(n) for n in _list(p["seq"], "a sequence")))
            if "execute" in p:
                return X.PExecute(_index(p["execute"], ncs, "a compute set reference"))
            if "copy" in p:
                return X.PCopy(_index(p["copy"], ncopies, "a copy reference"))
            if "repeat" in p:
                return X.PRepeat(_int(p["repeat"], 0, _BIG, "a repeat count"), seq(p["body"]))
            if "while" in p:
                return X.PWhile(cond(p["while"]), seq(p["body"]))
            if "if" in p:
                return X.PIf(cond(p["if"]), seq(p["then"]), seq(p["else"]))
            if "print" in p:
                return X.PPrint(_index(p["print"], len(reads), "a read reference"))
            raise damaged("unknown program node")

        def seq(p) -> X.PSeq:
            out = rec(p)
            if not isinstance(out, X.PSeq):
                raise damaged("a program body is not a sequence")
            return out
        return seq(p)

    def memory(self, m) -> X.MemoryPlan:
        keys = MEMORY_ARRAYS + ("timeline_labels",)
        m = _dict(m, "the memory plan", keys + ("timeline_categories",) if isinstance(m, dict)
                  and "timeline_categories" in m else keys)
        tiles = self.target.tiles
        arrays = {k: self.array(m[k], np.int64, 1, rows=None if k == "timeline" else tiles)
                  for k in MEMORY_ARRAYS}
        if any(a.size and (a.min() < 0 or a.max() > 1 << 40) for a in arrays.values()):
            raise damaged("memory figures out of range")
        labels = [_str(x, "a timeline label") for x in _list(m["timeline_labels"], "timeline labels")]
        if len(labels) < arrays["timeline"].size:
            raise damaged("the timeline has points without labels")
        # Live bytes over the timeline by category (files from before them have none).
        cats = _dict(m.get("timeline_categories", {}), "the timeline's categories")
        if not set(cats) <= set(X.CATEGORIES):
            raise damaged("the timeline's categories are not memory categories")
        cats = {k: self.array(v, np.int64, 1, rows=arrays["timeline"].size) for k, v in cats.items()}
        if any(a.size and (a.min() < 0 or a.max() > 1 << 50) for a in cats.values()):
            raise damaged("memory figures out of range")
        return X.MemoryPlan(**arrays, timeline_labels=labels, timeline_categories=cats)

    @staticmethod
    def op(op, ncs: int) -> dict:
        op = _dict(op, "an op", ("op", "phase", "name", "shape", "dtype", "node", "vertices", "tiles", "source",
                                 "flops", "compute_sets", "function", "calls"))
        if op["phase"] not in PHASES:
            raise damaged(f"an op's phase is not one of {', '.join(PHASES)}")
        return {"op": _str(op["op"], "an op's operation"), "phase": op["phase"], "name": _str(op["name"], "an op's name"),
                "shape": [_int(x, 0, _I32, "an op's dimension") for x in _list(op["shape"], "an op's shape")],
                "dtype": _str(op["dtype"], "an op's dtype"), "node": _int(op["node"], 0, _I32, "an op's node"),
                "vertices": _int(op["vertices"], 0, _BIG, "an op's vertex count"),
                "tiles": _int(op["tiles"], 0, MAX_TILES, "an op's tile count"),
                "source": _str(op["source"], "an op's source"),
                "flops": _int(op["flops"], 0, 1 << 62, "an op's FLOPs"),
                "function": _str(op["function"], "an op's function"),
                "calls": _int(op["calls"], 1, _BIG, "an op's calls"),
                "compute_sets": [_index(i, ncs, "an op's compute set")
                                 for i in _list(op["compute_sets"], "an op's compute sets")]}


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
        elif isinstance(node, cir.Amp):
            new["checked"] = True           # its corners are never proven: always checked
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
