"""The whole compiler in one function.

    source ─parse─▶ AST ─check─▶ codelet IR + graph AST ─elaborate─▶ tensor graph
           ─partition─▶ tensor graph with vertices ─lower─▶ vertex graph (regions, exchange) ─codegen─▶ native codelets
           ─plan─▶ Executable

Each stage is a pure function of the previous stage's result (the native code is
cached by content).  `stop_after` returns an intermediate result, which
`popdsl.ir.printer.dump` prints as text (`popc dump --after STAGE`).
"""
from __future__ import annotations

import os

from popdsl.codegen.jit import NativeCodelets
from popdsl.passes.elaborate import elaborate
from popdsl.passes.lower import lower
from popdsl.passes.memplan import plan
from popdsl.passes.partition import partition
from popdsl.runtime.target import Target
from popdsl.sema import check_program, load_program

STAGES = ("parse", "check", "elaborate", "partition", "lower", "codegen", "plan")


def compile_source(text: str, path: str, target: Target, graph: str | None = None,
                   unchecked: bool = False, stop_after: str | None = None, reuse: bool = True):
    """Returns (Executable, NativeCodelets), or the IR after `stop_after`."""
    modules = load_program(text, path)
    if stop_after == "parse":
        return modules
    program = check_program(modules)
    if stop_after == "check":
        return program
    tgraph = elaborate(program, target, graph, path)
    if stop_after == "elaborate":
        return tgraph
    tgraph = partition(tgraph)
    if stop_after == "partition":
        return tgraph
    low = lower(tgraph)
    if stop_after == "lower":
        return low
    tgraph.codelets = used_codelets(tgraph)
    native = NativeCodelets(list(tgraph.codelets.values()), unchecked)
    if stop_after == "codegen":
        return native
    exe = plan(low, {name: native.object_code_size(name) for name in tgraph.codelets}, unchecked, reuse,
               verify=bool(os.environ.get("POPDSL_VERIFY_PLAN")))
    return exe, native


def used_codelets(graph) -> dict:
    """The codelets vertices use, and the scalar codelets those call: all that
    needs native code (the rest were checked and are not part of the executable)."""
    from popdsl.ir.verify import direct_calls
    names = {grp.codelet for cs in graph.compute_sets.values() for grp in cs.groups}
    todo = list(names)
    while todo:
        for callee in direct_calls(graph.codelets[todo.pop()]):
            if callee not in names:
                names.add(callee)
                todo.append(callee)
    return {n: c for n, c in graph.codelets.items() if n in names}
