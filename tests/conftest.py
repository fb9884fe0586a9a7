import importlib.util
import os
import tempfile
import pytest

# Run without popdsl's dependencies (a bare interpreter, not the README's venv), every
# test module would fail to import, 25 tracebacks saying less than one line does.
_MISSING = [m for m in ("lark", "llvmlite", "numpy", "hypothesis") if importlib.util.find_spec(m) is None]


def pytest_sessionstart(session):
    if _MISSING:
        pytest.exit(f"popdsl's tests need {', '.join(_MISSING)}, not installed for this interpreter: "
                    "install them with pip install -e '.[test]' (README, Quick start)", returncode=4)

# Tests never write into the user's cache: one native-code cache per test session.
os.environ.setdefault("POPDSL_CACHE_DIR", tempfile.mkdtemp(prefix="popdsl-cache-"))
# Every compile in the tests runs the verifier after every pipeline stage.
os.environ["POPDSL_VERIFY"] = "1"


@pytest.fixture
def popc(capsys):
    """popc(*argv) -> (exit code, stdout, stderr), in-process; never a traceback.
    (A test module may define its own `popc`, which takes precedence.)"""
    from popdsl import cli

    def run(*argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, err
        return code, out, err
    return run
