"""popdsl: a language and compiler toolchain for IPU-style graph processors."""
from popdsl.diagnostics import CompileError

__version__ = "0.1.0"

from popdsl.api import Executable, Simulator, compile, load  # noqa: E402
from popdsl.artifact import ArtifactError  # noqa: E402
from popdsl.data import read_idx  # noqa: E402
from popdsl.runtime.simulator import DeviceError  # noqa: E402

__all__ = ["ArtifactError", "CompileError", "DeviceError", "Executable", "Simulator", "compile", "load",
           "read_idx", "__version__"]
