"""Which int8 dot-product instructions this CPU has: what decides whether an INT8 variant is exact.

ONNX Runtime's u8 x s8 kernels on plain AVX2 multiply with vpmaddubsw, which sums pairs of
products in int16 and saturates; AVX-512 VNNI, AVX-VNNI and AMX accumulate in int32. A
variant that feeds large uint8 values into the convs (integer_dataflow's relu_form
"clamp") is therefore only as accurate as the fused kernels allow: `build` gates it on the
build machine and records this ISA beside its timings.
"""

from __future__ import annotations

from pathlib import Path

# Best first: the first one whose flags are all present names the CPU.
INT8_ISAS = (
    ("amx", ("amx_int8",)),
    ("avx512_vnni", ("avx512_vnni",)),
    ("avx_vnni", ("avx_vnni",)),
    ("avx2", ("avx2",)),
    ("arm_i8mm", ("i8mm",)),
    ("arm_dotprod", ("asimddp",)),
)


def int8_isa_from_flags(flags: str | set[str]) -> str:
    """The best int8 instruction set among `flags` (a /proc/cpuinfo flags line or a set), else "none"."""
    have = set(flags.split()) if isinstance(flags, str) else set(flags)
    for name, needed in INT8_ISAS:
        if all(f in have for f in needed):
            return name
    return "none"


def cpu_int8_isa(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """This machine's int8 ISA from /proc/cpuinfo ("unknown" where there is none, e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM
            return int8_isa_from_flags(value)
    return "unknown"


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model"):
                return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"
