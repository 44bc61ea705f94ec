"""What every benchmark records about its machine: results from different CPUs must say which.

The sessions' 2-core machines differ in kind from run to run (AMD Zen 2 without VNNI, AMD Zen 4
and Sapphire Rapids with it), and INT8 and rendering speed hang on exactly that: an "AMD EPYC"
model name alone does not tell Zen 2 from Zen 4, its family and model numbers do.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields (Linux; {} elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0].splitlines()
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines) if k.strip()}


def cpu_flags() -> list[str]:
    """The int8-relevant instruction sets the CPU lists."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in INT8_FLAGS if f in flags]


def cpu_model() -> str:
    """The CPU's name, family/model and int8 extensions, e.g. 'AMD EPYC (family 25 model 17; avx2, avx512_vnni)'."""
    info = _cpuinfo()
    if not info:
        return platform.processor() or platform.machine()
    where = f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    return f"{info.get('model name', '?')} ({where}; {', '.join(cpu_flags()) or 'no AVX2'})"


def machine_info(**extra: object) -> dict:
    """The block a result's JSON opens with: CPU, cores, load at the start, and any `extra` fields."""
    return {"cpu": cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(),
            "load_average_at_start": os.getloadavg(), **extra}
