"""cunet-optimize: take a trained CU-Net to small, fast, accurate deployments."""

__version__ = "0.1.0"

__all__ = ["load_model", "__version__"]


def __getattr__(name: str):
    # `load_model` is imported on first use (PEP 562): importing any part of the package
    # runs this file, and the parts that only read JSON (`cunet-optimize report`, the
    # manifests) must not pay for torch.
    if name == "load_model":
        from cunet_optimize.models import load_model

        return load_model
    raise AttributeError(f"module 'cunet_optimize' has no attribute {name!r}")
