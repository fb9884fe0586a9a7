"""Differential tests of the fast parser against the reference (Lark from
grammar/pop.lark): on every input, either both accept and build equal trees (every
field, every span), or Lark rejects and the fast parser hands over, so that `parse`
reports Lark's diagnostics exactly.  The fast parser may hand over a text Lark accepts
(a keyword glued to a name, as in `on tile0`); it may never accept one Lark rejects.

Inputs: every .pop file of the repository; the programs test_fuzz generates; random
mutations of both (tokens deleted, duplicated, swapped, glued, wrapped in parentheses,
keywords and comments inserted); nesting around MAX_NESTING.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from popdsl.diagnostics import CompileError
from popdsl.frontend import parser
from popdsl.frontend.fastparse import Handover, parse_fast
from popdsl.frontend.lark_parser import parse_lark
from popdsl.frontend.parser import MAX_NESTING, parse
from test_fuzz import (CORPUS, codelet_source, mutated_source, program_source,
                       tensor_program_source)

ROOT = Path(__file__).resolve().parent.parent
ALL_POP = sorted({*ROOT.glob("examples/*.pop"), *ROOT.glob("stdlib/*.pop"),
                  *(ROOT / "tests").rglob("*.pop")})
PATH = "diff.pop"


def reference(text: str):
    """Lark's Module, or the exception it raised."""
    try:
        return parse_lark(text, PATH)
    except Exception as e:             # noqa: BLE001 — compared below, whatever it is
        return e


def fast(text: str):
    """The fast parser's Module, or None where it hands over."""
    try:
        return parse_fast(text, PATH, MAX_NESTING)
    except (Handover, RecursionError):
        return None


def same_error(a: Exception, b: Exception) -> bool:
    if isinstance(a, CompileError) and isinstance(b, CompileError):
        return a.diagnostics == b.diagnostics
    return type(a) is type(b) and str(a) == str(b)


def check(text: str) -> tuple[bool, bool]:
    """Hold the fast parser and `parse` to the reference on `text`.  Returns (Lark
    accepted, the fast parser accepted)."""
    ref = reference(text)
    got = fast(text)
    try:
        front = parse(text, PATH)
    except Exception as e:             # noqa: BLE001
        front = e
    if isinstance(ref, Exception):
        assert got is None, f"the fast parser accepted what Lark rejects ({ref!r}):\n{text}"
        assert isinstance(front, Exception) and same_error(front, ref), \
            f"parse() reported {front!r}, Lark {ref!r}:\n{text}"
        return False, False
    if got is not None:
        assert got == ref, first_difference(got, ref) + "\n" + text
    assert front == ref
    return True, got is not None


def first_difference(a, b, where="module") -> str:
    """Where two trees first differ, for a readable failure."""
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, tuple):
        if len(a) != len(b):
            return f"{where}: {len(a)} items != {len(b)}"
        for k, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{where}[{k}]")
    if hasattr(a, "__dataclass_fields__"):
        for f in a.__dataclass_fields__:
            if getattr(a, f) != getattr(b, f):
                return first_difference(getattr(a, f), getattr(b, f), f"{where}.{f}")
    return f"{where}: {a!r} != {b!r}"


def settings_(n: int):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ---------------------------------------------------------------- the repository's files

@pytest.mark.parametrize("path", ALL_POP, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_pop_file(path):
    text = path.read_text(encoding="utf-8")
    ok, accepted = check(text)
    # Every valid file of the repository takes the fast path: handing over is for
    # what people do not write.
    assert accepted == ok, f"{path}: handed over a valid file"


def test_the_corpus_takes_the_fast_path():
    """Most of the files are valid programs (the rest are golden syntax errors)."""
    valid = [p for p in ALL_POP if not isinstance(reference(p.read_text(encoding="utf-8")), Exception)]
    assert len(valid) > 100


# ---------------------------------------------------------------- generated programs

@settings_(100)
@given(st.one_of(program_source(), tensor_program_source(), codelet_source("A"),
                 codelet_source("S", scalar=True)))
def test_generated_programs(text):
    ok, accepted = check(text)
    assert ok and accepted, "a generated program is valid and takes the fast path"


# ---------------------------------------------------------------- mutations

_TOKEN = re.compile(r'\s+|//[^\n]*|/\*.*?\*/|"[^"\n]*"|\d+\.\d+(?:[eE][+-]?\d+)?|\d+|\w+|->|\.\.'
                    r'|==|!=|<=|>=|&&|\|\||[+\-*/]=|.', re.S)
_WORDS = ("else", "codelet", "graph", "def", "import", "in", "out", "inout", "shared", "tile", "on",
          "step", "as", "with", "linear", "true", "false", "var", "let", "param", "if", "for",
          "map", "copy", "return", "print", "output", "input", "minimize", "execute", "repeat")
_GAPS = (" ", "\n", "\t", "  \r\n", "/* c */", "/* two\nlines */", "// c\n", "\f", "")


@st.composite
def twisted_source(draw) -> str:
    """A file of the corpus or a generated program, then a few edits where the two
    parsers could part: glued or split tokens, keywords as names, parentheses, gaps."""
    if draw(st.booleans()):
        text = draw(st.sampled_from(CORPUS)).read_text(encoding="utf-8")
    else:
        text = draw(program_source())
    toks = _TOKEN.findall(text)
    for _ in range(draw(st.integers(1, 3))):
        if not toks:
            break
        k = draw(st.integers(0, len(toks) - 1))
        op = draw(st.sampled_from(("glue", "gap", "word", "word", "paren", "paren", "delete",
                                   "swap", "minus")))
        if op == "glue" and toks[k].isspace():
            del toks[k]
        elif op == "gap":
            toks.insert(k, draw(st.sampled_from(_GAPS)))
        elif op == "word":
            toks.insert(k, draw(st.sampled_from(_WORDS)) + draw(st.sampled_from(("", " "))))
        elif op == "paren" and re.fullmatch(r"\w+", toks[k]):
            depth = draw(st.integers(1, 3))
            toks[k] = "(" * depth + toks[k] + ")" * depth
        elif op == "delete":
            del toks[k]
        elif op == "swap":
            j = draw(st.integers(0, len(toks) - 1))
            toks[k], toks[j] = toks[j], toks[k]
        elif op == "minus":
            toks.insert(k, draw(st.sampled_from(("-", "!", "- ", "-=", "->", "=", "==", ",", ":"))))
    return "".join(toks)


@settings_(250)
@given(st.one_of(mutated_source(), twisted_source()))
def test_mutations(text):
    ok, accepted = check(text)
    event("Lark accepts" if ok else "Lark rejects")
    if ok and not accepted:
        event("handed over a valid text")


# ---------------------------------------------------------------- where the lexers differ

BODY = "codelet A(in a: f32[n], out y: f32) {{ {} }}\n"


@pytest.mark.parametrize("stmt", [
    "x = 1; else = 2;",                  # a name after ';' ...
    "while c {} else = 2;",              # ... but a keyword after '}'
    "for i in 0..n {} graph = 1;",
    "if c {} else {} else = 2;",
    "graph = 1;",
    "f(x) on tile0;", "f(x) ontile 0;", "f(x) on tile 0;",
    "for i in 0..10step2 {}", "for i in0..10 {}", "for i in 0..10 step 2 {}",
    "shared = 1;", "shared var v: f32;", "sharedvar v: f32;", "shared param p: f32[n];",
    "true = 1;", "y = f(true = 1);", "y = f(false = 1, x);", "y = f(step = 1, tile = 2);",
    "y = f(a == 1);", "y = f(a = = 1);", "let if = 1;", "let (a, b) = f();",
    "let (a) = f();", "y = a < b < c;", "y = (a < b) < c;", "y = a == b != c;", "y = -a[0] * -b;",
    "y = a - -b;", "y = a->b;", "y = a -= b;", "y = !=a;", "y = a[:, 1:, :2, 1:2];", "y = [];",
    "y = (a, b);", "y = (a,);", "y = ();", "y = f()(1)[2];", 'y = "s";', "y = 1.5e3 + 2e-1 + 3;",
    "y = 1..2;", "y = x.y;", "map x -> tile0;", "map x -> linear;", "map x->tile 1;",
    "output o = x as z;", "output x asz;", "output true = x;", "minimize l with sgd(0.1);",
    "minimize l with -x;", "copy a -> b;", "copy a - > b;", "step;", "step = 1;", "return;",
    "y = 1 /* c */ + 2;", "y = 1 /* unterminated", 'y = "unterminated;', "y = 1 // c\n;",
    "y = a\t+\tb;", "y = a\r\n+ b;", "y = é;", "y = 1\v;", "y = 1\x00;", "x: f32 = 1;",
    "var v: f32[1.5];", "var v: f32[n, 2];", "var v: f32[];", "y = " + "9" * 5000 + ";",
])
def test_lexer_corners(stmt):
    check(BODY.format(stmt))


@pytest.mark.parametrize("top", [
    "codeletA() {}", "codelet A() {} codeletB() {}", 'import "x"; codeletA() {}',
    "codelet A(in in: f32, out out: f32, inout: f32) {}", "codelet A(ina: f32) {}",
    "codelet A() -> f32 {}", "codelet A() -> (f32, i32) {}", "def f() -> (f32, i32) {}",
    "def f() -> (f32) {}", "graph g {}", "graph g() {}", "graph g(tiles = 4, 3) {}",
    "graph g(tiles = 4,) {}", "codelet A() {} else {}", "", "  // only a comment\n",
    "/* only */", 'import "a"; import "b";', "import a;",
])
def test_top_level_corners(top):
    check(top)


# ---------------------------------------------------------------- nesting

@pytest.mark.parametrize("depth", [MAX_NESTING - 5, MAX_NESTING - 4, MAX_NESTING - 3,
                                   MAX_NESTING - 2, MAX_NESTING + 1, 5 * MAX_NESTING])
def test_nesting_limit_in_parentheses(depth):
    check(BODY.format("y = " + "(" * depth + "1" + ")" * depth + ";"))


@pytest.mark.parametrize("depth", [97, 98, 99, 100, 101])
def test_nesting_limit_in_blocks(depth):
    check(BODY.format("if c { " * depth + "y = 1;" + " }" * depth))


@pytest.mark.parametrize("depth", [MAX_NESTING - 6, MAX_NESTING - 5, MAX_NESTING - 4, MAX_NESTING])
def test_nesting_limit_in_else_if_chains(depth):
    check(BODY.format("if c {}" + " else if c {}" * depth))


@pytest.mark.parametrize("n", [150, MAX_NESTING - 4, MAX_NESTING - 3, MAX_NESTING - 2, 1000])
def test_nesting_limit_in_long_sums_and_calls(n):
    """A flat sum nests to the left in the tree, as deep as it is long."""
    check(BODY.format("y = " + " + ".join(["1"] * n) + ";"))
    check(BODY.format("y = f" + "(1)" * n + ";"))
    check(BODY.format("y = " + "-" * n + "1;"))
    check(BODY.format("y = [" + ", ".join(["1"] * 5 * n) + "];"))


def test_nesting_limit_in_program_and_compute_blocks():
    for depth in (97, 98, 99, 100):
        check("graph g {" + " program {" * depth + " }" * depth + " }")
        check("graph g {" + " compute c {" * depth + " }" * depth + " }")


# Wrappings of an expression §: (levels of Lark's tree added above §, the binding
# level § needs to keep its place, the level of the result).  Levels: 3 comparison,
# 4 sum, 5 product, 6 prefix operator, 7 atom (names, brackets, calls, indexing).
_WRAP = {"(§)": (1, 0, 7), "f(§)": (1, 0, 7), "a[§]": (1, 0, 7), "[§]": (1, 0, 7),
         "(§, 1)": (1, 0, 7), "f(k = §)": (2, 0, 7), "a[§:]": (2, 0, 7), "a[:§]": (2, 0, 7),
         "a[1, §]": (1, 0, 7), "§(1)": (1, 7, 7), "§[0]": (1, 7, 7), "-§": (1, 6, 6),
         "!§": (1, 6, 6), "1 * §": (1, 6, 5), "§ + 1": (1, 4, 4), "§ < 1": (1, 4, 3)}
# Statements around an expression: how far below the statement the expression's root is.
_PLACE = {"y = §;": 1, "let v = §;": 1, "let v: f32[n] = §;": 1, "var v = §;": 1,
          "map x -> tile §;": 2, "map § -> linear;": 1, "output o = § as z;": 1, "print §;": 1,
          "copy § -> x;": 1, "for i in §..n step 1 {}": 1, "while § {}": 1, "return §;": 1,
          "minimize l with f(§);": 2, "f(x = §) on tile 1;": 3, "§ = 1;": 1, "if § {}": 1}
# Statements around a statement, and how much deeper it is.
_NEST = {"if c { § }": 2, "if c {} else { § }": 2, "if c {} else if c { § }": 3,
         "program { § }": 2, "for i in 0..2 { § }": 2, "repeat 2 { § }": 2, "compute c { § }": 2}


@st.composite
def deep_source(draw) -> str:
    """Blocks in blocks around an expression in an expression, whose deepest node is
    within a few levels of the limit: whatever the mix, the fast parser hands over
    what Lark finds too deep (and may hand over what is just below)."""
    target = MAX_NESTING + draw(st.integers(-2, 2))
    if draw(st.integers(0, 4)) == 0:              # a graph's argument: graph 1, arg 2
        depth, outer = 2, "graph g(tiles = 1, §) {}"
    else:
        place = draw(st.sampled_from(sorted(_PLACE)))
        depth, stmt = 3 + _PLACE[place], place
        while depth < target - 10 and draw(st.integers(0, 3)):
            nest = draw(st.sampled_from(sorted(_NEST)))
            depth += _NEST[nest]
            stmt = nest.replace("§", stmt)
        outer = "codelet A() { " + stmt + " }" if draw(st.booleans()) else "graph g { " + stmt + " }"
    e, level = "x", 7
    need = 7 if "§ = 1;" in outer else 0          # an assignment's target is an atom
    while depth < target:
        last = depth + 1 == target
        fits = [w for w, (k, lo, out) in _WRAP.items()
                if depth + k <= target and level >= lo and (not last or out >= need)]
        wrap = draw(st.sampled_from(fits))
        k, _, level = _WRAP[wrap]
        depth += k
        e = wrap.replace("§", e)
    return outer.replace("§", e)


@settings_(100)
@given(deep_source())
def test_nesting_limit_in_any_mix(text):
    ok, accepted = check(text)
    assert ok or "nested too deeply" in str(reference(text)), "only too deep, never wrong"
    event("Lark accepts" if ok else "Lark rejects")
    event("fast accepts" if accepted else "fast hands over")


@pytest.mark.parametrize("place", sorted(_PLACE) + ["graph g(tiles = 1, §) {}"])
@pytest.mark.parametrize("extra", [0, 1])
def test_nesting_limit_in_every_place(place, extra):
    """Parentheses around a name as deep as the limit allows, and one more, in every
    place an expression can be."""
    if place.startswith("graph"):
        depth, outer = 2, place
    else:
        depth, outer = 3 + _PLACE[place], "codelet A() { " + place + " }"
    k = MAX_NESTING + extra - depth
    text = outer.replace("§", "(" * k + "x" + ")" * k)
    ok, _ = check(text)
    assert ok == (extra == 0)


@pytest.mark.parametrize("stmt", ["y = {};", "var v: f32[{}];"])
def test_an_integer_longer_than_python_converts_is_an_error(stmt):
    digits = "9" * 5000
    text = BODY.format(stmt.format(digits))
    check(text)
    with pytest.raises(CompileError, match="integer literal too long") as e:
        parse(text, PATH)
    d = e.value.diagnostics[0]
    assert (d.span.line, d.span.end_col - d.span.col) == (1, 5000)


def test_a_long_flat_list_takes_the_fast_path():
    """The depth bound counts operators and brackets, not every token."""
    text = BODY.format("y = [" + ", ".join(["1"] * 2000) + "];")
    assert fast(text) == reference(text)


def test_the_environment_selects_the_reference(monkeypatch):
    text = BODY.format("y = 1;")
    calls = []
    monkeypatch.setattr(parser, "parse_fast", lambda *a: calls.append(a))
    monkeypatch.setenv("POPDSL_PARSER", "lark")
    assert parse(text, PATH) == reference(text) and not calls
