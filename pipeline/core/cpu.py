"""What this CPU can do: its model name and the instruction-set extensions that change our speed or correctness.

Torch-free (benchmarks, export and the service read it). The ISA list names
only the extensions that matter here: AVX2 (every supported machine), AVX-512
(wider fp32 GEMMs), VNNI (fast u8s8 int8 dot products in ONNX Runtime) and
BF16/AMX (oneDNN's bf16 LSTM). On Linux it comes from ``/proc/cpuinfo``;
elsewhere the list is empty and callers fall back to a probe.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

#: The extensions we record, in the order a reader compares machines.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def parse_cpuinfo(text: str) -> dict[str, object]:
    """Model name and the ``ISA_FLAGS`` present, from the text of ``/proc/cpuinfo`` (first processor)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if model and flags:
            break
    return {"model": model or platform.processor() or platform.machine(),
            "isa": [flag for flag in ISA_FLAGS if flag in flags]}


@functools.cache
def cpu_info() -> dict[str, object]:
    """``{"model": str, "isa": [flag, ...], "vnni": bool, "bf16": bool}`` for the machine this process runs on."""
    try:
        info = parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        info = {"model": platform.processor() or platform.machine(), "isa": []}
    isa = info["isa"]
    info["vnni"] = "avx512_vnni" in isa or "avx_vnni" in isa or "amx_int8" in isa
    info["bf16"] = "avx512_bf16" in isa or "amx_bf16" in isa
    return info


def describe() -> str:
    """One line for logs and error messages: ``AMD EPYC 7B13 (avx2 fma)``."""
    info = cpu_info()
    return f"{info['model']} ({' '.join(info['isa']) or 'ISA unknown'})"
