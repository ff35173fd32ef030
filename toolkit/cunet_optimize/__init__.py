"""cunet-optimize: take a trained CU-Net to small, fast, accurate deployments.

The Python API (docs/API.md): load_model, quantize, save_quantized, load_quantized, build,
load_engine, evaluate, export, profile, each the code path of its command, with its defaults.
"""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_API = {"load_model": "cunet_optimize.models",
        **{name: "cunet_optimize.api" for name in ("quantize", "save_quantized", "load_quantized", "build",
                                                   "load_engine", "evaluate", "export", "profile", "Engine")}}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    # The API is imported on first use (PEP 562): importing any part of the package runs this
    # file, and the parts that only read JSON (`cunet-optimize report`, the manifests) must not
    # pay for torch. No submodule shares an API name (the build pipeline is `pipeline.build`,
    # the stages `exporters/`, `profiling/`, `evaluation`), so `import cunet_optimize.X.Y`
    # keeps working beside `cunet_optimize.build(...)`.
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'cunet_optimize' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
