"""The installed package works outside the source tree: a wheel, a fresh venv, and
`popc` finding its grammar and stdlib inside the installation."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("pip") is None and not shutil.which(sys.executable), reason="no pip")
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wheel = next(wheels.glob("popdsl-*.whl"))
    venv = tmp_path / "venv"
    # A venv of its own (no system site packages: from inside a venv those would be
    # the base interpreter's, without our dependencies).  The runtime dependencies
    # are the ones this test runs with, reached through a .pth file, so nothing is
    # downloaded; the wheel goes into the venv's own site-packages, which comes first.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    import lark, llvmlite, numpy
    dirs = sorted({str(Path(m.__file__).resolve().parent.parent) for m in (lark, llvmlite, numpy)})
    (Path(site) / "popdsl_test_deps.pth").write_text("\n".join(dirs) + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(ROOT / "examples" / "scale_demo.pop", work)
    shutil.copy(ROOT / "examples" / "reduce.pop", work)      # imports the stdlib
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import popdsl; print(popdsl.__file__)"], cwd=work,
                           capture_output=True, text=True, env=env, timeout=120)
    assert str(venv) in where.stdout, where.stdout + where.stderr
    popc = venv / "bin" / "popc"
    r = subprocess.run([str(popc), "run", "scale_demo.pop"], cwd=work, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "v: [1000 2000 3000 4000 5000 6000 7000 8000]"
    r = subprocess.run([str(popc), "check", "reduce.pop"], cwd=work, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
