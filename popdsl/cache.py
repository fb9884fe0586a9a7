"""Cached builds: an unchanged source, target and options give the executable of the
last compile instead of compiling again (as PopART's executable cache does).

Requires the pipeline (to compile on a miss, and its parse stage to find every file
a source imports), the `.popx` writer and its validating reader; produces `build`,
which `popdsl.compile` and `popc` call wherever a `.pop` becomes an executable, and
`Build`, what it found or made.

Where: `$POPDSL_CACHE_DIR/builds/` (default `~/.cache/popdsl/builds/`; the JIT keeps
object code in the directory above), one file per build, `KEY.build`: an 80-byte
header (magic, the key, the sha256 and length of what follows) and the `.popx`
bytes — byte for byte what `popc build` writes.

The key is the sha256 of: every source file the compile reads (the root and, as the
parse stage resolves them, each import — the stdlib's included — each by the path
diagnostics and spans name it and its text); the target after overrides; every
option that changes the result (graph, training, unchecked, reuse, budgets); and
what compiled it — popdsl's version, the `.popx` format version, the codegen
version, a hash of the compiler's own source files and grammar (so an edited
compiler never reuses an old build) and the host's LLVM triple, CPU and features
(the memory plan holds the size of each codelet's native code).

Trust: an entry whose header, key, length or hash is wrong is a miss, compiled
again and replaced; an entry loaded as an executable also goes through the `.popx`
loader's validation, and one that fails it is replaced too.  Nothing about the
cache is ever an error: a missing, read-only or unusable directory only costs the
compile.  Size: after each store the least recently used builds are removed until
the directory holds at most POPDSL_BUILD_CACHE_MB megabytes (default 2048);
POPDSL_BUILD_CACHE_MB=0 turns the cache off.  `--verify` compiles without it (the
verifiers are what the user asked for), which keeps the test suite compiling.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import struct
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from popdsl import artifact
from popdsl.atomic import write_atomically
from popdsl.codegen.jit import CODEGEN_VERSION, NativeCodelets, cache_dir
from popdsl.diagnostics import SourceMap
from popdsl.ir import executable as X
from popdsl.ir.target import Target
from popdsl.limits import Budgets
from popdsl.passes.recompute import Policy
from popdsl.pipeline import compile_source, verify_by_default
from popdsl.resources import resource
from popdsl.sema import load_program

FORMAT = "popdsl-build-cache-1"
MAGIC = b"POPDSLB1"
_HEADER = struct.Struct("<8s32s32sQ")          # magic, key, sha256 of the payload, its length
DEFAULT_MB = 2048
SIZE_ENV = "POPDSL_BUILD_CACHE_MB"


class CacheSettingError(ValueError):
    """POPDSL_BUILD_CACHE_MB is not a whole number of megabytes (a user error)."""


@dataclass(eq=False)
class Build:
    """`exe` (None when a hit was not asked to load), `native` (None: made when a
    simulator needs it), `popx` (the `.popx` bytes, when known: always after a hit
    or a store), `status`: "hit", "miss" (compiled, then stored if it could be) or
    "off" (compiled without the cache)."""
    exe: X.Executable | None
    native: NativeCodelets | None
    popx: bytes | None
    status: str
    key: str | None = None
    why: str = ""             # "off": why not; "miss": whether it was stored

    def popx_bytes(self) -> bytes:
        return self.popx if self.popx is not None else artifact.dumps(self.exe)


def max_bytes() -> int:
    text = os.environ.get(SIZE_ENV, "").strip()
    if not text:
        return DEFAULT_MB << 20
    try:
        mb = int(text)
    except ValueError:
        mb = -1
    if mb < 0:
        raise CacheSettingError(f"{SIZE_ENV}={text!r}: expected a whole number of megabytes "
                                "(0 turns the build cache off)")
    return mb << 20


def builds_dir() -> Path:
    return cache_dir() / "builds"


@functools.lru_cache(maxsize=1)
def compiler_fingerprint() -> str:
    """What compiled it: versions, the compiler's own files, the host's code generator."""
    import llvmlite
    import llvmlite.binding as llvm
    from popdsl import __version__
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    files = [(p.relative_to(pkg).as_posix(), p) for p in sorted(pkg.rglob("*.py"))]
    for name, p in files + [("grammar", resource("grammar", "pop.lark"))]:
        h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    for part in (FORMAT, __version__, str(artifact.VERSION), CODEGEN_VERSION, llvm.get_process_triple(),
                 llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten(), llvmlite.__version__):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def build_key(modules, target: Target, graph, unchecked: bool, reuse: bool, training, budgets: Budgets,
              root_text: str, root_path: str, recompute: Policy = Policy(), outline: bool = True) -> str:
    """The key of a compile whose parse stage gave `modules`."""
    from popdsl import __version__
    sources = []
    for m in modules:
        text = root_text if m.path == root_path else SourceMap.text(m.path)
        sources.append([m.path, _sha(text if text is not None else "\0missing")])
    doc = {"compiler": compiler_fingerprint(), "version": __version__, "sources": sources,
           "target": target.to_json(),
           "options": {"graph": graph, "unchecked": unchecked, "reuse": reuse, "training": training,
                       "budgets": asdict(budgets), "recompute": asdict(recompute),
                       "outline": outline}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# ---------------------------------------------------------------- entries

def _entry(key: str) -> Path:
    return builds_dir() / f"{key}.build"


def read_entry(key: str) -> bytes | None:
    """The `.popx` bytes stored under `key`, or None (absent, unreadable, damaged,
    truncated, or not this key's)."""
    try:
        data = _entry(key).read_bytes()
    except (OSError, ValueError):
        return None
    if len(data) < _HEADER.size:
        return None
    magic, k, digest, n = _HEADER.unpack_from(data)
    payload = memoryview(data)[_HEADER.size:]
    if magic != MAGIC or k != bytes.fromhex(key) or n != len(payload) or \
            hashlib.sha256(payload).digest() != digest:
        return None
    return bytes(payload)


def write_entry(key: str, popx: bytes) -> bool:
    """Store `popx` under `key`, then keep the directory within its size.  False if
    it could not be written (which only costs a later compile)."""
    limit = max_bytes()
    if len(popx) + _HEADER.size > limit:
        return False
    header = _HEADER.pack(MAGIC, bytes.fromhex(key), hashlib.sha256(popx).digest(), len(popx))
    try:
        builds_dir().mkdir(parents=True, exist_ok=True)

        def write(f):
            f.write(header)
            f.write(popx)
        write_atomically(str(_entry(key)), write)
    except OSError:
        return False
    prune(limit, keep=key)
    return True


def _drop(key: str) -> None:
    try:
        _entry(key).unlink()
    except OSError:
        pass


def _touch(key: str) -> None:
    # Least recently *used*: a hit counts (atime is often not kept).
    try:
        os.utime(_entry(key))
    except OSError:
        pass


def entries() -> list[tuple[Path, int, float]]:
    """(path, bytes, last use) of every stored build, oldest first."""
    out = []
    try:
        with os.scandir(builds_dir()) as it:
            for e in it:
                if e.name.endswith(".build"):
                    try:
                        st = e.stat()
                    except OSError:
                        continue
                    out.append((Path(e.path), st.st_size, st.st_mtime))
    except OSError:
        return []
    out.sort(key=lambda r: r[2])
    return out


def prune(limit: int, keep: str | None = None) -> None:
    """Remove the least recently used builds until at most `limit` bytes remain."""
    found = entries()
    total = sum(n for _, n, _ in found)
    for path, n, _ in found:
        if total <= limit:
            break
        if keep is not None and path.name == f"{keep}.build":
            continue
        try:
            path.unlink()
            total -= n
        except OSError:
            pass


# ---------------------------------------------------------------- compiling through it

def build(text: str, path: str, target: Target, graph: str | None = None, unchecked: bool = False,
          reuse: bool = True, training: bool | None = None, budgets: Budgets | None = None, *,
          cache: bool = True, verify: bool | None = None, load: bool = True, store: bool = True,
          inspect=None, monitor=None, recompute: Policy | None = None, outline: bool = True) -> Build:
    """Compile `text` (from `path`), or take its build from the cache.  `load`: on a
    hit, load (and validate) the executable; without it a hit gives only the
    `.popx` bytes (`popc build` copies them out).  `store`: on a miss, store the
    build.  `inspect` and `monitor`: the pipeline's hooks (`compile_source`); on a
    hit no stage runs.  Raises CompileError; the cache itself raises nothing but
    CacheSettingError."""
    budgets = budgets or Budgets()
    recompute = recompute or Policy()
    verify = verify_by_default() if verify is None else verify
    why = "--no-cache" if not cache else "--verify compiles every stage" if verify else \
        f"{SIZE_ENV}=0" if max_bytes() == 0 else ""
    hooks = dict(inspect=inspect, monitor=monitor, recompute=recompute, outline=outline)
    if why:
        exe, native = compile_source(text, path, target, graph, unchecked, reuse=reuse, verify=verify,
                                     training=training, budgets=budgets, **hooks)
        return Build(exe, native, None, "off", why=why)
    with monitor("parse") if monitor is not None else nullcontext():
        modules = load_program(text, path)
    with monitor("cache") if monitor is not None else nullcontext():
        key = build_key(modules, target, graph, unchecked, reuse, training, budgets, text, path, recompute, outline)
        found = _lookup(key, load, unchecked)
    if found is not None:
        return found
    exe, native = compile_source(text, path, target, graph, unchecked, reuse=reuse, verify=False,
                                 training=training, budgets=budgets, start=("parse", modules), **hooks)
    popx, stored = None, False
    if store:
        with monitor("serialise") if monitor is not None else nullcontext():
            popx = artifact.dumps(exe)          # what `popc build` writes anyway
        with monitor("store") if monitor is not None else nullcontext():
            stored = write_entry(key, popx)
    return Build(exe, native, popx, "miss", key, "stored" if stored else "not stored (cannot write "
                 f"{builds_dir()}, or larger than {SIZE_ENV})")


def _lookup(key: str, load: bool, unchecked: bool) -> Build | None:
    popx = read_entry(key)
    if popx is None:
        return None
    exe = None
    if load:
        try:
            exe = artifact.load(io.BytesIO(popx), unchecked=unchecked)
        except artifact.ArtifactError:
            _drop(key)              # valid bytes of an invalid executable: compile it again
            return None
    _touch(key)
    return Build(exe, None, popx, "hit", key)



