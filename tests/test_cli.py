"""`popc` as a user meets it (README: "CLI reference"): exit codes 0 ok, 1 an error in the user's
program, data or files, 2 command-line usage, 70 an internal compiler error; clear
messages and never a Python traceback, whatever the input — including damaged,
truncated or hostile `.popx` files.

The CLI runs in-process (`popdsl.cli.main`), capturing stdout and stderr.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from popdsl import cli
from popdsl.pipeline import STAGE_NAMES as STAGES

ROOT = Path(__file__).resolve().parent.parent

SCALE = """\
codelet Scale(inout x: f32[n], k: f32) {
    for i in 0..n { x[i] = x[i] * k; }
}
graph g(tiles = 4) {
    var v: f32[8] = [1, 2, 3, 4, 5, 6, 7, 8];
    var w: f32[8];
    map v -> linear;
    for t in 0..4 { map w[2*t : 2*t+2] -> tile 3 - t; }
    compute scale {
        for t in 0..4 { Scale(x = v[2*t : 2*t+2], k = 10.0) on tile t; }
    }
    program {
        execute scale;
        copy v -> w;
        print v;
        print w;
    }
}
"""
SCALE_OUT = ["v: [10 20 30 40 50 60 70 80]", "w: [10 20 30 40 50 60 70 80]"]

# A graph with a host input and two outputs.
FEED = """\
codelet AddK(in x: f32[n], out y: f32[n], k: f32) {
    for i in 0..n { y[i] = x[i] + k; }
}
graph fed(tiles = 2) {
    input x: f32[4];
    var y: f32[4];
    map x -> linear;
    map y -> linear;
    compute add { AddK(x = x[0:2], y = y[0:2], k = 1.0) on tile 0;
                  AddK(x = x[2:4], y = y[2:4], k = 1.0) on tile 1; }
    output y;
    output x as echo;
}
"""

BAD = """\
codelet A(inout x: f32[n]) {
    x[0] = nope;
}
graph g(tiles = 2) { }
"""


@pytest.fixture
def popc(capsys):
    """popc(*argv) -> (exit code, stdout, stderr); asserts no traceback ever."""
    def run(*argv):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:             # main() itself returns; this is a bug
            pytest.fail(f"popc {' '.join(map(str, argv))} raised SystemExit({e.code})")
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, err
        return code, out, err
    return run


@pytest.fixture
def src(tmp_path):
    def write(text: str, name: str = "prog.pop") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p
    return write


@pytest.fixture
def built(tmp_path, popc, src):
    """A real .popx of SCALE."""
    out = tmp_path / "scale.popx"
    code, _, err = popc("build", src(SCALE, "scale.pop"), "-o", out)
    assert code == 0, err
    return out


# ---------------------------------------------------------------- usage: exit 2

@pytest.mark.parametrize("argv, message", [
    ([], "a command is required"),
    (["check", "x.pop", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["run", "x.pop", "--steps", "0"], "expected a positive integer, got 0"),
    (["run", "x.pop", "--steps", "-3"], "expected a positive integer"),
    (["check", "x.pop", "--tiles", "abc"], "expected an integer, got 'abc'"),
    (["check", "x.pop", "--tile-memory", "1.5"], "expected an integer"),
    (["dump", "x.pop"], "the following arguments are required: --after"),
    (["dump", "x.pop", "--after", "nosuch"], "invalid choice"),
    (["check"], "the following arguments are required: FILE"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_usage_errors_exit_2(popc, argv, message):
    code, out, err = popc(*argv)
    assert code == 2
    assert message in err
    assert "usage: popc" in err


@pytest.mark.parametrize("flags, message", [
    (["--target", "gc9000"], "unknown target 'gc9000' (known: gc200, gc2)"),
    (["--tiles", "100000"], "--tiles must be between 1 and"),
    (["--tile-memory", "100"], "--tile-memory must be between"),
    (["--tile-memory", "2000"], "--tile-memory must be a multiple of 64 bytes"),
])
def test_bad_target_options_exit_2(popc, src, flags, message):
    code, out, err = popc("check", src(SCALE), *flags)
    assert code == 2
    assert f"popc: error: {message}" in err


def test_version_and_help_exit_0(popc):
    code, out, _ = popc("--version")
    assert code == 0 and out.startswith("popc ")
    code, out, _ = popc("--help")
    assert code == 0 and "build" in out and "dump" in out


# ---------------------------------------------------------------- files: exit 1

def test_missing_file(popc, tmp_path):
    code, _, err = popc("check", tmp_path / "nosuch.pop")
    assert code == 1
    assert "no such file" in err


def test_directory(popc, tmp_path):
    code, _, err = popc("check", tmp_path)
    assert code == 1
    assert "it is a directory" in err


def test_not_utf8(popc, tmp_path):
    p = tmp_path / "latin1.pop"
    p.write_bytes("// caf\xe9\ngraph g(tiles = 1) { }\n".encode("latin-1"))
    code, _, err = popc("check", p)
    assert code == 1
    assert "not UTF-8 text" in err


def test_utf8_with_bom_and_crlf(popc, tmp_path):
    """Windows-made files: a byte-order mark and CRLF line ends."""
    p = tmp_path / "win.pop"
    p.write_bytes(b"\xef\xbb\xbf" + SCALE.replace("\n", "\r\n").encode())
    code, out, err = popc("run", p)
    assert code == 0, err
    assert out.splitlines() == SCALE_OUT


def test_shorthand_builds(popc, src, tmp_path):
    """`popc FILE.pop` is `popc build FILE.pop`."""
    p = src(SCALE)
    code, out, err = popc(p)
    assert code == 0, err
    assert (tmp_path / "prog.popx").exists()
    assert out.strip() == f"wrote {tmp_path / 'prog.popx'}"


def test_pop_commands_refuse_popx(popc, built):
    for cmd in (["check"], ["dump", "--after", "parse"], ["build"]):
        code, _, err = popc(*cmd, built)
        assert code == 1
        assert "is already compiled" in err


def test_run_unknown_extension_is_compiled_as_source(popc, tmp_path):
    p = tmp_path / "prog.txt"
    p.write_text(SCALE)
    code, out, err = popc("run", p)
    assert code == 0, err
    assert out.splitlines() == SCALE_OUT


# ---------------------------------------------------------------- build

def test_build_then_run_popx(popc, built):
    code, out, err = popc("run", built)
    assert code == 0, err
    assert out.splitlines() == SCALE_OUT


def test_cycles_print_every_constant_of_the_model_with_its_source(popc, built):
    from popdsl.ir.cost import constants
    from popdsl.ir.target import get_target
    code, out, err = popc("run", built, "--cycles")
    assert code == 0, err
    listed = out[out.index("constants (name = value: what; source):"):].splitlines()[1:]
    table = constants(get_target("gc200"))
    assert len(listed) == len(table) >= 15
    for line, (name, _value, _what, source) in zip(listed, table):
        assert line.startswith(f"    - {name} = ") and line.endswith(source)
        assert source and ("assumed" in source or any(w in source for w in ("poplibs", "Jia", "Graphcore", "Poplar")))


def test_failed_build_writes_nothing(popc, src, tmp_path):
    p = src(BAD, "bad.pop")
    before = set(tmp_path.iterdir())
    code, out, err = popc("build", p, "-o", tmp_path / "bad.popx")
    assert code == 1
    assert "unknown name 'nope'" in err
    assert set(tmp_path.iterdir()) == before          # no output, no temporary file
    code, _, _ = popc("build", p)                      # default output name too
    assert code == 1
    assert set(tmp_path.iterdir()) == before


def test_failed_build_keeps_old_output(popc, src, tmp_path):
    """A failing build does not clobber the .popx a good build wrote before."""
    out = tmp_path / "prog.popx"
    assert popc("build", src(SCALE), "-o", out)[0] == 0
    good = out.read_bytes()
    assert popc("build", src(BAD), "-o", out)[0] == 1
    assert out.read_bytes() == good


def test_build_to_unwritable_place(popc, src, tmp_path):
    code, _, err = popc("build", src(SCALE), "-o", tmp_path / "no" / "such" / "dir" / "x.popx")
    assert code == 1
    assert "cannot write" in err


def test_build_onto_a_directory(popc, src, tmp_path):
    d = tmp_path / "out.popx"
    d.mkdir()
    code, _, err = popc("build", src(SCALE), "-o", d)
    assert code == 1
    assert "cannot write" in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_check_writes_nothing(popc, src, tmp_path):
    p = src(SCALE)
    before = set(tmp_path.iterdir())
    code, out, _ = popc("check", p)
    assert code == 0
    assert "ok (graph 'g'" in out
    assert set(tmp_path.iterdir()) == before


# ---------------------------------------------------------------- damaged .popx

def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return path


def _tampered(built: Path, tmp_path: Path, edit_doc=None, edit_arrays=None) -> Path:
    """A copy of `built` with popx.json and/or its arrays changed."""
    m = _members(built)
    doc = json.loads(m["popx.json"])
    if edit_doc:
        edit_doc(doc)
    m["popx.json"] = json.dumps(doc).encode()
    if edit_arrays:
        # Arrays are keyed by their refs in popx.json; delta-coded ones ("aN:d") are
        # shown as their values and coded again (as int64 deltas) after the edit.
        coded = set(re.findall(r'"(a[0-9]+):d"', m["popx.json"].decode()))
        arrays = {}
        for n, b in m.items():
            if n.endswith(".npy"):
                a = np.load(io.BytesIO(b))
                arrays[n[:-4] + ":d" if n[:-4] in coded else n[:-4]] = \
                    np.cumsum(a, axis=0, dtype=np.int64) if n[:-4] in coded else a
        edit_arrays(doc, arrays)
        for name, a in arrays.items():
            if name.endswith(":d"):
                name, a = name[:-2], np.diff(a.astype(np.int64), axis=0, prepend=np.zeros((1,) + a.shape[1:], np.int64))
            buf = io.BytesIO()
            np.save(buf, a)
            m[name + ".npy"] = buf.getvalue()
    return _write_zip(tmp_path / "tampered.popx", m)


def _run_popx(popc, path) -> str:
    code, out, err = popc("run", path)
    assert code == 1, (code, out, err)
    assert f"{path}: error: " in err
    assert "internal" not in err
    return err


def test_popx_random_bytes(popc, tmp_path):
    p = tmp_path / "noise.popx"
    p.write_bytes(np.random.default_rng(1).bytes(2000))
    assert "not a popdsl executable" in _run_popx(popc, p)


def test_popx_empty(popc, tmp_path):
    p = tmp_path / "empty.popx"
    p.write_bytes(b"")
    assert "not a popdsl executable" in _run_popx(popc, p)


def test_popx_missing(popc, tmp_path):
    code, _, err = popc("run", tmp_path / "nosuch.popx")
    assert code == 1 and "no such file" in err


def test_popx_is_a_directory(popc, tmp_path):
    d = tmp_path / "dir.popx"
    d.mkdir()
    code, _, err = popc("run", d)
    assert code == 1 and "directory" in err


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_popx_truncated(popc, built, tmp_path, keep):
    data = built.read_bytes()
    p = tmp_path / "cut.popx"
    p.write_bytes(data[:int(len(data) * keep)])
    assert "not a popdsl executable" in _run_popx(popc, p)


def test_popx_zip_without_manifest(popc, tmp_path):
    p = _write_zip(tmp_path / "other.popx", {"hello.txt": b"hi"})
    assert "no popx.json" in _run_popx(popc, p)


def test_popx_foreign_json(popc, tmp_path):
    p = _write_zip(tmp_path / "other.popx", {"popx.json": b'{"format": "something-else"}'})
    assert "not a popdsl executable" in _run_popx(popc, p)
    p = _write_zip(tmp_path / "list.popx", {"popx.json": b"[1, 2, 3]"})
    assert "not a popdsl executable" in _run_popx(popc, p)
    p = _write_zip(tmp_path / "junk.popx", {"popx.json": b"\xff\xfe{{{"})
    assert "not valid JSON" in _run_popx(popc, p)


def test_popx_future_version(popc, built, tmp_path):
    def edit(doc):
        doc["version"] = 99
    err = _run_popx(popc, _tampered(built, tmp_path, edit))
    assert ".popx version 99" in err and "rebuild it with 'popc build'" in err


def test_popx_table_address_out_of_range(popc, built, tmp_path):
    def edit(doc, arrays):
        ref = doc["compute_sets"][0]["groups"][0]["table"]
        arrays[ref][0, 0] = doc["target"]["tiles"] * doc["target"]["tile_memory"]
    err = _run_popx(popc, _tampered(built, tmp_path, edit_arrays=edit))
    assert "field x of vertex 0 (Scale) in compute set 'scale' reaches outside its tile 0's memory" in err


def test_popx_negative_address(popc, built, tmp_path):
    def edit(doc, arrays):
        arrays[doc["tensors"][0]["runs"]["addrs"]][0] = -4
    assert "a run of tensor 'v' lies outside the target's memory" in \
        _run_popx(popc, _tampered(built, tmp_path, edit_arrays=edit))


def test_popx_run_across_a_tile_end(popc, built, tmp_path):
    def edit(doc, arrays):
        runs = doc["tensors"][0]["runs"]
        arrays[runs["addrs"]][0] = doc["target"]["tile_memory"] - 4   # more than one element: over the end
    assert "a run of tensor 'v' lies outside the target's memory or across a tile's end" in \
        _run_popx(popc, _tampered(built, tmp_path, edit_arrays=edit))


def test_popx_runs_that_skip_or_repeat_elements(popc, built, tmp_path):
    def edit(doc, arrays):
        arrays[doc["tensors"][0]["runs"]["starts"]][-1] -= 1
    assert "the runs of tensor 'v' do not cover its" in _run_popx(popc, _tampered(built, tmp_path, edit_arrays=edit))


def test_popx_copy_address_out_of_range(popc, built, tmp_path):
    def edit(doc, arrays):
        arrays[doc["copies"][0]["dst"]][-1] = 1 << 40
    assert "outside the target's memory" in _run_popx(popc, _tampered(built, tmp_path, edit_arrays=edit))


def test_popx_huge_size_symbol(popc, built, tmp_path):
    """A size symbol that would let a vertex run past the end of memory."""
    def edit(doc, arrays):
        ref = doc["compute_sets"][0]["groups"][0]["table"]
        arrays[ref][:, -1] = 1 << 30
    assert "reaches outside its tile" in _run_popx(popc, _tampered(built, tmp_path, edit_arrays=edit))


def test_popx_wrong_array_dtype(popc, built, tmp_path):
    def edit(doc, arrays):
        ref = doc["compute_sets"][0]["groups"][0]["table"]
        arrays[ref] = arrays[ref].astype(np.float64)
    err = _run_popx(popc, _tampered(built, tmp_path, edit_arrays=edit))
    assert "damaged .popx file (array " in err and "holds float64, expected int64" in err, err


def test_popx_missing_array_member(popc, built, tmp_path):
    m = _members(built)
    del m["a3.npy"]
    err = _run_popx(popc, _write_zip(tmp_path / "holes.popx", m))
    assert "damaged .popx file (bad array reference 'a3')" in err, err


def test_popx_pickled_array_is_refused(popc, built, tmp_path):
    """An object array would need pickle, which could run code: refused."""
    m = _members(built)
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    m["a0.npy"] = buf.getvalue()
    err = _run_popx(popc, _write_zip(tmp_path / "pickle.popx", m))
    assert "holds Python objects (a pickle), which popc never loads" in err, err


# Each damage is reported with its own reason (the first check that catches it).
@pytest.mark.parametrize("edit, reason", [
    (lambda d: d.update(tensors=5), "tensors is not a list"),
    (lambda d: d.update(program={"seq": [{"execute": 7}]}), "a compute set reference is 7, not an integer in 0..0"),
    (lambda d: d.update(program={"seq": [{"launch": 0}]}), "unknown program node"),
    (lambda d: d.update(program={"repeat": -1, "body": {"seq": []}}), "a repeat count is -1, not an integer"),
    (lambda d: d.update(target={"name": "gc200", "tiles": 0, "tile_memory": 64}),
     "the target is not a record of the expected fields"),
    (lambda d: d.update(target={"bogus": 1}), "the target is not a record of the expected fields"),
    (lambda d: d.update(outputs={"y": 99}), "an output's read is 99, not an integer in 0..1"),
    (lambda d: d["compute_sets"][0]["groups"][0].update(codelet="Nope"), "compute set 'scale' runs 'Nope', which is not a vertex codelet here"),
    (lambda d: d.pop("spans"), "KeyError: 'spans'"),
    (lambda d: d["tensors"][0].update(dtype="f64"), "unknown dtype 'f64'"),
    (lambda d: d["tensors"][0].update(shape=[3]),
     "the runs of tensor 'v' do not cover its 3 elements once, in order"),
    (lambda d: d["codelets"][0].update(_="Mystery"), "ValueError: unknown codelet IR node 'Mystery'"),
], ids=["tensors-not-a-list", "execute-out-of-range", "unknown-node", "negative-repeat",
        "zero-tiles", "bad-target", "output-out-of-range", "unknown-codelet", "no-spans",
        "unknown-dtype", "shape-mismatch", "unknown-ir-node"])
def test_popx_damaged_manifest(popc, built, tmp_path, edit, reason):
    path = _tampered(built, tmp_path, edit)
    first = _run_popx(popc, path).splitlines()[0]
    assert first.startswith(f"{path}: error: damaged .popx file (") and reason in first, first


def test_popx_invalid_codelet_ir(popc, built, tmp_path):
    """IR the verifier rejects: a store to a field that is not there."""
    def edit(doc):
        doc["codelets"][0]["body"][0]["body"][0]["field"] = "zz"
    assert "failed verification" in _run_popx(popc, _tampered(built, tmp_path, edit))


def test_popx_cannot_claim_checks_away(popc, built, tmp_path):
    """A file cannot switch bounds checks off: neither by marking an access as
    proven in range (the loader proves it again) nor by saying --unchecked (only
    the person running it can).  Either way the bad access is a runtime error,
    not a crash."""
    def longer_loop(doc):
        loop = doc["codelets"][0]["body"][0]
        loop["stop"] = {"_": "Const", "value": 1000000, "ty": "i32"}     # was n; still "checked": false
    code, _, err = popc("run", _tampered(built, tmp_path, longer_loop))
    assert code == 1
    assert "index 2 is out of range for axis 0 of field 'x' (size 2) in codelet Scale" in err

    def unchecked(doc):
        longer_loop(doc)
        doc["unchecked"] = True
    code, _, err = popc("run", _tampered(built, tmp_path, unchecked))
    assert code == 1
    assert "index 2 is out of range" in err


@pytest.mark.parametrize("depth", [900, 100000])
def test_popx_nested_too_deeply(popc, built, tmp_path, depth):
    """Deeply nested JSON or codelet IR is refused, not a stack overflow."""
    m = _members(built)
    doc = json.loads(m["popx.json"])
    doc["codelets"][0]["body"][0]["body"][0]["value"] = "HOLE"
    e = '{"_": "Unary", "op": "neg", "x": ' * depth + '{"_": "Const", "value": 1.0, "ty": "f32"}' \
        + ', "ty": "f32"}' * depth
    m["popx.json"] = json.dumps(doc).replace('"HOLE"', e).encode()
    err = _run_popx(popc, _write_zip(tmp_path / "deep.popx", m))
    assert "nested" in err


def test_popx_of_deeply_nested_program_loads(popc, src, tmp_path):
    """...while the deepest program the compiler accepts still round-trips."""
    e = "-" * 95 + "(" * 95 + "1.0" + ")" * 95
    ifs = "if true { " * 90 + "y[0] = 1.0;" + " }" * 90
    calls = "exp(" * 90 + "0.0" + ")" * 90
    p = src(f"codelet A(inout y: f32[n]) {{ y[1] = {e}; y[0] = {calls}; {ifs} }}\n"
            "graph g(tiles = 1) { var v: f32[2]; map v -> tile 0; compute c { A(y = v) on tile 0; }\n"
            "    program { execute c; print v; } }\n")
    out = tmp_path / "deep.popx"
    code, _, err = popc("build", p, "-o", out)
    assert code == 0, err
    code, stdout, err = popc("run", out)
    assert code == 0, err
    assert stdout.startswith("v: [")


def test_popx_unchecked_when_both_ask(popc, src, tmp_path):
    out = tmp_path / "u.popx"
    assert popc("build", src(SCALE), "--unchecked", "-o", out)[0] == 0
    code, stdout, err = popc("run", out, "--unchecked")
    assert code == 0, err
    assert stdout.splitlines() == SCALE_OUT


def test_report_on_popx(popc, built, src):
    """The report of a .popx is the report of the program it was built from."""
    code, out, err = popc("report", built, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["graph"] == "g" and doc["target"]["tiles"] == 4
    assert {t["name"] for t in doc["largest_tensors"]} == {"v", "w"}
    code, again, err = popc("report", src(SCALE, "scale.pop"), "--json")
    assert code == 0, err
    fresh = json.loads(again)
    for key in ("totals", "categories", "tile_bytes"):
        assert doc[key] == fresh[key], key


# ---------------------------------------------------------------- feeds and data

@pytest.fixture
def fed(src):
    return src(FEED, "fed.pop")


def _npy(tmp_path, name, array) -> Path:
    p = tmp_path / name
    np.save(p, array)
    return p


def test_feed_ok(popc, fed, tmp_path):
    x = _npy(tmp_path, "x.npy", np.arange(4, dtype=np.float32))
    code, out, err = popc("run", fed, "--feed", f"x={x}")
    assert code == 0, err
    assert out.splitlines() == ["y: [1 2 3 4]", "echo: [0 1 2 3]"]


def test_feed_several_steps_and_save(popc, fed, tmp_path):
    x = _npy(tmp_path, "x.npy", np.arange(8, dtype=np.float32))
    save = tmp_path / "out.npz"
    code, out, err = popc("run", fed, "--feed", f"x={x}", "--steps", "2", "--save", save)
    assert code == 0, err
    with np.load(save) as z:
        np.testing.assert_array_equal(z["y"], [[1, 2, 3, 4], [5, 6, 7, 8]])


def test_feed_missing(popc, fed):
    code, _, err = popc("run", fed)
    assert code == 1 and "input 'x' (" in err and "not fed" in err


def test_feed_unknown_input(popc, fed, tmp_path):
    x = _npy(tmp_path, "x.npy", np.zeros(4, np.float32))
    code, _, err = popc("run", fed, "--feed", f"x={x}", "--feed", f"z={x}")
    assert code == 1 and "no input named 'z' (inputs: x)" in err


def test_feed_wrong_shape(popc, fed, tmp_path):
    x = _npy(tmp_path, "x.npy", np.zeros((3, 3), np.float32))
    code, _, err = popc("run", fed, "--feed", f"x={x}")
    assert code == 1 and "feed 'x' has shape [3, 3]; input is [4]" in err


def test_feed_wrong_dtype(popc, fed, tmp_path):
    x = _npy(tmp_path, "x.npy", np.array(["a", "b", "c", "d"]))
    code, _, err = popc("run", fed, "--feed", f"x={x}")
    assert code == 1 and "feed 'x' has dtype" in err


def test_feed_bad_file(popc, fed, tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"this is not numpy")
    code, _, err = popc("run", fed, "--feed", f"x={bad}")
    assert code == 1 and "not a valid .npy/.npz file" in err


def test_feed_missing_file(popc, fed, tmp_path):
    code, _, err = popc("run", fed, "--feed", f"x={tmp_path / 'nope.npy'}")
    assert code == 1 and "no such file" in err


def test_feed_pickled_file(popc, fed, tmp_path):
    p = tmp_path / "obj.npy"
    np.save(p, np.array([object()] * 4, dtype=object), allow_pickle=True)
    code, _, err = popc("run", fed, "--feed", f"x={p}")
    assert code == 1 and "not a valid .npy/.npz file" in err


@pytest.mark.parametrize("spec", ["x", "=x.npy", "x=", ""])
def test_feed_malformed(popc, fed, spec):
    code, _, err = popc("run", fed, "--feed", spec)
    assert code == 1 and "--feed expects NAME=FILE" in err


def test_feed_npz_instead_of_npy(popc, fed, tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros(4, np.float32))
    code, _, err = popc("run", fed, "--feed", f"x={p}")
    assert code == 1 and "is an .npz; use --data" in err
    code, out, err = popc("run", fed, "--data", p)
    assert code == 0, err


def test_data_needs_npz(popc, fed, tmp_path):
    x = _npy(tmp_path, "x.npy", np.zeros(4, np.float32))
    code, _, err = popc("run", fed, "--data", x)
    assert code == 1 and "--data needs an .npz" in err


def test_load_params_errors(popc, src, tmp_path):
    p = src(SCALE)
    bad_name = tmp_path / "p1.npz"
    np.savez(bad_name, nosuch=np.zeros(8, np.float32))
    code, _, err = popc("run", p, "--load-params", bad_name)
    assert code == 1 and "no tensor named 'nosuch'" in err
    bad_shape = tmp_path / "p2.npz"
    np.savez(bad_shape, v=np.zeros(3, np.float32))
    code, _, err = popc("run", p, "--load-params", bad_shape)
    assert code == 1 and "'v' has shape [8], given [3]" in err


def test_save_and_load_params(popc, src, tmp_path):
    p = src(SCALE)
    saved = tmp_path / "params.npz"
    code, out, err = popc("run", p, "--save-params", saved)
    assert code == 0, err
    code, out, err = popc("run", p, "--load-params", saved)     # v starts at 10..80
    assert code == 0, err
    assert out.splitlines()[0] == "v: [100 200 300 400 500 600 700 800]"


def test_save_to_unwritable_place(popc, fed, tmp_path):
    x = _npy(tmp_path, "x.npy", np.zeros(4, np.float32))
    code, _, err = popc("run", fed, "--feed", f"x={x}", "--save", tmp_path / "no" / "dir" / "o.npz")
    assert code == 1 and "cannot write" in err


# ---------------------------------------------------------------- dump

@pytest.mark.parametrize("stage", STAGES)
def test_dump_every_stage_is_deterministic(popc, src, stage):
    p = src(SCALE)
    first = popc("dump", "--after", stage, p)
    second = popc("dump", "--after", stage, p)
    assert first[0] == 0, first[2]
    assert first[1] == second[1]
    assert first[1].strip()
    assert " at 0x" not in first[1]                     # no Python object reprs


@pytest.mark.parametrize("stage", STAGES)
def test_dump_of_a_bad_program_reports_errors(popc, src, stage):
    code, out, err = popc("dump", "--after", stage, src(BAD))
    if stage == "parse":
        assert code == 0                                 # the error is found later
    else:
        assert code == 1 and "unknown name 'nope'" in err


# ---------------------------------------------------------------- diagnostics

def test_diagnostic_format(popc, src):
    """`path:line:col: error: message`, the source line, a caret under the span."""
    p = src(BAD)
    code, _, err = popc("check", p)
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == f"{p}:2:12: error: unknown name 'nope'"
    assert lines[1] == "      x[0] = nope;"
    assert lines[2] == "             ^~~~"


def test_several_errors_are_counted(popc, src):
    p = src("codelet A(out y: f32) {\n    y = a;\n    y = b;\n}\n")
    code, _, err = popc("check", p)
    assert code == 1
    assert ":2:9: error: unknown name 'a'" in err and ":3:9: error: unknown name 'b'" in err
    assert err.rstrip().endswith("2 errors")


def test_runtime_error_exit_1(popc, src):
    p = src("""\
codelet Poke(inout x: f32[n], at: i32) { x[at] = 1.0; }
graph g(tiles = 2) {
    var v: f32[4];
    map v -> linear;
    compute c { Poke(x = v[2:4], at = 9) on tile 1; }
    program { print v; execute c; }
}
""")
    code, out, err = popc("run", p)
    assert code == 1
    assert out == "v: [0 0 0 0]\n"                       # output before the failure stays
    assert f"{p}:5:17: error: index 9 is out of range for axis 0 of field 'x' (size 2) " \
           "in codelet Poke, vertex 0 of compute set 'c', on tile 1" in err


# ---------------------------------------------------------------- internal errors: exit 70

@pytest.mark.parametrize("where", ["popdsl.pipeline.lower", "popdsl.pipeline.plan",
                                   "popdsl.pipeline.elaborate"])
def test_internal_error_exit_70(popc, src, monkeypatch, where):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr(where, broken)
    monkeypatch.delenv("POPDSL_TRACEBACK", raising=False)
    code, out, err = popc("check", src(SCALE))
    assert code == 70
    assert "popc: internal compiler error: RuntimeError: simulated bug" in err
    assert "This is a bug in popdsl, not in your program" in err


def test_internal_error_traceback_on_request(popc, src, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr("popdsl.pipeline.lower", broken)
    monkeypatch.setenv("POPDSL_TRACEBACK", "1")
    code = cli.main(["check", str(src(SCALE))])
    _, err = capsys.readouterr()
    assert code == 70
    assert "Traceback" in err and "simulated bug" in err


def test_internal_error_in_simulator_exit_70(popc, src, monkeypatch):
    from popdsl.runtime import simulator

    def broken(self, *args):
        raise AssertionError("simulated simulator bug")
    monkeypatch.setattr(simulator.Machine, "_copy", broken)
    code, out, err = popc("run", src(SCALE))
    assert code == 70
    assert "internal compiler error: AssertionError: simulated simulator bug" in err


def test_interrupt_exits_130(popc, src, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("popdsl.pipeline.lower", interrupted)
    code, _, err = popc("check", src(SCALE))
    assert code == 130 and "interrupted" in err
