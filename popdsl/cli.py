"""`popc`: the command line (README: "CLI reference").

Exit codes: 0 ok; 1 an error in the user's program, data or files; 2 command-line
usage; 70 an internal compiler error (a bug of ours, said as such).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import numpy as np

from popdsl import __version__, artifact
from popdsl.diagnostics import CompileError
from popdsl.runtime.simulator import DeviceError

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

    b = sub.add_parser("build", help="compile FILE.pop to FILE.popx")
    common(b)
    b.add_argument("-o", "--output", metavar="OUT.popx")
    c = sub.add_parser("check", help="report every error in FILE.pop without writing anything")
    common(c)
    r = sub.add_parser("run", help="run FILE.pop or FILE.popx on the IPU model")
    common(r, "a .pop or .popx file")
    r.add_argument("--feed", action="append", default=[], metavar="NAME=FILE.npy",
                   help="feed input NAME from a .npy file (repeatable)")
    r.add_argument("--data", metavar="FILE.npz", help="feeds by input name")
    r.add_argument("--steps", type=_positive, default=1,
                   help="steps to run (default 1); a feed holding STEPS batches along "
                        "axis 0 gives one batch per step")
    r.add_argument("--save", metavar="OUT.npz", help="write the outputs here")
    r.add_argument("--load-params", metavar="P.npz", help="set tensors by name before running")
    r.add_argument("--save-params", metavar="P.npz", help="save every variable after running")
    r.add_argument("--threads", type=_positive, help="host threads for tiles (default: all cores)")
    r.add_argument("--cycles", action="store_true", help="print the cycle estimate and its assumptions")
    rp = sub.add_parser("report", help="memory and cycle reports")
    common(rp, "a .pop or .popx file")
    rp.add_argument("--memory", action="store_true", help="memory per tile and category (default)")
    rp.add_argument("--partition", action="store_true",
                    help="per tensor op: tiles used, cycles per tile (max, mean), exchange bytes")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    d = sub.add_parser("dump", help="print the IR after a stage")
    common(d)
    from popdsl.pipeline import STAGE_NAMES
    d.add_argument("--after", required=True, choices=STAGE_NAMES, metavar="STAGE",
                   help="one of: " + ", ".join(STAGE_NAMES))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `popc FILE.pop` is `popc build FILE.pop`.
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["build"] + argv
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
        print(e.render(), file=sys.stderr)
        n = len(e.diagnostics)
        if n > 1:
            print(f"{n} errors", file=sys.stderr)
        return EXIT_USER
    except UserError as e:
        print(f"popc: error: {e}", file=sys.stderr)
        return EXIT_USER
    except UsageError as e:
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
    except KeyboardInterrupt:
        print("popc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:            # noqa: BLE001 — the one place a bug becomes a report
        print(f"popc: internal compiler error: {type(e).__name__}: {e}\n"
              "This is a bug in popdsl, not in your program; please report it with the input "
              "that caused it (set POPDSL_TRACEBACK=1 for details).", file=sys.stderr)
        if os.environ.get("POPDSL_TRACEBACK"):
            import traceback
            traceback.print_exc()
        return EXIT_INTERNAL


# ---------------------------------------------------------------- helpers

def _target(args):
    from popdsl.ir.target import get_target
    try:
        return get_target(args.target, args.tiles, args.tile_memory)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _read_source(path: str) -> str:
    try:
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
    from popdsl.pipeline import compile_source
    if args.file.endswith(".popx"):
        raise UserError(f"'{args.file}' is already compiled; '{args.command}' needs a .pop file")
    return compile_source(_read_source(args.file), args.file, _target(args), args.graph,
                          args.unchecked, stop_after, reuse=not args.no_reuse)


def _executable(args):
    """A .popx is loaded; a .pop is compiled."""
    from popdsl.api import Executable
    if args.file.endswith(".popx"):
        if not os.path.exists(args.file):
            raise UserError(f"cannot read '{args.file}': no such file")
        return Executable(artifact.load(args.file, unchecked=args.unchecked))
    exe, native = _compile(args)
    return Executable(exe, native)


# ---------------------------------------------------------------- commands

def cmd_build(args) -> int:
    exe, _ = _compile(args)
    out = args.output or str(Path(args.file).with_suffix(".popx"))
    try:
        artifact.save(exe, out)
    except OSError as e:
        raise UserError(f"cannot write '{out}': {e.strerror}") from None
    print(f"wrote {out}")
    return 0


def cmd_check(args) -> int:
    exe, _ = _compile(args)
    nv = sum(len(g.tiles) for cs in exe.compute_sets for g in cs.groups)
    print(f"{args.file}: ok (graph '{exe.name}': {_count(len(exe.tensors), 'tensor')}, "
          f"{_count(nv, 'vertex', 'vertices')} in {_count(len(exe.compute_sets), 'compute set')}, "
          f"{_count(exe.target.tiles, 'tile')})")
    return 0


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _load_npy(path: str):
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"cannot read '{path}': no such file") from None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read '{path}': not a valid .npy/.npz file ({e})") from None


def _feeds(args) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    if args.data:
        data = _load_npy(args.data)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise UserError(f"--data needs an .npz file of named arrays, '{args.data}' is not one")
        feeds.update({k: data[k] for k in data.files})
    for f in args.feed:
        name, sep, path = f.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--feed expects NAME=FILE.npy, got {f!r}")
        arr = _load_npy(path)
        if isinstance(arr, np.lib.npyio.NpzFile):
            raise UserError(f"--feed {name}: '{path}' is an .npz; use --data or an .npy file")
        feeds[name] = arr
    return feeds


def cmd_run(args) -> int:
    from popdsl.api import Simulator
    from popdsl.runtime.simulator import DeviceError, format_array
    exe = _executable(args)
    feeds = _feeds(args)
    sim = Simulator(exe, threads=args.threads or os.cpu_count())
    try:
        if args.load_params:
            params = _load_npy(args.load_params)
            for k in getattr(params, "files", []):
                try:
                    sim.write(k, params[k])
                except (KeyError, ValueError) as e:
                    raise UserError(f"--load-params: {e.args[0]}") from None
        try:
            outputs = sim.run(feeds, steps=args.steps)
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
        if args.save_params:
            _save_npz(args.save_params, {t.name: sim.read(t.name) for t in exe.ir.tensors if t.kind == "var"})
        if args.cycles:
            print(_cycles_text(exe.ir, sim.cycles))
    finally:
        sim.close()
    return 0


def _save_npz(path: str, arrays: dict) -> None:
    tmp = path + ".tmp.npz"
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise UserError(f"cannot write '{path}': {e.strerror}") from None


def _cycles_text(exe, c) -> str:
    from popdsl.ir.cost import assumptions
    t = exe.target
    lines = [f"cycles (estimated, {t.name}, {t.tiles} tiles, {c.steps} step{'s' if c.steps != 1 else ''}): "
             f"{c.total:,} = compute {c.compute:,} + exchange {c.exchange:,} + sync {c.sync:,}",
             f"  time at {t.clock_hz / 1e9:.2f} GHz: {c.total / t.clock_hz * 1e6:.3f} us; "
             f"exchange traffic {c.exchange_bytes:,} B"]
    for name, cyc in c.per_compute_set.items():
        lines.append(f"  compute set {name}: {cyc:,} compute cycles")
    lines.append("  assumptions:")
    lines.extend(f"    - {a}" for a in assumptions(t))
    return "\n".join(lines)


def cmd_report(args) -> int:
    from popdsl.report.memory import memory_report
    from popdsl.report.partition import partition_report
    exe = _executable(args)
    reports = []
    if args.memory or not args.partition:
        reports.append(("memory", memory_report(exe.ir)))
    if args.partition:
        reports.append(("partition", partition_report(exe.ir, exe.native())))
    if args.json:
        doc = reports[0][1].to_json() if len(reports) == 1 else {k: r.to_json() for k, r in reports}
        print(json.dumps(doc, indent=2))
    else:
        print("\n\n".join(r.text() for _, r in reports))
    return 0


def cmd_dump(args) -> int:
    from popdsl.pipeline import dump
    result = _compile(args, args.after)
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
    sys.exit(main())


if __name__ == "__main__":
    entry()
