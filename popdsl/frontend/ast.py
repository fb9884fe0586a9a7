"""AST: plain frozen dataclasses named after the grammar rules of grammar/pop.lark,
each with the span of the source it came from.  Produced by `frontend.parser`,
consumed by `sema` (codelets) and `passes.elaborate` (graphs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from popdsl.diagnostics import Span


# ---------------------------------------------------------------- expressions

@dataclass(frozen=True, slots=True)
class IntLit:
    value: int
    span: Span


@dataclass(frozen=True, slots=True)
class FloatLit:
    value: float
    span: Span


@dataclass(frozen=True, slots=True)
class BoolLit:
    value: bool
    span: Span


@dataclass(frozen=True, slots=True)
class StringLit:
    value: str
    span: Span


@dataclass(frozen=True, slots=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True, slots=True)
class ListLit:
    items: tuple["Expr", ...]
    span: Span


@dataclass(frozen=True, slots=True)
class TupleLit:
    """`(a, b)`: what a def returns when it declares several results, and the target
    of an assignment that takes them apart."""
    items: tuple["Expr", ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Neg:
    x: "Expr"
    span: Span


@dataclass(frozen=True, slots=True)
class Not:
    x: "Expr"
    span: Span


@dataclass(frozen=True, slots=True)
class Binary:
    op: str
    a: "Expr"
    b: "Expr"
    span: Span


@dataclass(frozen=True, slots=True)
class Kwarg:
    name: str
    value: "Expr"
    span: Span


@dataclass(frozen=True, slots=True)
class Call:
    fn: "Expr"
    args: tuple["Expr | Kwarg", ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Slice:
    start: "Expr | None"
    stop: "Expr | None"
    span: Span


@dataclass(frozen=True, slots=True)
class IndexExpr:
    base: "Expr"
    index: tuple["Expr | Slice", ...]
    span: Span


Expr = Union[IntLit, FloatLit, BoolLit, StringLit, Name, ListLit, TupleLit, Neg, Not, Binary,
             Call, IndexExpr]


# ---------------------------------------------------------------- types

@dataclass(frozen=True, slots=True)
class TypeRef:
    name: str
    dims: tuple[Union[str, int], ...] | None     # None: no brackets (a scalar)
    span: Span


# ---------------------------------------------------------------- statements

@dataclass(frozen=True, slots=True)
class Block:
    stmts: tuple["Stmt", ...]
    span: Span


@dataclass(frozen=True, slots=True)
class LetStmt:
    name: str | tuple[str, ...]        # several names take apart a def's several results
    type: TypeRef | None
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class VarStmt:
    name: str
    type: TypeRef | None
    value: Expr | None
    span: Span
    shared: bool = False               # in a def: one tensor for every call from one place


@dataclass(frozen=True, slots=True)
class AssignStmt:
    target: Expr
    op: str
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class ForStmt:
    var: str
    start: Expr
    stop: Expr
    step: Expr | None
    body: Block
    span: Span


@dataclass(frozen=True, slots=True)
class WhileStmt:
    cond: Expr
    body: Block
    span: Span


@dataclass(frozen=True, slots=True)
class IfStmt:
    cond: Expr
    then: Block
    orelse: "Block | IfStmt | None"
    span: Span


@dataclass(frozen=True, slots=True)
class BreakStmt:
    span: Span


@dataclass(frozen=True, slots=True)
class ContinueStmt:
    span: Span


@dataclass(frozen=True, slots=True)
class ReturnStmt:
    value: Expr | None
    span: Span


@dataclass(frozen=True, slots=True)
class MapStmt:
    target: Expr
    tile: Expr | None      # None: linear
    span: Span


@dataclass(frozen=True, slots=True)
class ComputeStmt:
    name: str
    body: Block
    span: Span


@dataclass(frozen=True, slots=True)
class CallStmt:
    """A call as a statement, `amp(...);` (codelets' statement intrinsics)."""
    call: Call
    span: Span


@dataclass(frozen=True, slots=True)
class VertexStmt:
    call: Call
    tile: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class ProgramStmt:
    body: Block
    span: Span


@dataclass(frozen=True, slots=True)
class InputStmt:
    name: str
    type: TypeRef
    span: Span


@dataclass(frozen=True, slots=True)
class OutputStmt:
    value: Expr
    name: str | None
    span: Span


@dataclass(frozen=True, slots=True)
class ParamStmt:
    name: str
    type: TypeRef
    init: Expr | None
    span: Span
    shared: bool = False               # in a def: one tensor for every call from one place


@dataclass(frozen=True, slots=True)
class MinimizeStmt:
    loss: Expr
    optimizer: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class ExecuteStmt:
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class CopyStmt:
    src: Expr
    dst: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class RepeatStmt:
    count: Expr
    body: Block
    span: Span


@dataclass(frozen=True, slots=True)
class PrintStmt:
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class StepStmt:
    span: Span


Stmt = Union[LetStmt, VarStmt, AssignStmt, ForStmt, WhileStmt, IfStmt, BreakStmt,
             ContinueStmt, ReturnStmt, MapStmt, ComputeStmt, VertexStmt, ProgramStmt,
             InputStmt, OutputStmt, ParamStmt, MinimizeStmt, ExecuteStmt, CopyStmt,
             RepeatStmt, PrintStmt, StepStmt]


# ---------------------------------------------------------------- top level

@dataclass(frozen=True, slots=True)
class Param:
    direction: str | None
    name: str
    type: TypeRef
    span: Span


@dataclass(frozen=True, slots=True)
class Codelet:
    name: str
    params: tuple[Param, ...]
    ret: TypeRef | None
    body: Block
    span: Span


@dataclass(frozen=True, slots=True)
class Graph:
    name: str
    args: tuple["Expr | Kwarg", ...]
    body: Block
    span: Span


@dataclass(frozen=True, slots=True)
class DefDecl:
    name: str
    params: tuple[Param, ...]
    ret: TypeRef | tuple[TypeRef, ...] | None      # a tuple: several results
    body: Block
    span: Span


@dataclass(frozen=True, slots=True)
class ImportDecl:
    path: str
    span: Span


@dataclass(frozen=True, slots=True)
class Module:
    path: str
    items: tuple["Codelet | Graph | DefDecl | ImportDecl", ...]
