"""AST: plain frozen dataclasses named after the grammar rules of grammar/pop.lark,
each with the span of the source it came from.  Produced by `frontend.parser`,
consumed by `sema` (codelets) and `passes.elaborate` (graphs)."""
from __future__ import annotations

from typing import Union

from popdsl.diagnostics import Span
from popdsl.node import node


# ---------------------------------------------------------------- expressions

@node
class IntLit:
    value: int
    span: Span


@node
class FloatLit:
    value: float
    span: Span


@node
class BoolLit:
    value: bool
    span: Span


@node
class StringLit:
    value: str
    span: Span


@node
class Name:
    id: str
    span: Span


@node
class ListLit:
    items: tuple["Expr", ...]
    span: Span


@node
class TupleLit:
    """`(a, b)`: what a def returns when it declares several results, and the target
    of an assignment that takes them apart."""
    items: tuple["Expr", ...]
    span: Span


@node
class Neg:
    x: "Expr"
    span: Span


@node
class Not:
    x: "Expr"
    span: Span


@node
class Binary:
    op: str
    a: "Expr"
    b: "Expr"
    span: Span


@node
class Kwarg:
    name: str
    value: "Expr"
    span: Span


@node
class Call:
    fn: "Expr"
    args: tuple["Expr | Kwarg", ...]
    span: Span


@node
class Slice:
    start: "Expr | None"
    stop: "Expr | None"
    span: Span


@node
class IndexExpr:
    base: "Expr"
    index: tuple["Expr | Slice", ...]
    span: Span


Expr = Union[IntLit, FloatLit, BoolLit, StringLit, Name, ListLit, TupleLit, Neg, Not, Binary,
             Call, IndexExpr]


# ---------------------------------------------------------------- types

@node
class TypeRef:
    name: str
    dims: tuple[Union[str, int], ...] | None     # None: no brackets (a scalar)
    span: Span


# ---------------------------------------------------------------- statements

@node
class Block:
    stmts: tuple["Stmt", ...]
    span: Span


@node
class LetStmt:
    name: str | tuple[str, ...]        # several names take apart a def's several results
    type: TypeRef | None
    value: Expr
    span: Span


@node
class VarStmt:
    name: str
    type: TypeRef | None
    value: Expr | None
    span: Span
    shared: bool = False               # in a def: one tensor for every call from one place


@node
class AssignStmt:
    target: Expr
    op: str
    value: Expr
    span: Span


@node
class ForStmt:
    var: str
    start: Expr
    stop: Expr
    step: Expr | None
    body: Block
    span: Span


@node
class WhileStmt:
    cond: Expr
    body: Block
    span: Span


@node
class IfStmt:
    cond: Expr
    then: Block
    orelse: "Block | IfStmt | None"
    span: Span


@node
class BreakStmt:
    span: Span


@node
class ContinueStmt:
    span: Span


@node
class ReturnStmt:
    value: Expr | None
    span: Span


@node
class MapStmt:
    target: Expr
    tile: Expr | None      # None: linear
    span: Span


@node
class ComputeStmt:
    name: str
    body: Block
    span: Span


@node
class CallStmt:
    """A call as a statement, `amp(...);` (codelets' statement intrinsics)."""
    call: Call
    span: Span


@node
class VertexStmt:
    call: Call
    tile: Expr
    span: Span


@node
class ProgramStmt:
    body: Block
    span: Span


@node
class InputStmt:
    name: str
    type: TypeRef
    span: Span


@node
class OutputStmt:
    value: Expr
    name: str | None
    span: Span


@node
class ParamStmt:
    name: str
    type: TypeRef
    init: Expr | None
    span: Span
    shared: bool = False               # in a def: one tensor for every call from one place


@node
class MinimizeStmt:
    loss: Expr
    optimizer: Expr
    span: Span


@node
class ExecuteStmt:
    name: str
    span: Span


@node
class CopyStmt:
    src: Expr
    dst: Expr
    span: Span


@node
class RepeatStmt:
    count: Expr
    body: Block
    span: Span


@node
class PrintStmt:
    value: Expr
    span: Span


@node
class StepStmt:
    span: Span


Stmt = Union[LetStmt, VarStmt, AssignStmt, ForStmt, WhileStmt, IfStmt, BreakStmt,
             ContinueStmt, ReturnStmt, MapStmt, ComputeStmt, VertexStmt, ProgramStmt,
             InputStmt, OutputStmt, ParamStmt, MinimizeStmt, ExecuteStmt, CopyStmt,
             RepeatStmt, PrintStmt, StepStmt]


# ---------------------------------------------------------------- top level

@node
class Param:
    direction: str | None
    name: str
    type: TypeRef
    span: Span


@node
class Codelet:
    name: str
    params: tuple[Param, ...]
    ret: TypeRef | None
    body: Block
    span: Span


@node
class Graph:
    name: str
    args: tuple["Expr | Kwarg", ...]
    body: Block
    span: Span


@node
class DefDecl:
    name: str
    params: tuple[Param, ...]
    ret: TypeRef | tuple[TypeRef, ...] | None      # a tuple: several results
    body: Block
    span: Span


@node
class ImportDecl:
    path: str
    span: Span


@node
class Module:
    path: str
    items: tuple["Codelet | Graph | DefDecl | ImportDecl", ...]
