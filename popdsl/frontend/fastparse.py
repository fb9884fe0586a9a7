"""Fast parser: source text → `ast.Module`, equal field for field and span for span to
what the reference parser (Lark, `frontend.lark_parser`, from grammar/pop.lark) builds.
Requires `frontend.lexer` and `frontend.ast`; produces a Module or raises `Handover`.

Recursive descent over the rules of the grammar, precedence climbing for expressions.
It never reports a syntax error: whatever it does not accept, it hands over (`Handover`)
and the caller parses the text again with Lark, whose diagnostics name the mistake.  So
it may refuse valid programs (a keyword glued to a name, as in `on tile0`, which Lark's
contextual lexer splits) but must never accept an invalid one or build a different tree.

Spans are Lark's `propagate_positions`: a node runs from the first to the last token of
its rule, keywords and punctuation included, and `(x)` as a child makes its parent's span
take in the parentheses while `x` keeps its own.  A node is therefore the tokens [s, e]
it consumed, whatever it returns.

Nesting: Lark's tree may not be deeper than `MAX_NESTING`.  A node is deeper than its
parent by one and every tree node spans more tokens than each of its children, so a
statement of n tokens at depth d reaches at most depth d + n - 1; only when that passes
the limit are its operators and brackets counted (each inner expression node has one of
its own), and only when that passes too is the program handed to Lark, which measures.
"""
from __future__ import annotations

from popdsl.frontend import ast
from popdsl.frontend.lexer import EOF, new, tokenize


class Handover(Exception):
    """The fast parser does not accept this text; parse it with Lark."""


_NAME_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_DIGITS = frozenset("0123456789")
# Binding strength of the binary operators (grammar: or_expr ... mul_expr).
_PREC = {"||": 1, "&&": 2, "==": 3, "!=": 3, "<=": 3, ">=": 3, "<": 3, ">": 3,
         "+": 4, "-": 4, "*": 5, "/": 5, "%": 5, "@": 5}
_CMP = 3                        # comparisons do not chain: `a < b < c` is an error
_ASSIGN = frozenset(("=", "+=", "-=", "*=", "/="))
_BOOL = {"true": True, "false": False}
_DIRECTION = frozenset(("in", "out", "inout"))
# After a '}' Lark's lexer is in a state that takes these words as keywords too, so
# `while c {} else = 1;` is an error although `else` is a name after a ';'.
_AFTER_BRACE = frozenset(("else", "codelet", "def", "graph", "import"))
# Tokens of which every inner expression node owns one (see the module docstring).
_STRUCT = frozenset(("(", "[", "=", ":", "-", "!", "||", "&&", "==", "!=", "<=", ">=", "<",
                     ">", "+", "*", "/", "%", "@"))


def parse_fast(text: str, path: str, max_nesting: int) -> ast.Module:
    """The Module of `text`, or Handover.  May also raise RecursionError, which means
    the same: let Lark decide."""
    T, L, C, E = tokenize(text)
    i = 0
    Span_, Name, IntLit, Binary = new.Span, new.Name, new.IntLit, new.Binary
    NAME_START, PREC, BOOL = _NAME_START, _PREC, _BOOL

    def span(s: int, e: int):
        return Span_(path, L[s], C[s], L[e], E[e])

    def expect(tok: str) -> None:
        nonlocal i
        if T[i] != tok:
            raise Handover
        i += 1

    def name() -> str:
        nonlocal i
        t = T[i]
        if t[0] not in NAME_START:
            raise Handover
        i += 1
        return t

    def commas(rule) -> list:
        """rule ("," rule)*"""
        nonlocal i
        out = [rule()]
        while T[i] == ",":
            i += 1
            out.append(rule())
        return out

    def guard(d: int, s: int) -> None:
        """Hand over if the tokens [s, i), children of a node at depth d, may reach
        deeper than the limit."""
        if d + i - s - 1 > max_nesting and d + 2 + sum(map(_STRUCT.__contains__, T[s:i])) > max_nesting:
            raise Handover

    # ------------------------------------------------------------ expressions
    def expr(minp: int):
        nonlocal i
        s = i
        left = operand()
        while True:
            op = T[i]
            p = PREC.get(op)
            if p is None or p < minp:
                return left
            i += 1
            right = expr(p + 1)
            left = Binary(op, left, right, Span_(path, L[s], C[s], L[i - 1], E[i - 1]))
            if p == _CMP and PREC.get(T[i]) == _CMP:
                raise Handover

    def operand(prefix: bool = True):
        """unary: prefix operators, an atom, then calls and indexing."""
        nonlocal i
        s = i
        t = T[i]
        c = t[0]
        if c in NAME_START:
            i += 1
            b = BOOL.get(t)
            x = Name(t, Span_(path, L[s], C[s], L[s], E[s])) if b is None else new.BoolLit(b, span(s, s))
        elif c in _DIGITS:
            i += 1
            if t.isdigit():
                try:
                    x = IntLit(int(t), Span_(path, L[s], C[s], L[s], E[s]))
                except ValueError:            # past int()'s digit limit: Lark's business
                    raise Handover from None
            else:
                x = new.FloatLit(float(t), span(s, s))
        elif c == "(":
            i += 1
            x = expr(1)
            if T[i] == ",":
                items = [x]
                while T[i] == ",":
                    i += 1
                    items.append(expr(1))
                x = new.TupleLit(tuple(items), span(s, i))
            expect(")")
        elif c == "[":
            i += 1
            items = []
            if T[i] != "]":
                items.append(expr(1))
                while T[i] == ",":
                    i += 1
                    items.append(expr(1))
            expect("]")
            x = new.ListLit(tuple(items), span(s, i - 1))
        elif c == '"' and len(t) > 1:
            i += 1
            x = new.StringLit(t[1:-1], span(s, s))
        elif (t == "-" or t == "!") and prefix:
            i += 1
            x = operand()
            return (new.Neg if t == "-" else new.Not)(x, span(s, i - 1))
        else:
            raise Handover
        while True:
            t = T[i]
            if t == "(":
                i += 1
                x = new.Call(x, args(), span(s, i - 1))
            elif t == "[":
                i += 1
                idx = [index()]
                while T[i] == ",":
                    i += 1
                    idx.append(index())
                expect("]")
                x = new.IndexExpr(x, tuple(idx), span(s, i - 1))
            else:
                return x

    def args() -> tuple:
        """[arg ("," arg)*] ")"; an arg is an expression or NAME = expression."""
        nonlocal i
        out = []
        if T[i] == ")":
            i += 1
            return ()
        while True:
            s = i
            if T[i + 1] == "=" and T[i][0] in NAME_START and T[i] not in BOOL:
                i += 2
                value = expr(1)
                out.append(new.Kwarg(T[s], value, span(s, i - 1)))
            else:
                out.append(expr(1))
            t = T[i]
            i += 1
            if t == ")":
                return tuple(out)
            if t != ",":
                raise Handover

    def index():
        """expr, or a slice [expr] ":" [expr]."""
        nonlocal i
        s = i
        start = None if T[i] == ":" else expr(1)
        if T[i] != ":":
            return start
        i += 1
        stop = None if T[i] in (",", "]") else expr(1)
        return new.Slice(start, stop, span(s, i - 1))

    # ------------------------------------------------------------ types
    def type_ref():
        nonlocal i
        s = i
        n = name()
        if T[i] != "[":
            return new.TypeRef(n, None, span(s, s))
        i += 1
        dims = commas(dim)
        expect("]")
        return new.TypeRef(n, tuple(dims), span(s, i - 1))

    def dim():
        nonlocal i
        t = T[i]
        if t[0] in NAME_START:
            i += 1
            return t
        if t[0] in _DIGITS and t.isdigit():
            i += 1
            try:
                return int(t)
            except ValueError:
                raise Handover from None
        raise Handover

    # ------------------------------------------------------------ statements
    def skip() -> int:
        """Step over the keyword that starts a rule; where it was."""
        nonlocal i
        i += 1
        return i - 1

    def opt(tok: str, rule):
        """[tok rule]"""
        nonlocal i
        if T[i] != tok:
            return None
        i += 1
        return rule()

    def expr1():
        return expr(1)

    def end(d: int, s: int, node_type, *fields):
        """The ';' of a statement at depth d that started at token s, and its node."""
        expect(";")
        guard(d, s)
        return node_type(*fields, span(s, i - 1))

    def block(d: int):
        nonlocal i
        s = i
        expect("{")
        if d > max_nesting:
            raise Handover
        stmts = []
        while T[i] != "}":
            t = T[i]
            rule = keyword_stmt.get(t)
            if rule is not None:
                stmts.append(rule(d + 1))
            elif t in _AFTER_BRACE and T[i - 1] == "}":
                raise Handover
            else:
                stmts.append(assign_or_vertex(d + 1))
        i += 1
        return new.Block(tuple(stmts), span(s, i - 1))

    def assign_or_vertex(d: int):
        nonlocal i
        s = i
        target = operand(prefix=False)
        op = T[i]
        if op in _ASSIGN:
            i += 1
            return end(d, s, new.AssignStmt, target, op, expr(1))
        if op == "on" and T[i + 1] == "tile":
            i += 2
            return end(d, s, new.VertexStmt, target, expr(1))
        if op == ";":               # call_stmt: any postfix (sema names the useless ones)
            return end(d, s, new.CallStmt, target)
        raise Handover

    def let_stmt(d: int):
        nonlocal i
        s = skip()
        if T[i] != "(":
            n = name()
            typ = opt(":", type_ref)
            expect("=")
            return end(d, s, new.LetStmt, n, typ, expr(1))
        i += 1
        names = commas(name)
        if len(names) < 2:
            raise Handover
        expect(")")
        expect("=")
        return end(d, s, new.LetStmt, tuple(names), None, expr(1))

    def var_or_param(d: int):
        """[shared] var NAME [: type] [= expr] ;  /  [shared] param NAME : type [= expr] ;"""
        nonlocal i
        s = i
        shared = T[i] == "shared"
        i += shared
        word = T[i]
        if word != "var" and word != "param":
            raise Handover
        i += 1
        n = name()
        if word == "var":
            typ = opt(":", type_ref)
            node_type = new.VarStmt
        else:
            expect(":")
            typ = type_ref()
            node_type = new.ParamStmt
        value = opt("=", expr1)
        expect(";")
        guard(d, s)
        return node_type(n, typ, value, span(s, i - 1), shared)

    def for_stmt(d: int):
        s = skip()
        var = name()
        expect("in")
        start = expr(1)
        expect("..")
        stop = expr(1)
        step = opt("step", expr1)
        guard(d, s)
        body = block(d + 1)
        return new.ForStmt(var, start, stop, step, body, span(s, i - 1))

    def cond_block(d: int, node_type):
        """while / repeat: keyword expr block."""
        s = skip()
        cond = expr(1)
        guard(d, s)
        body = block(d + 1)
        return node_type(cond, body, span(s, i - 1))

    def if_stmt(d: int):
        nonlocal i
        s = skip()
        cond = expr(1)
        guard(d, s)
        then = block(d + 1)
        orelse = None
        if T[i] == "else":
            i += 1
            if T[i] == "{":
                orelse = block(d + 1)
            elif T[i] == "if":
                orelse = if_stmt(d + 1)
            else:
                raise Handover
        return new.IfStmt(cond, then, orelse, span(s, i - 1))

    def map_stmt(d: int):
        nonlocal i
        s = skip()
        target = expr(1)
        expect("->")
        if T[i] == "linear":
            i += 1
            return end(d, s, new.MapStmt, target, None)
        expect("tile")
        return end(d, s, new.MapStmt, target, expr(1))

    def output_stmt(d: int):
        nonlocal i
        s = skip()
        n = None
        if T[i + 1] == "=" and T[i][0] in NAME_START and T[i] not in BOOL:
            n = T[i]
            i += 2
        value = expr(1)
        return end(d, s, new.OutputStmt, value, opt("as", name) or n)

    def with_block(node_type):
        """compute NAME block  /  program block"""
        def rule(d: int):
            s = skip()
            n = () if node_type is new.ProgramStmt else (name(),)
            return node_type(*n, block(d + 1), span(s, i - 1))
        return rule

    def two(node_type, first, sep: str, second):
        """keyword first sep second ;"""
        def rule(d: int):
            s = skip()
            a = first()
            expect(sep)
            return end(d, s, node_type, a, second())
        return rule

    def one(node_type, rule_of_field=None):
        """keyword [field] ;"""
        def rule(d: int):
            s = skip()
            if rule_of_field is None:
                return end(d, s, node_type)
            if node_type is new.ReturnStmt and T[i] == ";":
                return end(d, s, node_type, None)
            return end(d, s, node_type, rule_of_field())
        return rule

    keyword_stmt = {
        "let": let_stmt, "var": var_or_param, "param": var_or_param, "shared": var_or_param,
        "for": for_stmt, "if": if_stmt, "map": map_stmt, "output": output_stmt,
        "while": lambda d: cond_block(d, new.WhileStmt),
        "repeat": lambda d: cond_block(d, new.RepeatStmt),
        "compute": with_block(new.ComputeStmt), "program": with_block(new.ProgramStmt),
        "input": two(new.InputStmt, name, ":", type_ref),
        "minimize": two(new.MinimizeStmt, expr1, "with", lambda: operand(prefix=False)),
        "copy": two(new.CopyStmt, expr1, "->", expr1),
        "break": one(new.BreakStmt), "continue": one(new.ContinueStmt), "step": one(new.StepStmt),
        "return": one(new.ReturnStmt, expr1), "execute": one(new.ExecuteStmt, name),
        "print": one(new.PrintStmt, expr1),
    }

    # ------------------------------------------------------------ top level
    def param():
        nonlocal i
        s = i
        direction = None
        if T[i] in _DIRECTION:
            direction = T[i]
            i += 1
        n = name()
        expect(":")
        return new.Param(direction, n, type_ref(), span(s, i - 1))

    def params() -> tuple:
        """"(" [param ("," param)*] ")" of a codelet or def."""
        expect("(")
        out = () if T[i] == ")" else tuple(commas(param))
        expect(")")
        return out

    def codelet_or_def(node_type):
        nonlocal i
        s = i
        i += 1
        n = name()
        ps = params()
        ret = None
        if T[i] == "->":
            i += 1
            if T[i] == "(" and node_type is new.DefDecl:
                i += 1
                ret = tuple(commas(type_ref))
                if len(ret) < 2:
                    raise Handover
                expect(")")
            else:
                ret = type_ref()
        body = block(2)
        return node_type(n, ps, ret, body, span(s, i - 1))

    def graph():
        nonlocal i
        s = i
        i += 1
        n = name()
        graph_args = ()
        if T[i] == "(":
            i += 1
            graph_args = args()
            guard(1, s)
        body = block(2)
        return new.Graph(n, graph_args, body, span(s, i - 1))

    def import_decl():
        nonlocal i
        s = i
        t = T[i + 1]
        if t[0] != '"' or len(t) < 2:
            raise Handover
        i += 2
        expect(";")
        return new.ImportDecl(t[1:-1], span(s, i - 1))

    items = []
    while True:
        t = T[i]
        if t == "codelet":
            items.append(codelet_or_def(new.Codelet))
        elif t == "graph":
            items.append(graph())
        elif t == "def":
            items.append(codelet_or_def(new.DefDecl))
        elif t == "import":
            items.append(import_decl())
        elif t == EOF:
            return new.Module(path, tuple(items))
        else:
            raise Handover
