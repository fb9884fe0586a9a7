"""Per-pass golden tests ("filetests", in the style of LLVM's FileCheck and
Cranelift's filetests): every `.pop` under tests/filetests/ is one test.

A filetest is a small program, compiled up to one stage of the pipeline
(`popdsl.pipeline.STAGES`); the stage's dump (`popc dump --after STAGE`) is matched
against check lines written in the file.  One file shows one behaviour of one pass;
the folder names the stage.

Header (`//` comment lines before any code):

`// dump-after: STAGE`
    required: parse, check, elaborate, autodiff, recompute, outline, partition, lower, codegen or plan.
`// args: FLAGS`
    target flags, split like a shell would: --target, --tiles, --tile-memory,
    --graph, --unchecked, --no-reuse, --recompute, --no-outline (as for `popc dump`).

Check lines, anywhere in the file (a `//` comment, alone or after code):

`// check: TEXT`
    a later line of the dump (after the line the previous check matched; at first,
    any line) contains TEXT.  The first such line is taken.
`// check-next: TEXT`
    the line right after the previous match contains TEXT (not allowed first).
`// check-not: TEXT`
    no line between the previous match and the next positive (`check`,
    `check-next`) match contains TEXT; after the last positive check, up to the end
    of the dump.  Before the first positive check, from the start of the dump.

TEXT is literal, except that a run of spaces matches any run of spaces or tabs
(so `naive 9,600` matches a padded table), and `{{REGEX}}` embeds a Python regular
expression: `// check: tile {{[0-9]+}}: x=buffer`.  Leading and trailing spaces of
TEXT are ignored.  Every check matches within one line; each positive check takes a
line of its own.  A comment word close to a directive but none of them (`// CHECK:`,
`// chek:`, `// check-nxt:`) is an error in the test: a misspelt check must not pass
unseen.

Every positive check must pin its line: the test also fails when taking out of the
dump the line a check matched still lets the file pass (the check would match
another line too, so it does not test what it seems to).

On failure the test prints the failed check (file and line), the line of the dump
where matching stood, and the numbered dump.
"""
from __future__ import annotations

import argparse
import difflib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from popdsl.ir.target import get_target
from popdsl.passes.recompute import Policy
from popdsl.pipeline import STAGE_NAMES, compile_source, dump

FILETESTS = Path(__file__).resolve().parent / "filetests"

_DIRECTIVE = re.compile(r"//\s*(dump-after|args|check-next|check-not|check):(.*)$")
_WORD = re.compile(r"//\s*([\w-]+)\s*:")
KINDS = ("dump-after", "args", "check", "check-next", "check-not")
POSITIVE = ("check", "check-next")


class FiletestError(Exception):
    """A malformed filetest (not a failed check)."""


@dataclass(frozen=True)
class Check:
    kind: str               # "check" | "check-next" | "check-not"
    text: str
    line: int               # in the test file

    @property
    def regex(self) -> re.Pattern:
        return compile_pattern(self.text)

    def where(self, path) -> str:
        return f"{path}:{self.line}: // {self.kind}: {self.text}"


@dataclass
class Filetest:
    path: Path
    stage: str | None = None
    args: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


def compile_pattern(text: str) -> re.Pattern:
    """TEXT → regex: literal pieces (runs of blanks match runs of blanks) and
    `{{REGEX}}` pieces."""
    out, rest = [], text.strip()
    while rest:
        a = rest.find("{{")
        lit, rest = (rest, "") if a < 0 else (rest[:a], rest[a:])
        out += [r"[ \t]+" if piece.isspace() else re.escape(piece)
                for piece in re.split(r"([ \t]+)", lit) if piece]
        if rest:
            b = rest.find("}}", 2)
            if b < 0:
                raise FiletestError(f"unclosed '{{{{' in check text {text!r}")
            out.append(f"(?:{rest[2:b]})")
            rest = rest[b + 2:]
    try:
        return re.compile("".join(out))
    except re.error as e:
        raise FiletestError(f"bad regex in check text {text!r}: {e}") from None


def _misspelt(path, lineno: int, line: str) -> None:
    """A comment word that looks like a directive but is none (`CHECK:`, `chek:`,
    `check-nxt:`) is an error: a check that is never run must not pass unseen."""
    m = _WORD.search(line)
    if m and difflib.get_close_matches(m.group(1).lower(), KINDS, n=1, cutoff=0.75):
        raise FiletestError(f"{path}:{lineno}: unknown directive '{m.group(1)}:'")


def parse_filetest(path: Path, text: str | None = None) -> Filetest:
    ft = Filetest(path)
    in_header = True
    text = path.read_text(encoding="utf-8") if text is None else text
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("//"):
            in_header = False
        m = _DIRECTIVE.search(line)
        if m is None:
            _misspelt(path, lineno, line)
            continue
        kind, arg = m.group(1), m.group(2).strip()
        if kind in ("dump-after", "args"):
            if not in_header:
                raise FiletestError(f"{path}:{lineno}: '{kind}:' belongs in the header")
            if kind == "args":
                ft.args.extend(shlex.split(arg))
            elif ft.stage is not None:
                raise FiletestError(f"{path}:{lineno}: a second 'dump-after:'")
            elif arg not in STAGE_NAMES:
                raise FiletestError(f"{path}:{lineno}: unknown stage {arg!r} (one of {', '.join(STAGE_NAMES)})")
            else:
                ft.stage = arg
            continue
        if not arg:
            raise FiletestError(f"{path}:{lineno}: empty '{kind}:'")
        if kind == "check-next" and not any(c.kind in POSITIVE for c in ft.checks):
            raise FiletestError(f"{path}:{lineno}: 'check-next:' needs a positive check before it")
        compile_pattern(arg)                     # report a bad pattern at parse time
        ft.checks.append(Check(kind, arg, lineno))
    if ft.stage is None:
        raise FiletestError(f"{path}: no '// dump-after: STAGE' in the header")
    if not any(c.kind in POSITIVE for c in ft.checks):
        raise FiletestError(f"{path}: no positive check ('check:' or 'check-next:')")
    return ft


class CheckFailure(AssertionError):
    pass


def match_checks(checks: list[Check], dump_text: str, path="<test>") -> list[tuple[Check, int]]:
    """The dump line (0-based) each positive check matched.  Raises CheckFailure
    naming the failed check and where matching stood."""
    lines = dump_text.splitlines()
    pos = -1                     # the line the last positive check matched
    pending: list[Check] = []    # check-nots waiting for the next positive match
    matched = []

    def stood() -> str:
        return f"after dump line {pos + 1}: {lines[pos]!r}" if pos >= 0 else "at the start of the dump"

    def verify_nots(upto: int) -> None:
        for c in pending:
            for k in range(pos + 1, upto):
                if c.regex.search(lines[k]):
                    raise CheckFailure(f"{c.where(path)}\n  found on dump line {k + 1}: {lines[k]!r}"
                                       f"\n  (the range began {stood()})")

    for c in checks:
        if c.kind == "check-not":
            pending.append(c)
            continue
        if c.kind == "check-next":
            j = pos + 1
            if j >= len(lines) or not c.regex.search(lines[j]):
                got = repr(lines[j]) if j < len(lines) else "the end of the dump"
                raise CheckFailure(f"{c.where(path)}\n  the next line is dump line {j + 1}: {got}\n"
                                   f"  (matching stood {stood()})")
        else:
            j = next((k for k in range(pos + 1, len(lines)) if c.regex.search(lines[k])), None)
            if j is None:
                raise CheckFailure(f"{c.where(path)}\n  not found {stood()}")
        verify_nots(j)
        pending = []
        pos = j
        matched.append((c, j))
    verify_nots(len(lines))
    return matched


def loose_checks(checks: list[Check], dump_text: str) -> list[tuple[Check, int]]:
    """Positive checks that do not pin their line: the file still passes with the
    line the check matched taken out of the dump (the check would match another
    line, so it does not test what it seems to)."""
    lines = dump_text.splitlines()
    loose = []
    for c, j in match_checks(checks, dump_text):
        try:
            match_checks(checks, "\n".join(lines[:j] + lines[j + 1:]))
        except CheckFailure:
            continue
        loose.append((c, j))
    return loose


def _target_args(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="// args:", add_help=False, exit_on_error=False)
    p.add_argument("--target", default="gc200")
    p.add_argument("--tiles", type=int)
    p.add_argument("--tile-memory", type=int)
    p.add_argument("--graph")
    p.add_argument("--unchecked", action="store_true")
    p.add_argument("--no-reuse", action="store_true")
    p.add_argument("--recompute", default="auto")
    p.add_argument("--no-outline", action="store_true")
    try:
        return p.parse_args(args)
    except (argparse.ArgumentError, SystemExit) as e:
        raise FiletestError(f"bad '// args:' {args}: {e}") from None


def compile_and_dump(ft: Filetest, text: str) -> str:
    a = _target_args(ft.args)
    target = get_target(a.target, a.tiles, a.tile_memory)
    result = compile_source(text, str(ft.path), target, a.graph, a.unchecked, stop_after=ft.stage,
                            reuse=not a.no_reuse, verify=True, recompute=Policy(a.recompute),
                            outline=not a.no_outline)
    return dump(ft.stage, result)


def run_filetest(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    ft = parse_filetest(path, text)
    out = compile_and_dump(ft, text)
    try:
        match_checks(ft.checks, out, path.relative_to(FILETESTS) if path.is_relative_to(FILETESTS) else path)
    except CheckFailure as e:
        pytest.fail(f"{e}\n{_numbered(ft.stage, out)}", pytrace=False)
    loose = loose_checks(ft.checks, out)
    if loose:
        pytest.fail("checks that still pass without the dump line they matched (make them specific):\n"
                    + "\n".join(f"  {c.where(path.name)}  (dump line {j + 1})" for c, j in loose)
                    + "\n" + _numbered(ft.stage, out), pytrace=False)


def _numbered(stage: str, out: str) -> str:
    return f"--- dump after {stage}\n" + "\n".join(f"{k:>5} | {line}" for k, line in enumerate(out.splitlines(), 1))


def filetests() -> list[Path]:
    return sorted(FILETESTS.rglob("*.pop"))


@pytest.mark.parametrize("path", filetests(), ids=lambda p: str(p.relative_to(FILETESTS)))
def test_filetest(path: Path) -> None:
    run_filetest(path)


def test_every_file_is_in_the_folder_of_its_stage() -> None:
    for p in filetests():
        assert parse_filetest(p).stage == p.parent.name, p


def test_every_stage_has_filetests() -> None:
    count = {s: 0 for s in STAGE_NAMES}
    for p in filetests():
        count[p.parent.name] += 1
    assert all(count[s] >= 3 for s in ("parse", "check", "elaborate", "partition", "lower", "plan")), count


# ---------------------------------------------------------------- the runner's own rules

DUMP = """graph g
  compute a.1:
    tile 0: x=v[0:2]
  compute b.2:
    tile 1: x=buffer r4+0
  program {
    execute a.1
    execute b.2
  }
"""


def _checks(*lines: str) -> list[Check]:
    text = "// dump-after: lower\n" + "\n".join(lines) + "\n"
    return parse_filetest(Path("t.pop"), text).checks


def _passes(*lines: str) -> bool:
    try:
        match_checks(_checks(*lines), DUMP)
    except CheckFailure:
        return False
    return True


def test_check_finds_text_in_order() -> None:
    assert _passes("// check: compute a.1", "// check: compute b.2", "// check: execute b.2")
    assert not _passes("// check: compute c.3")                         # absent
    assert not _passes("// check: compute b.2", "// check: compute a.1")  # out of order
    assert not _passes("// check: execute a.1", "// check: execute a.1")  # each takes a line


def test_check_next_means_the_very_next_line() -> None:
    assert _passes("// check: compute a.1", "// check-next: tile 0: x=v")
    assert not _passes("// check: compute a.1", "// check-next: compute b.2")     # two lines on
    assert not _passes("// check: execute b.2", "// check-next: }", "// check-next: }")  # past the end
    assert _passes("// check: execute b.2", "// check-next: }")


def test_check_not_between_matches_and_to_the_end() -> None:
    # Between compute a.1 and compute b.2 there is no buffer, after it there is.
    assert _passes("// check: compute a.1", "// check-not: buffer", "// check: compute b.2")
    assert not _passes("// check: compute a.1", "// check-not: buffer", "// check: program")
    assert not _passes("// check: compute b.2", "// check-not: execute")   # up to the end
    assert _passes("// check: execute b.2", "// check-not: execute")
    assert not _passes("// check-not: graph", "// check: compute")          # from the start
    assert _passes("// check-not: program", "// check: compute a.1")


def test_patterns() -> None:
    assert _passes("// check: tile {{[0-9]+}}: x=buffer r{{\\d+}}")
    assert not _passes("// check: tile {{[2-9]}}:")
    assert _passes("// check: compute    b.2:")                  # blanks match blanks
    assert not _passes("// check: computeb.2")
    assert _passes("// check: v[0:2]")                           # brackets are literal
    assert not _passes("// check: v[0:3]")


@pytest.mark.parametrize("text, message", [
    ("// check: x\n", "no '// dump-after: STAGE'"),
    ("// dump-after: lowering\n// check: x\n", "unknown stage"),
    ("// dump-after: lower\n", "no positive check"),
    ("// dump-after: lower\n// check-not: x\n", "no positive check"),
    ("// dump-after: lower\n// check-next: x\n", "needs a positive check before it"),
    ("// dump-after: lower\n// chek: x\n// check: y\n", "unknown directive 'chek:'"),
    ("// dump-after: lower\n// CHECK: x\n", "unknown directive 'CHECK:'"),
    ("// dump-after: lower\n// check-nxt: x\n", "unknown directive 'check-nxt:'"),
    ("// dump-after: lower\n// check:\n", "empty 'check:'"),
    ("// dump-after: lower\n// check: a {{[}}\n", "bad regex"),
    ("// dump-after: lower\n// check: a {{x\n", "unclosed"),
    ("graph g() {}\n// dump-after: lower\n// check: x\n", "belongs in the header"),
])
def test_malformed_filetests_are_errors(text, message) -> None:
    with pytest.raises(FiletestError, match=re.escape(message)):
        parse_filetest(Path("t.pop"), text)


def test_a_check_that_matches_two_lines_is_loose() -> None:
    # `execute` matches both execute lines: without the first, it takes the second.
    assert [c.text for c, _ in loose_checks(_checks("// check: execute"), DUMP)] == ["execute"]
    assert loose_checks(_checks("// check: execute a.1"), DUMP) == []
    # A check-next after it pins it: without its line the next line is wrong.
    assert loose_checks(_checks("// check: execute", "// check-next: execute b.2"), DUMP) == []


def test_a_failing_filetest_fails_and_says_where(tmp_path) -> None:
    """End to end: a real compile whose check cannot match fails the test, naming
    the check, where matching stood and the dump."""
    p = tmp_path / "t.pop"
    p.write_text("// dump-after: elaborate\n// args: --tiles 2\n"
                 "graph g(tiles = 2) { var v: f32[4]; map v -> tile 1; }\n"
                 "// check: var v: f32[4]\n// check-next: no such line\n")
    with pytest.raises(pytest.fail.Exception) as e:
        run_filetest(p)
    msg = str(e.value)
    assert "t.pop:5: // check-next: no such line" in msg
    assert "matching stood after dump line 2:" in msg and "var v: f32[4]" in msg
    assert "--- dump after elaborate" in msg and "    1 | graph g on gc200 (2 tiles)" in msg
    p.write_text(p.read_text().replace("// check-next: no such line", "// check-next: }"))
    with pytest.raises(pytest.fail.Exception):
        run_filetest(p)
    p.write_text(p.read_text().replace("// check-next: }", "// check: program {"))
    run_filetest(p)
    p.write_text(p.read_text().replace("// check: program {", "// check: {{^ }}"))   # any indented line
    with pytest.raises(pytest.fail.Exception, match="still pass without the dump line"):
        run_filetest(p)
