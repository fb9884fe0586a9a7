"""popdsl: a language and compiler toolchain for IPU-style graph processors."""
from popdsl.diagnostics import CompileError

__version__ = "0.1.0"

# The rest of the API loads when first named: `popc check` needs none of it, and the
# simulator, the build cache and the data readers cost start-up time (PEP 562).
_LAZY = {"Executable": "popdsl.api", "Simulator": "popdsl.api", "compile": "popdsl.api",
         "load": "popdsl.api", "ArtifactError": "popdsl.artifact", "read_idx": "popdsl.data",
         "DeviceError": "popdsl.runtime.simulator"}

__all__ = ["ArtifactError", "CompileError", "DeviceError", "Executable", "Simulator", "compile", "load",
           "read_idx", "__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'popdsl' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
