"""Recomputation (popdsl/passes/recompute.py; README "Recomputation"): a training
step's backward pass computes forward results again instead of keeping them.  The
numbers stay the same; the bytes kept for the backward pass and the live data go
down; `auto` recomputes the least that fits; every way to get it wrong is a
diagnostic."""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from popdsl import api
from popdsl.diagnostics import CompileError, Diagnostic, OutOfMemory, Span
from popdsl.ir.target import get_target
from popdsl.limits import Budgets
from popdsl.passes import recompute as rc
from popdsl.passes.recompute import Policy
from popdsl import pipeline
from popdsl.report.memory import memory_report

from test_cli import _tampered

# Six conv + batch-norm + relu layers on 32x32 images: activations big, weights small (the regime of
# ResNet's early layers, where recomputation pays).
LAYERS = "\n".join(f"    let h{i} = relu(conv_bn(h{i - 1}, 8, 3, 1, 1));" for i in range(1, 7))
CNN = f"""import "popnn";
graph deep(tiles = 16) {{
    input x: f32[4, 8, 32, 32];
    input labels: i32[4];
    let h0 = x;
{LAYERS}
    let p = avg_pool2d(h6, 32);
    let logits = dense(reshape(p, [4, 8]), 10);
    let loss = mean(cross_entropy(logits, labels));
    output loss;
    minimize loss with sgd(lr = 0.05, momentum = 0.9);
}}
"""


def compile_cnn(mode: str, budget: int | None = None, tile_memory: int | None = None):
    # Recomputation's own effect: without outlining, whose calls change what a
    # tile holds as vertex state (the six layers alike are one function;
    # recomputed, most are inline again), tests/test_outline.py.
    return pipeline.compile_source(CNN, "deep.pop", get_target("gc200", None, tile_memory), outline=False,
                                   recompute=Policy(mode, budget))


@pytest.fixture(scope="module")
def built():
    return {m: compile_cnn(m) for m in ("none", "all")}


def feeds(seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((4, 8, 32, 32)).astype(np.float32),
            "labels": rng.integers(0, 10, 4).astype(np.int32)}


def train(exe, native, steps=3):
    sim = api.Simulator(api.Executable(exe, native), threads=2)
    losses = [float(sim.run(feeds(s))["loss"]) for s in range(steps)]
    params = {t.name: sim.read(t.name) for t in exe.tensors if t.kind in ("param", "var")}
    return losses, params


def test_recomputing_gives_the_same_training_step(built):
    ref_losses, ref_params = train(*built["none"])
    losses, params = train(*built["all"])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert params.keys() == ref_params.keys() and len(params) > 12
    for name in ref_params:
        np.testing.assert_allclose(params[name], ref_params[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_recomputing_every_segment_keeps_far_fewer_bytes(built):
    none, every = (memory_report(built[m][0]).to_json()["training"] for m in ("none", "all"))
    assert none["recomputed_segments"] == 0 and none["flops"]["recompute"] == 0
    assert none["activations_kept_bytes"] == none["activations_kept_bytes_without_recompute"]
    assert every["recomputed_segments"] == every["segments"] > 1
    assert every["activations_kept_bytes_without_recompute"] == none["activations_kept_bytes"]
    # Tensor level and as planned: what crosses into the backward pass, and the peak
    # (3.0x here: relu's gradient asks its result, which the next layer
    # keeps anyway, so even `none` keeps only two tensors a layer).
    assert every["activations_kept_bytes"] * 2.5 < none["activations_kept_bytes"]
    assert every["live_at_backward_start"] * 2.5 < none["live_at_backward_start"]
    assert every["live_peak"] < 0.7 * none["live_peak"]
    # ... paid for in compute: at most one forward pass again.
    assert 0 < every["flops"]["recompute"] <= every["flops"]["forward"]
    assert every["flops"]["backward"] == none["flops"]["backward"]
    phases = {o["phase"] for o in built["all"][0].ops}
    assert phases == {"forward", "backward", "recompute"}


def test_partition_report_gives_the_step_cycles_with_and_without_recomputation(built):
    """One simulated step each: the phases add up to the step; recomputing costs
    compute cycles of the forward pass again (at most one forward pass's worth), and
    the step without it is close to the plain step's."""
    none, every = (api.Executable(*built[m]).partition_report() for m in ("none", "all"))
    for r in (none, every):
        j = r.to_json()
        assert sum(j["step_compute_cycles_by_phase"].values()) == j["step_compute_cycles"]
        assert j["step_compute_cycles_without_recompute"] == j["step_compute_cycles"] - r.phases["recompute"]
        assert "training step, compute cycles by phase: forward" in r.text()
    assert none.phases["recompute"] == 0
    assert 0 < every.phases["recompute"] <= every.phases["forward"]
    assert every.phases["backward"] == none.phases["backward"]
    without = every.step_cycles - every.phases["recompute"]
    assert abs(without - none.step_cycles) <= 0.05 * none.step_cycles


def test_auto_recomputes_nothing_when_the_step_fits(built):
    exe, _ = compile_cnn("auto")
    assert exe.recompute["recomputed_segments"] == 0
    assert np.array_equal(exe.memory.total, built["none"][0].memory.total)


def test_auto_recomputes_the_least_that_fits_the_budget(built):
    lo, hi = (int(built[m][0].memory.total.max()) for m in ("all", "none"))
    assert lo < hi
    budget = (lo + hi) // 2
    exe, _ = compile_cnn("auto", budget)
    level = exe.recompute["level"]
    assert 0 < level <= exe.recompute["segments"] + 1
    assert exe.memory.total.max() <= budget
    # One segment fewer does not fit.
    fewer, _ = pipeline.compile_source(CNN, "deep.pop", get_target(), recompute=Policy("auto", budget),
                                       outline=False, level=level - 1)
    assert fewer.memory.total.max() > budget


def test_auto_keeps_its_best_try_and_stops_the_others_at_their_lower_bound(built, monkeypatch):
    """Tiles just big enough for every segment recomputed, the search made to
    bisect (so that it ends on a try that fails): a try whose lower bound is over
    a tile stops there (no placement), and the try that fitted, displaced by
    later tries, is loaded from its .popx bytes, not compiled again: the same
    executable a compile at its level gives."""
    import io
    from popdsl import artifact
    from popdsl.passes import memplan
    memory = -(-int(built["all"][0].memory.total.max()) // 64) * 64
    placed, tried = [], []
    real = memplan._plan_tiles
    monkeypatch.setattr(memplan, "_plan_tiles", lambda *a: placed.append(1) or real(*a))
    monkeypatch.setattr(rc, "next_try", lambda lo, hi, *a: tried.append((lo + hi) // 2) or (lo + hi) // 2)
    exe, _ = compile_cnn("auto", tile_memory=memory)
    level, top = exe.recompute["level"], exe.recompute["segments"] + 1
    assert tried[-1] < level          # the last try failed: the level kept came back from its bytes
    target = get_target("gc200", None, memory)
    opts = pipeline.Options(CNN, "deep.pop", target, recompute=Policy("auto"), outline=False)
    graph = pipeline.compile_source(CNN, "deep.pop", target, stop_after="autodiff")
    split = pipeline.STAGE_NAMES.index("recompute")
    direct, _ = pipeline.compile_source(CNN, "deep.pop", target, recompute=Policy("auto"), outline=False,
                                        start=("autodiff", graph), level=level)
    # (Loaded, as a build-cache hit is: a loader proves some bounds checks away.)
    assert artifact.dumps(exe) == artifact.dumps(artifact.load(io.BytesIO(artifact.dumps(direct))))
    placed.clear()
    with pytest.raises(OutOfMemory, match="needs at least"):
        pipeline._run(pipeline.STAGES[split:], replace(opts, level=0, probe=True), graph, None, None, None)
    assert not placed
    assert 0 < level < top


def test_tiles_over_their_memory_try_more_placement_orders(built):
    """A tile whose plan is over its memory, but not its lower bound, is planned
    again with more orders (memplan._plan_harder): the step compiles on tiles
    smaller than the two usual orders need, and trains as before."""
    exe, native = built["none"]
    need = int(exe.memory.total.max())
    memory = (need - 1) // 64 * 64
    assert int(exe.memory.bound_total.max()) <= memory < need
    tight, tight_native = compile_cnn("none", tile_memory=memory)
    assert int(tight.memory.total.max()) <= memory
    losses, params = train(tight, tight_native)
    want_losses, want_params = train(exe, native)
    assert losses == want_losses
    for name, value in want_params.items():
        np.testing.assert_array_equal(params[name], value)


def _search(fits_from: int, count: int, need, freed) -> list[int]:
    """The levels `auto` tries (after 0 and `count`) when exactly the levels from
    `fits_from` on fit, the busiest tile needing `need(level)` bytes."""
    lo, hi, tried = 0, count, []
    while hi - lo > 1:
        mid = rc.next_try(lo, hi, need(lo), need(hi), freed, 1000)
        assert lo < mid < hi
        tried.append(mid)
        lo, hi = (lo, mid) if mid >= fits_from else (mid, hi)
    assert hi == fits_from
    return tried


def test_auto_predicts_the_level_and_tries_one_below_it_first():
    """With the busiest tile falling in proportion to the bytes freed, the search
    tries one below the least level that fits, then that level: two tries, the
    fitting one last (nothing kept as .popx bytes only to be dropped)."""
    freed = np.arange(14) * 100
    need = lambda level: 1900 - freed[level]          # noqa: E731 — fits (<= 1000) from level 9 on
    assert _search(9, 13, need, freed) == [8, 9]


@given(st.integers(1, 13), st.integers(2, 13), st.lists(st.integers(0, 10_000), min_size=13, max_size=13),
       st.integers(0, 5000), st.integers(0, 5000))
def test_auto_search_ends_at_the_least_fitting_level_within_twice_bisections_tries(fits_from, count, frees,
                                                                                   over, under):
    """Whatever the bytes freed and the busiest tile's bytes (predictions as wrong
    as can be), the search ends with the least level that fits, in at most about
    twice the tries of bisection."""
    assume(fits_from <= count)
    freed = np.concatenate(([0], np.cumsum(frees[:count])))
    need = lambda level: 1000 + over + 1 if level < fits_from else 1000 - under   # noqa: E731
    tried = _search(fits_from, count, need, freed)
    assert len(tried) <= 2 * max(1, int(np.ceil(np.log2(count))))


class _Compiled:
    """What a fake compile at a level gives `recompute_auto.fit`: an executable's tiles."""

    def __init__(self, level: int, total: np.ndarray, bound: np.ndarray):
        self.level, self.codelets, self.unchecked = level, {}, False
        self.memory = SimpleNamespace(total=total, bound_total=bound)


HOT = 5          # the fake compiles' busiest tile: one of the spread (0, 5, 10, 15 of the CNN's 16)


def _fake_search(monkeypatch, need, budget: int, sampled=None, spread: bool = False, guess: int | None = None,
                 fork: bool = False, log: list | None = None, stuck: bool = False, broken: int | None = None):
    """`recompute_auto.fit` over the CNN's segments with compiles faked: a try at a
    level whose busiest tile (HOT) needs `need(level)` bytes, its lower bound 100
    fewer, every other tile half.  A try lowered for some tiles alone bounds them
    as the whole try does, but for HOT where `sampled(level)` gives its bound
    there.  Gives the tries as (level, how: 'whole', 'measure' or 'sample', the last
    two bounds only), the level of the result and the last level (every segment).
    `spread`: the step expected over its budget with nothing recomputed
    (rc.expect_over).  `guess`: rc.guessed_need's (None: over the budget, so the
    bracket is tried).  `fork`: a try the search expects over made in a second
    process beside the next (popdsl.forked), if it ever does; `log`, if given, gets
    each try as (level, how, whether a second process made it).  `stuck`: the
    second process never answers (the search waits no longer than its own try).
    `broken`: a level whose partition raises a CompileError."""
    import gc
    import os
    import pickle
    import tempfile
    import weakref
    from popdsl import forked, recompute_auto
    graph = pipeline.compile_source(CNN, "deep.pop", get_target(), stop_after="autodiff")
    top = rc.segments(graph).levels - 1
    monkeypatch.setattr(recompute_auto, "artifact", SimpleNamespace(dumps=pickle.dumps,
                                                                    load=lambda f, unchecked: pickle.load(f)))
    monkeypatch.setattr(recompute_auto, "NativeCodelets", lambda codelets, unchecked: None)
    monkeypatch.setattr(forked, "available", lambda: fork)
    monkeypatch.setattr(rc, "expect_over", lambda *a: spread)
    monkeypatch.setattr(rc, "guessed_need", lambda *a: budget + 1 if guess is None else guess)
    monkeypatch.setattr(rc, "SAMPLE_TILES", 2)          # samples on the CNN's 16 tiles
    monkeypatch.setattr(rc, "SPREAD_TILES", 4)
    memory, tiles, parent = get_target().tile_memory, graph.target.tiles, os.getpid()
    # Tries are logged to a file: a second process's too.
    fd, logged = tempfile.mkstemp(prefix="popdsl-tries-")
    os.close(fd)

    class Tries:
        def append(self, t):
            with open(logged, "a") as f:
                f.write(f"{t[0]} {t[1]} {int(os.getpid() != parent)}\n")
    tries = Tries()

    def per_tile(n: int) -> np.ndarray:
        out = np.full(tiles, n // 2, np.int64)
        out[HOT] = n
        return out

    if stuck:
        monkeypatch.setattr(recompute_auto, "BESIDE_WAIT", 0.0)
    # Every whole try's result: none may still be held when the next whole try
    # begins (the best so far waits as bytes; a whole try is gigabytes).
    results = weakref.WeakSet()

    def compile_at(opts, note, until=None, partitioned=None, monitor=None, check=None):
        if check is not None:
            check()
        if until is None and not opts.measure and os.getpid() == parent:
            gc.collect()
            assert not results, f"a try's result held through the whole try at level {opts.level}"

        if stuck and os.getpid() != parent:
            time.sleep(60)
        level, n = opts.level, need(opts.level)
        if level == broken:
            raise CompileError([Diagnostic(Span("deep.pop", 1, 1, 1, 2), f"level {level} is broken", "error", ())])
        if until == "partition":
            return ("partitioned", level)
        assert partitioned in (None, ("partitioned", level))
        tries.append((level, "sample" if opts.only else "measure" if opts.measure else "whole"))
        bound = per_tile(n - 100)
        if opts.only:
            assert opts.measure and len(opts.only) in (rc.SAMPLE_TILES, rc.SPREAD_TILES)
            bound = np.where(np.isin(np.arange(tiles), opts.only), bound, 0)
            if sampled is not None and sampled(level) is not None:
                bound[HOT] = min(bound[HOT], sampled(level))
        if (opts.probe or opts.measure) and bound.max() > memory or n > memory:
            at_least = opts.probe or opts.measure
            need_ = int(bound.max()) if at_least else n
            raise OutOfMemory([Diagnostic(Span("deep.pop", 0, 0, 0, 0), f"out of memory: tile {HOT} needs {need_:,} B",
                                          "error", ())], HOT, need_, memory, bound)
        if opts.measure:
            z = np.zeros(tiles, np.int64)
            return recompute_auto.X.MemoryPlan(z, z, z, z, z, bound, bound, z, z, []), None
        compiled = _Compiled(level, per_tile(n), bound)
        results.add(compiled)
        return compiled, None

    opts = pipeline.Options(CNN, "deep.pop", get_target(), recompute=Policy("auto", budget))
    try:
        level = recompute_auto.fit(opts, graph, compile_at)[0].level
    finally:
        with open(logged) as f:
            made = [(int(a), b, c == "1") for a, b, c in (line.split() for line in f)]
        os.unlink(logged)
    if log is not None:
        log.extend(made)
    return [(lvl, how) for lvl, how, _ in made], level, top


def test_auto_measures_everything_recomputed_by_its_lower_bound_only(monkeypatch):
    """The try with every segment recomputed brackets the search by its lower
    bound, placing nothing: it is placed only when it is the level kept."""
    tries, level, top = _fake_search(monkeypatch, lambda level: 2000 - 200 * level, 1500)
    assert level == 3 and tries[:2] == [(0, "whole"), (top, "sample")]
    assert (top, "whole") not in tries and (3, "whole") in tries and (2, "sample") in tries
    # Only every segment recomputed fits: now placed, once.
    last = top
    tries, level, top = _fake_search(monkeypatch, lambda level: 1000 if level == last else 2000, 1500)
    assert level == top and tries.count((top, "whole")) == 1 and tries[-1] == (top, "whole")
    # Everything recomputed within the tiles' memory by its bound, not within the
    # budget: measured whole, then placed, the closest there is.
    tries, level, top = _fake_search(monkeypatch, lambda level: 600_000 - level, 1000)
    assert level == top and tries == [(0, "whole"), (top, "sample"), (top, "measure"), (top, "whole")]


def test_auto_tries_a_level_it_expects_to_fail_on_the_busiest_tiles_first(monkeypatch):
    """A level the search expects not to fit is lowered for the tiles busiest in
    the last whole try alone, and stops there when they are over the budget; when
    they are not (the busiest tile has moved), the try goes on whole from the same
    partition — the level found is the same either way."""
    graph = pipeline.compile_source(CNN, "deep.pop", get_target(), stop_after="autodiff")
    share = rc.segments(graph).freed() / rc.segments(graph).freed()[-1]
    last = len(share) - 1
    need = lambda level: int(2000 - 1000 * share[level])          # noqa: E731 — the bound falls as bytes are freed
    budget = 1250
    fits_from = int(np.argmax([need(level) <= budget for level in range(len(share))]))
    tries, level, top = _fake_search(monkeypatch, need, budget)
    middle = [t for t in tries if t[0] not in (0, top)]
    assert level == fits_from and middle[-1] == (level, "whole")
    shown = {lvl for lvl, how in middle if how == "sample"} - {lvl for lvl, how in middle if how == "whole"}
    assert shown and max(shown) < level          # some level shown over the budget by its sample alone
    # The sampled tiles miss the busiest of the levels between: each sampled level
    # is tried whole too.
    tries, level, top = _fake_search(monkeypatch, need, budget, sampled=lambda level: 0 if level < last else None)
    middle = [t for t in tries if t[0] not in (0, top)]
    assert level == fits_from and shown <= {lvl for lvl, how in middle if how == "sample"}
    for k, (lvl, how) in enumerate(middle):
        assert how != "sample" or middle[k + 1] == (lvl, "whole")


@pytest.mark.parametrize("level, outline", [(0, False), (3, False), (0, True)])
def test_lowering_some_tiles_alone_bounds_them_from_below(level, outline):
    """A lowering of some tiles' vertices alone (`lower(..., only)`): every tile's
    lower bound at most the whole graph's (each region there is touched at most as
    often), and on the tiles lowered every category but the peak exactly the
    whole graph's (their regions, buffers, vertex state and code are all there).
    Of the program's copies it keeps the runs from or to those tiles (and every
    run of a copy to or from a function's tensors, which liveness counts call by
    call)."""
    from popdsl.passes.lower import lower
    from popdsl.passes.memplan import plan
    gen = pipeline.compile_source(CNN, "deep.pop", get_target(), outline=outline, level=level, stop_after="codegen")
    sizes = {name: gen.native.object_code_size(name) for name in gen.codelets}
    graph = gen.lowered.graph
    whole = plan(gen.lowered, gen.codelets, sizes, measure=True)
    busy = np.flatnonzero(whole.vertex_state)
    in_function = np.zeros(len(graph.tensors), bool)           # a function's tensors
    for f in graph.function_summary:
        in_function[f["tensors"][0]:f["tensors"][1]] = True
    rng = np.random.default_rng(level)
    for k in (1, 1, 2, 3, 5, busy.size // 2):
        only = np.zeros(graph.target.tiles, bool)
        only[rng.choice(busy, k, replace=False)] = True
        low = lower(graph, only)
        assert low.copies
        for c in low.copies:
            sr, _, dr, _, _ = c.merged()
            near = only[low.region_tile[sr]] | only[low.region_tile[dr]]
            assert (near | in_function[low.region_tensor[sr]] | in_function[low.region_tensor[dr]]).all()
        part = plan(low, gen.codelets, sizes, measure=True)
        assert (part.bound_total <= whole.bound_total).all()
        for cat in ("always_live", "not_always_live", "exchange_buffers", "vertex_state", "code"):
            assert np.array_equal(getattr(part, cat)[only], getattr(whole, cat)[only]), cat
        assert (part.vertex_state[~only] == 0).all()


def test_auto_finds_the_same_level_with_tries_bounded_on_some_tiles_first(monkeypatch):
    """With samples of two tiles (the CNN has 16), the search bounds the levels it
    expects not to fit on the busiest tiles first, and ends on the same level, with
    the same executable, as without samples."""
    from popdsl.passes import lower as lowering
    sampled = []
    real = lowering.lower
    monkeypatch.setattr(pipeline, "lower", lambda graph, only=None: sampled.append(only) or real(graph, only))
    lo, hi = (int(compile_cnn(m)[0].memory.total.max()) for m in ("all", "none"))
    budget = lo + (hi - lo) // 4
    monkeypatch.setattr(rc, "SAMPLE_TILES", 16)          # 4 x 16 tiles or fewer: no samples
    plain, _ = compile_cnn("auto", budget)
    assert not any(only is not None for only in sampled)
    monkeypatch.setattr(rc, "SAMPLE_TILES", 2)
    monkeypatch.setattr(rc, "SPREAD_TILES", 4)
    monkeypatch.setattr(rc, "expect_over", lambda *a: True)
    sampled.clear()
    trusted, _ = compile_cnn("auto", budget)            # the bracket guessed within the budget
    guess = rc.guessed_need
    monkeypatch.setattr(rc, "guessed_need", lambda *a: budget + 1)
    sampled.clear()
    exe, _ = compile_cnn("auto", budget)
    assert [int(only.sum()) for only in sampled if only is not None][:2] == [4, 2]
    assert exe.recompute["level"] == trusted.recompute["level"] == plain.recompute["level"] > 0
    assert artifact_bytes(exe) == artifact_bytes(trusted) == artifact_bytes(plain)
    # A try expected over made in a second process beside the next (on two
    # cores): the same executable, the search's tries made one at a time.
    from popdsl import forked
    made = []
    monkeypatch.setattr(forked, "available", lambda: True)
    monkeypatch.setattr(forked.Forked, "__init__", lambda self, fn, real=forked.Forked.__init__:
                        made.append(1) or real(self, fn))
    beside, _ = compile_cnn("auto", budget)
    monkeypatch.setattr(forked, "available", lambda: False)
    alone, _ = compile_cnn("auto", budget)
    assert made and artifact_bytes(beside) == artifact_bytes(alone) == artifact_bytes(plain)
    assert guess(10_000, np.array([0, 4000]), 16) == 9750


def artifact_bytes(exe) -> bytes:
    from popdsl import artifact
    return artifact.dumps(exe)


def test_auto_samples_nothing_recomputed_on_spread_tiles_when_it_expects_it_over(monkeypatch):
    """A step expected over its budget with nothing recomputed tries that first on
    tiles spread over the chip; shown over there, the busiest of them are the
    sample of the next try.  The level found is the one found without."""
    need = lambda level: 2000 - 200 * level          # noqa: E731 — fits (<= 1500) from level 3 on
    plain, level, top = _fake_search(monkeypatch, need, 1500)
    tries, spread_level, _ = _fake_search(monkeypatch, need, 1500, spread=True)
    assert spread_level == level == 3 and plain[0] == (0, "whole")
    assert tries[:2] == [(0, "sample"), (top, "sample")] and (0, "whole") not in tries
    # Not shown over on the spread (its busiest tile elsewhere): tried whole.
    tries, spread_level, _ = _fake_search(monkeypatch, need, 1500, spread=True,
                                          sampled=lambda level: 0 if level == 0 else None)
    assert spread_level == 3 and tries[:2] == [(0, "sample"), (0, "whole")]


def test_auto_takes_its_bracket_on_trust_when_everything_recomputed_is_guessed_well_within(monkeypatch):
    """Everything recomputed guessed well within the budget: no bracketing try; the
    search goes straight between, and finds the level it finds with the bracket.
    Guessed wrong — nothing fits — the search ends on everything recomputed,
    placed, and its error."""
    need = lambda level: 2000 - 200 * level          # noqa: E731 — fits (<= 1500) from level 3 on
    bracketed, level, top = _fake_search(monkeypatch, need, 1500)
    tries, trusted, _ = _fake_search(monkeypatch, need, 1500, guess=1000)
    assert trusted == level == 3 and (top, "sample") in bracketed
    assert all(lvl != top for lvl, _ in tries) and tries[-1] == (3, "whole")
    with pytest.raises(OutOfMemory, match="every one of the"):
        _fake_search(monkeypatch, lambda level: 700_000, 1500, guess=1000)


@pytest.mark.parametrize("need, options, forks", [
    (lambda level: 2000 - 200 * level, {}, 1),                               # falls as predicted
    (lambda level: 2000 - 200 * level, {"guess": 1000, "spread": True}, 1),  # as at ResNet-50's batch 8
    (lambda level: 2000 - 200 * level, {"sampled": lambda level: 0}, 0),     # samples never show it over
    (lambda level: 2000 if level < 5 else 1000, {}, 2),                      # fits later than predicted
    (lambda level: 2000 if level < 1 else 1000, {"guess": 1000}, 0),         # earlier
    (lambda level: 700_000, {"guess": 1000}, 1),                             # never
    (lambda level: 2000 - 200 * level, {"guess": 1000, "spread": True, "broken": 2}, 1),   # the sample raises
    (lambda level: 2000 - 200 * level, {"guess": 1000, "spread": True, "broken": 3}, 1),   # the try beside it
], ids=["predicted", "trusted", "missed", "later", "earlier", "never", "sample-raises", "beside-raises"])
def test_auto_makes_a_try_it_expects_over_beside_the_next_and_finds_the_same(monkeypatch, need, options, forks):
    """On a second core, a try the search expects over its budget runs in a second
    process beside the whole try the search would make next (popdsl.forked): the
    search ends where it ends alone, having made every try it makes alone (the one
    beside, only when the search would have made it) — or raises what it raises."""
    from popdsl import forked
    made = []

    def search(fork, log=None):
        try:
            return _fake_search(monkeypatch, need, 1500, fork=fork, log=log, **options)
        except OutOfMemory as e:
            return str(e), e.need
        except CompileError as e:
            return str(e), None
    alone, log = search(False), []
    monkeypatch.setattr(forked.Forked, "__init__", lambda self, fn, real=forked.Forked.__init__:
                        made.append(1) or real(self, fn))
    beside = search(True, log)
    assert len(made) == forks                 # second processes made
    assert beside[1:] == alone[1:]
    if isinstance(alone[0], str):
        assert beside[0] == alone[0]
        return
    extra = Counter(beside[0]) - Counter(alone[0])
    assert not Counter(alone[0]) - Counter(beside[0])
    assert all(how == "whole" for _, how in extra) and sum(extra.values()) <= sum(1 for *_, side in log if side)
    if forks:
        assert any(side for *_, side in log)          # a try was made in a second process


def test_auto_makes_the_try_alone_when_the_second_process_does_not_answer(monkeypatch):
    log = []
    _fake_search(monkeypatch, lambda level: 2000 - 200 * level, 1500, fork=True, stuck=True, log=log,
                 guess=1000, spread=True)
    alone, level, _ = _fake_search(monkeypatch, lambda level: 2000 - 200 * level, 1500, guess=1000, spread=True)
    assert level == 3 and not any(side for *_, side in log)      # the stuck child logged nothing
    assert Counter(alone) - Counter((lvl, how) for lvl, how, _ in log) == Counter()


def test_auto_guesses_everything_recomputed_from_an_even_share_of_the_bytes_freed():
    freed = np.array([0, 1000, 3000])
    assert rc.guessed_need(10_000, freed, 4) == 9250


def test_auto_expects_a_step_over_from_its_kept_bytes_spread_evenly():
    graph = pipeline.compile_source(CNN, "deep.pop", get_target(), stop_after="autodiff")
    seg = rc.segments(graph)
    always = sum(t.numel * t.elem_bytes for t in graph.tensors if t.kind in ("var", "input", "param"))
    even = (always + seg.held) / graph.target.tiles
    assert seg.held == sum(rc._nbytes(n) for n in seg.forward if n.id in seg.saved and rc._holds_data(n)) > 0
    assert rc.expect_over(graph, seg, int(even * rc.BUSIEST_OVER_EVEN) - 1)
    assert not rc.expect_over(graph, seg, int(even * rc.BUSIEST_OVER_EVEN) + 1)


def test_auto_out_of_memory_even_recomputing_everything_says_so():
    with pytest.raises(OutOfMemory) as e:
        compile_cnn("auto", tile_memory=40_000)
    assert "every one of the" in str(e.value) and "recomputed" in str(e.value)
    # `none` stops at the first plan, as Poplar would.
    with pytest.raises(OutOfMemory) as e:
        compile_cnn("none", tile_memory=40_000)
    assert "every one of the" not in str(e.value)


def test_a_graph_that_does_not_train_is_left_alone():
    text = (Path(__file__).parents[1] / "examples" / "mlp.pop").read_text()
    plain = pipeline.compile_source(text, "mlp.pop", get_target(), recompute=Policy("none"))[0]
    every = pipeline.compile_source(text, "mlp.pop", get_target(), recompute=Policy("all"))[0]
    assert every.recompute == {} and "training" not in memory_report(every).to_json()
    assert np.array_equal(plain.memory.total, every.memory.total)


def test_segments_cut_where_the_frontier_is_complete():
    """Every forward node a recomputed node reads from an earlier segment is a
    checkpoint (the stage's verifier checks the same on the rewritten graph)."""
    graph = pipeline.compile_source(CNN, "deep.pop", get_target(), stop_after="autodiff")
    seg = rc.segments(graph)
    pos = {n.id: i for i, n in enumerate(seg.forward)}
    for i, n in enumerate(seg.forward):
        for a in n.args:
            j = pos.get(a.id)
            if j is not None and seg.segment[j] != seg.segment[i]:
                assert seg.segment[j] < seg.segment[i]
                assert a.id in seg.checkpoints, (a.op, n.op)


def test_verifier_catches_a_recomputed_node_reading_another_segment():
    graph = pipeline.compile_source(CNN, "deep.pop", get_target(), stop_after="recompute",
                                    recompute=Policy("all"))
    rc.verify(graph)
    # As a broken pass would leave it: a recomputed node filed under a segment its
    # recomputed operands are not in.
    reader = next(n for n in graph.nodes.nodes if n.id in graph.recomputed
                  and any(a.id in graph.recomputed for a in n.args))
    bad = graph.copy()
    bad.recomputed[reader.id] += 100
    with pytest.raises(AssertionError, match="reads node"):
        rc.verify(bad)


def test_popx_keeps_the_recomputation_record(built, tmp_path, popc):
    src = tmp_path / "deep.pop"
    src.write_text(CNN)
    lo, hi = (int(built[m][0].memory.total.max()) for m in ("all", "none"))
    code, _, err = popc("build", src, "--memory-budget", (lo + hi) // 2, "--no-cache", "--no-outline",
                        "-o", tmp_path / "d.popx")
    assert code == 0, err
    assert "popc: note: the training step does not fit" in err and "--recompute none" in err
    note = err
    code, out, err = popc("report", tmp_path / "d.popx", "--json")
    assert code == 0, err
    tr = json.loads(out)["training"]
    assert tr["recompute"] == "auto" and 0 < tr["level"] <= tr["segments"] + 1
    assert tr["activations_kept_bytes"] < tr["activations_kept_bytes_without_recompute"]
    # The note says what the record says.
    k, n, e = tr["recomputed_segments"], tr["segments"], tr["recomputed_elementwise"]
    said = (f"recomputes {k} of the {n} segments" if k else "") + (" and " if k and e else "") + \
        (f"makes {e} results of element-wise ops again" if e else "")
    assert said and said in note, (said, note)
    code, out, _ = popc("report", tmp_path / "d.popx")
    assert "training step: activations kept for the backward pass" in out
    assert "with and without the recomputation: popc report --partition" in out     # where the cycles are
    # A forged record or phase is refused, not believed.
    for edit in (lambda d: d["recompute"].update(mode="some"),
                 lambda d: d["recompute"].update(kept_bytes=-1),
                 lambda d: d["recompute"].pop("segments"),
                 lambda d: d["ops"][0].update(phase="sideways")):
        bad = _tampered(tmp_path / "d.popx", tmp_path, edit)
        code, _, err = popc("report", bad)
        assert code == 1 and "damaged" in err, err


def test_a_budget_nothing_meets_is_said(popc, tmp_path):
    code, _, err = popc("build", Path(__file__).parents[1] / "examples" / "digits.pop", "--memory-budget", 1000,
                        "--no-cache", "-o", tmp_path / "d.popx")
    assert code == 0, err
    assert re.search(r"recomputes (\d+) of the \1 segments", err), err
    assert "even recomputing every segment, the busiest tile needs" in err and "over the --memory-budget" in err


@pytest.mark.parametrize("args, message", [
    (["--recompute", "some"], "invalid choice"),
    (["--memory-budget", "0"], "--memory-budget"),
    (["--memory-budget", "lots"], "--memory-budget"),
])
def test_bad_recompute_flags_are_usage_errors(args, message, popc):
    code, _, err = popc("check", Path(__file__).parents[1] / "examples" / "digits.pop", *args)
    assert code == 2 and message in err


def test_recompute_flag_on_a_popx_is_refused(tmp_path, popc):
    src = Path(__file__).parents[1] / "examples" / "matvec.pop"
    assert popc("build", src, "-o", tmp_path / "m.popx")[0] == 0
    code, _, err = popc("report", tmp_path / "m.popx", "--recompute", "all")
    assert code == 2 and "--recompute does not apply to a .popx" in err


def test_the_budget_goes_into_the_build_cache_key():
    from popdsl import cache
    from popdsl.sema import load_program
    mods = load_program(CNN, "deep.pop")
    keys = {cache.build_key(mods, get_target(), None, False, True, None, Budgets(), CNN, "deep.pop", p)
            for p in (Policy(), Policy("none"), Policy("all"), Policy("auto", 100_000))}
    assert len(keys) == 4


def test_policy_refuses_what_it_cannot_do():
    with pytest.raises(ValueError):
        Policy("sometimes")
    with pytest.raises(ValueError):
        Policy("auto", 0)
    with pytest.raises(CompileError):
        api.compile(CNN, tile_memory=40_000, recompute="all", cache=False)


def test_a_layer_keeps_two_activations_for_its_backward_pass():
    """conv -> batch norm -> relu, six times: the backward pass reads batch norm's
    centred input and relu's result, both for the mask of relu's gradient and as
    the next convolution's input (its weights' gradient) -- two image-sized
    tensors a layer, as PyTorch keeps with an in-place ReLU.  Relu's input, batch
    norm's output, is not kept (relu's gradient asks the result, not the input)."""
    graph = pipeline.compile_source(CNN, "deep.pop", get_target(), stop_after="autodiff")
    assert _kept_image_sized(graph) == {"relu": 6, "sub": 6}
    assert rc.kept_bytes(graph) == sum(rc._nbytes(a) for a in _kept(graph).values())


def _kept(graph) -> dict:
    """The forward results the backward pass reads (through views), by id."""
    from popdsl import ops
    from popdsl.passes.autodiff import topological
    kept = {}
    for n in topological(rc._roots(graph)):
        if n.id < graph.backward_from:
            continue
        for a in n.args:
            while a.id < graph.backward_from and ops.op(a.op).kind == "view":
                a = a.args[0]
            if a.id < graph.backward_from and rc._holds_data(a):
                kept[a.id] = a
    return kept


def _kept_image_sized(graph):
    from collections import Counter
    return Counter(a.op for a in _kept(graph).values() if a.shape == (4, 8, 32, 32))


def test_level_one_makes_relus_results_again_from_batch_norms_centred_input(built):
    """Level 1 (PopART's NormOnly): each relu's result, which the backward pass read,
    is made again from batch norm's centred input (kept anyway), its scale and its
    parameters, by element-wise ops only -- one image-sized tensor a layer kept
    instead of two, no convolution or sum run again, and the same training step."""
    graph = pipeline.compile_source(CNN, "deep.pop", get_target(), stop_after="autodiff")
    one = rc.recompute(graph, "auto", 1)
    rc.verify(one)
    assert _kept_image_sized(graph) == {"relu": 6, "sub": 6}
    assert _kept_image_sized(one) == {"sub": 6}
    r = one.recompute
    assert r["level"] == 1 and r["recomputed_segments"] == 0 and r["recomputed_elementwise"] == 7    # and softmax's exp
    assert 1.9 * r["kept_bytes"] < r["kept_bytes_without"]
    from popdsl import ops
    from popdsl.passes.autodiff import topological
    remade = [n for n in topological(rc._roots(one)) if n.id in one.recomputed]
    assert remade and all(ops.op(n.op).kind in ("elementwise", "view") for n in remade)
    exe, native = pipeline.compile_source(CNN, "deep.pop", get_target(), outline=False, start=("recompute", one))
    assert exe.memory.total.max() < built["none"][0].memory.total.max()
    ref_losses, ref_params = train(*built["none"])
    # With outlining too: the six layers alike are one function, their element-wise
    # results made again in its backward calls.
    outlined = pipeline.compile_source(CNN, "deep.pop", get_target(), start=("recompute", one))
    assert outlined[0].functions
    for got in ((exe, native), outlined):
        losses, params = train(*got)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        for name in ref_params:
            np.testing.assert_allclose(params[name], ref_params[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # The cost: element-wise FLOPs, a small part of the forward pass's.
    rep = memory_report(exe).to_json()["training"]
    assert 0 < rep["flops"]["recompute"] < 0.05 * rep["flops"]["forward"]


def test_levels_free_more_bytes_as_they_go():
    graph = pipeline.compile_source(CNN, "deep.pop", get_target(), stop_after="autodiff")
    seg = rc.segments(graph)
    freed = seg.freed()
    assert len(freed) == seg.levels == seg.count + 2 and freed[0] == 0
    assert freed[1] == seg.cheap.sum() > 0
    kept = [rc.recompute(graph, "auto", level).recompute["kept_bytes"] for level in range(seg.levels)]
    assert kept[0] > kept[1] and kept[-1] < kept[1]
    assert rc.recompute(graph, "all").recompute["level"] == seg.levels - 1
    with pytest.raises(ValueError, match="level"):
        rc.recompute(graph, "auto", seg.levels)


def test_a_level_out_of_range_is_refused():
    graph = pipeline.compile_source(CNN, "deep.pop", get_target(), stop_after="autodiff")
    top = rc.segments(graph).levels - 1
    for level in (-1, top + 1):
        with pytest.raises(ValueError, match=f"between 0 and {top}"):
            pipeline.compile_source(CNN, "deep.pop", get_target(), start=("autodiff", graph), level=level)
