"""The host CPU as the int8 choices and every latency report see it: model name, the int8-relevant x86 flags, and
whether u8 x s8 int8 kernels saturate here.

Why it matters: x86 CPUs with AVX2 but no VNNI (seen here: AMD EPYC) multiply u8 x s8 with VPMADDUBSW, whose int16
pair sums saturate when full 8-bit weights meet large activations; CPUs with AVX-512-VNNI, AVX-VNNI or AMX
(seen here: Intel Xeon) accumulate in int32 and are exact. So the 7-bit-weight workarounds (ONNX Runtime's
`reduce_range`, NNCF's overflow fix) are chosen from the flags of the CPU the export runs on, and recorded in the
manifest; an artifact meant for another CPU sets the option explicitly.

`EDGESEG_CPU_FLAGS` (comma-separated flags, e.g. "avx2" or "avx2,avx512f,avx512_vnni") replaces the flags read
from /proc/cpuinfo: it forces the branch this CPU does not take (tests), and is recorded as `forced` everywhere.

Imports nothing heavy (read by the CLI, exporters, sessions and benches).
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

FORCE_ENV = "EDGESEG_CPU_FLAGS"
# the flags that decide int8 arithmetic and speed on x86
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 arithmetic in hardware (without them bf16 is emulated, slower)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    machine: str
    flags: tuple[str, ...]
    forced: bool = False

    @property
    def vnni(self) -> bool:
        return bool(set(VNNI_FLAGS) & set(self.flags))

    @property
    def native_bf16(self) -> bool:
        """bf16 computed in hardware (AVX512_BF16 or AMX-BF16): OpenVINO's and PyTorch's bf16 paths are fast."""
        return bool(set(BF16_FLAGS) & set(self.flags))

    @property
    def int8_saturates(self) -> bool:
        """u8 x s8 int8 kernels saturate with full 8-bit weights: x86 with AVX2 and no VNNI/AMX."""
        return self.machine in ("x86_64", "AMD64", "i686") and "avx2" in self.flags and not self.vnni

    def summary(self) -> str:
        """One line for tables: 'AMD EPYC (avx2; no VNNI)'."""
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in self.flags]
        tail = ", ".join(isa) if isa else self.machine
        if self.machine in ("x86_64", "AMD64"):
            tail += "" if self.vnni else "; no VNNI"
        return f"{self.model} ({tail}{'; flags forced' if self.forced else ''})"

    def to_json(self) -> dict:
        return {"model": self.model, "machine": self.machine, "flags": list(self.flags), "vnni": self.vnni,
                "int8_saturates": self.int8_saturates, "forced": self.forced}


def _read_cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model or platform.processor() or "unknown CPU", flags


@functools.lru_cache(maxsize=None)
def _host(forced_flags: str | None) -> CpuInfo:
    model, flags = _read_cpuinfo()
    if forced_flags is not None:
        flags = {f.strip() for f in forced_flags.split(",") if f.strip()}
    return CpuInfo(model=model, machine=platform.machine(), flags=tuple(sorted(f for f in flags if f in INT8_FLAGS)),
                   forced=forced_flags is not None)


def host_cpu() -> CpuInfo:
    """This host's CPU (flags replaced by EDGESEG_CPU_FLAGS when set)."""
    return _host(os.environ.get(FORCE_ENV))


def int8_saturates() -> bool:
    return host_cpu().int8_saturates


SATURATES_WHY = "saturates u8 x s8 int16 sums with full 8-bit weights"
EXACT_WHY = "accumulates int8 products exactly (VNNI/AMX or not x86 AVX2)"


def resolve_auto(requested: Any, test: Callable[[CpuInfo], bool], when_true: Any, when_false: Any,
                 why_true: str, why_false: str) -> tuple[Any, str]:
    """(value, why) of an option whose "auto" is decided by this host's CPU: `requested` itself unless it is "auto",
    else `when_true` if `test(host_cpu())` holds and `when_false` if not, with the CPU and the reason. The one rule
    behind ONNX Runtime's reduce_range, NNCF's overflow fix and OpenVINO's inference precision."""
    if requested != "auto":
        return requested, "set explicitly"
    cpu = host_cpu()
    if test(cpu):
        return when_true, f"auto: {cpu.summary()} {why_true}"
    return when_false, f"auto: {cpu.summary()} {why_false}"


__all__ = ["CpuInfo", "FORCE_ENV", "BF16_FLAGS", "host_cpu", "int8_saturates", "cpu_label", "resolve_auto",
           "SATURATES_WHY", "EXACT_WHY"]


def cpu_label(cpu: dict[str, Any] | None) -> str:
    """'Intel(R) Xeon(R) ... (AVX2, AVX-512, VNNI, AMX)' or 'AMD EPYC 7B13 (AVX2; no AVX-512, no VNNI, no AMX)'
    from a `CpuInfo.to_json()` record; 'CPU not recorded' for None."""
    if not cpu:
        return "CPU not recorded"
    flags = set(cpu.get("flags") or ())
    isa = [("AVX2", "avx2" in flags), ("AVX-512", "avx512f" in flags),
           ("VNNI", bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})), ("AMX", "amx_int8" in flags)]
    machine = str(cpu.get("machine") or "")
    if machine and machine not in ("x86_64", "AMD64", "i686"):  # the x86 flags say nothing about other CPUs
        tail = machine
    else:
        tail = ", ".join(n for n, have in isa if have) or "no AVX2"
        absent = [f"no {n}" for n, have in isa if not have and n != "AVX2"]
        tail += ("; " + ", ".join(absent)) if absent and any(h for _, h in isa) else ""
    return f"{cpu.get('model') or 'unknown CPU'} ({tail}{'; flags forced' if cpu.get('forced') else ''})"
