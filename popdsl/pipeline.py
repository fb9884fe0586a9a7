"""The whole compiler in one function, and its stages in one table.

    source ─parse─▶ AST ─check─▶ codelet IR + graph AST ─elaborate─▶ tensor graph
           ─partition─▶ tensor graph with vertices ─lower─▶ vertex graph (regions, exchange)
           ─codegen─▶ native codelets ─plan─▶ Executable

Each stage is a pure function of the previous stage's result (native code is cached by
content): it never changes what it was given.  Each has a dump (`popc dump --after
STAGE`, what per-pass tests check) and may have a verifier that checks the invariants
its output promises; verifiers run after every stage when `verify` is on (the test
suite turns it on with POPDSL_VERIFY=1; users with `--verify`).  A verifier that fails
is a bug of the compiler, never of the program: it raises AssertionError.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from popdsl.codegen.jit import NativeCodelets
from popdsl.codegen.llvm import emit_module
from popdsl.ir import codelet as cir
from popdsl.ir import printer
from popdsl.ir.lowered import Lowered
from popdsl.ir.target import Target
from popdsl.ir.verify import direct_calls
from popdsl.ir.verify_graph import verify_checked, verify_elaborated, verify_partitioned
from popdsl.ir.verify_lowered import verify_generated, verify_lowered, verify_planned
from popdsl.passes.elaborate import elaborate
from popdsl.passes.lower import lower
from popdsl.passes.memplan import plan
from popdsl.passes.partition import partition
from popdsl.report.memory import memory_report
from popdsl.sema import check_program, load_program


@dataclass(frozen=True, slots=True)
class Options:
    text: str
    path: str
    target: Target
    graph: str | None = None
    unchecked: bool = False
    reuse: bool = True
    verify: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class Generated:
    """What the codegen stage produces: the vertex graph it compiled for, the codelets
    that need native code (the ones vertices use and the scalar codelets those call)
    and their native code."""
    lowered: Lowered
    codelets: dict[str, cir.Codelet]
    native: NativeCodelets


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    run: Callable[[Options, object], object]     # (options, previous result) -> result
    dump: Callable[[object], str]
    verify: Callable[[object], None] | None = None


def _codegen(opts: Options, low: Lowered) -> Generated:
    codelets = used_codelets(low.graph.codelets, (grp.codelet for cs in low.compute_sets for grp in cs.groups))
    return Generated(low, codelets, NativeCodelets(list(codelets.values()), opts.unchecked))


def _plan(opts: Options, gen: Generated):
    sizes = {name: gen.native.object_code_size(name) for name in gen.codelets}
    return plan(gen.lowered, gen.codelets, sizes, opts.unchecked, opts.reuse, opts.verify), gen.native


def _dump_codegen(gen: Generated) -> str:
    return str(emit_module(list(gen.codelets.values()), gen.native.unchecked))


def _dump_plan(result) -> str:
    exe, _ = result
    out = [memory_report(exe).text()]
    tm = exe.target.tile_memory
    for t, a in zip(exe.tensors, exe.tensor_addrs):
        tiles = np.unique(a // tm)
        out.append(f"  {t.name}: " + ", ".join(f"tile {int(tt)} @{int(a[a // tm == tt].min() % tm)}"
                                                for tt in tiles[:8]) + (" ..." if len(tiles) > 8 else ""))
    return "\n".join(out) + "\n"


STAGES: tuple[Stage, ...] = (
    Stage("parse", lambda o, _: load_program(o.text, o.path), printer.modules),
    Stage("check", lambda o, modules: check_program(modules), printer.program, verify_checked),
    Stage("elaborate", lambda o, prog: elaborate(prog, o.target, o.graph, o.path), printer.tensor_graph,
          verify_elaborated),
    Stage("partition", lambda o, graph: partition(graph), printer.tensor_graph, verify_partitioned),
    Stage("lower", lambda o, graph: lower(graph), printer.lowered, verify_lowered),
    Stage("codegen", _codegen, _dump_codegen, verify_generated),
    Stage("plan", _plan, _dump_plan, verify_planned),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def verify_by_default() -> bool:
    return os.environ.get("POPDSL_VERIFY", "") not in ("", "0")


def compile_source(text: str, path: str, target: Target, graph: str | None = None,
                   unchecked: bool = False, stop_after: str | None = None, reuse: bool = True,
                   verify: bool | None = None):
    """Returns (Executable, NativeCodelets), or the result of stage `stop_after`.
    Raises CompileError for errors in the program."""
    if stop_after is not None and stop_after not in STAGE_NAMES:
        raise ValueError(f"unknown stage {stop_after!r}")
    verify = verify_by_default() if verify is None else verify
    opts = Options(text, path, target, graph, unchecked, reuse, verify)
    result = None
    for stage in STAGES:
        result = stage.run(opts, result)
        if verify and stage.verify is not None:
            stage.verify(result)
        if stage.name == stop_after:
            break
    return result


def dump(stage: str, result) -> str:
    """The text of `result`, the output of stage `stage`."""
    return next(s for s in STAGES if s.name == stage).dump(result)


def used_codelets(codelets: dict[str, cir.Codelet], names) -> dict[str, cir.Codelet]:
    """The codelets named (those vertices use) and the scalar codelets they call: all
    that needs native code (the rest were checked and are not part of the executable)."""
    used = set(names)
    todo = list(used)
    while todo:
        for callee in direct_calls(codelets[todo.pop()]):
            if callee not in used:
                used.add(callee)
                todo.append(callee)
    return {n: c for n, c in codelets.items() if n in used}
