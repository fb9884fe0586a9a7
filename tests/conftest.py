import os
import tempfile
import pytest

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
