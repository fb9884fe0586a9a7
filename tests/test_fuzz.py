"""Fuzzing the compiler with hypothesis: whatever a user writes, `popc` answers with
exit 0 (fine) or 1 (an error in the program, reported as such) — never 70 (an
internal compiler error), never an uncaught exception, never a Python traceback.

Three sources of input:
  (a) programs generated from the grammar: codelets and graphs that are mostly
      well-formed, so that they reach the later stages (elaborate, lower, plan) and,
      for a part of them, run on the IPU model;
  (b) mutations of the examples and golden programs: tokens deleted, duplicated,
      swapped or replaced, numbers made huge, negative or zero, random characters
      inserted, the text truncated;
  (c) random bytes and random text.

A crash found here is fixed in the compiler and gets a golden test.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st

from popdsl import cli

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted([*ROOT.glob("examples/*.pop"), *ROOT.glob("stdlib/*.pop"),
                 *(ROOT / "tests" / "golden").rglob("*.pop")])

# POPDSL_FUZZ_SCALE=20 runs twenty times as many examples (a long hunt, by hand).
SCALE = float(os.environ.get("POPDSL_FUZZ_SCALE", "1"))


def fuzz(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])

_WORK = Path(tempfile.mkdtemp(prefix="popdsl-fuzz-"))
TIME_LIMIT = 5          # seconds per compile; a slow compile is not a crash


@pytest.fixture(autouse=True, scope="module")
def _cache():
    """Object code of generated codelets goes to a throwaway cache."""
    old = os.environ.get("POPDSL_CACHE_DIR")
    os.environ["POPDSL_CACHE_DIR"] = str(_WORK / "cache")
    yield
    if old is None:
        del os.environ["POPDSL_CACHE_DIR"]
    else:
        os.environ["POPDSL_CACHE_DIR"] = old


class _TooSlow(BaseException):
    """Raised by the alarm; a BaseException so that popc's own handlers let it pass."""


def _alarm(signum, frame):
    raise _TooSlow


def popc(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    timed = hasattr(signal, "SIGALRM")          # not on Windows: no time limit there
    if timed:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(TIME_LIMIT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code
    except _TooSlow:
        code = None
    finally:
        if timed:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    return code, out.getvalue(), err.getvalue()


def assert_handled(source: str | bytes, commands=(("check",),), name: str = "fuzz.pop") -> int | None:
    """Run popc on `source`; it must exit 0 or 1 with no traceback.  Returns the
    exit code of the first command (None when it was too slow to matter)."""
    path = _WORK / name
    if isinstance(source, bytes):
        path.write_bytes(source)
    else:
        path.write_text(source, encoding="utf-8", errors="surrogatepass")
    first = None
    for k, cmd in enumerate(commands):
        code, out, err = popc([*cmd, str(path), "--tiles", "4"])
        if k == 0:
            first = code
        if code is None:
            break
        text = source if isinstance(source, str) else repr(source)
        msg = f"popc {' '.join(cmd)} exited {code}\n--- source\n{text}\n--- stdout\n{out}--- stderr\n{err}"
        assert code in (0, 1), msg
        assert "Traceback" not in out + err, msg
        assert "internal compiler error" not in err, msg
        if code == 1:
            assert "error" in err, msg          # a failure always says why
        if code != 0:
            break
    return first


# ---------------------------------------------------------------- (a) generated programs

DTYPES = ("f32", "i32", "bool", "f16")
INTRINSICS_1 = ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "sin", "cos", "abs", "floor", "ceil")
INTRINSICS_2 = ("min", "max", "pow")


@st.composite
def codelet_source(draw, name: str, scalar: bool = False) -> str:
    """A codelet: fields of every direction, rank and type; a body of statements
    that mostly type-check.  Every loop terminates."""
    fields = []
    if scalar:
        for k in range(draw(st.integers(1, 2))):
            fields.append(("", f"p{k}", draw(st.sampled_from(("f32", "i32"))), ()))
    else:
        for k in range(draw(st.integers(1, 3))):
            direction = draw(st.sampled_from(("in", "out", "inout", "inout", "")))
            dims = () if direction == "" else draw(st.sampled_from(((), ("n",), ("n",), (4,), ("n", "m"), (2, "n"))))
            fields.append((direction, f"f{k}", draw(st.sampled_from(DTYPES)), dims))
    locals_: list[tuple[str, str]] = []          # in scope: (name, type)
    mutable: set[str] = set()
    counter = [0]

    def scalar_expr(ty: str, depth: int = 0) -> str:
        opts = ["lit"]
        loads = [f for f in fields if (f[2] == ty or (ty == "f32" and f[2] == "f16"))]
        if loads:
            opts += ["load", "load"]
        if any(t == ty for _, t in locals_):
            opts += ["local", "local"]
        if depth < 3:
            opts += ["bin", "bin", "call", "cast", "select"]
        kind = draw(st.sampled_from(opts))
        if kind == "lit":
            if ty == "bool":
                return draw(st.sampled_from(("true", "false")))
            if ty == "i32":
                return str(draw(st.integers(-3, 9)))
            return draw(st.sampled_from(("0.0", "1.5", "2.0", "-0.25", "3")))
        if kind == "load":
            f = draw(st.sampled_from(loads))
            if not f[3]:
                return f[1]
            idx = ", ".join(index_expr(d, depth + 1) for d in f[3])
            return f"{f[1]}[{idx}]"
        if kind == "local":
            return draw(st.sampled_from([n for n, t in locals_ if t == ty]))
        if kind == "bin":
            if ty == "bool":
                op = draw(st.sampled_from(("<", "==", "!=", ">=", "&&", "||")))
                if op in ("&&", "||"):
                    return f"({scalar_expr('bool', depth + 1)} {op} {scalar_expr('bool', depth + 1)})"
                t = draw(st.sampled_from(("f32", "i32")))
                return f"({scalar_expr(t, depth + 1)} {op} {scalar_expr(t, depth + 1)})"
            ops = ("+", "-", "*", "/") + (("%",) if ty == "i32" else ())
            op = draw(st.sampled_from(ops))
            return f"({scalar_expr(ty, depth + 1)} {op} {scalar_expr(ty, depth + 1)})"
        if kind == "call":
            if ty == "f32":
                fn = draw(st.sampled_from(INTRINSICS_1 + INTRINSICS_2))
                n = 2 if fn in INTRINSICS_2 else 1
                return f"{fn}({', '.join(scalar_expr('f32', depth + 1) for _ in range(n))})"
            if ty == "i32":
                fn = draw(st.sampled_from(("abs", "min", "max", "len")))
                if fn == "len":
                    arrays = [f for f in fields if f[3]]
                    if arrays:
                        return f"len({draw(st.sampled_from(arrays))[1]})"
                    fn = "abs"
                n = 1 if fn == "abs" else 2
                return f"{fn}({', '.join(scalar_expr('i32', depth + 1) for _ in range(n))})"
            return f"!{scalar_expr('bool', depth + 1)}"
        if kind == "cast":
            src = draw(st.sampled_from(("f32", "i32", "bool")))
            return f"{ty}({scalar_expr(src, depth + 1)})"
        return f"select({scalar_expr('bool', depth + 1)}, {scalar_expr(ty, depth + 1)}, {scalar_expr(ty, depth + 1)})"

    def index_expr(dim, depth: int) -> str:
        loops = [n for n, t in locals_ if t == "i32" and n.startswith("i")]
        choice = draw(st.sampled_from(("const", "loop", "loop", "expr") if loops else ("const", "expr")))
        if choice == "const":
            return str(draw(st.integers(-1, 4)))
        if choice == "loop":
            return draw(st.sampled_from(loops))
        return scalar_expr("i32", depth + 2)

    def stmts(depth: int, in_loop: bool) -> list[str]:
        scope = len(locals_)
        try:
            return _stmts(depth, in_loop)
        finally:
            del locals_[scope:]

    def _stmts(depth: int, in_loop: bool) -> list[str]:
        out = []
        for _ in range(draw(st.integers(0 if depth else 1, 3))):
            kinds = ["decl", "store", "store", "assign"]
            if depth < 2:
                kinds += ["for", "if", "while"]
            if in_loop:
                kinds += ["break", "continue"]
            if scalar:
                kinds.remove("store")
                kinds.remove("store")
            kind = draw(st.sampled_from(kinds))
            if kind == "decl":
                counter[0] += 1
                ty = draw(st.sampled_from(("f32", "i32", "bool")))
                name = f"v{counter[0]}"
                word = draw(st.sampled_from(("var", "let")))
                out.append(f"{word} {name}: {ty} = {scalar_expr(ty)};" if draw(st.booleans())
                           else f"{word} {name} = {scalar_expr(ty)};")
                locals_.append((name, ty))
                if word == "var":
                    mutable.add(name)
            elif kind == "store":
                writable = [f for f in fields if f[0] in ("out", "inout")]
                if not writable:
                    continue
                f = draw(st.sampled_from(writable))
                ty = "f32" if f[2] == "f16" else f[2]
                target = f[1] if not f[3] else f"{f[1]}[{', '.join(index_expr(d, 0) for d in f[3])}]"
                op = draw(st.sampled_from(("=", "=", "+=", "*=") if ty != "bool" else ("=",)))
                out.append(f"{target} {op} {scalar_expr(ty)};")
            elif kind == "assign":
                targets = [(n, t) for n, t in locals_ if n in mutable]
                if not targets:
                    continue
                n, t = draw(st.sampled_from(targets))
                out.append(f"{n} = {scalar_expr(t)};")
            elif kind == "for":
                counter[0] += 1
                var = f"i{counter[0]}"
                arrays = [d for f in fields for d in f[3]]
                bound = draw(st.sampled_from([*(str(d) for d in arrays), "3", "0"]))
                step = draw(st.sampled_from(("", "", " step 2", " step -1")))
                start = "0"
                if step == " step -1":
                    start, bound = bound + " - 1", "-1"
                locals_.append((var, "i32"))
                body = stmts(depth + 1, True)
                locals_.pop()
                out.append(f"for {var} in {start}..{bound}{step} {{ {' '.join(body)} }}")
            elif kind == "while":
                counter[0] += 1
                w = f"w{counter[0]}"
                body = stmts(depth + 1, True)
                out.append(f"var {w}: i32 = 0; while {w} < 3 {{ {w} += 1; {' '.join(body)} }}")
            elif kind == "if":
                cond = scalar_expr("bool")
                then = stmts(depth + 1, in_loop)
                orelse = stmts(depth + 1, in_loop) if draw(st.booleans()) else None
                out.append(f"if {cond} {{ {' '.join(then)} }}" +
                           (f" else {{ {' '.join(orelse)} }}" if orelse is not None else ""))
            else:
                out.append(f"{kind};")
        return out

    body = stmts(0, False)
    ret = ""
    if scalar:
        rt = draw(st.sampled_from(("f32", "i32")))
        ret = f" -> {rt}"
        body.append(f"return {scalar_expr(rt)};")
    params = ", ".join(f"{d + ' ' if d else ''}{n}: {t}{'[' + ', '.join(map(str, dims)) + ']' if dims else ''}"
                       for d, n, t, dims in fields)
    return f"codelet {name}({params}){ret} {{\n    " + "\n    ".join(body) + "\n}\n"


@st.composite
def graph_source(draw, codelets: list[tuple[str, list]]) -> str:
    """A Poplar-level graph over a few small tensors: maps (sometimes partial or out
    of range), compute sets of vertices connected to slices, and a program with
    copies, prints, repeat and if.  Device `while` is left out: it need not end."""
    tiles = draw(st.integers(1, 4))
    tensors = []
    lines = []
    # Mostly the types the codelets' edges have, so that vertices connect.
    wanted = [f[2] for _, fields in codelets if fields for f in fields if f[0]] or list(DTYPES)
    for k in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(wanted) if draw(st.integers(0, 4)) else st.sampled_from(DTYPES))
        shape = draw(st.sampled_from(((4,), (8,), (2, 4), (1,), (3,))))
        name = f"t{k}"
        init = ""
        if draw(st.booleans()):
            init = " = " + draw(st.sampled_from(("1", "0", "zeros()", "ones()", "arange()",
                                                 "uniform(seed = 3)", "[1, 2, 3, 4]", "true")))
        tensors.append((name, dtype, shape))
        lines.append(f"var {name}: {dtype}[{', '.join(map(str, shape))}]{init};")
        how = draw(st.sampled_from(("linear",) * 4 + ("tile",) * 3 + ("slices",) * 2 + ("none",)))
        if how == "linear":
            lines.append(f"map {name} -> linear;")
        elif how == "tile":
            lines.append(f"map {name} -> tile {draw(st.integers(0, tiles - 1 + (draw(st.integers(0, 9)) == 0)))};")
        elif how == "slices":
            n = shape[0]
            lines.append(f"for i in 0..{n} {{ map {name}[i] -> tile i % {tiles}; }}")

    def view(t, rank: int | None = None) -> str:
        """A view of tensor t: all of it, a slice, an element, a block of rows and
        columns; of `rank` dimensions when it can be."""
        name, _, shape = t
        if rank is None:
            rank = draw(st.integers(0, len(shape)))
        if rank >= len(shape) and draw(st.booleans()):
            return name
        numel = 1
        for n in shape:
            numel *= n
        odd = draw(st.integers(0, 11))
        if odd == 0:
            return f"flatten({name})" if rank == 1 else f"transpose({name})"
        if odd == 1 and rank == 2 and numel % 2 == 0:
            return f"reshape({name}, [2, {numel // 2}])"
        if odd == 2:
            return f"{name}[{-draw(st.integers(1, shape[0]))}]"
        idx = []
        for axis, n in enumerate(shape):
            lo = draw(st.integers(0, n - 1))
            keep = axis >= len(shape) - rank
            if not keep:
                idx.append(str(lo))
            elif draw(st.booleans()):
                idx.append(":")
            else:
                idx.append(f"{lo}:{draw(st.integers(lo + 1, n))}")
        return f"{name}[{', '.join(idx)}]"

    if draw(st.integers(0, 3)) == 0:
        lines.append(draw(st.sampled_from((
            "if tiles > 2 { let big = true; } else { let big = false; }",
            "for i in 0..tiles step 2 { let j = i * 2 - 1; }",
            "let a = t0; let b = a;",
            "let half = tiles / 2 + tiles % 2;",
        ))))
    cs_names = []
    vertex_codelets = [c for c in codelets if c[1] is not None]
    for k in range(draw(st.integers(0, 2))):
        body = []
        for _ in range(draw(st.integers(0, 3))):
            if not vertex_codelets:
                break
            cname, fields = draw(st.sampled_from(vertex_codelets))
            args = []
            for direction, fname, dtype, dims in fields:
                if direction == "":
                    value = {"f32": "1.5", "f16": "2", "i32": "3", "bool": "true"}[dtype]
                    if draw(st.integers(0, 9)) == 0:
                        value = draw(st.sampled_from(("1.5", "7", "false")))
                    args.append(f"{fname} = {value}")
                else:
                    same = [t for t in tensors if t[1] == dtype and len(t[2]) >= len(dims)] or tensors
                    args.append(f"{fname} = {view(draw(st.sampled_from(same)), len(dims))}")
            tile = draw(st.sampled_from(("0", str(tiles - 1), "t", f"t % {tiles}")))
            stmt = f"{cname}({', '.join(args)}) on tile {tile};"
            if "t" in tile.split():
                stmt = f"for t in 0..{draw(st.integers(1, tiles))} {{ {stmt} }}"
            body.append(stmt)
        cs_names.append(f"cs{k}")
        lines.append(f"compute cs{k} {{ {' '.join(body)} }}")

    if draw(st.booleans()):
        prog = []

        def steps(depth: int) -> list[str]:
            out = []
            for _ in range(draw(st.integers(0, 3))):
                kinds = ["print", "execute", "copy"] + (["repeat", "if"] if depth < 2 else [])
                kind = draw(st.sampled_from(kinds))
                if kind == "print":
                    out.append(f"print {view(draw(st.sampled_from(tensors)))};")
                elif kind == "execute" and cs_names:
                    out.append(f"execute {draw(st.sampled_from(cs_names))};")
                elif kind == "copy":
                    a, b = draw(st.sampled_from(tensors)), draw(st.sampled_from(tensors))
                    out.append(f"copy {view(a)} -> {view(b)};")
                elif kind == "repeat":
                    out.append(f"repeat {draw(st.integers(0, 2))} {{ {' '.join(steps(depth + 1))} }}")
                elif kind == "if":
                    bools = [t for t in tensors if t[1] == "bool"]
                    if bools:
                        b = draw(st.sampled_from(bools))
                        out.append(f"if {b[0]}[0] {{ {' '.join(steps(depth + 1))} }} "
                                   f"else {{ {' '.join(steps(depth + 1))} }}")
            return out
        prog = steps(0)
        lines.append(f"program {{ {' '.join(prog)} }}")
    if draw(st.booleans()):
        t = draw(st.sampled_from(tensors))
        lines.append(f"output {view(t)} as out0;")
    return f"graph g(tiles = {tiles}) {{\n    " + "\n    ".join(lines) + "\n}\n"


@st.composite
def program_source(draw) -> str:
    codelets = []
    parts = []
    if draw(st.booleans()):
        parts.append(draw(codelet_source("sq", scalar=True)))
        codelets.append(("sq", None))
    for name in ("A", "B")[:draw(st.integers(1, 2))]:
        src = draw(codelet_source(name))
        parts.append(src)
        header = src[src.index("(") + 1:src.index(")")]
        fields = []
        for p in filter(None, (x.strip() for x in re.split(r",\s*(?![^\[]*\])", header))):
            m = re.match(r"(?:(in|out|inout) )?(\w+): (\w+)(?:\[(.*)\])?", p)
            dims = tuple(x.strip() for x in m.group(4).split(",")) if m.group(4) else ()
            fields.append((m.group(1) or "", m.group(2), m.group(3), dims))
        codelets.append((name, fields))
    parts.append(draw(graph_source(codelets)))
    return "\n".join(parts)


@st.composite
def tensor_program_source(draw) -> str:
    """A tensor program: expressions of built-in operations and popnn layers over a
    few tensors, with shapes that mostly agree; its outputs.  No device loops."""
    tensors = {"x": ("f32", (4, 8)), "w": ("f32", (8, 4)), "v": ("f32", (8,)), "y": ("i32", (4,)),
               "im": ("f32", (2, 3, 6, 6))}
    lines = [f"var {n}: {t}[{', '.join(map(str, sh))}] = "
             f"{'arange()' if t == 'i32' else 'uniform(seed = ' + str(k) + ')'};"
             for k, (n, (t, sh)) in enumerate(tensors.items())]
    names = list(tensors)

    def expr(depth: int) -> str:
        if depth > 3 or draw(st.integers(0, 3)) == 0:
            return draw(st.sampled_from(names + ["1.5", "2"]))
        kind = draw(st.sampled_from(("unary", "binary", "reduce", "matmul", "shape", "layer", "cast")))
        a = expr(depth + 1)
        if kind == "unary":
            fn = draw(st.sampled_from(("exp", "log", "sqrt", "tanh", "sigmoid", "abs", "relu",
                                       "square", "floor", "rsqrt", "softmax", "log_softmax")))
            return f"{fn}({a})"
        if kind == "binary":
            op = draw(st.sampled_from(("+", "-", "*", "/", "==", "<", "@", "%")))
            return f"({a} {op} {expr(depth + 1)})"
        if kind == "reduce":
            fn = draw(st.sampled_from(("sum", "mean", "max", "min", "argmax")))
            axis = draw(st.sampled_from(("", ", axis = 0", ", axis = 1", ", axis = -1", ", axis = 5",
                                         ", axis = 1, keepdims = true")))
            return f"{fn}({a}{axis})"
        if kind == "matmul":
            return f"matmul({a}, {expr(depth + 1)})"
        if kind == "shape":
            return draw(st.sampled_from((f"transpose({a})", f"reshape({a}, [8, 4])",
                                         f"reshape({a}, [32])", f"reshape({a}, [3, 3])",
                                         f"slice({a}, axis = 0, start = 1, stop = 3)",
                                         f"concat([{a}, {a}], axis = 0)",
                                         f"pad({a}, [[1, 1], [0, 2]])",
                                         f"gather({a}, y, axis = 0)",
                                         "one_hot(y, 5)",
                                         f"select({a} > 0.5, {a}, 0.0)",
                                         f"max_pool2d({a}, 2)", f"avg_pool2d({a}, 3)",
                                         f"conv2d({a}, reshape(x, [1, 2, 4, 4]), stride = 1, padding = 1)")))
        if kind == "layer":
            return draw(st.sampled_from((f"dense({a}, 3)", f"dense({a}, 0)", f"cross_entropy({a}, y)",
                                         f"batch_norm({a})", f"conv_bn({a}, 2, 3, 1, 1)")))
        return f"{draw(st.sampled_from(('f32', 'i32', 'bool', 'f16')))}({a})"

    for k in range(draw(st.integers(1, 3))):
        lines.append(f"let e{k} = {expr(0)};")
        names.append(f"e{k}")
    for k in range(draw(st.integers(1, 2))):
        lines.append(f"output o{k} = {draw(st.sampled_from(names[5:]))};")
    for n in tensors:
        lines.append(f"map {n} -> linear;")
    return 'import "popnn";\ngraph tp(tiles = 4) {\n    ' + "\n    ".join(lines) + "\n}\n"


@fuzz(150)
@given(tensor_program_source())
def test_generated_tensor_programs(source):
    code = assert_handled(source, commands=(("check",), ("run",)))
    # How many reach `run` (--hypothesis-show-statistics): most are rejected by check.
    event(f"check exited {code}")


@fuzz(300)
@given(program_source())
def test_generated_programs(source):
    code = assert_handled(source, commands=(("check",), ("run",)))
    assume(code is not None)
    event(f"check exited {code}")      # about half reach `run` (--hypothesis-show-statistics)


@fuzz(150)
@given(st.data())
def test_generated_programs_dump(data):
    """The IR printers too: every stage of a generated program prints (or the program
    has errors)."""
    source = data.draw(program_source())
    stage = data.draw(st.sampled_from(("parse", "check", "elaborate", "lower", "plan")))
    assert_handled(source, commands=(("dump", "--after", stage),))


@fuzz(200)
@given(st.data())
def test_generated_codelets_alone(data):
    """Codelets without a graph: every one checks or is an error; none crashes the checker."""
    parts = [data.draw(codelet_source("sq", scalar=True)), data.draw(codelet_source("A"))]
    assert_handled("\n".join(parts), commands=(("dump", "--after", "check"),))


# ---------------------------------------------------------------- (b) mutations

_TOKEN = re.compile(r'\s+|//[^\n]*|/\*.*?\*/|"[^"\n]*"|\d+\.\d+(?:[eE][+-]?\d+)?|\d+|\w+|->|\.\.|==|!=|<=|>='
                    r'|&&|\|\||[+\-*/]=|.', re.S)
_NUMBERS = ("0", "-1", "1", "2147483647", "2147483648", "-2147483648", "99999999999999999999",
            "1e999", "0.0", "-0.0", "1e-45", "65536", "3.5")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


@st.composite
def mutated_source(draw) -> str:
    path = draw(st.sampled_from(CORPUS))
    toks = _tokens(path.read_text(encoding="utf-8"))
    for _ in range(draw(st.integers(1, 4))):
        if not toks:
            break
        i = draw(st.integers(0, len(toks) - 1))
        op = draw(st.sampled_from(("delete", "duplicate", "swap", "number", "number", "name",
                                   "char", "truncate", "keyword")))
        if op == "delete":
            del toks[i]
        elif op == "duplicate":
            toks.insert(i, toks[i])
        elif op == "swap":
            j = draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
        elif op == "number":
            nums = [k for k, t in enumerate(toks) if t[:1].isdigit()]
            if nums:
                toks[draw(st.sampled_from(nums))] = draw(st.sampled_from(_NUMBERS))
        elif op == "name":
            names = [k for k, t in enumerate(toks) if re.fullmatch(r"[A-Za-z_]\w*", t)]
            if names:
                toks[draw(st.sampled_from(names))] = toks[draw(st.sampled_from(names))]
        elif op == "char":
            toks.insert(i, draw(st.sampled_from(list("{}()[];:,.=<>!&|+-*/%@\"'#$\\\n\t\x00é€"))))
        elif op == "keyword":
            toks.insert(i, " " + draw(st.sampled_from(
                ("break", "continue", "return", "var", "let", "in", "out", "inout", "tile", "linear",
                 "step", "map", "copy", "print", "repeat", "while", "if", "else", "for", "compute",
                 "program", "execute", "codelet", "graph", "import", "def", "param", "input",
                 "output", "minimize", "true", "false", "f32", "i32", "bool", "f16"))) + " ")
        else:
            toks = toks[:i]
    return "".join(toks)


@fuzz(600)
@given(mutated_source())
def test_mutated_programs(source):
    assert_handled(source, name="mutant.pop")


@fuzz(200)
@given(mutated_source())
def test_mutated_programs_dump(source):
    assert_handled(source, commands=(("dump", "--after", "elaborate"),), name="mutant.pop")


# ---------------------------------------------------------------- (c) random input

@fuzz(200)
@given(st.binary(max_size=300))
def test_random_bytes(data):
    assert_handled(data, name="bytes.pop")


_ALPHABET = st.sampled_from(list("{}()[];:,.=<>!&|+-*/%@\"\n 0123456789abcfgimnortxyz_") +
                            ["codelet ", "graph ", "in ", "out ", "f32", "i32", "tile ", "map ",
                             "for ", "..", "->", "compute ", "program ", "var ", "let "])


@fuzz(300)
@given(st.lists(_ALPHABET, max_size=80).map("".join))
def test_random_text(text):
    assert_handled(text, name="text.pop")


@fuzz(60)
@given(st.binary(max_size=400))
def test_random_popx(data):
    """A .popx of random bytes is an error, not a crash."""
    path = _WORK / "random.popx"
    path.write_bytes(data)
    code, out, err = popc(["run", str(path)])
    assert code == 1 and "Traceback" not in err and "internal" not in err, err
