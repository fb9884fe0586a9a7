"""Cached builds (README: "Cached builds"), `--timings`, the progress line.

The rest of the suite runs with POPDSL_VERIFY=1, and a verified compile bypasses the
build cache, so every other test compiles; here verification is off (the cache's
subject) and each test gets its own empty cache directory.
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import popdsl
from popdsl import api, cache, cli, timings
from popdsl.ir.target import get_target
from popdsl.pipeline import STAGE_NAMES

from test_cli import FEED, SCALE, SCALE_OUT

MLP = """\
import "popnn";
graph net(tiles = 4) {
    input x: f32[2, 8];
    let h = relu(dense(x, 6));
    output y = softmax(dense(h, 3));
}
"""


@pytest.fixture(autouse=True)
def cache_dir(monkeypatch, tmp_path):
    d = tmp_path / "cache"
    monkeypatch.setenv("POPDSL_CACHE_DIR", str(d))
    monkeypatch.setenv("POPDSL_VERIFY", "0")
    monkeypatch.delenv(cache.SIZE_ENV, raising=False)
    return d


@pytest.fixture
def compiles(monkeypatch):
    """How many times the pipeline ran (behind the cache)."""
    calls = []
    real = cache.compile_source

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(cache, "compile_source", counting)
    return calls



def _build(text, path="<string>", tiles=None, **opts):
    return cache.build(text, path, get_target("gc200", tiles, None), **opts)


def _run(exe, feeds=None):
    with api.Simulator(exe, threads=1) as sim:
        out = sim.run(feeds or {})
        return out, sim.cycles.total


# ---------------------------------------------------------------- hits

def test_hit_gives_the_same_executable(compiles):
    first = _build(MLP)
    second = _build(MLP)
    assert (first.status, second.status) == ("miss", "hit") and len(compiles) == 1
    assert second.popx == first.popx                       # the very bytes stored
    a, b = first.exe, second.exe
    for k in ("planned", "lower_bound", "naive_data", "code", "vertex_state", "timeline"):
        assert np.array_equal(getattr(a.memory, k), getattr(b.memory, k)), k
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ra, rb in zip(a.tensor_runs, b.tensor_runs):
        assert np.array_equal(ra.addrs, rb.addrs) and np.array_equal(ra.counts, rb.counts)
    x = {"x": np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)}
    (out_a, cyc_a), (out_b, cyc_b) = _run(api.Executable(a, first.native), x), _run(api.Executable(b), x)
    assert cyc_a == cyc_b
    assert out_a.keys() == out_b.keys()
    for k in out_a:
        assert np.array_equal(out_a[k], out_b[k]), k


def test_api_compile_uses_the_cache(compiles, tmp_path):
    p = tmp_path / "net.pop"
    p.write_text(MLP)
    exe1, exe2 = popdsl.compile(p), popdsl.compile(str(p))
    assert len(compiles) == 1
    popdsl.compile(p, cache=False)
    assert len(compiles) == 2
    x = {"x": np.ones((2, 8), np.float32)}
    assert np.array_equal(_run(exe1, x)[0]["y"], _run(exe2, x)[0]["y"])


def test_build_from_the_cache_is_byte_identical(popc, tmp_path, compiles):
    src = tmp_path / "scale.pop"
    src.write_text(SCALE)
    outs = [tmp_path / f"{k}.popx" for k in range(3)]
    code, out, err = popc("build", src, "-o", outs[0])
    assert code == 0 and "from the build cache" not in out, err
    code, out, err = popc("build", src, "-o", outs[1])
    assert code == 0 and "from the build cache" in out, err
    assert popc("build", src, "-o", outs[2], "--no-cache")[0] == 0
    assert len(compiles) == 2
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()
    code, out, err = popc("run", outs[1])
    assert code == 0 and out.splitlines() == SCALE_OUT


def test_run_and_report_of_a_pop_use_the_cache(popc, tmp_path, compiles):
    src = tmp_path / "scale.pop"
    src.write_text(SCALE)
    assert popc("build", src, "-o", tmp_path / "s.popx")[0] == 0
    code, out, err = popc("run", src, "--timings")
    assert code == 0 and out.splitlines() == SCALE_OUT
    assert "build cache: hit" in err
    assert popc("report", src)[0] == 0
    assert len(compiles) == 1


def test_errors_are_never_cached(popc, tmp_path, compiles):
    src = tmp_path / "bad.pop"
    src.write_text(SCALE.replace("x[i] * k", "x[i] * nope"))
    for _ in range(2):
        code, _, err = popc("build", src)
        assert code == 1 and "nope" in err
    assert len(compiles) == 2
    assert not list(cache.entries())


# ---------------------------------------------------------------- what the key covers

LIB = "codelet Twice(inout x: f32[n]) { for i in 0..n { x[i] = x[i] * 2.0; } }\n"
MAIN = """\
import "lib.pop";
graph g(tiles = 2) {
    var v: f32[4] = [1, 2, 3, 4];
    map v -> linear;
    compute c { Twice(x = v[0:2]) on tile 0; Twice(x = v[2:4]) on tile 1; }
    program { execute c; print v; }
}
graph h(tiles = 2) {
    var v: f32[2] = [5, 6];
    map v -> tile 1;
    compute c { Twice(x = v) on tile 1; }
}
"""


def test_changing_an_imported_file_misses(tmp_path, compiles):
    (tmp_path / "lib.pop").write_text(LIB)
    main = tmp_path / "main.pop"
    main.write_text(MAIN)
    first = _build(MAIN, str(main), graph="g")
    assert first.status == "miss"
    assert _build(MAIN, str(main), graph="g").status == "hit"
    (tmp_path / "lib.pop").write_text(LIB.replace("2.0", "3.0"))
    b = _build(MAIN, str(main), graph="g")
    assert b.status == "miss" and b.popx != first.popx
    assert _build(MAIN, str(main), graph="g").status == "hit"
    assert len(compiles) == 2


def test_changing_an_imported_file_changes_the_cli_result(popc, tmp_path):
    (tmp_path / "lib.pop").write_text(LIB)
    main = tmp_path / "main.pop"
    main.write_text(MAIN)
    assert popc("run", main, "--graph", "g")[1].splitlines() == ["v: [2 4 6 8]"]
    (tmp_path / "lib.pop").write_text(LIB.replace("2.0", "3.0"))
    assert popc("run", main, "--graph", "g")[1].splitlines() == ["v: [3 6 9 12]"]


def test_the_stdlib_is_part_of_the_key():
    modules = popdsl.sema.load_program(MLP, "<string>")
    assert "<stdlib>/popnn.pop" in [m.path for m in modules]
    args = (get_target("gc200", 4, None), None, False, True, None, popdsl.limits.Budgets(), MLP, "<string>")
    before = cache.build_key(modules, *args)
    text = popdsl.diagnostics.SourceMap.text("<stdlib>/popnn.pop")
    try:
        popdsl.diagnostics.SourceMap.add("<stdlib>/popnn.pop", text + "\n// edited\n")
        assert cache.build_key(modules, *args) != before
    finally:
        popdsl.diagnostics.SourceMap.add("<stdlib>/popnn.pop", text)
    assert cache.build_key(modules, *args) == before


@pytest.mark.parametrize("change", [
    dict(tiles=2), dict(graph="h"), dict(unchecked=True), dict(reuse=False),
    dict(budgets=popdsl.limits.Budgets(unroll=10_000)), dict(path="elsewhere/main.pop"),
])
def test_target_and_options_are_part_of_the_key(tmp_path, change, compiles):
    (tmp_path / "lib.pop").write_text(LIB)
    main = str(tmp_path / "main.pop")
    base = dict(path=main, tiles=4, graph="g")
    assert _build(MAIN, **base).status == "miss"
    assert _build(MAIN, **base).status == "hit"
    if change.get("path"):
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "lib.pop").write_text(LIB)
        change = dict(path=str(tmp_path / change["path"]))
    assert _build(MAIN, **{**base, **change}).status == "miss"
    assert _build(MAIN, **{**base, **change}).status == "hit"
    assert len(compiles) == 2


def test_training_is_part_of_the_key(compiles):
    src = MLP.replace("output y = softmax(dense(h, 3));",
                      "let y = softmax(dense(h, 3));\n    let loss = sum(y);\n    output loss;\n"
                      "    minimize loss with sgd(lr = 0.1);")
    assert _build(src).status == "miss"
    assert _build(src, training=False).status == "miss"
    assert _build(src).status == "hit" and _build(src, training=False).status == "hit"


def test_a_new_popdsl_or_an_edited_compiler_misses(monkeypatch, compiles):
    assert _build(SCALE).status == "miss"
    assert _build(SCALE).status == "hit"
    with monkeypatch.context() as m:
        m.setattr(popdsl, "__version__", "99.0")
        cache.compiler_fingerprint.cache_clear()
        assert _build(SCALE).status == "miss"
    cache.compiler_fingerprint.cache_clear()
    assert _build(SCALE).status == "hit"
    # The compiler's own files are hashed: an edit anywhere in popdsl is a new compiler.
    real = Path.read_bytes
    with monkeypatch.context() as m:
        m.setattr(Path, "read_bytes", lambda p: real(p) + (b"#" if p.name == "partition.py" else b""))
        cache.compiler_fingerprint.cache_clear()
        assert _build(SCALE).status == "miss"
    cache.compiler_fingerprint.cache_clear()
    assert _build(SCALE).status == "hit"
    assert len(compiles) == 3


# ---------------------------------------------------------------- damaged entries

def _only_entry() -> Path:
    (path, _, _), = cache.entries()
    return path


def _flip(p: Path):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _garbage_zip_with_a_good_hash(p: Path):
    payload = b"PK\x05\x06" + b"\0" * 18                      # an empty zip: no popx.json
    key = p.stem
    import hashlib
    p.write_bytes(cache._HEADER.pack(cache.MAGIC, bytes.fromhex(key), hashlib.sha256(payload).digest(),
                                     len(payload)) + payload)


@pytest.mark.parametrize("damage", [
    _flip,
    lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 3]),      # truncated
    lambda p: p.write_bytes(p.read_bytes()[:40]),                              # inside the header
    lambda p: p.write_bytes(b""),
    lambda p: p.write_bytes(os.urandom(5000)),                                 # garbage
    _garbage_zip_with_a_good_hash,                                             # passes the hash, fails the loader
], ids=["flipped", "truncated", "header-only", "empty", "garbage", "invalid-popx"])
def test_a_damaged_entry_is_compiled_again_and_replaced(damage, compiles):
    first = _build(SCALE)
    entry = _only_entry()
    good = entry.read_bytes()
    damage(entry)
    again = _build(SCALE)
    assert again.status == "miss" and len(compiles) == 2
    assert entry.read_bytes() == good                          # replaced by the good build
    out, _ = _run(api.Executable(again.exe, again.native))
    assert _build(SCALE).status == "hit"
    assert first.popx == again.popx


def test_a_foreign_entry_is_not_taken(compiles):
    """Another build's (valid) entry under this key's name: its key does not match."""
    a = _build(SCALE)
    b = _build(FEED)
    (cache.builds_dir() / f"{a.key}.build").write_bytes((cache.builds_dir() / f"{b.key}.build").read_bytes())
    again = _build(SCALE)
    assert again.status == "miss" and again.exe.name == "g"


def test_a_damaged_entry_via_the_cli(popc, tmp_path):
    src = tmp_path / "scale.pop"
    src.write_text(SCALE)
    assert popc("build", src, "-o", tmp_path / "a.popx")[0] == 0
    _only_entry().write_bytes(b"not a build at all")
    code, out, err = popc("build", src, "-o", tmp_path / "b.popx", "--timings")
    assert code == 0 and "build cache: miss" in err and "from the build cache" not in out
    assert (tmp_path / "a.popx").read_bytes() == (tmp_path / "b.popx").read_bytes()


# ---------------------------------------------------------------- unusable directories, size

def test_an_unwritable_cache_still_compiles(monkeypatch, tmp_path, popc):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("POPDSL_CACHE_DIR", str(blocker))      # mkdir fails, as on a read-only disk
    for _ in range(2):
        b = _build(SCALE)
        assert b.status == "miss" and "not stored" in b.why
    src = tmp_path / "scale.pop"
    src.write_text(SCALE)
    code, out, err = popc("run", src)
    assert code == 0 and out.splitlines() == SCALE_OUT


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_a_read_only_cache_dir_still_compiles(cache_dir):
    _build(SCALE)
    builds = cache.builds_dir()
    builds.chmod(0o555)
    try:
        assert _build(FEED).status == "miss"
        assert _build(SCALE).status == "hit"                   # reading still works
    finally:
        builds.chmod(0o755)


def test_a_missing_cache_dir_is_made(monkeypatch, tmp_path):
    monkeypatch.setenv("POPDSL_CACHE_DIR", str(tmp_path / "deep" / "er" / "cache"))
    assert _build(SCALE).status == "miss" and _build(SCALE).status == "hit"


def test_least_recently_used_builds_go_first(tmp_path):
    d = cache.builds_dir()
    d.mkdir(parents=True)
    for k, age in enumerate((300, 100, 200)):
        p = d / f"{k:064x}.build"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (1e9 + 1000 - age, 1e9 + 1000 - age))
    cache.prune(2500)
    assert sorted(p.name[63] for p, _, _ in cache.entries()) == ["1", "2"]
    cache.prune(1000)
    assert [p.name[63] for p, _, _ in cache.entries()] == ["1"]


def test_size_setting(monkeypatch, popc, tmp_path, compiles):
    monkeypatch.setenv(cache.SIZE_ENV, "0")
    assert _build(SCALE).status == "off" and _build(SCALE).status == "off"
    assert not cache.entries()
    monkeypatch.setenv(cache.SIZE_ENV, "lots")
    src = tmp_path / "scale.pop"
    src.write_text(SCALE)
    code, _, err = popc("build", src)
    assert code == 1 and f"popc: error: {cache.SIZE_ENV}='lots'" in err


def test_verify_compiles_without_the_cache(monkeypatch, compiles):
    assert _build(SCALE).status == "miss"
    assert _build(SCALE, verify=True).status == "off"
    monkeypatch.setenv("POPDSL_VERIFY", "1")
    assert _build(SCALE).status == "off"
    assert len(compiles) == 3


# ---------------------------------------------------------------- --timings and progress

def test_timings_list_every_stage(popc, tmp_path):
    src = tmp_path / "scale.pop"
    src.write_text(SCALE)
    code, out, err = popc("build", src, "--timings", "-o", tmp_path / "s.popx")
    assert code == 0
    rows = [ln.split()[0] for ln in err.splitlines() if ln.startswith("  ") and ln.split()]
    for stage in STAGE_NAMES + ("cache", "serialise", "store", "write", "total"):
        assert stage in rows, (stage, err)
    assert "build cache: miss" in err and "peak RSS" in err
    for line in err.splitlines():
        if line.split() and line.split()[0] in STAGE_NAMES:
            wall, peak = line.split()[1:3]
            assert float(wall) >= 0 and int(peak.lstrip("~").replace(",", "")) > 0
    code, out, err = popc("build", src, "--timings", "-o", tmp_path / "s.popx")
    assert "build cache: hit" in err and "elaborate" not in err
    code, out, err = popc("check", src, "--timings")
    assert code == 0 and all(s in err for s in STAGE_NAMES) and "always compiles" in err
    code, out, err = popc("run", tmp_path / "s.popx", "--timings")
    assert code == 0 and "nothing was compiled" in err


def test_no_progress_when_not_a_terminal(popc, tmp_path, monkeypatch):
    monkeypatch.setattr(timings, "QUIET_SECONDS", 0.0)
    src = tmp_path / "scale.pop"
    src.write_text(SCALE)
    code, out, err = popc("build", src, "--no-cache")
    assert code == 0 and "\r" not in err and "\x1b" not in err and err == ""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(timings, "QUIET_SECONDS", 0.0)
    monkeypatch.setattr(timings, "REDRAW_SECONDS", 0.0)
    # Slow one stage down so the watcher draws during it.
    import time
    from popdsl import pipeline
    slow = [s if s.name != "lower" else pipeline.Stage(
        s.name, lambda o, g, run=s.run: (time.sleep(0.4), run(o, g))[1], s.dump, s.verify)
        for s in pipeline.STAGES]
    monkeypatch.setattr(pipeline, "STAGES", tuple(slow))
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    src = tmp_path / "scale.pop"
    src.write_text(SCALE)
    assert cli.main(["build", str(src), "--no-cache"]) == 0
    text = term.getvalue()
    assert "popc build: lower (8/10)" in text and "vertices" in text
    assert text.endswith("\r\x1b[K")                          # the line is cleared before the output
    assert capsys.readouterr().out.startswith("wrote ")


def test_a_read_only_cache_as_root_sees_it(monkeypatch, compiles):
    """Root ignores permission bits: a write that fails as on a read-only disk."""
    assert _build(SCALE).status == "miss"

    def refuse(path, write):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(cache, "write_atomically", refuse)
    b = _build(FEED)
    assert b.status == "miss" and "not stored" in b.why
    assert _build(SCALE).status == "hit"                       # reading still works
    assert _build(FEED).status == "miss"
