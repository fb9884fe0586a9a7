"""`--data`, `--feed` and `--load-params` files are untrusted input: every damaged,
hostile or unfitting file is a clear error (exit 1), refused from its header before
its data is read or inflated; values must fit their input's dtype; an input is fed
once."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from popdsl import cli, datafile
from test_cli import FEED, SCALE

TWO = """\
codelet AddK(in x: f32[n], out y: f32[n], k: f32) { for i in 0..n { y[i] = x[i] + k; } }
codelet AddI(in x: i32[n], out y: i32[n]) { for i in 0..n { y[i] = x[i] + 1; } }
codelet Half(in x: f16[n], out y: f16[n]) { for i in 0..n { y[i] = x[i] * 0.5; } }
codelet Not(in x: bool[n], out y: bool[n]) { for i in 0..n { y[i] = !x[i]; } }
graph fed(tiles = 1) {
    input x: f32[4]; input j: i32[2]; input h: f16[2]; input b: bool[2];
    var y: f32[4]; var z: i32[2]; var g: f16[2]; var c: bool[2];
    map x -> tile 0; map y -> tile 0; map j -> tile 0; map z -> tile 0;
    map h -> tile 0; map g -> tile 0; map b -> tile 0; map c -> tile 0;
    compute add { AddK(x = x, y = y, k = 1.0) on tile 0; AddI(x = j, y = z) on tile 0;
                  Half(x = h, y = g) on tile 0; Not(x = b, y = c) on tile 0; }
    output y; output z; output g; output c;
}
"""
GOOD = {"x": np.ones(4, np.float32), "j": np.array([1, 2], np.int32), "h": np.ones(2, np.float16),
        "b": np.array([True, False])}


def popc(*argv):
    import contextlib
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    assert "Traceback" not in out.getvalue() + err.getvalue()
    assert "internal compiler error" not in err.getvalue(), err.getvalue()
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def prog(tmp_path) -> Path:
    p = tmp_path / "two.pop"
    p.write_text(TWO)
    return p


def _npz(path: Path, compressed=False, **arrays) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _npy_header(shape, descr="<f4") -> bytes:
    h = io.BytesIO()
    np.lib.format.write_array_header_1_0(h, {"descr": descr, "fortran_order": False, "shape": shape})
    return h.getvalue()


def test_good_data_runs(prog, tmp_path):
    code, out, err = popc("run", prog, "--data", _npz(tmp_path / "d.npz", **GOOD))
    assert code == 0, err
    assert out.splitlines() == ["y: [2 2 2 2]", "z: [2 3]", "g: [0.5 0.5]", "c: [false true]"]


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9, 0.99])
def test_truncated_npz(prog, tmp_path, keep):
    data = _npz(tmp_path / "d.npz", **GOOD).read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:int(len(data) * keep)])
    code, _, err = popc("run", prog, "--data", tmp_path / "cut.npz")
    assert code == 1 and "cannot read" in err and "not a valid .npy/.npz file" in err, err


@pytest.mark.parametrize("compressed", [False, True])
def test_crc_damaged_npz(prog, tmp_path, compressed):
    p = _npz(tmp_path / "d.npz", compressed, **{k: np.repeat(v, 1) for k, v in GOOD.items()})
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("x.npy")
    b = bytearray(p.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    b[start + info.compress_size - 3] ^= 0xFF           # inside x's data (or its deflate stream)
    p.write_bytes(bytes(b))
    code, _, err = popc("run", prog, "--data", p)
    assert code == 1 and "member 'x.npy' is damaged" in err, err


def test_object_array_inside_npz(prog, tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, **{**GOOD, "x": np.array([1, "a", None, 2], dtype=object)})
    code, _, err = popc("run", prog, "--data", p)
    assert code == 1 and "pickle" in err, err


def test_npy_header_claiming_a_huge_shape(prog, tmp_path):
    p = tmp_path / "huge.npy"
    p.write_bytes(_npy_header((2**40,)) + b"\0" * 16)
    code, _, err = popc("run", prog, "--feed", f"x={p}")
    assert code == 1 and "truncated (the header promises 4,398,046,511,104 bytes" in err, err
    p.write_bytes(_npy_header((2**62, 2**62)) + b"\0" * 16)
    code, _, err = popc("run", prog, "--feed", f"x={p}")
    assert code == 1 and "truncated" in err, err


def test_zip_bomb_is_refused_before_inflating(prog, tmp_path, monkeypatch):
    """A member whose header says 64M floats (it inflates from a few hundred KB): as
    a streamed feed its shape would do, but it is refused before it is inflated."""
    n = 64 << 20
    p = tmp_path / "bomb.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((n,)))
            zeros = bytes(1 << 22)
            for _ in range(4 * n // len(zeros)):
                f.write(zeros)
    assert p.stat().st_size < 2 << 20

    def never(*a):
        raise AssertionError("inflated")
    monkeypatch.setattr(datafile, "read_body", never)
    code, _, err = popc("run", prog, "--data", p)
    assert code == 1 and "refused as a likely zip bomb" in err, err


def test_member_whose_header_and_zip_disagree(prog, tmp_path):
    p = tmp_path / "lie.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", _npy_header((4,)) + b"\0" * 8)
    code, _, err = popc("run", prog, "--data", p)
    assert code == 1 and "its header promises 16 bytes of data, the zip says 8" in err, err


def test_npz_member_that_is_not_an_array(prog, tmp_path):
    p = tmp_path / "odd.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.txt", b"hello")
    code, _, err = popc("run", prog, "--data", p)
    assert code == 1 and "member 'x.txt' is not an .npy array" in err


@pytest.mark.parametrize("name, value, message", [
    ("j", np.array([1, 2**40], np.int64), "feed 'j' has values that do not fit i32 (e.g. 1099511627776"),
    ("j", np.array([1, 2**63 + 5], np.uint64), "do not fit i32"),
    ("j", np.array([-2**31 - 1, 0], np.int64), "do not fit i32"),
    ("b", np.array([0, 1], np.int32), "has dtype int32; input is bool"),
    ("h", np.array([1.0, 1e6], np.float32), "do not fit f16"),
    ("h", np.array([1, 100000], np.int32), "do not fit f16"),
    ("x", np.array([1, 2, 3, 1e300], np.float64), "do not fit f32"),
])
def test_feed_values_must_fit_the_input_dtype(prog, tmp_path, name, value, message):
    p = tmp_path / "v.npy"
    np.save(p, value)
    data = _npz(tmp_path / "d.npz", **{k: v for k, v in GOOD.items() if k != name})
    code, _, err = popc("run", prog, "--data", data, "--feed", f"{name}={p}")
    assert code == 1 and message in err, err


def test_fitting_wider_feeds_are_fine(prog, tmp_path):
    wide = {"x": np.ones(4), "j": np.array([-2**31, 2**31 - 1], np.int64), "h": np.array([65504.0, np.inf]),
            "b": np.array([True, False])}
    code, out, err = popc("run", prog, "--data", _npz(tmp_path / "d.npz", **wide))
    assert code == 0, err
    assert out.splitlines()[1:] == ["z: [-2147483647 -2147483648]", "g: [32752 inf]", "c: [false true]"]


def test_duplicate_feeds_are_an_error(prog, tmp_path):
    x1, x2 = tmp_path / "x1.npy", tmp_path / "x2.npy"
    np.save(x1, GOOD["x"])
    np.save(x2, GOOD["x"] * 2)
    data = _npz(tmp_path / "d.npz", **GOOD)
    code, _, err = popc("run", prog, "--data", data, "--feed", f"x={x1}")
    assert code == 1 and f"input 'x' is fed twice: by --data {data} and by --feed" in err
    rest = _npz(tmp_path / "r.npz", **{k: v for k, v in GOOD.items() if k != "x"})
    code, _, err = popc("run", prog, "--data", rest, "--feed", f"x={x1}", "--feed", f"x={x2}")
    assert code == 1 and f"input 'x' is fed twice: --feed x={x1} and --feed x={x2}" in err


def test_load_params_checked_from_headers(tmp_path):
    src = tmp_path / "s.pop"
    src.write_text(SCALE)
    npy = tmp_path / "v.npy"
    np.save(npy, np.zeros(8, np.float32))
    code, _, err = popc("run", src, "--load-params", npy)
    assert code == 1 and "--load-params needs an .npz file of named arrays" in err
    big = tmp_path / "big.npz"
    np.savez_compressed(big, v=np.zeros((1000, 1000), np.float32))
    code, _, err = popc("run", src, "--load-params", big)
    assert code == 1 and "--load-params: 'v' has shape [8], given [1000, 1000]" in err
    bools = tmp_path / "b.npz"
    np.savez(bools, v=np.array([0, 1, 2, 3, 4, 5, 6, 7], np.int64))
    code, _, err = popc("run", src, "--load-params", bools)
    assert code == 0, err                                         # ints into f32: fine
    obj = tmp_path / "o.npz"
    np.savez(obj, v=np.array([None] * 8, dtype=object))
    code, _, err = popc("run", src, "--load-params", obj)
    assert code == 1 and "pickle" in err
    wide = tmp_path / "w.npz"
    np.savez(wide, v=np.full(8, 1e300))
    code, _, err = popc("run", src, "--load-params", wide)
    assert code == 1 and "'v' has values that do not fit f32" in err


def test_feed_file_is_a_directory(tmp_path):
    src = tmp_path / "fed.pop"
    src.write_text(FEED)
    (tmp_path / "d.npy").mkdir()
    code, _, err = popc("run", src, "--feed", f"x={tmp_path / 'd.npy'}")
    assert code == 1 and "is a directory" in err


def test_fortran_ordered_feed_reads_right(prog, tmp_path):
    """(the reader builds Fortran-ordered arrays itself, from the raw bytes)"""
    p = tmp_path / "f.npy"
    np.save(p, np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    a = datafile.load_npy(str(p))
    np.testing.assert_array_equal(a, np.arange(6).reshape(2, 3))


def _header_text(raw: bytes) -> str:
    n, at = (int.from_bytes(raw[8:10], "little"), 10) if raw[6] == 1 else (int.from_bytes(raw[8:12], "little"), 12)
    return raw[at:at + n].decode("latin1")


def test_numpy_headers_are_read_without_the_parser_and_as_it_reads_them():
    """What numpy writes (both header versions, np.save) takes the fast path and
    reads as `ast.literal_eval` reads it; every one-character change of such a header
    reads the same either way, or fails either way."""
    import ast
    import random
    texts = []
    for dt in ("<f4", "<f8", "<i4", "|u1", "|b1", "<f2", ">i2", "<c8"):
        for shape in ((), (0,), (3,), (3, 4), (1, 2, 3), (10**12,)):
            for fortran in (False, True):
                for write in (np.lib.format.write_array_header_1_0, np.lib.format.write_array_header_2_0):
                    f = io.BytesIO()
                    write(f, {"descr": dt, "fortran_order": fortran, "shape": shape})
                    texts.append(_header_text(f.getvalue()))
    for a in (np.zeros((2, 3), np.float32), np.arange(5), np.array(3.0), np.zeros(0, bool)):
        f = io.BytesIO()
        np.save(f, a)
        texts.append(_header_text(f.getvalue()))

    def read(read_one, text):
        try:
            d = read_one(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return "error"
        return d, type(d["shape"]) if isinstance(d, dict) and "shape" in d else None

    rnd = random.Random(0)
    for text in texts:
        assert datafile._NUMPY_HEADER.fullmatch(text), text
        assert read(datafile._header_dict, text) == read(ast.literal_eval, text)
        for _ in range(40):
            i = rnd.randrange(len(text))
            bad = text[:i] + rnd.choice("0123456789, ()'{}:TrueFalse<>|x\n ") + text[i + 1:]
            assert read(datafile._header_dict, bad) == read(ast.literal_eval, bad), bad
