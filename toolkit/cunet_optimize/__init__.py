"""cunet-optimize: take a trained CU-Net to small, fast, accurate deployments."""

__version__ = "0.1.0"

from cunet_optimize.models import load_model  # noqa: E402  (public API)

__all__ = ["load_model", "__version__"]
