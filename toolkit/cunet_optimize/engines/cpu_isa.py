"""Which int8 dot-product and bf16 instructions this CPU has: what decides whether an INT8 variant
is exact, and whether `--precision bf16` can run at all.

ONNX Runtime's u8 x s8 kernels on plain AVX2 multiply with vpmaddubsw, which sums pairs of
products in int16 and saturates; AVX-512 VNNI, AVX-VNNI and AMX accumulate in int32. A
variant that feeds large uint8 values into the convs (integer_dataflow's relu_form
"clamp") is therefore only as accurate as the fused kernels allow: `build` gates it on the
build machine and records this ISA beside its timings.

bf16 compute needs AVX-512 BF16 or AMX (OpenVINO's bf16 kernels; engines/openvino.py): without
either, `build --precision bf16` is refused before any work. CPUINFO is the file read, so a test
can simulate another CPU.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

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


# Best first, as INT8_ISAS.
BF16_ISAS = (
    ("amx_bf16", ("amx_bf16",)),
    ("avx512_bf16", ("avx512_bf16",)),
)


def bf16_isa_from_flags(flags: str | set[str]) -> str:
    """The best bf16 instruction set among `flags`, else "none"."""
    have = set(flags.split()) if isinstance(flags, str) else set(flags)
    return next((name for name, needed in BF16_ISAS if all(f in have for f in needed)), "none")


def _cpu_flags(cpuinfo: str | Path | None) -> str | None:
    """The first flags line of /proc/cpuinfo (or `cpuinfo`), None where there is none."""
    try:
        text = Path(cpuinfo or CPUINFO).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM
            return value
    return None


def cpu_int8_isa(cpuinfo: str | Path | None = None) -> str:
    """This machine's int8 ISA from /proc/cpuinfo ("unknown" where there is none, e.g. not Linux)."""
    flags = _cpu_flags(cpuinfo)
    return "unknown" if flags is None else int8_isa_from_flags(flags)


def cpu_bf16_isa(cpuinfo: str | Path | None = None) -> str:
    """This machine's bf16 ISA from /proc/cpuinfo: "amx_bf16", "avx512_bf16", "none", or "unknown"."""
    flags = _cpu_flags(cpuinfo)
    return "unknown" if flags is None else bf16_isa_from_flags(flags)


def cpu_model(cpuinfo: str | Path | None = None) -> str:
    try:
        for line in Path(cpuinfo or CPUINFO).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model"):
                return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"
