"""The whole compiler in one function, and its stages in one table.

    source ─parse─▶ AST ─check─▶ codelet IR + graph AST ─elaborate─▶ tensor graph
           ─autodiff─▶ tensor graph with gradients and optimizer updates
           ─recompute─▶ the same, its backward pass recomputing some forward results
           ─outline─▶ the same, its repeated parts grouped into functions
           ─partition─▶ tensor graph with vertices ─lower─▶ vertex graph (regions, exchange)
           ─codegen─▶ native codelets ─plan─▶ Executable

Each stage is a pure function of the previous stage's result (native code is cached by
content): it never changes what it was given — but for plan, which takes the lowered
graph's vertex tables and copies into the executable (gigabytes for a ResNet-50
training step; nothing reads a lowered graph after planning).  Each has a dump (`popc dump --after
STAGE`, what per-pass tests check) and may have a verifier that checks the invariants
its output promises; verifiers run after every stage when `verify` is on (the test
suite turns it on with POPDSL_VERIFY=1; users with `--verify`).  A verifier that fails
is a bug of the compiler, never of the program: it raises AssertionError.

Native code compiles on a second core: lowering starts LLVM on the codelets the
vertices use in the background, and codegen takes what it made
(`codegen.jit.compile_ahead`).

One loop goes back: a training step compiled with recomputation `auto` that does not
fit its tiles (or the budget) is compiled again from the recompute stage with more
of its forward pass recomputed, searching until a level fits where one fewer
does not (`recompute_auto.fit`); a try it expects not to fit is lowered first for a
sample of tiles only, whose lower bounds may already show it — on a machine with
two cores, in a second process beside the try expected to fit.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable

import numpy as np

from popdsl.codegen.jit import NativeCodelets, compile_ahead
from popdsl.diagnostics import CompileError, Diagnostic, Span
from popdsl.codegen.llvm import emit_module
from popdsl.ir import codelet as cir
from popdsl.ir import printer
from popdsl.ir.index import unique
from popdsl.ir.lowered import Lowered
from popdsl.ir.target import Target
from popdsl.ir.verify import direct_calls
from popdsl.node import node
from popdsl.passes import autodiff as ad
from popdsl.passes import outline as ol
from popdsl.passes import recompute as rc
from popdsl.recompute_auto import fit
from popdsl.limits import BUDGET_FLAGS, Budgets
from popdsl.ir.verify_graph import verify_checked, verify_elaborated, verify_partitioned
from popdsl.ir.verify_lowered import verify_generated, verify_lowered, verify_planned
from popdsl.passes.elaborate import elaborate
from popdsl.passes.lower import lower
from popdsl.passes.memplan import plan
from popdsl.passes.partition import partition
from popdsl.report.memory import memory_report
from popdsl.sema import check_program, load_program


@node
class Options:
    text: str
    path: str
    target: Target
    graph: str | None = None
    unchecked: bool = False
    reuse: bool = True
    verify: bool = False
    training: bool | None = None      # None: a graph that says 'minimize' trains
    budgets: Budgets = Budgets()
    recompute: rc.Policy = rc.Policy()
    level: int | None = None          # recomputation level (passes.recompute; None: what the policy's mode says)
    outline: bool = True              # repeated parts built once and called (passes.outline)
    probe: bool = False               # a try of `auto` whose out-of-memory error is not shown (memplan.plan)
    measure: bool = False             # a try of `auto` that plans only lower bounds (memplan.plan)
    only: tuple[int, ...] | None = None   # a try of `auto` lowered and bounded on these tiles alone (lower)


@node(eq=False)
class Generated:
    """What the codegen stage produces: the vertex graph it compiled for, the codelets
    that need native code (the ones vertices use and the scalar codelets those call)
    and their native code."""
    lowered: Lowered
    codelets: dict[str, cir.Codelet]
    native: NativeCodelets


@node
class Stage:
    name: str
    run: Callable[[Options, object], object]     # (options, previous result) -> result
    dump: Callable[[object], str]
    verify: Callable[[object], None] | None = None


def _partition(opts: Options, graph):
    out = partition(graph)
    # Vertices placed by hand were counted by elaboration; the partitioner's too
    # must fit the budget before lowering and planning spend time on them.
    n = sum(len(grp) for cs in out.compute_sets.values() for grp in cs.groups)
    if n > opts.budgets.vertices:
        raise CompileError([Diagnostic(
            Span(opts.path, 0, 0, 0, 0), f"the graph has {n:,} vertices after partitioning: more than "
            f"{opts.budgets.vertices:,}, the compile-time budget", "error",
            (f"raise the budget with {BUDGET_FLAGS['vertices']} N",))])
    return out


def _lower(opts: Options, graph):
    # Which codelets the vertices run is known now: their native code compiles on a
    # second core while lowering runs in this one; codegen then waits for it, if at all.
    compile_ahead(list(used_codelets(graph.codelets, (grp.codelet for cs in graph.compute_sets.values()
                                                      for grp in cs.groups)).values()), opts.unchecked)
    if opts.only is None:
        return lower(graph)
    only = np.zeros(graph.target.tiles, bool)
    only[list(opts.only)] = True
    return lower(graph, only)


def _codegen(opts: Options, low: Lowered) -> Generated:
    codelets = used_codelets(low.graph.codelets, (grp.codelet for cs in low.compute_sets for grp in cs.groups))
    return Generated(low, codelets, NativeCodelets(list(codelets.values()), opts.unchecked))


def _plan(opts: Options, gen: Generated):
    sizes = {name: gen.native.object_code_size(name) for name in gen.codelets}
    return plan(gen.lowered, gen.codelets, sizes, opts.unchecked, opts.reuse, opts.verify, opts.probe,
                opts.measure), gen.native


def _dump_codegen(gen: Generated) -> str:
    return str(emit_module(list(gen.codelets.values()), gen.native.unchecked))


def _dump_plan(result) -> str:
    """The memory report, then what it does not show: data bytes (without vertex
    state and code, whose size depends on the host's native code) per tile, where
    each tensor's part on a tile sits, and the vertices whose output took over an
    input's bytes (in place)."""
    exe, _ = result
    m = exe.memory
    out = [memory_report(exe).text(), "",
           f"  data (naive / lower bound / planned): all tiles {int(m.naive_data.sum()):,} / "
           f"{int(m.lower_bound.sum()):,} / {int(m.planned.sum()):,} B"]
    busy = np.nonzero(m.naive_data)[0]
    for tile in busy[:8].tolist():
        at = "  at the bound" if m.planned[tile] == m.lower_bound[tile] else ""
        out.append(f"    tile {tile}: {int(m.naive_data[tile]):,} / {int(m.lower_bound[tile]):,} / "
                   f"{int(m.planned[tile]):,} B{at}")
    if busy.size > 8:
        out.append(f"    ... {busy.size - 8} more tiles")
    out.append("  tensors (bytes on each tile):")
    tm = exe.target.tile_memory
    for t, r in zip(exe.tensors, exe.tensor_runs):
        lo, hi = r.addrs, r.addrs + r.counts * cir.ELEM_BYTES[t.dtype]
        tiles = unique(lo // tm)
        parts = [f"tile {int(tt)} [{int(lo[lo // tm == tt].min() % tm)}, {int((hi[lo // tm == tt].max() - 1) % tm) + 1})"
                 for tt in tiles[:8]]
        out.append(f"    {t.name}: " + ", ".join(parts) + (f", ... ({len(tiles)} tiles)" if len(tiles) > 8 else ""))
    for cs in exe.compute_sets:
        for grp in cs.groups:
            c = exe.codelets[grp.codelet]
            col = {(k.kind, k.name): j for j, k in enumerate(cir.table_layout(c))}
            edges = [f for f in c.fields if f.direction != "state"]
            for w in (f for f in edges if f.direction in ("out", "inout")):
                for r in (f for f in edges if f.direction == "in"):
                    same = int((grp.table[:, col[("addr", w.name)]] == grp.table[:, col[("addr", r.name)]]).sum())
                    if same:
                        out.append(f"  in place: {cs.name}: {grp.codelet}.{w.name} over .{r.name} in {same} of "
                                   f"{len(grp.tiles)} vertices")
    return "\n".join(out) + "\n"


STAGES: tuple[Stage, ...] = (
    Stage("parse", lambda o, _: load_program(o.text, o.path), printer.modules),
    Stage("check", lambda o, modules: check_program(modules), printer.program, verify_checked),
    Stage("elaborate", lambda o, prog: elaborate(prog, o.target, o.graph, o.path, o.training, o.budgets),
          printer.tensor_graph, verify_elaborated),
    Stage("autodiff", lambda o, graph: ad.autodiff(graph), printer.tensor_graph, ad.verify),
    Stage("recompute", lambda o, graph: rc.recompute(graph, o.recompute.mode, o.level),
          printer.tensor_graph, rc.verify),
    Stage("outline", lambda o, graph: ol.outline(graph, o.outline), ol.dump, ol.verify),
    Stage("partition", _partition, printer.tensor_graph, verify_partitioned),
    Stage("lower", _lower, printer.lowered, verify_lowered),
    Stage("codegen", _codegen, _dump_codegen, verify_generated),
    Stage("plan", _plan, _dump_plan, verify_planned),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def verify_by_default() -> bool:
    return os.environ.get("POPDSL_VERIFY", "") not in ("", "0")


def compile_source(text: str, path: str, target: Target, graph: str | None = None,
                   unchecked: bool = False, stop_after: str | None = None, reuse: bool = True,
                   verify: bool | None = None, training: bool | None = None,
                   budgets: Budgets | None = None, inspect=None, monitor=None, start=None,
                   recompute: rc.Policy | None = None, outline: bool = True, level: int | None = None):
    """Returns (Executable, NativeCodelets), or the result of stage `stop_after`.
    `training`: False compiles a graph that minimizes for inference (training()
    false, no update), None lets the graph say.  `inspect(stage, result)`, if given,
    sees each stage's result (the CLI checks feeds against the inputs once they are
    elaborated, before the long stages).  `monitor(stage[, note])`, if given, returns a
    context manager entered around each stage (and its verifier): timings and
    progress hook in there, without any stage knowing.  `start = (stage, result)`
    resumes after `stage`, whose result the caller already has (the build cache
    parses to compute its key).  `recompute`: the training step's recomputation
    policy (default `auto`); `level`, a recomputation level to compile at instead
    of what the policy would choose (passes.recompute; benchmarks and tests).
    `outline`: repeated parts of the tensor program built once and called
    (passes.outline).  Raises CompileError for errors in the program."""
    if stop_after is not None and stop_after not in STAGE_NAMES:
        raise ValueError(f"unknown stage {stop_after!r}")
    verify = verify_by_default() if verify is None else verify
    opts = Options(text, path, target, graph, unchecked, reuse, verify, training, budgets or Budgets(),
                   recompute or rc.Policy(), level=level, outline=outline)
    result, stages = None, STAGES
    if start is not None:
        done, result = start
        stages = STAGES[STAGE_NAMES.index(done) + 1:]
        if inspect is not None:
            inspect(done, result)
        if done == stop_after:
            return result
    if "recompute" in (s.name for s in stages) and opts.recompute.mode == "auto" and level is None \
            and stop_after in (None, "plan"):
        split = next(i for i, s in enumerate(stages) if s.name == "recompute")
        after = next(i for i, s in enumerate(stages) if s.name == "partition") + 1
        trained, _ = _run(stages[:split], opts, result, inspect, monitor, stop_after)

        def compile_at(o: Options, note: str, until: str | None = None, partitioned=None, monitor=monitor,
                       check=None):
            if partitioned is None:
                return _run(stages[split:], o, trained, inspect, monitor, until or stop_after, note, check)[0]
            return _run(stages[after:], o, partitioned, inspect, monitor, stop_after, note, check)[0]
        return fit(opts, trained, compile_at, monitor)
    return _run(stages, opts, result, inspect, monitor, stop_after)[0]


def _run(stages, opts: Options, result, inspect, monitor, stop_after, note: str = "", check=None):
    """Run `stages` from `result`: (the last result, whether `stop_after` stopped it).
    `note` says which try of recomputation `auto` this is, to the monitor; `check()`,
    called before each stage, may raise to stop the try (recompute_auto.fit)."""
    for stage in stages:
        if check is not None:
            check()
        with (monitor(stage.name, note) if note else monitor(stage.name)) if monitor is not None else nullcontext():
            result = stage.run(opts, result)
            if opts.verify and stage.verify is not None:
                stage.verify(result)
        if inspect is not None:
            inspect(stage.name, result)
        if stage.name == stop_after:
            return result, True
    return result, False


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
