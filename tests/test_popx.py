"""`.popx` files: save → load → run is the identity, builds are reproducible, and a
damaged or hostile file is an error (exit 1), never a crash, a hang or exit 70.

Native code runs in a subprocess wherever a bad file could have made it touch memory
it does not own: a segfault there is a failed test, not a dead test run.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import popdsl
from popdsl import cli
from test_cli import SCALE, _members, _tampered, _write_zip
from test_golden import golden_files, parse_golden

ROOT = Path(__file__).resolve().parent.parent
# Compiled by their own tests: seconds and gigabytes each.
BIG = ("resnet50.pop", "resnet50_train.pop", "alexnet_train.pop")
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.pop") if p.name not in BIG)
RUNNING_GOLDEN = [g for g in map(parse_golden, golden_files())
                  if g.command == "run" and not g.errors and not g.file_errors]

# Rows of a wider matrix: a 2-D field with a row stride, on two tiles, and a copy.
STRIDED = """\
import "popops";
graph g(tiles = 2) {
    var A: f32[8, 16] = uniform(seed = 1);
    var x: f32[8] = uniform(seed = 2);
    var y: f32[8];
    map x -> tile 1;
    for t in 0..2 { map A[4*t : 4*t+4, :] -> tile t; map y[4*t : 4*t+4] -> tile t; }
    compute mv {
        for v in 0..4 { MatVecRows(a = A[2*v : 2*v+2, 4:12], x = x, y = y[2*v : 2*v+2]) on tile v / 2; }
    }
    program { execute mv; repeat 2 { execute mv; } print y; }
    output y;
}
"""


def popc(*argv) -> tuple[int, str, str]:
    import contextlib
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()


def _feeds(popx: Path, tmp_path: Path) -> list[str]:
    exe = popdsl.load(popx)
    if not exe.inputs:
        return []
    rng = np.random.default_rng(0)
    data = {n: (rng.integers(0, 10, s).astype(np.int32) if d == "i32" else
                rng.standard_normal(s).astype(np.float16 if d == "f16" else np.float32))
            for n, (d, s) in exe.inputs.items()}
    np.savez(tmp_path / "feeds.npz", **data)
    return ["--data", tmp_path / "feeds.npz"]


def _same_run(source: Path, args: list[str], tmp_path: Path) -> None:
    popx = tmp_path / "built.popx"
    run_only = {"--steps", "--epochs"}          # flags of `run` with a value, not of `build`
    build_args = [a for i, a in enumerate(args) if a not in run_only and (i == 0 or args[i - 1] not in run_only)]
    code, _, err = popc("build", source, *build_args, "-o", popx)
    assert code == 0, err
    feeds = _feeds(popx, tmp_path)
    runs = []
    compile_only = {"--graph", "--tiles", "--tile-memory", "--target"}    # a .popx was compiled with them
    popx_args = [a for i, a in enumerate(args) if a not in compile_only and (i == 0 or args[i - 1] not in compile_only)]
    for what in (source, popx):
        out_npz = tmp_path / f"out-{what.suffix[1:]}.npz"
        code, out, err = popc("run", what, *(args if what == source else popx_args), *feeds, "--cycles",
                              "--save", out_npz)
        assert code == 0, err
        with np.load(out_npz) as z:
            runs.append((out, {k: z[k] for k in z.files}))
    (text_pop, out_pop), (text_popx, out_popx) = runs
    assert text_popx == text_pop                  # prints and the cycle estimate
    assert out_popx.keys() == out_pop.keys()
    for k in out_pop:
        assert out_popx[k].dtype == out_pop[k].dtype and out_popx[k].shape == out_pop[k].shape, k
        np.testing.assert_array_equal(out_popx[k], out_pop[k])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_built_saved_loaded_runs_as_compiled(path, tmp_path):
    _same_run(path, [], tmp_path)


@pytest.mark.parametrize("g", RUNNING_GOLDEN, ids=lambda g: f"{g.path.parent.name}/{g.path.name}")
def test_golden_built_saved_loaded_runs_as_compiled(g, tmp_path):
    _same_run(g.path, g.args, tmp_path)


def test_scalar_initial_values_round_trip(tmp_path):
    """0-d tensors (`var k: i32 = 5;`) load with their shape."""
    src = tmp_path / "k.pop"
    src.write_text("graph g(tiles = 1) { var k: i32 = 5; var b: bool = true; var f: f32[2] = 1.5;\n"
                   "    map k -> tile 0; map b -> tile 0; map f -> tile 0;\n"
                   "    program { print k; print b; print f; } }\n")
    exe = popdsl.compile(src)
    exe.save(tmp_path / "k.popx")
    back = popdsl.load(tmp_path / "k.popx")
    assert [a.shape for a in back.ir.init.values()] == [(), (), (2,)]
    assert popc("run", tmp_path / "k.popx")[1] == "k: 5\nb: true\nf: [1.5 1.5]\n"


def test_every_vertex_and_copy_of_the_examples_stays_in_its_tile():
    """What the loader demands of a file, the compiler gives (checked directly,
    not only through a successful load)."""
    from popdsl.ir.executable import field_extents
    for path in EXAMPLES:
        exe = popdsl.compile(path).ir
        tm = exe.target.tile_memory
        for cs in exe.compute_sets:
            for g in cs.groups:
                lo = g.tiles.astype(np.int64) * tm
                for _, addr, extent in field_extents(exe.codelets[g.codelet], g.table):
                    assert ((addr >= lo) & (addr + extent <= lo + tm)).all(), (path.name, cs.name)
            for c in (cs.pre, cs.post):
                assert (c.src // tm == (c.src + c.nbytes - 1) // tm).all()
                assert (c.dst // tm == (c.dst + c.nbytes - 1) // tm).all()


# ---------------------------------------------------------------- reproducible, atomic

def _build_in_subprocess(source: Path, out: Path, seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "popdsl", "build", str(source), "-o", str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["mlp.pop", "newton.pop"])
def test_two_builds_are_byte_identical(name, tmp_path):
    """Different processes (hash seeds), different times: the same bytes."""
    a, b = tmp_path / "a.popx", tmp_path / "b.popx"
    src = tmp_path / name
    src.write_text((ROOT / "examples" / name).read_text())
    _build_in_subprocess(src, a, "1")
    os.utime(src, (1e9, 1e9))                   # another mtime changes nothing either
    _build_in_subprocess(src, b, "2")
    assert a.read_bytes() == b.read_bytes()


def test_build_at_another_time_is_byte_identical(tmp_path, monkeypatch):
    import time
    src = tmp_path / "s.pop"
    src.write_text(SCALE)
    assert popc("build", src, "-o", tmp_path / "a.popx")[0] == 0
    later = time.time() + 86400 * 400
    monkeypatch.setattr(time, "time", lambda: later)
    assert popc("build", src, "-o", tmp_path / "b.popx")[0] == 0
    assert (tmp_path / "a.popx").read_bytes() == (tmp_path / "b.popx").read_bytes()


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_output_files_follow_the_umask(tmp_path, mask):
    src = tmp_path / "s.pop"
    src.write_text(SCALE)
    old = os.umask(mask)
    try:
        assert popc("build", src, "-o", tmp_path / "s.popx")[0] == 0
        assert popc("run", tmp_path / "s.popx", "--save", tmp_path / "o.npz")[0] == 0
    finally:
        os.umask(old)
    for f in ("s.popx", "o.npz"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_killed_build_leaves_no_file(tmp_path):
    """SIGKILL in the middle of writing the .popx: no output, no hidden temp file."""
    src = tmp_path / "s.pop"
    src.write_text(SCALE)
    script = (
        "import os, signal, sys, numpy as np\n"
        "from popdsl import cli\n"
        "real = np.lib.format.write_array\n"
        "calls = []\n"
        "def dying(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "np.lib.format.write_array = dying\n"
        "cli.main(['build', sys.argv[1], '-o', sys.argv[2]])\n")
    r = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "s.popx")],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pop"]


@pytest.mark.parametrize("flag", ["-o", "--save", "--save-params"])
def test_empty_output_name_is_an_error(tmp_path, flag):
    src = tmp_path / "s.pop"
    src.write_text(SCALE)
    code, _, err = popc("build" if flag == "-o" else "run", src, flag, "")
    assert code == 2 and f"{flag} needs a file name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pop"]


def test_model_too_big_for_the_host_is_a_clean_error(tmp_path, monkeypatch):
    """A valid file whose tiles x used bytes the host cannot allocate."""
    from popdsl.runtime import simulator

    def no_memory(n):
        raise MemoryError
    monkeypatch.setattr(simulator, "aligned_zeros", no_memory)
    src = tmp_path / "s.pop"
    src.write_text(SCALE)
    code, _, err = popc("run", src)
    assert code == 1 and "this machine could not allocate them" in err


def test_build_will_not_overwrite_its_source(tmp_path):
    src = tmp_path / "s.pop"
    src.write_text(SCALE)
    code, _, err = popc("build", src, "-o", src)
    assert code == 2 and "would overwrite the source" in err
    assert src.read_text() == SCALE


# ---------------------------------------------------------------- hostile files

_RUNNER = """\
import contextlib, io, signal, sys
from popdsl import cli
class Slow(BaseException): pass
def alarm(*_): raise Slow
signal.signal(signal.SIGALRM, alarm)
for path in sys.argv[1:]:
    out, err = io.StringIO(), io.StringIO()
    signal.alarm(5)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["run", path, "--cycles", "--max-cycles", "10000000"])
    except Slow:
        code = "slow"
    finally:
        signal.alarm(0)
    first = (err.getvalue().splitlines() or [""])[0]
    print(path, code, first[:300], sep="\\t", flush=True)
"""


def run_isolated(paths: list[Path]) -> dict[str, tuple[str, str]]:
    """`popc run` on each file in one subprocess; {path: (exit code, first error
    line)}.  Fails, naming the file, if the subprocess dies of a signal."""
    r = subprocess.run([sys.executable, "-c", _RUNNER, *map(str, paths)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    got = {}
    for line in r.stdout.splitlines():
        path, code, first = line.split("\t")
        got[path] = (code, first)
    if r.returncode != 0:
        dead = next((str(p) for p in paths if str(p) not in got), "?")
        pytest.fail(f"popc died (exit {r.returncode}) on {dead}\n{r.stderr[-3000:]}")
    return got


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Built .popx files of three small programs: a 1-D codelet with copies, a
    strided 2-D field, a device while loop with scalars."""
    d = tmp_path_factory.mktemp("popx")
    out = {}
    for name, text in (("scale", SCALE), ("strided", STRIDED),
                       ("newton", (ROOT / "examples" / "newton.pop").read_text())):
        src = d / f"{name}.pop"
        src.write_text(text)
        code, _, err = popc("build", src, "--tiles", "4" if name != "newton" else "16", "-o", d / f"{name}.popx")
        assert code == 0, err
        out[name] = d / f"{name}.popx"
    return out


def _edit(built: Path, tmp_path: Path, name: str, edit_doc=None, edit_arrays=None) -> Path:
    p = _tampered(built, tmp_path, edit_doc, edit_arrays)
    return p.rename(tmp_path / f"{name}.popx")


def _group(doc, codelet):
    return next(g for cs in doc["compute_sets"] for g in cs["groups"] if g["codelet"] == codelet)


def _col(doc, codelet, kind, field):
    from popdsl.ir import codelet as cir
    c = cir.from_json(next(c for c in doc["codelets"] if c["name"] == codelet))
    return [(k.kind, k.name) for k in cir.table_layout(c)].index((kind, field))


def test_overflowing_addresses_strides_and_copies_are_refused(sources, tmp_path):
    """The exact files of the issue: sums that wrapped in int64 passed the old check
    and the native vertex wrote far outside the simulator's memory (SIGSEGV)."""
    cases = {}

    def table_value(kind, field, value, row=0):
        def edit(doc, arrays):
            arrays[_group(doc, "MatVecRows")["table"]][row, _col(doc, "MatVecRows", kind, field)] = value
        return edit
    for name, (kind, field, value) in {
            "addr": ("addr", "a", 2**63 - 8), "addr_y": ("addr", "y", 2**63 - 8),
            "stride": ("stride", "a", 2**61 + 1), "stride_neg": ("stride", "a", -(2**62)),
            "sym": ("sym", "n", 2**62), "addr_other_tile": ("addr", "a", 700_000)}.items():
        cases[name] = _edit(sources["strided"], tmp_path, name, edit_arrays=table_value(kind, field, value))

    def copy_overflow(doc, arrays):
        c = next(c for cs in doc["compute_sets"] for c in (cs["pre"], cs["post"]) if c["nbytes"]) \
            if not doc["copies"] else doc["copies"][0]
        arrays[c["src"]][0], arrays[c["nbytes"]][0] = 2**63 - 100, 200
    cases["copy"] = _edit(sources["scale"], tmp_path, "copy", edit_arrays=copy_overflow)

    def copy_crosses_tile(doc, arrays):
        c = doc["copies"][0]
        tm = doc["target"]["tile_memory"]
        arrays[c["dst"]][0], arrays[c["nbytes"]][0] = tm - 4, 64
    cases["copy_cross"] = _edit(sources["scale"], tmp_path, "copy_cross", edit_arrays=copy_crosses_tile)
    got = run_isolated(list(cases.values()))
    for name, path in cases.items():
        code, first = got[str(path)]
        assert code == "1" and "damaged .popx file" in first, (name, first)
    assert "reaches outside its tile 0's memory" in got[str(cases["addr_other_tile"])][1]
    assert "crosses the end of a tile" in got[str(cases["copy_cross"])][1]


@pytest.mark.parametrize("field, value, message", [
    ("tiles", 65536, "tile count"), ("tile_memory", 1 << 28, "tile memory"),
    ("tile_memory", 1030, "multiple of 64"), ("clock_hz", 0, "clock"), ("clock_hz", float("nan"), "clock"),
    ("clock_hz", float("inf"), "clock"), ("clock_hz", True, "clock"), ("sync_cycles", -1, "sync cycles"),
    ("workers", 0, "workers"), ("exchange_bytes_per_cycle", 0, "exchange bytes"), ("name", 7, "name"),
])
def test_implausible_targets_are_refused(sources, tmp_path, field, value, message):
    p = _tampered(sources["scale"], tmp_path, lambda d: d["target"].update({field: value}))
    code, _, err = popc("run", p, "--cycles")
    assert code == 1 and "damaged .popx file" in err and message in err, err


def _flip_inside_deflate(data: bytes, member: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo(member)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    b = bytearray(data)
    for k in range(info.compress_size // 3, info.compress_size // 3 + 8):
        b[start + k] ^= 0x5A
    return bytes(b)


@pytest.mark.parametrize("member", ["popx.json", "a0.npy"])
def test_corrupt_deflate_stream_is_a_clean_error(sources, tmp_path, member):
    p = tmp_path / "flip.popx"
    p.write_bytes(_flip_inside_deflate(sources["strided"].read_bytes(), member))
    code, _, err = popc("run", p)
    assert code == 1 and "damaged .popx file" in err, err


@pytest.mark.parametrize("method", [1, 14, 99])
def test_unsupported_zip_method_is_a_clean_error(sources, tmp_path, method):
    """Compression methods zipfile does not implement (shrink, LZMA variants, unknown)."""
    b = bytearray(sources["scale"].read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(b))) as z:
        infos = z.infolist()
    for info in infos:                      # local headers and the central directory
        b[info.header_offset + 8:info.header_offset + 10] = method.to_bytes(2, "little")
    cd = bytes(b).find(b"PK\x01\x02")
    while cd >= 0:
        b[cd + 10:cd + 12] = method.to_bytes(2, "little")
        cd = bytes(b).find(b"PK\x01\x02", cd + 4)
    p = tmp_path / "method.popx"
    p.write_bytes(bytes(b))
    code, _, err = popc("run", p)
    assert code == 1 and ("damaged .popx file" in err or "not a popdsl executable" in err), err


def test_oversized_members_are_refused_before_inflating(sources, tmp_path, monkeypatch):
    from popdsl import artifact_load
    monkeypatch.setattr(artifact_load, "MAX_ARRAY_BYTES", 1000)
    code, _, err = popc("run", sources["scale"])
    assert code == 1 and "arrays larger than 1,000 bytes" in err
    monkeypatch.setattr(artifact_load, "MAX_JSON_BYTES", 1000)
    monkeypatch.setattr(artifact_load, "MAX_ARRAY_BYTES", 1 << 32)
    code, _, err = popc("run", sources["scale"])
    assert code == 1 and "popx.json is larger than 1,000 bytes" in err


def test_array_whose_header_lies_about_its_size_is_refused(sources, tmp_path):
    m = _members(sources["scale"])
    h = io.BytesIO()
    np.lib.format.write_array_header_1_0(h, {"descr": "<i8", "fortran_order": False, "shape": (1 << 40,)})
    m["a0.npy"] = h.getvalue() + m["a0.npy"][len(h.getvalue()):]
    code, _, err = popc("run", _write_zip(tmp_path / "lie.popx", m))
    assert code == 1 and "header promises" in err, err


def test_one_array_referenced_twice_is_refused(sources, tmp_path):
    def edit(doc):
        doc["tensors"][1]["runs"]["addrs"] = doc["tensors"][0]["runs"]["addrs"]
    code, _, err = popc("run", _tampered(sources["scale"], tmp_path, edit))
    assert code == 1 and "used twice" in err


def test_while_on_a_read_that_is_not_one_bool_is_refused(sources, tmp_path):
    def edit(doc):
        doc["program"]["seq"].insert(0, {"while": next(i for i, r in enumerate(doc["reads"]) if r["dtype"] != "bool"),
                                         "body": {"seq": []}})
    code, _, err = popc("run", _tampered(sources["newton"], tmp_path, edit))
    assert code == 1 and "a condition is not one bool" in err


def test_input_naming_another_tensor_is_refused(tmp_path):
    from test_cli import FEED
    src = tmp_path / "fed.pop"
    src.write_text(FEED)
    assert popc("build", src, "-o", tmp_path / "fed.popx")[0] == 0

    def edit(doc):
        doc["inputs"] = {"y": doc["inputs"]["x"]}
    code, _, err = popc("run", _tampered(tmp_path / "fed.popx", tmp_path, edit))
    assert code == 1 and "input 'y' refers to tensor 'x'" in err


# ---------------------------------------------------------------- fuzzing the loader

_VALUES = (0, -1, 1, 3, 63, 64, 2**31 - 1, 2**31, -2**31, 2**32, 2**61 + 1, 2**62, 2**63 - 8, 2**63 - 1,
           -2**63, 638_976, 2_555_904, 2_555_900, 10**12)
_FLOATS = (0.0, -1.0, 1e300, float("nan"), float("inf"), 0.5)


def _numbers(x, path=()):
    """Paths to every number in a JSON document."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, path + (i,))
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path


def _set(doc, path, value):
    for k in path[:-1]:
        doc = doc[k]
    doc[path[-1]] = value


def test_fuzzed_popx_files_exit_0_or_1(sources, tmp_path):
    """Truncations, byte flips and edits of every number in popx.json and of
    elements of every array, overflow values included: every one exits 0 or 1,
    none dies of a signal, none is an internal error or a hang."""
    rng = np.random.default_rng(9)
    files = []

    def emit(data: bytes) -> None:
        p = tmp_path / f"f{len(files)}.popx"
        p.write_bytes(data)
        files.append(p)

    for name, built in sources.items():
        data = built.read_bytes()
        m = _members(built)
        doc = json.loads(m["popx.json"])
        for _ in range(12):                                     # truncations
            emit(data[:int(rng.integers(0, len(data)))])
        for _ in range(40):                                     # byte flips anywhere
            b = bytearray(data)
            for k in rng.integers(0, len(b), int(rng.integers(1, 4))):
                b[k] ^= int(rng.integers(1, 256))
            emit(bytes(b))
        paths = [p for p in _numbers(doc) if p[0] != "codelets" or rng.random() < 0.1]
        for path in paths:                                      # every number of popx.json
            d = json.loads(m["popx.json"])
            pool = _FLOATS if path[-1] == "clock_hz" else _VALUES
            _set(d, path, pool[int(rng.integers(len(pool)))])
            emit(_zip_bytes({**m, "popx.json": json.dumps(d).encode()}))
        for member in sorted(k for k in m if k.endswith(".npy")):   # elements of every array
            a = np.load(io.BytesIO(m[member]))
            for _ in range(3 if a.size else 1):
                b2 = a.copy()
                if b2.size:
                    flat = b2.reshape(-1)
                    v = _VALUES[int(rng.integers(len(_VALUES)))]
                    flat[int(rng.integers(flat.size))] = np.array(v, np.int64).astype(b2.dtype)
                else:
                    b2 = np.zeros(3, a.dtype)
                buf = io.BytesIO()
                np.save(buf, b2)
                emit(_zip_bytes({**m, member: buf.getvalue()}))
    got = run_isolated(files)
    bad = {p: r for p, r in got.items() if r[0] not in ("0", "1", "slow")}
    assert not bad, bad
    assert sum(r[0] == "1" for r in got.values()) > len(files) // 2
    assert sum(r[0] == "slow" for r in got.values()) <= 3, [p for p, r in got.items() if r[0] == "slow"]


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for n, b in members.items():
            z.writestr(n, b)
    return buf.getvalue()


# ---------------------------------------------------------------- delta-coded arrays

def _loader_for(arrays: dict[str, np.ndarray]):
    """A Loader over a zip holding a minimal popx.json and these members."""
    from popdsl.artifact_load import MAGIC, VERSION, Loader
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("popx.json", json.dumps({"format": MAGIC, "version": VERSION}))
        for name, a in arrays.items():
            b = io.BytesIO()
            np.save(b, a)
            z.writestr(name + ".npy", b.getvalue())
    return Loader(zipfile.ZipFile(buf))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-2**63, 2**63 - 1), min_size=16, max_size=200),
       st.sampled_from([np.int64, np.int32, np.uint8]))
def test_integer_arrays_come_back_bit_for_bit(values, dtype):
    from popdsl.artifact import _Arrays
    info = np.iinfo(dtype)
    a = np.array([min(max(v, info.min), info.max) for v in values], dtype)
    A = _Arrays()
    ref = A.ref(a)
    assert ref.endswith(":d")              # long integer arrays are delta-coded
    got = _loader_for({"a0": A.items[0]}).array(ref, dtype)
    assert got.dtype == a.dtype and np.array_equal(got, a)


def test_tables_are_delta_coded_along_their_rows():
    from popdsl.artifact import _Arrays
    t = np.arange(64, dtype=np.int64).reshape(16, 4) * 1000
    A = _Arrays()
    ref = A.ref(t)
    assert A.items[0].dtype == np.int16     # steps of 4000 down the columns
    assert np.array_equal(_loader_for({"a0": A.items[0]}).array(ref, np.int64, ndim=2), t)


def test_forged_deltas_are_refused():
    from popdsl.artifact_load import ArtifactError
    big = np.full(16, 2**30, np.int64)      # sums beyond int32
    with pytest.raises(ArtifactError, match="beyond int32"):
        _loader_for({"a0": big}).array("a0:d", np.int32)
    with pytest.raises(ArtifactError, match="delta-coded but holds float32"):
        _loader_for({"a0": big}).array("a0:d", np.float32)
    with pytest.raises(ArtifactError, match="holds float64, expected deltas of int64"):
        _loader_for({"a0": np.zeros(16)}).array("a0:d", np.int64)
    with pytest.raises(ArtifactError, match="bad array reference"):
        _loader_for({"a0": big}).array("a0:x", np.int64)


def test_deltas_that_would_widen_past_the_limit_are_refused(monkeypatch):
    """int8 deltas become int64 values: eight times the bytes the member declares."""
    from popdsl import artifact_load
    from popdsl.artifact_load import ArtifactError
    loader = _loader_for({"a0": np.zeros(1 << 16, np.int8)})
    monkeypatch.setattr(artifact_load, "MAX_ARRAY_BYTES", 1 << 18)
    with pytest.raises(ArtifactError, match="arrays larger than"):
        loader.array("a0:d", np.int64)


# ---------------------------------------------------------------- parameters as recipes

def test_initializers_draw_the_same_bits_everywhere():
    """The values a .popx's recipes stand for, pinned: a numpy that drew other bits
    would load other weights than were built."""
    from popdsl.ir.initializers import Recipe, checksum
    assert checksum(Recipe("he_normal", 7, (64, 3, 7, 7), "f32").values()) == 3188237393
    assert checksum(Recipe("glorot_uniform", 7, (300, 200), "f32").values()) == 2151325521
    assert checksum(Recipe("he_normal", 7, (33,), "f16").values()) == 3027648035


def test_initializers_have_their_distributions():
    from popdsl.ir.initializers import Recipe
    w = Recipe("he_normal", 1, (256, 128, 3, 3), "f32").values().astype(np.float64)
    std = np.sqrt(2.0 / (128 * 9))
    assert abs(w.mean()) < 0.01 * std and abs(w.std() / std - 1) < 0.01
    assert np.abs(w).max() <= 2 * np.sqrt(3) * std * (1 + 1e-6)          # Irwin-Hall's bound
    lim = np.sqrt(6.0 / (300 + 200))
    u = Recipe("glorot_uniform", 3, (300, 200), "f32").values()
    np.testing.assert_array_equal(u, np.random.default_rng(3).uniform(-lim, lim, (300, 200)).astype(np.float32))


_PARAMS = """
import "popnn";
graph p(tiles = 4) {
    input x: f32[2, 8];
    output y = dense(x, 4);
}
"""


def test_parameters_are_stored_as_their_recipes(tmp_path):
    from popdsl import artifact
    exe = popdsl.compile(_PARAMS, tiles=4)
    path = tmp_path / "p.popx"
    exe.save(path)
    doc = json.loads(_members(path)["popx.json"])
    w = next(i for i, t in enumerate(doc["tensors"]) if t["name"].endswith("dense_1.w"))
    assert doc["init"][str(w)] == {"recipe": {"kind": "glorot_uniform", "seed": doc["init"][str(w)]["recipe"]["seed"]}}
    back = artifact.load(path)
    np.testing.assert_array_equal(back.init[w], exe.ir.init[w])
    # Held as the recipe, compiled and loaded alike: drawn when read, never kept.
    for init in (exe.ir.init, back.init):
        r = init.recipe(w)
        assert r is not None and init.spec(w) == ((8, 4), np.dtype(np.float32))
        np.testing.assert_array_equal(init[w], r.values())
        assert init[w] is not init[w]
    # Values that are no longer what the recipe drew are stored as values.
    exe.ir.init[w] = exe.ir.init[w] + 1
    exe.save(path)
    doc = json.loads(_members(path)["popx.json"])
    assert isinstance(doc["init"][str(w)], str)
    assert exe.ir.init.recipe(w) is None
    np.testing.assert_array_equal(artifact.load(path).init[w], exe.ir.init[w])


@pytest.mark.parametrize("recipe, message", [
    ({"kind": "lecun", "seed": 1}, "not an initializer popdsl writes"),
    ({"kind": "he_normal", "seed": -1}, "not an initializer popdsl writes"),
    ({"kind": "he_normal", "seed": 1.5}, "not an initializer popdsl writes"),
    ({"kind": "he_normal"}, "not an initializer popdsl writes"),
])
def test_forged_recipes_are_refused(tmp_path, recipe, message):
    exe = popdsl.compile(_PARAMS, tiles=4)
    path = tmp_path / "p.popx"
    exe.save(path)

    def edit(doc):
        k = next(k for k, v in doc["init"].items() if isinstance(v, dict))
        doc["init"][k] = {"recipe": recipe}
    bad = _tampered(path, tmp_path, edit)
    code, _, err = popc("run", bad, "--feed", "x=" + str(tmp_path / "nothing.npy"))
    assert code == 1 and message in err, err


def test_compiler_out_of_host_memory_is_a_clean_error(tmp_path, monkeypatch):
    """A compile the host cannot hold (ResNet-50 at batch 16 under a 20 GB limit
    ended in 'internal compiler error: MemoryError')."""
    from popdsl.passes import lower

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 9.59 MiB")
    monkeypatch.setattr(lower, "lower", no_memory)
    monkeypatch.setattr("popdsl.pipeline.lower", no_memory)
    src = tmp_path / "s.pop"
    src.write_text(SCALE)
    code, _, err = popc("build", src, "--no-cache", "-o", tmp_path / "s.popx")
    assert code == 1 and "this machine ran out of memory" in err and "internal" not in err, err
    assert not (tmp_path / "s.popx").exists()
