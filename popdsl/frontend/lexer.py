"""What the fast parser reads and what it builds with.  Requires `frontend.ast`;
produces the tokens of a source text (their texts with the line and column where each
starts and the column where it ends) and `new`, fast constructors of the AST classes.

It knows the terminals of grammar/pop.lark, longest match first, but not the parser
states of Lark's contextual lexer: a name is a name even where Lark would read a keyword
out of it ("tile0" after `on` is `tile` `0` to Lark).  The parser accepts a keyword only
where its text is exactly the keyword and hands anything else to Lark.  What the grammar
has no terminal for (an unterminated string or comment, a stray character) becomes a
one-character token that no rule accepts, so Lark reports it.
"""
from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

from popdsl.diagnostics import Span
from popdsl.frontend import ast

# Lark's terminals, with the same character classes (ASCII names and digits, the
# whitespace of `%ignore`): `\w`, `\d` and `\s` would also take Unicode.  Comments are
# tokens here; `tokenize` drops them.
_TOKEN = re.compile(
    r"([A-Za-z_][A-Za-z_0-9]*"
    r"|[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
    r"|//[^\n]*|/\*[\s\S]*?\*/"
    r'|"[^"\n]*"'
    r"|==|!=|<=|>=|->|\.\.|\|\||&&|[-+*/]="
    r"|[^ \t\r\n\f])")

# After the last token: never a token's text, and its first character starts nothing.
EOF = " "
PAD = 4


def tokenize(text: str) -> tuple[list[str], list[int], list[int], list[int]]:
    """(texts, lines, columns, end columns) of the tokens of `text`, comments left out,
    then PAD end-of-file tokens.  Lines and columns are 1-based and count characters
    (a tab is one column) as Lark does; an end column is exclusive."""
    # split with a group alternates the text between tokens (whitespace only, since the
    # last alternative takes any other character) and the tokens.
    parts = _TOKEN.split(text)
    toks: list[str] = []
    lines: list[int] = []
    cols: list[int] = []
    ends: list[int] = []
    add_tok, add_line, add_col, add_end = toks.append, lines.append, cols.append, ends.append
    line, line_start, pos = 1, 0, 0
    it = iter(parts)
    for space, tok in zip(it, it):
        if space:
            if "\n" in space:
                line += space.count("\n")
                line_start = pos + space.rindex("\n") + 1
            pos += len(space)
        if tok[0] == "/" and tok[1:2] in ("/", "*"):
            if "\n" in tok:
                line += tok.count("\n")
                line_start = pos + tok.rindex("\n") + 1
            pos += len(tok)
            continue
        col = pos - line_start + 1
        pos += len(tok)
        add_tok(tok)
        add_line(line)
        add_col(col)
        add_end(col + len(tok))
    toks.extend([EOF] * PAD)
    lines.extend([line] * PAD)
    cols.extend([0] * PAD)
    ends.extend([0] * PAD)
    return toks, lines, cols, ends


# ---------------------------------------------------------------- node constructors

def _constructor(cls):
    """A function of `cls`'s fields, in order, that builds what `cls(...)` builds in about
    half the time: a frozen dataclass's __init__ sets each field through
    object.__setattr__, this sets the slots directly.  Only for a slotted dataclass whose
    __init__ does nothing else; any other class is its own constructor."""
    if not (dataclasses.is_dataclass(cls) and "__slots__" in cls.__dict__) \
            or hasattr(cls, "__post_init__") or not all(f.init for f in dataclasses.fields(cls)):
        return cls
    setters = [cls.__dict__[f.name].__set__ for f in dataclasses.fields(cls)]
    if len(setters) not in _BY_ARITY:
        return cls
    return _BY_ARITY[len(setters)](object.__new__, cls, *setters)


# One closure per number of fields: an exec per class would cost more at import.
def _make1(new, cls, s0):
    def make(a):
        o = new(cls); s0(o, a); return o                                          # noqa: E702
    return make


def _make2(new, cls, s0, s1):
    def make(a, b):
        o = new(cls); s0(o, a); s1(o, b); return o                                # noqa: E702
    return make


def _make3(new, cls, s0, s1, s2):
    def make(a, b, c):
        o = new(cls); s0(o, a); s1(o, b); s2(o, c); return o                      # noqa: E702
    return make


def _make4(new, cls, s0, s1, s2, s3):
    def make(a, b, c, d):
        o = new(cls); s0(o, a); s1(o, b); s2(o, c); s3(o, d); return o            # noqa: E702
    return make


def _make5(new, cls, s0, s1, s2, s3, s4):
    def make(a, b, c, d, e):
        o = new(cls); s0(o, a); s1(o, b); s2(o, c); s3(o, d); s4(o, e); return o  # noqa: E702
    return make


def _make6(new, cls, s0, s1, s2, s3, s4, s5):
    def make(a, b, c, d, e, f):
        o = new(cls); s0(o, a); s1(o, b); s2(o, c); s3(o, d); s4(o, e); s5(o, f)  # noqa: E702
        return o
    return make


_BY_ARITY = {1: _make1, 2: _make2, 3: _make3, 4: _make4, 5: _make5, 6: _make6}


# The AST classes (and Span) by name, each as its fast constructor: `new.Name(id, span)`.
new = SimpleNamespace(Span=_constructor(Span), **{
    name: _constructor(getattr(ast, name)) for name in (
        "Name", "IntLit", "FloatLit", "BoolLit", "StringLit", "ListLit", "TupleLit", "Neg", "Not",
        "Binary", "Kwarg", "Call", "Slice", "IndexExpr", "TypeRef", "Block", "LetStmt", "VarStmt",
        "AssignStmt", "CallStmt", "ForStmt", "WhileStmt", "IfStmt", "BreakStmt", "ContinueStmt", "ReturnStmt",
        "MapStmt", "ComputeStmt", "VertexStmt", "ProgramStmt", "InputStmt", "OutputStmt",
        "ParamStmt", "MinimizeStmt", "ExecuteStmt", "CopyStmt", "RepeatStmt", "PrintStmt",
        "StepStmt", "Param", "Codelet", "Graph", "DefDecl", "ImportDecl", "Module")})
