"""The reference parser: source text → `ast.Module` with Lark from grammar/pop.lark (the
definition of the language), and syntax errors with names rather than token lists.
Requires lark; produces AST dataclasses with spans or a CompileError.

`frontend.parser` calls it when the fast parser hands a text over, which is for every
text with a syntax error; the differential tests hold the fast parser to its trees."""
from __future__ import annotations

import functools
import re

import lark
from lark import Token, Transformer, v_args

from popdsl import resources
from popdsl.diagnostics import CompileError, Diagnostic, SourceMap, Span
from popdsl.frontend import ast
from popdsl.limits import MAX_NESTING

# How terminals read in a message.
_TOKEN_TEXT = {
    "SEMI": "';'", "COLON": "':'", "EQ": "'='", "LPAR": "'('", "RPAR": "')'",
    "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'", "ARROW": "'->'",
    "DOTDOT": "'..'", "COMMA": "','", "NAME": "a name", "INT": "an integer",
    "FLOAT": "a number", "STRING": "a string", "ASSIGN_OP": "an assignment",
    "CMP_OP": "a comparison", "ADD_OP": "'+' or '-'", "MUL_OP": "'*', '/', '%' or '@'",
    "MINUS": "'-'", "BANG": "'!'", "OROR": "'||'", "ANDAND": "'&&'",
    "DIRECTION": "'in', 'out' or 'inout'", "SHARED": "'shared'", "$END": "end of file",
}


@functools.cache
def _parser() -> lark.Lark:
    text = resources.resource("grammar", "pop.lark").read_text()
    return lark.Lark(text, parser="lalr", lexer="contextual", propagate_positions=True,
                     maybe_placeholders=True, cache=False)


def _describe(term: str) -> str:
    if term in _TOKEN_TEXT:
        return _TOKEN_TEXT[term]
    if term.startswith("__ANON") or term.isupper():
        try:
            pattern = _parser().get_terminal(term).pattern
            if isinstance(pattern, lark.lexer.PatternStr):
                return f"'{pattern.value}'"
        except KeyError:
            pass
    return term.lower()


def _unclosed_brace(text: str, upto: int) -> tuple[int, int] | None:
    """(line, col) of the innermost '{' still open at offset `upto`, skipping
    comments and strings; None if every brace before it is closed."""
    stack: list[int] = []
    i = 0
    while i < upto:
        ch = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = upto if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = upto if j < 0 else j + 2
            continue
        elif ch == '"':
            j = text.find('"', i + 1)
            i = upto if j < 0 else j
        elif ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            stack.pop()
        i += 1
    if not stack:
        return None
    pos = stack[-1]
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _unclosed_note(text: str, upto: int) -> tuple[str, ...]:
    where = _unclosed_brace(text, upto)
    return (f"the '{{' at line {where[0]}, column {where[1]} is not closed",) if where else ()


_TOP_LEVEL = {"CODELET", "GRAPH", "DEF", "IMPORT"}


def _syntax_error(path: str, text: str, e: lark.exceptions.UnexpectedInput) -> Diagnostic:
    line, col = max(e.line, 1), max(e.column, 1)
    notes: tuple[str, ...] = ()
    if isinstance(e, lark.exceptions.UnexpectedCharacters):
        pos = e.pos_in_stream
        ch = text[pos] if pos < len(text) else "?"
        if ch == '"':
            msg = "unterminated string: strings end with '\"' on the same line"
        else:
            msg = f"unexpected character {ch!r}"
        width = 1
    elif isinstance(e, lark.exceptions.UnexpectedEOF) or \
            (isinstance(e, lark.exceptions.UnexpectedToken) and e.token.type == "$END"):
        expected = set(getattr(e, "expected", ()) or ())
        lines = text.splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
        msg = "unexpected end of file"
        if "RBRACE" in expected:
            msg += ": missing '}'"
            notes = _unclosed_note(text, len(text))
        width = 1
    else:
        tok = e.token
        expected = sorted(set(e.expected or ()))
        value = str(tok)
        width = max(len(value), 1)
        stray_else = re.search(r"(?<![\w.])else\s*$", text[:tok.start_pos or 0])
        if stray_else and tok.type == "LBRACE":
            # Where no 'if' precedes it, 'else' lexes as a name.
            pos = stray_else.start()
            line = text.count("\n", 0, pos) + 1
            col = pos - (text.rfind("\n", 0, pos) + 1) + 1
            msg, width, expected = "'else' without an 'if' before it", 4, []
        elif tok.start_pos is not None and text.startswith("/*", tok.start_pos):
            msg = "unterminated comment: '/*' without a closing '*/'"
            width, expected = 2, []
        elif value == "=" and "CMP_OP" in expected and "EQ" not in expected \
                and "ASSIGN_OP" not in expected:
            msg = "unexpected '=' here (use '==' to compare)"
            expected = []
        elif tok.type in _TOP_LEVEL and "RBRACE" in expected:
            msg = f"missing '}}' before '{value}'"
            notes = _unclosed_note(text, tok.start_pos or 0)
            expected = []
        elif "SEMI" in expected and tok.type != "SEMI":
            # The token that follows a statement missing its ';' is usually on the
            # next line; point at the end of the previous token instead.
            prev = getattr(e, "token_history", None) or []
            msg = "expected ';' at the end of the statement"
            if prev and prev[-1] is not None and prev[-1].end_line is not None:
                line, col, width = prev[-1].end_line, prev[-1].end_column, 1
        elif tok.type == "RBRACE":
            msg = "unexpected '}'"
        elif tok.type == "NAME":
            msg = f"unexpected name {value!r}"
        elif tok.type in ("INT", "FLOAT"):
            msg = f"unexpected number {value}"
        elif tok.type == "STRING":
            msg = f"unexpected string {value}"
        else:
            msg = f"unexpected {value!r}"
        if expected and len(expected) <= 6:
            notes = ("expected " + ", ".join(sorted({_describe(t) for t in expected})),)
    return Diagnostic(Span(path, line, col, line, col + width), msg, "error", notes)


def parse_lark(text: str, path: str = "<string>") -> ast.Module:
    """Parse one source file with Lark.  Raises CompileError on a syntax error."""
    SourceMap.add(path, text)
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as e:
        raise CompileError([_syntax_error(path, text, e)]) from None
    _check_nesting(tree, path)
    try:
        items = _ToAst(path).transform(tree)
    except lark.exceptions.VisitError as e:      # Lark wraps what a rule raises
        if isinstance(e.orig_exc, CompileError):
            raise e.orig_exc from None
        raise
    return ast.Module(path, tuple(items.children))


def _check_nesting(tree: lark.Tree, path: str) -> None:
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise CompileError([Diagnostic(
                _span(path, node.meta), f"nested too deeply: more than {MAX_NESTING} levels of "
                "expressions and blocks", "error",
                ("split the expression with 'let' or the code into smaller codelets",))])
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, lark.Tree))


def _span(path: str, meta) -> Span:
    if getattr(meta, "empty", True):
        return Span(path, 0, 0, 0, 0)
    return Span(path, meta.line, meta.column, meta.end_line, meta.end_column)


def _meaningful(children):
    """Drop punctuation tokens: the AST keeps only what carries meaning."""
    return [c for c in children if not (isinstance(c, Token) and c.type in _PUNCT)]


def _shared(c) -> bool:
    """Whether a declaration starts with 'shared'; drops that token (or the
    placeholder of its absence) from `c`."""
    first = c.pop(0)
    return first is not None


def _decl_parts(c):
    """NAME [: type] [= value], whatever placeholders the optional parts left."""
    c = _meaningful(c)
    typ = next((x for x in c[1:] if isinstance(x, ast.TypeRef)), None)
    value = c[-1] if len(c) > 1 and not isinstance(c[-1], ast.TypeRef) else None
    return str(c[0]), typ, value


_PUNCT = {"SEMI", "COLON", "EQ", "LPAR", "RPAR", "LSQB", "RSQB", "LBRACE", "RBRACE",
          "ARROW", "DOTDOT"}


@v_args(meta=True)
class _ToAst(Transformer):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def sp(self, meta) -> Span:
        return _span(self.path, meta)

    # -- literals and names
    def int_lit(self, meta, c):
        return ast.IntLit(self._int(meta, c[0]), self.sp(meta))

    def _int(self, meta, token) -> int:
        try:
            return int(token)
        except ValueError:           # more digits than Python converts (4300 by default)
            raise CompileError([Diagnostic(
                Span(self.path, meta.line, meta.column, meta.end_line, meta.end_column),
                f"integer literal too long ({len(token):,} digits)", "error")]) from None

    def float_lit(self, meta, c):
        return ast.FloatLit(float(c[0]), self.sp(meta))

    def true_lit(self, meta, c):
        return ast.BoolLit(True, self.sp(meta))

    def false_lit(self, meta, c):
        return ast.BoolLit(False, self.sp(meta))

    def string_lit(self, meta, c):
        return ast.StringLit(str(c[0])[1:-1], self.sp(meta))

    def name(self, meta, c):
        return ast.Name(str(c[0]), self.sp(meta))

    def atom(self, meta, c):           # ( expr )
        return _meaningful(c)[0]

    def list_lit(self, meta, c):
        return ast.ListLit(tuple(x for x in _meaningful(c) if x is not None), self.sp(meta))

    def tuple_lit(self, meta, c):
        return ast.TupleLit(tuple(_meaningful(c)), self.sp(meta))

    def neg(self, meta, c):
        return ast.Neg(c[1], self.sp(meta))

    def not_(self, meta, c):
        return ast.Not(c[1], self.sp(meta))

    def binary(self, meta, c):
        return ast.Binary(str(c[1]), c[0], c[2], self.sp(meta))

    def kwarg(self, meta, c):
        return ast.Kwarg(str(c[0]), c[2], self.sp(meta))

    def call(self, meta, c):
        c = _meaningful(c)
        return ast.Call(c[0], tuple(x for x in c[1:] if x is not None), self.sp(meta))

    def slice(self, meta, c):
        start, _, stop = c
        return ast.Slice(start, stop, self.sp(meta))

    def index_expr(self, meta, c):
        c = _meaningful(c)
        return ast.IndexExpr(c[0], tuple(c[1:]), self.sp(meta))

    # -- types
    def dim_name(self, meta, c):
        return str(c[0])

    def dim_int(self, meta, c):
        return self._int(meta, c[0])

    def type_ref(self, meta, c):
        c = _meaningful(c)
        dims = tuple(x for x in c[1:] if x is not None)
        return ast.TypeRef(str(c[0]), dims or None, self.sp(meta))

    def tuple_type(self, meta, c):
        return tuple(_meaningful(c))

    # -- statements
    def block(self, meta, c):
        return ast.Block(tuple(_meaningful(c)), self.sp(meta))

    def let_stmt(self, meta, c):
        name, typ, value = _decl_parts(c)
        return ast.LetStmt(name, typ, value, self.sp(meta))

    def let_tuple(self, meta, c):
        c = _meaningful(c)
        return ast.LetStmt(tuple(str(x) for x in c[:-1]), None, c[-1], self.sp(meta))

    def var_stmt(self, meta, c):
        shared = _shared(c)
        name, typ, value = _decl_parts(c)
        return ast.VarStmt(name, typ, value, self.sp(meta), shared)

    def assign_stmt(self, meta, c):
        c = _meaningful(c)
        return ast.AssignStmt(c[0], str(c[1]), c[2], self.sp(meta))

    def for_stmt(self, meta, c):
        c = _meaningful(c)
        return ast.ForStmt(str(c[0]), c[1], c[2], c[3], c[4], self.sp(meta))

    def while_stmt(self, meta, c):
        return ast.WhileStmt(c[0], c[1], self.sp(meta))

    def if_stmt(self, meta, c):
        return ast.IfStmt(c[0], c[1], c[2], self.sp(meta))

    def break_stmt(self, meta, c):
        return ast.BreakStmt(self.sp(meta))

    def continue_stmt(self, meta, c):
        return ast.ContinueStmt(self.sp(meta))

    def return_stmt(self, meta, c):
        return ast.ReturnStmt(_meaningful(c)[0] if _meaningful(c) else None, self.sp(meta))

    def map_linear(self, meta, c):
        return None

    def map_tile(self, meta, c):
        return c[0]

    def map_stmt(self, meta, c):
        c = _meaningful(c)
        return ast.MapStmt(c[0], c[1], self.sp(meta))

    def compute_stmt(self, meta, c):
        return ast.ComputeStmt(str(c[0]), c[1], self.sp(meta))

    def call_stmt(self, meta, c):
        c = _meaningful(c)
        return ast.CallStmt(c[0], self.sp(meta))

    def vertex_stmt(self, meta, c):
        c = _meaningful(c)
        return ast.VertexStmt(c[0], c[1], self.sp(meta))

    def program_stmt(self, meta, c):
        return ast.ProgramStmt(c[0], self.sp(meta))

    def input_stmt(self, meta, c):
        c = _meaningful(c)
        return ast.InputStmt(str(c[0]), c[1], self.sp(meta))

    def output_stmt(self, meta, c):
        # output [NAME =] EXPR [as NAME];
        c = [x for x in _meaningful(c) if x is not None]
        name = None
        if len(c) > 1 and isinstance(c[0], Token) and c[0].type == "NAME":
            name = str(c[0])
            c = c[1:]
        if len(c) > 1 and isinstance(c[-1], Token):
            name = str(c[-1])
        return ast.OutputStmt(c[0], name, self.sp(meta))

    def param_stmt(self, meta, c):
        shared = _shared(c)
        c = _meaningful(c)
        return ast.ParamStmt(str(c[0]), c[1], c[2], self.sp(meta), shared)

    def minimize_stmt(self, meta, c):
        c = _meaningful(c)
        return ast.MinimizeStmt(c[0], c[1], self.sp(meta))

    def execute_stmt(self, meta, c):
        return ast.ExecuteStmt(str(c[0]), self.sp(meta))

    def copy_stmt(self, meta, c):
        c = _meaningful(c)
        return ast.CopyStmt(c[0], c[1], self.sp(meta))

    def repeat_stmt(self, meta, c):
        return ast.RepeatStmt(c[0], c[1], self.sp(meta))

    def print_stmt(self, meta, c):
        return ast.PrintStmt(_meaningful(c)[0], self.sp(meta))

    def step_stmt(self, meta, c):
        return ast.StepStmt(self.sp(meta))

    # -- top level
    def param(self, meta, c):
        c = _meaningful(c)
        return ast.Param(str(c[0]) if c[0] is not None else None, str(c[1]), c[2],
                         self.sp(meta))

    def codelet(self, meta, c):
        c = _meaningful(c)
        params = tuple(x for x in c[1:-2] if x is not None)
        return ast.Codelet(str(c[0]), params, c[-2], c[-1], self.sp(meta))

    def def_decl(self, meta, c):
        c = _meaningful(c)
        params = tuple(x for x in c[1:-2] if x is not None)
        return ast.DefDecl(str(c[0]), params, c[-2], c[-1], self.sp(meta))

    def graph(self, meta, c):
        c = _meaningful(c)
        args = tuple(x for x in c[1:-1] if x is not None)
        return ast.Graph(str(c[0]), args, c[-1], self.sp(meta))

    def import_decl(self, meta, c):
        return ast.ImportDecl(str(c[0])[1:-1], self.sp(meta))
