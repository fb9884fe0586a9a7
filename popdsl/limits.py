"""The limits popc puts on what a user's input may make it do, in one place.

Requires nothing; produces the compile-time budgets (`Budgets`: unrolled loop
iterations and def calls, tensor operations, vertices), the largest source file it
parses, and the default cycle budget of one vertex at run time.  Every limit is
generous for real programs and stops a runaway one in seconds; each message that
reports one names the flag that raises it.
"""
from __future__ import annotations

from popdsl.node import node

# A source bigger than this is almost always data that belongs in a .npz (`popc run
# --load-params`); the parser takes about a second per 10,000 lines (bench/parse.py).
MAX_SOURCE_BYTES = 1 << 20
# Every later stage walks the tree recursively; past this depth Python's stack would
# not be enough.  No program a person writes comes near it.  (Both parsers and the
# .popx loader use it, so it lives here, below them all.)
MAX_NESTING = 200

# An .npz member that inflates more than this many times over its compressed size,
# to more than ZIP_BOMB_BYTES, is refused before it is inflated: real arrays do not
# compress a hundredfold, zip bombs do (streamed training data may hold any number
# of examples, so the header's shape alone cannot refuse one).  Saving the arrays
# uncompressed (`np.savez`) gets past it.
MAX_INFLATE_RATIO = 100
ZIP_BOMB_BYTES = 16 << 20

# A vertex's own cycle counter (the cost model of `ir.cost`) may not pass this: ten
# billion cycles, 7.5 s of one IPU worker, which no real vertex comes near (a
# 1024 x 1024 x 1024 matmul in one vertex is 3e9).  `popc run --max-cycles`.
MAX_CYCLES = 10_000_000_000
MAX_CYCLES_LIMIT = 1 << 60          # the largest --max-cycles (the counter is i64)


# How a training step trades compute for activations (passes.recompute, --recompute).
RECOMPUTE_MODES = ("none", "auto", "all")


@node
class Budgets:
    """Compile-time budgets (elaboration runs the user's graph-building program).

    unroll: compile-time steps (`--max-unroll`): a loop iteration is one step, a
        def call `CALL_STEPS` (a call elaborates a whole body: about 100 us, a
        trivial iteration about 1 us).  Two million allow a million vertices
        placed one per iteration.
    ops: tensor operations built by a tensor program (`--max-ops`); ResNet-50
        has under a thousand, and each costs ~15 us to build and more to partition.
    vertices: vertices of the whole graph, placed by hand or by partitioning
        (`--max-vertices`); a million is a target for real graphs, ResNet-50's
        training step at batch 8 has 6.3M (a compile of about 55 s and 9 GB), and
        a runaway graph is stopped before lowering at about 1.7 KB of host memory a
        vertex.
    """
    unroll: int = 1 << 21
    ops: int = 1 << 18
    vertices: int = 1 << 23


CALL_STEPS = 64
BUDGET_FLAGS = {"unroll": "--max-unroll", "ops": "--max-ops", "vertices": "--max-vertices"}
