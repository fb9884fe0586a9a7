"""`popc`: the command line (README: "CLI reference").

Exit codes: 0 ok; 1 an error in the user's program, data or files; 2 command-line
usage; 70 an internal compiler error (a bug of ours, said as such).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
from pathlib import Path

import numpy as np

from popdsl import __version__, artifact, datafile
from popdsl.atomic import write_atomically
from popdsl.diagnostics import CompileError
from popdsl.limits import MAX_CYCLES, MAX_CYCLES_LIMIT, MAX_SOURCE_BYTES, RECOMPUTE_MODES, Budgets
from popdsl.runtime.simulator import DeviceError, HostMemoryError

EXIT_USER, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 70
COMMANDS = ("build", "check", "run", "report", "dump")


class UserError(Exception):
    """A problem with the user's files or data, reported as `popc: error: ...`."""


class UsageError(Exception):
    """A bad command line that argparse cannot see (a value out of range): exit 2."""


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _cycles_budget(text: str) -> int:
    v = _positive(text)
    if v > MAX_CYCLES_LIMIT:
        raise argparse.ArgumentTypeError(f"at most {MAX_CYCLES_LIMIT} (2^60)")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="popc", description="popdsl compiler and IPU model")
    p.add_argument("--version", action="version", version=f"popc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp, source_help="a .pop file"):
        sp.add_argument("file", metavar="FILE", help=source_help)
        sp.add_argument("--target", default="gc200", help="gc200 (default) or gc2")
        sp.add_argument("--tiles", type=_positive, help="use N tiles of the target")
        sp.add_argument("--tile-memory", type=_positive, metavar="BYTES", help="bytes of memory per tile")
        sp.add_argument("--graph", help="the graph to compile, when a file has several")
        sp.add_argument("--unchecked", action="store_true", help="drop the remaining bounds checks")
        sp.add_argument("--no-reuse", action="store_true",
                        help="give every tensor and buffer its own memory (no liveness sharing, no in-place)")
        d = Budgets()
        sp.add_argument("--max-unroll", type=_positive, default=d.unroll, metavar="N",
                        help=f"compile-time steps: loop iterations, a def call counting 64 (default {d.unroll})")
        sp.add_argument("--max-ops", type=_positive, default=d.ops, metavar="N",
                        help=f"tensor operations a tensor program may build (default {d.ops})")
        sp.add_argument("--max-vertices", type=_positive, default=d.vertices, metavar="N",
                        help=f"vertices of the graph (default {d.vertices})")
        sp.add_argument("--verify", action="store_true",
                        help="check the compiler's invariants after every stage (slower; for bug reports; "
                             "compiles without the build cache)")
        sp.add_argument("--no-cache", action="store_true",
                        help="compile even if the build cache holds this build, and do not store it")
        sp.add_argument("--timings", action="store_true",
                        help="print each compiler stage's wall time and peak memory (on stderr)")
        sp.add_argument("--recompute", choices=RECOMPUTE_MODES, default="auto",
                        help="a training step's backward pass recomputes forward results instead of "
                             "keeping them: none, all, or auto (default: as little as fits the tiles)")
        sp.add_argument("--memory-budget", type=_positive, metavar="BYTES",
                        help="bytes per tile --recompute auto fits the step in (default: the tile's memory)")
        sp.add_argument("--no-outline", action="store_true",
                        help="build every repeated part of the program again instead of once, called "
                             "(the same results; for comparing)")

    def cycles(sp):
        sp.add_argument("--max-cycles", type=_cycles_budget, default=MAX_CYCLES, metavar="N",
                        help=f"stop a vertex that counts more than N cycles (default {MAX_CYCLES:,})")

    def command(name: str, summary: str, examples: str):
        return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                              epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)

    b = command("build", "compile FILE.pop to FILE.popx (planned, with its codelets as verified IR)",
                "  popc build examples/mlp.pop              writes examples/mlp.popx\n"
                "  popc build net.pop -o /tmp/net.popx --tiles 64\n"
                "  popc examples/mlp.pop                    the same as 'popc build'")
    common(b)
    b.add_argument("-o", "--output", metavar="OUT.popx")
    c = command("check", "report every error in FILE.pop without writing anything",
                "  popc check net.pop\n  popc check net.pop --tiles 4 --verify")
    common(c)
    r = command("run", "run FILE.pop or FILE.popx on the IPU model (or train it, if it says 'minimize')",
                "  popc run examples/scale_demo.pop\n"
                "  popc run examples/mlp.pop --data feeds.npz --cycles\n"
                "  popc run examples/digits.pop --data examples/data/digits-train.npz --epochs 15 \\\n"
                "      --eval examples/data/digits-test.npz --save-params trained.npz\n"
                "  popc run net.popx --feed x=x.npy --steps 4 --save out.npz")
    common(r, "a .pop or .popx file")
    r.add_argument("--feed", action="append", default=[], metavar="NAME=FILE",
                   help="feed input NAME from a .npy or an IDX file (MNIST's; gzipped or not) (repeatable)")
    r.add_argument("--data", metavar="FILE.npz", help="feeds by input name")
    length = r.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive,
                        help="steps to run (default 1); a feed with more "
                             "examples than its input's batch gives the next batch each step")
    length.add_argument("--epochs", type=_positive,
                        help="run every whole batch of the data this many times")
    r.add_argument("--eval", action="append", default=[], metavar="TEST.npz|NAME=FILE",
                   help="after running, the test loss and accuracy of the graph compiled for "
                        "inference on this data (repeatable: NAME=FILE per input)")
    r.add_argument("--save", metavar="OUT.npz", help="write the outputs here")
    r.add_argument("--load-params", metavar="P.npz", help="set tensors by name before running")
    r.add_argument("--save-params", metavar="P.npz",
                   help="save every param and var after running (the optimizer's state included)")
    r.add_argument("--threads", type=_positive, help="host threads for tiles (default: all cores)")
    r.add_argument("--cycles", action="store_true", help="print the cycle estimate and its assumptions")
    r.add_argument("--trace", metavar="T.json",
                   help="write the estimated execution as a Chrome/Perfetto trace-event file")
    r.add_argument("--trace-tiles", action="store_true",
                   help="a trace track per tile (default: per tile up to 64 tiles, else 16 groups of tiles)")
    cycles(r)
    rp = command("report", "memory per tile and category, or how each op was partitioned",
                 "  popc report examples/resnet50.pop\n"
                 "  popc report examples/mlp.pop --partition\n"
                 "  popc report net.popx --json > memory.json")
    common(rp, "a .pop or .popx file")
    cycles(rp)
    rp.add_argument("--memory", action="store_true", help="memory per tile and category (default)")
    rp.add_argument("--partition", action="store_true",
                    help="per tensor op: tiles used, cycles per tile (max, mean), exchange bytes")
    rp.add_argument("--reuse", action="store_true",
                    help="functions built once and called: bytes saved, copies added (compiles the "
                         "program a second time, with --no-outline, to compare)")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.add_argument("--graph-picture", metavar="G.png",
                    help="draw the compiled graph (needs the viz extra: pip install 'popdsl[viz]')")
    rp.add_argument("--memory-map", metavar="M.png", help="draw bytes per tile on the tile grid")
    rp.add_argument("--liveness", metavar="L.png", help="draw live bytes by category over the program")
    d = command("dump", "print the IR after a stage of the compiler",
                "  popc dump --after partition examples/mlp.pop\n"
                "  popc dump --after codegen net.pop --tiles 4")
    common(d)
    from popdsl.pipeline import STAGE_NAMES
    d.add_argument("--after", required=True, choices=STAGE_NAMES, metavar="STAGE",
                   help="one of: " + ", ".join(STAGE_NAMES))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `popc FILE.pop` is `popc build FILE.pop`; any other first word is a command.
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        if argv[0].endswith(".pop") or os.path.isfile(argv[0]):
            argv = ["build"] + argv
        else:
            import difflib
            close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
            _parser().print_usage(sys.stderr)
            print(f"popc: error: unknown command '{argv[0]}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                  + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)
            return EXIT_USAGE
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:           # usage errors (2); --help and --version (0)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("popc: error: a command is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _COMMANDS[args.command](args)
    except CompileError as e:
        _quiet(args)
        print(e.render(), file=sys.stderr)
        n = len(e.diagnostics)
        if n > 1:
            print(f"{n} errors", file=sys.stderr)
        return EXIT_USER
    except UserError as e:
        _quiet(args)
        print(f"popc: error: {e}", file=sys.stderr)
        return EXIT_USER
    except UsageError as e:
        _quiet(args)
        parser.print_usage(sys.stderr)
        print(f"popc: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except artifact.ArtifactError as e:
        print(f"{args.file}: error: {e}", file=sys.stderr)
        return EXIT_USER
    except DeviceError as e:          # a vertex failed while a report ran a step
        sys.stdout.flush()
        print(e.diagnostic.render(), file=sys.stderr)
        return EXIT_USER
    except HostMemoryError as e:
        print(f"popc: error: {e}", file=sys.stderr)
        return EXIT_USER
    except MemoryError as e:          # the host, not the program: a limit the user can change
        _quiet(args)
        print(f"popc: error: this machine ran out of memory ({e or 'MemoryError'}); the program "
              "may need more host memory than is available (a smaller batch, or fewer tiles, "
              "compiles with less)", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        _quiet(args)
        print("popc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:            # noqa: BLE001 — the one place a bug becomes a report
        _quiet(args)
        print(f"popc: internal compiler error: {type(e).__name__}: {e}\n"
              "This is a bug in popdsl, not in your program; please report it with the input "
              "that caused it (set POPDSL_TRACEBACK=1 for details).", file=sys.stderr)
        if os.environ.get("POPDSL_TRACEBACK"):
            import traceback
            traceback.print_exc()
        return EXIT_INTERNAL
    finally:
        _quiet(args)


# ---------------------------------------------------------------- timings and progress

def _monitor(args):
    """The stage monitor of this command (made on first use): timings with
    --timings, a progress line when stderr is a terminal; None for neither."""
    mon = getattr(args, "_monitor", None)
    if mon is None:
        try:
            tty = sys.stderr.isatty()
        except (AttributeError, ValueError):
            tty = False
        if not (tty or args.timings):
            return None
        from popdsl.pipeline import STAGE_NAMES
        from popdsl.timings import StageMonitor
        mon = args._monitor = StageMonitor(progress=sys.stderr if tty else None, sample=args.timings,
                                           label=f"popc {args.command}", order=STAGE_NAMES)
    return mon


def _stage(args, name: str):
    """A context around work of the command's own (writing the output) to time."""
    mon = _monitor(args)
    return mon.stage(name) if mon is not None else contextlib.nullcontext()


def _quiet(args) -> None:
    """Stop the progress line (before anything else is printed)."""
    mon = getattr(args, "_monitor", None)
    if mon is not None:
        mon.close()


def _timings(args, build=None) -> None:
    """Print the --timings table (stderr) once the compile's work is done.
    `build`: the cache.Build (None: a command that always compiles)."""
    _quiet(args)
    if not args.timings or getattr(args, "_timed", False):
        return
    args._timed = True
    mon = getattr(args, "_monitor", None)
    if mon is None:
        print(f"popc: --timings: nothing was compiled ('{args.file}' is a .popx)", file=sys.stderr)
        return
    if build is None:
        status = f"not used ('{args.command}' always compiles)"
    elif build.status == "hit":
        status = "hit (no stage ran: the executable came from the cache)"
    elif build.status == "miss":
        status = f"miss (compiled; {build.why})"
    else:
        status = f"off ({build.why})"
    print(mon.table(f"compile of {args.file}; build cache: {status}"), file=sys.stderr)


def _hooks(args, inspect=None, prefix: str = ""):
    """The pipeline hooks: `inspect` (if any), the stage counts the progress line
    shows, and the monitor."""
    mon = _monitor(args)
    if mon is None:
        return inspect, None

    def counting(stage: str, result) -> None:
        if stage == "elaborate":
            mon.counts = f"{len(result.tensors):,} tensors"
        elif stage == "partition":
            n = sum(len(grp) for cs in result.compute_sets.values() for grp in cs.groups)
            mon.counts = f"{n:,} vertices"
        if inspect is not None:
            inspect(stage, result)
    return counting, (lambda name, note="": mon.stage(prefix + name, note))


# ---------------------------------------------------------------- helpers

def _target(args):
    from popdsl.ir.target import get_target
    try:
        return get_target(args.target, args.tiles, args.tile_memory)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _read_source(path: str) -> str:
    try:
        size = os.path.getsize(path)
        if size > MAX_SOURCE_BYTES:
            raise UserError(f"cannot compile '{path}': it is {size:,} bytes, and popc compiles sources of "
                            f"at most {MAX_SOURCE_BYTES:,} bytes (large constant data belongs in a .npz: "
                            "popc run --load-params)")
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"cannot read '{path}': no such file") from None
    except IsADirectoryError:
        raise UserError(f"cannot read '{path}': it is a directory") from None
    except UnicodeDecodeError:
        raise UserError(f"cannot read '{path}': not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read '{path}': {e.strerror}") from None


def _compile(args, stop_after=None):
    """Compile (check, dump: always, without the build cache)."""
    from popdsl.pipeline import compile_source
    if args.file.endswith(".popx"):
        raise UserError(f"'{args.file}' is already compiled; '{args.command}' needs a .pop file")
    _monitor(args)                          # the clock starts before the source is read
    text, target = _read_source(args.file), _target(args)
    inspect, monitor = _hooks(args)
    return compile_source(text, args.file, target, args.graph, args.unchecked, stop_after,
                          reuse=not args.no_reuse, verify=args.verify or None,
                          budgets=Budgets(args.max_unroll, args.max_ops, args.max_vertices),
                          inspect=inspect, monitor=monitor, recompute=_policy(args), outline=not args.no_outline)


def _policy(args):
    from popdsl.passes.recompute import Policy
    return Policy(args.recompute, args.memory_budget)


def _build(args, inspect=None, load: bool = True, training: bool | None = None, prefix: str = ""):
    """Compile a .pop through the build cache (build, run, report): a `cache.Build`."""
    from popdsl import cache
    if args.file.endswith(".popx"):
        raise UserError(f"'{args.file}' is already compiled; '{args.command}' needs a .pop file")
    _monitor(args)
    text, target = _read_source(args.file), _target(args)
    inspect, monitor = _hooks(args, inspect, prefix)
    try:
        b = cache.build(text, args.file, target, args.graph, args.unchecked, reuse=not args.no_reuse,
                        training=training, budgets=Budgets(args.max_unroll, args.max_ops, args.max_vertices),
                        recompute=_policy(args), outline=not args.no_outline,
                        cache=not args.no_cache, verify=args.verify or None, load=load,
                        inspect=inspect, monitor=monitor)
    except cache.CacheSettingError as e:
        raise UserError(str(e)) from None
    _recompute_note(args, b.exe)
    return b


def _recompute_note(args, exe) -> None:
    """`auto` recomputed (where Poplar would stop, out of memory): say so."""
    r = exe.recompute if exe is not None else {}
    if r.get("mode") != "auto" or not r.get("level"):
        return
    where = f"{args.memory_budget:,} B per tile (--memory-budget)" if args.memory_budget else "its tiles"
    k, n, e = r["recomputed_segments"], r["segments"], r["recomputed_elementwise"]
    segs = f"recomputes {k} of the {n} segments of the forward pass"
    cheap = f"makes {e} results of element-wise ops again"
    what = f"{segs} and {cheap} in the others" if k and e else segs if k else f"{cheap} in its forward pass"
    print(f"popc: note: the training step does not fit {where} keeping every activation for the backward "
          f"pass; it {what} "
          f"(keeping {r['kept_bytes']:,} B of activations instead of {r['kept_bytes_without']:,} B; "
          "--recompute none turns this off)", file=sys.stderr)
    need = int(exe.memory.total.max())
    if args.memory_budget and need > args.memory_budget:
        print(f"popc: note: even recomputing every segment, the busiest tile needs {need:,} B: over the "
              f"--memory-budget of {args.memory_budget:,} B (it fits the tiles, so the build goes on)",
              file=sys.stderr)


def _executable(args, inspect=None):
    """A .popx is loaded; a .pop is compiled (`inspect`: see `compile_source`)."""
    from popdsl.api import Executable
    if args.file.endswith(".popx"):
        if not os.path.exists(args.file):
            raise UserError(f"cannot read '{args.file}': no such file")
        given = [flag for flag, v in (("--tiles", args.tiles), ("--tile-memory", args.tile_memory),
                                      ("--graph", args.graph)) if v is not None]
        if args.target != "gc200":
            given.append("--target")
        given += [flag for flag, v in (("--recompute", args.recompute != "auto"),
                                       ("--memory-budget", args.memory_budget is not None),
                                       ("--no-outline", args.no_outline),
                                       ("--reuse", getattr(args, "reuse", False))) if v]
        if given:
            raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to a .popx: "
                             "it was compiled for its target; rebuild it from its source with the flag")
        return Executable(artifact.load(args.file, unchecked=args.unchecked))
    b = _build(args, inspect)
    args._build = b
    return Executable(b.exe, b.native)


# ---------------------------------------------------------------- commands

def _output_name(flag: str, path: str | None) -> None:
    """Refuse an output the user cannot have meant, before any work is done."""
    if path is not None and not path.strip():
        raise UsageError(f"{flag} needs a file name")


def cmd_build(args) -> int:
    _output_name("-o", args.output)
    out = args.output or str(Path(args.file).with_suffix(".popx"))
    b = _build(args, load=False)
    if os.path.exists(out) and os.path.samefile(out, args.file):
        raise UsageError(f"-o {out} would overwrite the source file")
    try:
        with _stage(args, "write"):
            if b.popx is not None:          # from the cache, or just stored there
                write_atomically(out, lambda f: f.write(b.popx))
            else:
                artifact.save(b.exe, out)
    except IsADirectoryError:
        raise UserError(f"cannot write '{out}': it is a directory") from None
    except OSError as e:
        raise UserError(f"cannot write '{out}': {e.strerror}") from None
    _timings(args, b)
    print(f"wrote {out}" + (" (from the build cache)" if b.status == "hit" else ""))
    return 0


def cmd_check(args) -> int:
    exe, _ = _compile(args)
    _timings(args, None)
    nv = sum(len(g.tiles) for cs in exe.compute_sets for g in cs.groups)
    print(f"{args.file}: ok (graph '{exe.name}': {_count(len(exe.tensors), 'tensor')}, "
          f"{_count(nv, 'vertex', 'vertices')} in {_count(len(exe.compute_sets), 'compute set')}, "
          f"{_count(exe.target.tiles, 'tile')})")
    return 0


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _cannot_read(path: str, e: BaseException) -> UserError:
    if isinstance(e, FileNotFoundError):
        return UserError(f"cannot read '{path}': no such file")
    if isinstance(e, IsADirectoryError):
        return UserError(f"cannot read '{path}': it is a directory")
    if isinstance(e, datafile.DataFileError):
        return UserError(f"cannot read '{path}': not a valid .npy/.npz file ({e})")
    if isinstance(e, MemoryError):
        return UserError(f"cannot read '{path}': too large for this machine's memory")
    return UserError(f"cannot read '{path}': {getattr(e, 'strerror', None) or e}")


def _is_zip(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")     # a member first, or none
    except OSError:
        return False        # reading it properly says why


def _read_npy(path: str, check) -> np.ndarray:
    """The array in .npy file `path`; `check(header)` refuses it before its data
    is read (a header may claim terabytes)."""
    try:
        return datafile.load_npy(path, check)
    except (OSError, datafile.DataFileError, MemoryError) as e:
        raise _cannot_read(path, e) from None


def _read_npz(path: str, flag: str, check_for) -> dict[str, np.ndarray]:
    """The arrays of .npz file `path` by name; `check_for(name)(header)` refuses
    one before it is inflated (a 3 MB zip may inflate to gigabytes)."""
    if os.path.isfile(path) and not _is_zip(path):
        raise UserError(f"{flag} needs an .npz file of named arrays, '{path}' is not one")
    try:
        z, arrays = datafile.open_npz(path)
        with z:
            return {k: arrays.array(k, check_for(k)) for k in arrays.keys}
    except (OSError, datafile.DataFileError, MemoryError) as e:
        raise _cannot_read(path, e) from None


def _inputs(graph) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Input name -> (dtype, shape) of an elaborated graph or an executable."""
    return {n: (graph.tensors[i].dtype, graph.tensors[i].shape) for n, i in graph.inputs.items()}


def _feeds(args, inputs, specs_in=None, npz=None, flag="--data") -> dict[str, np.ndarray]:
    """--data and --feed arrays by input name (or --eval's), each checked against
    its input (name, dtype, shape: one batch, or examples to stream in batches)
    from its header before its data is read; every input fed."""
    from popdsl import data, training
    specs_in = args.feed if specs_in is None else specs_in
    npz = args.data if npz is None else npz

    def check_for(name: str):
        def check(h: datafile.Header) -> None:
            try:
                training.check_feed(inputs, name, h.dtype, h.shape, npz or "")
            except training.DataError as e:
                raise UserError(str(e) if flag == "--data" else f"{flag}: {e}") from None
        return check
    specs: dict[str, str] = {}
    for f in specs_in:
        name, sep, path = f.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{flag if flag != '--data' else '--feed'} expects NAME=FILE (.npy or IDX), got {f!r}")
        if name in specs:
            raise UserError(f"input '{name}' is fed twice: --feed {name}={specs[name]} and --feed {f}")
        specs[name] = path
    feeds: dict[str, np.ndarray] = {}
    if npz:
        feeds = _read_npz(npz, flag, check_for)
        twice = sorted(set(feeds) & set(specs))
        if twice:
            raise UserError(f"input '{twice[0]}' is fed twice: by {flag} {npz} and by "
                            f"{'--feed' if flag == '--data' else flag + ' NAME=FILE'}")
    for name, path in specs.items():
        if data.is_idx(path):
            try:
                feeds[name] = data.read_idx(path)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read '{path}': {e}") from None
            check_for(name)(datafile.Header(feeds[name].dtype, feeds[name].shape, False, feeds[name].nbytes, 0))
            continue
        if _is_zip(path):
            raise UserError(f"--feed {name}: '{path}' is an .npz; use --data or an .npy file")
        feeds[name] = _read_npy(path, check_for(name))
    missing = sorted(set(inputs) - set(feeds))
    if missing:
        from popdsl.api import not_fed
        has = f" ({npz} has: {', '.join(sorted(feeds)) or 'nothing'})" if npz else ""
        raise UserError((f"{flag}: " if flag != "--data" else "") + not_fed(inputs, missing) + has)
    return feeds


def _writable(path: str, flag: str) -> None:
    """Fail before the work if `path` cannot be written (its folder is missing or
    not writable, or it is a folder)."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"cannot write {flag} '{path}': it is a directory")
    if not os.path.isdir(d):
        raise UserError(f"cannot write {flag} '{path}': no such directory '{d}'")
    if not os.access(d, os.W_OK):
        raise UserError(f"cannot write {flag} '{path}': permission denied")


def _params(path: str, exe) -> dict[str, np.ndarray]:
    """--load-params: arrays by tensor name, checked from their headers."""
    def check_for(name: str):
        def check(h: datafile.Header) -> None:
            i = exe.tensor_index(name)
            if i is None:
                raise UserError(f"--load-params: no tensor named '{name}'")
            t = exe.tensors[i]
            if h.shape != t.shape:
                raise UserError(f"--load-params: '{name}' has shape {list(t.shape)}, given {list(h.shape)}")
            if h.dtype.kind not in "biuf":
                raise UserError(f"--load-params: '{name}' holds {h.dtype} values; it is {t.dtype}")
        return check
    return _read_npz(path, "--load-params", check_for)


def cmd_run(args) -> int:
    from popdsl import training
    from popdsl.api import Simulator
    from popdsl.runtime.simulator import DeviceError, format_array
    _output_name("--save", args.save)
    _output_name("--save-params", args.save_params)
    _output_name("--trace", args.trace)
    if args.trace:
        _writable(args.trace, "--trace")
    elif args.trace_tiles:
        raise UsageError("--trace-tiles needs --trace T.json")
    early: dict = {}

    def check_inputs(stage: str, result) -> None:
        # Feeds are checked once the program is known to be right and its inputs
        # are known (after autodiff): before the long stages.
        if stage == "autodiff":
            early["feeds"] = _feeds(args, _inputs(result))
    exe = _executable(args, check_inputs)
    feeds = early["feeds"] if "feeds" in early else _feeds(args, _inputs(exe.ir))
    params = _params(args.load_params, exe.ir) if args.load_params else {}
    test = _eval_data(args, exe) if args.eval else None      # errors before a long run
    _timings(args, getattr(args, "_build", None))
    sim = Simulator(exe, threads=args.threads or os.cpu_count(), max_cycles=args.max_cycles)
    recorder = None
    if args.trace:
        recorder = sim.record_trace(per_tile=True if args.trace_tiles else None)
    try:
        for k, v in params.items():
            try:
                sim.write(k, v)
            except (KeyError, ValueError) as e:
                raise UserError(f"--load-params: {e.args[0]}") from None
        try:
            stream = training.prepare(exe, feeds, args.data if args.data and not args.feed else "")
        except training.DataError as e:
            raise UserError(str(e)) from None
        if args.epochs and not stream.streamed:
            raise UserError("--epochs needs data with more examples than one batch to stream "
                            "(--data FILE.npz or --feed NAME=FILE)")
        steps = args.steps or (args.epochs or 1) * (stream.batches if args.epochs else 1)
        if stream.left_out and steps > 1:
            print(f"popc: note: {stream.examples} examples make {stream.batches} batches of "
                  f"{stream.samples_per_step}; the last {stream.left_out} are left out of each epoch", file=sys.stderr)
        try:
            outputs = training.run(sim, stream, steps)
        except ValueError as e:
            raise UserError(str(e)) from None
        except DeviceError as e:
            sys.stdout.flush()
            print(e.diagnostic.render(), file=sys.stderr)
            return EXIT_USER
        if args.save:
            _save_npz(args.save, outputs)
        else:
            for name, value in outputs.items():
                print(f"{name}: {format_array(value) if value.size <= 64 else np.array2string(value, threshold=16)}")
        if test is not None:
            eval_exe, test_stream = test
            try:
                result, seen = training.evaluate(eval_exe, sim, test_stream, threads=args.threads or os.cpu_count())
            except DeviceError as e:
                sys.stdout.flush()
                print(e.diagnostic.render(), file=sys.stderr)
                return EXIT_USER
            for k, v in result.items():
                print(f"test {k}: {v:.4f} ({seen} examples)")
        if args.save_params:
            _save_npz(args.save_params, {n: sim.read(n) for n in training.state_names(exe)})
        if args.cycles:
            print(_cycles_text(exe.ir, sim.cycles))
        if recorder is not None:
            try:
                n = recorder.write(args.trace)
            except OSError as e:
                raise UserError(f"cannot write --trace '{args.trace}': {e.strerror}") from None
            print(f"wrote {args.trace} ({n:,} trace events, "
                  f"{'a track per tile' if recorder.per_tile else f'{len(recorder.cuts) - 1} tracks of tile groups'})",
                  file=sys.stderr)
    finally:
        sim.close()
    return 0


def _eval_data(args, exe):
    """The inference executable of the graph and the test data, checked."""
    from popdsl import training
    from popdsl.api import Executable
    if args.file.endswith(".popx"):
        raise UserError("--eval compiles the graph again for inference: give the .pop file, not a .popx")
    npz = [e for e in args.eval if "=" not in e]
    if len(npz) > 1:
        raise UserError(f"--eval takes one .npz file (or NAME=FILE per input), given {', '.join(npz)}")
    b = _build(args, training=False, prefix="eval ")
    eval_exe = Executable(b.exe, b.native)
    test = _feeds(args, _inputs(eval_exe.ir), [e for e in args.eval if "=" in e], npz[0] if npz else "", "--eval")
    try:
        training.reported(eval_exe)
        return eval_exe, training.prepare(eval_exe, test, npz[0] if npz and len(args.eval) == 1 else "")
    except training.DataError as e:
        raise UserError(f"--eval: {e}") from None


def _save_npz(path: str, arrays: dict) -> None:
    try:
        write_atomically(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        raise UserError(f"cannot write '{path}': {e.strerror}") from None


def _cycles_text(exe, c) -> str:
    from popdsl.ir.cost import assumptions, constants
    t = exe.target
    lines = [f"cycles (estimated, {t.name}, {t.tiles} tiles, {c.steps} step{'s' if c.steps != 1 else ''}): "
             f"{c.total:,} = compute {c.compute:,} + exchange {c.exchange:,} + sync {c.sync:,}",
             f"  time at {t.clock_hz / 1e9:.2f} GHz: {c.total / t.clock_hz * 1e6:.3f} us; "
             f"exchange traffic {c.exchange_bytes:,} B"]
    for name, cyc in c.per_compute_set.items():
        lines.append(f"  compute set {name}: {cyc:,} compute cycles")
    lines.append("  assumptions:")
    lines.extend(f"    - {a}" for a in assumptions(t))
    lines.append("  constants (name = value: what; source):")
    lines.extend(f"    - {name} = {value:,}: {what}; {source}" if isinstance(value, int)
                 else f"    - {name} = {value}: {what}; {source}" for name, value, what, source in constants(t))
    return "\n".join(lines)


PICTURES = (("graph_picture", "--graph-picture"), ("memory_map", "--memory-map"), ("liveness", "--liveness"))


def _pictures(args, exe) -> None:
    from popdsl.report.pictures import draw_liveness, draw_memory_map
    for attr, flag in PICTURES:
        path = getattr(args, attr)
        if not path:
            continue
        if attr == "graph_picture":
            from popdsl.report.graphpicture import draw_graph as draw
        else:
            draw = draw_memory_map if attr == "memory_map" else draw_liveness
        try:
            pic = draw(exe, path)
        except OSError as e:
            raise UserError(f"cannot write {flag} '{path}': {e.strerror}") from None
        print(f"wrote {path} ({pic.width}x{pic.height} px, {pic.seconds:.1f} s): {pic.note}", file=sys.stderr)


def cmd_report(args) -> int:
    from popdsl.report.memory import memory_report
    from popdsl.report.partition import partition_report
    wanted = [(attr, flag) for attr, flag in PICTURES if getattr(args, attr)]
    if wanted:
        from popdsl.report.pictures import PicturesUnavailable, require
        try:
            require(graph=bool(args.graph_picture))
        except PicturesUnavailable as e:
            raise UserError(str(e)) from None
        for attr, flag in wanted:
            _output_name(flag, getattr(args, attr))
            _writable(getattr(args, attr), flag)
    if args.reuse and args.no_outline:
        raise UsageError("--reuse compares the build with outlining against one without; drop --no-outline")
    exe = _executable(args)
    # --reuse: the same program compiled again without outlining, to compare.
    plain = _build(argparse.Namespace(**{**vars(args), "no_outline": True}), prefix="without outlining: ") \
        if args.reuse else None
    _timings(args, getattr(args, "_build", None))
    if wanted:
        _pictures(args, exe.ir)
        if not (args.memory or args.partition or args.json or args.reuse):
            return 0
    reports = []
    if plain is not None:
        from popdsl.report.reuse import reuse_report
        reports.append(("reuse", reuse_report(exe.ir, plain.exe)))
    if args.memory or not (args.partition or args.reuse):
        reports.append(("memory", memory_report(exe.ir)))
    if args.partition:
        reports.append(("partition", partition_report(exe.ir, exe.native(), args.max_cycles)))
    if args.json:
        doc = reports[0][1].to_json() if len(reports) == 1 else {k: r.to_json() for k, r in reports}
        if "graph_stats" not in doc:        # the memory report carries them; --partition alone too
            from popdsl.report.graphstats import graph_stats
            doc["graph_stats"] = graph_stats(exe.ir).to_json()
        print(json.dumps(doc, indent=2))
    else:
        print("\n\n".join(r.text() for _, r in reports))
    return 0


def cmd_dump(args) -> int:
    from popdsl.pipeline import dump
    result = _compile(args, args.after)
    _timings(args, None)
    print(dump(args.after, result), end="")
    return 0


_COMMANDS = {"build": cmd_build, "check": cmd_check, "run": cmd_run, "report": cmd_report, "dump": cmd_dump}


def entry() -> None:
    # One short process that builds large graphs of objects and frees few before it
    # exits: the cyclic collector, run every 700 allocations, walks the live objects
    # again and again.  Leave out what the imports made and collect young objects less
    # often (measured: the stages of `check` of a 10,000-line file take a third less
    # CPU time; ResNet-50's time and peak memory do not change).
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)
    code = main()
    # Then leave without the interpreter's teardown, which frees the compile's objects
    # one by one (0.35 s of `popc check` of a 10,000-line file), as mypy's fast exit
    # does: output flushed, compiles started ahead finished (their cache files are
    # written whole); popc registers no exit handlers of its own.
    jit = sys.modules.get("popdsl.codegen.jit")
    if jit is not None:
        try:
            jit.finish_ahead()
        except KeyboardInterrupt:                  # Ctrl-C while LLVM finishes: leave now
            print("popc: interrupted", file=sys.stderr)
            code = 130
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):     # a reader that left early; a closed stream
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


if __name__ == "__main__":
    entry()
