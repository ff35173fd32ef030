"""cunet-optimize: take a trained CU-Net to small, fast, accurate deployments.

The Python API (docs/API.md): load_model, quantize, save_quantized, load_quantized, build,
load_engine, evaluate, export, profile, each the code path of its command, with its defaults.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# name -> the module that defines it
_API = {"load_model": "cunet_optimize.models",
        **{name: "cunet_optimize.api" for name in ("quantize", "save_quantized", "load_quantized", "build",
                                                   "load_engine", "evaluate", "export", "profile", "Engine")}}

__all__ = [*_API, "__version__"]


class _Package(types.ModuleType):
    """This package, whose API names always mean the API: `build`, `evaluate`, `export` and
    `profile` are also submodules, which the import system sets as attributes of the package when
    they are first imported. The API is imported on first use: importing any part of the package
    runs this file, and the parts that only read JSON (`cunet-optimize report`, the manifests) must
    not pay for torch. The submodules stay `from cunet_optimize.build import ...` and
    `importlib.import_module("cunet_optimize.build")`."""

    def __getattribute__(self, name: str):
        if name in _API:
            return getattr(importlib.import_module(_API[name]), name)
        return super().__getattribute__(name)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_API})


sys.modules[__name__].__class__ = _Package
