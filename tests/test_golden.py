"""Golden tests: every `.pop` under tests/golden/ is one test (Crafting Interpreters style).

A golden file is a small program annotated with what popc must do with it,
Crafting-Interpreters style.  The annotations are `//` comments:

`// error: SUBSTRING` at the end of a line
    popc reports an error *at that line* (`PATH:LINE:COL: error: MESSAGE`) whose
    message contains SUBSTRING.  Several on one line are written
    `// error: first // error: second`.
`// error-at: FILE:LINE: SUBSTRING` anywhere
    an error in another file (an imported module), FILE relative to the test file.
`// file-error: SUBSTRING` anywhere
    an error not tied to a line (`PATH: error: MESSAGE`), e.g. "no graph to compile".
`// expect: TEXT` anywhere
    a line popc prints on stdout.  With `run`, stdout must be exactly these lines,
    in this order (the output of `print` and of every `output`).
`// args: FLAGS` in the header (comment lines before any code)
    extra command-line flags, split like a shell would: `// args: --tile-memory 1024`.
`// command: check|run|build|report|dump` in the header
    the command (default `run`).  `build` writes into a temporary directory.

Every expected error must be reported, and no other; the exit code is 1 when errors
are expected and 0 otherwise; no traceback and no internal compiler error, ever.

Files whose names start with `_` are not tests: they are modules the tests import.
The CLI runs in-process (`popdsl.cli.main`), which is much faster than a subprocess.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from popdsl import cli

GOLDEN = Path(__file__).resolve().parent / "golden"

_ANNOT = re.compile(r"//\s*(error|expect|error-at|file-error|args|command):[ \t]?(.*?)\s*$")
_ERROR_LINE = re.compile(r"^(?P<path>.+?):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>.*)$")
_FILE_ERROR = re.compile(r"^(?P<path>\S.*?): error: (?P<msg>.*)$")


@dataclass
class Golden:
    path: Path
    command: str = "run"
    args: list[str] = field(default_factory=list)
    errors: list[tuple[str, int, str]] = field(default_factory=list)    # (path, line, substring)
    file_errors: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)


def parse_golden(path: Path) -> Golden:
    g = Golden(path)
    in_header = True
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("//"):
            in_header = False
        # `// error: a // error: b` holds two annotations: split at each `//`.
        pieces = line.split("//")
        for k in range(1, len(pieces)):
            m = _ANNOT.match("//" + pieces[k])
            if not m:
                continue
            kind, text = m.group(1), m.group(2)
            if kind == "error":
                g.errors.append((str(path), lineno, text))
            elif kind == "error-at":
                file, ln, msg = text.split(":", 2)
                g.errors.append((str(path.parent / file.strip()), int(ln), msg.strip()))
            elif kind == "file-error":
                g.file_errors.append(text)
            elif kind == "expect":
                g.expect.append(text)
            elif in_header and kind == "args":
                g.args.extend(shlex.split(text))
            elif in_header and kind == "command":
                g.command = text.strip()
            else:
                raise ValueError(f"{path}:{lineno}: '{kind}:' belongs in the header")
    return g


def golden_files() -> list[Path]:
    return sorted(p for p in GOLDEN.rglob("*.pop") if not p.name.startswith("_"))


def run_popc(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:            # argparse; main() itself should return
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def reported_errors(err: str):
    """(path, line, message) per `error:` line of the rendered diagnostics; line 0
    for an error not tied to a line."""
    out = []
    for line in err.splitlines():
        if line.startswith(" "):         # source line, caret, note
            continue
        m = _ERROR_LINE.match(line)
        if m:
            out.append((m["path"], int(m["line"]), m["msg"]))
            continue
        m = _FILE_ERROR.match(line)
        if m:
            out.append((m["path"], 0, m["msg"]))
    return out


def check_golden(g: Golden, capsys, tmp_path) -> None:
    argv = [g.command, str(g.path), *g.args]
    if g.command == "build":
        argv += ["-o", str(tmp_path / "out.popx")]
    code, out, err = run_popc(argv, capsys)
    report = f"\n--- exit {code}\n--- stdout\n{out}--- stderr\n{err}"
    assert "Traceback" not in out + err, report
    assert "internal compiler error" not in err, report
    got = reported_errors(err)
    missing, unexpected = [], list(got)
    for path, line, text in g.errors:
        hit = next((r for r in unexpected if r[0] == path and r[1] == line and text in r[2]), None)
        if hit is None:
            missing.append(f"{Path(path).name}:{line}: {text}")
        else:
            unexpected.remove(hit)
    for text in g.file_errors:
        hit = next((r for r in unexpected if r[1] == 0 and text in r[2]), None)
        if hit is None:
            missing.append(f"(file) {text}")
        else:
            unexpected.remove(hit)
    assert not missing, f"expected errors not reported: {missing}" + report
    assert not unexpected, f"unexpected errors: {unexpected}" + report
    want_code = 1 if g.errors or g.file_errors else 0
    assert code == want_code, f"exit code {code}, expected {want_code}" + report
    if g.command == "run":
        assert out.splitlines() == g.expect, report
    else:
        lines = out.splitlines()
        for text in g.expect:
            assert text in lines, f"missing output line {text!r}" + report


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: str(p.relative_to(GOLDEN)))
def test_golden(path: Path, capsys, tmp_path) -> None:
    check_golden(parse_golden(path), capsys, tmp_path)


def test_golden_suite_is_not_empty() -> None:
    stages = {p.parent.name for p in golden_files()}
    assert {"syntax", "codelet", "graph", "run", "memory", "imports"} <= stages


def test_annotations_parse() -> None:
    """The runner's own conventions, on a file written here."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.pop"
        p.write_text("// args: --tiles 4 --tile-memory 2048\n// command: check\n"
                     "codelet A(x: f32) { }  // error: one // error: two\n"
                     "// expect: v: [1]\n// error-at: _m.pop:3: in module\n// file-error: whole\n")
        g = parse_golden(p)
    assert g.command == "check" and g.args == ["--tiles", "4", "--tile-memory", "2048"]
    assert [(line, t) for _, line, t in g.errors] == [(3, "one"), (3, "two"), (3, "in module")]
    assert g.expect == ["v: [1]"] and g.file_errors == ["whole"]
