"""Where the numbers were measured: CPU, cores, memory, GPU, library versions, load."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def memory_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def gpu_description() -> str:
    """'none', or what torch.cuda reports (name of each visible device)."""
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            return ", ".join(names)
    except Exception:  # a broken CUDA install must not stop a CPU profile
        pass
    return "none"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict:
    """A JSON-ready description of this machine and software."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    from cunet_optimize import __version__

    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "memory_total_bytes": memory_total_bytes(),
        "gpu": gpu_description(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "versions": {
            "cunet-optimize": __version__,
            "torch": _version("torch"),
            "onnxruntime": _version("onnxruntime"),
            "onnx": _version("onnx"),
            "numpy": _version("numpy"),
            "tensorrt": _version("tensorrt"),
            "openvino": _version("openvino"),
        },
        "load_average": load_average(),
    }
