"""The arithmetic of a training run: bf16 autocast + channels_last, or float32, chosen from the device and, on the
CPU, from its flags at run time (`--precision auto|fp32|bf16`), and the CPU thread count (`--threads`).

`auto`: bf16 on CUDA; on the CPU bf16 only where it has native bf16 arithmetic (x86 `avx512_bf16` or `amx_bf16`,
read by `edgeseg.cpu.host_cpu`, whose EDGESEG_CPU_FLAGS forces the other branch in tests), float32 elsewhere
(without those instructions bf16 is emulated and slower than float32). bf16 trains under `torch.autocast` with the
model and inputs in channels_last; the weights, the optimizer, the loss and validation stay float32. `None` (the
default of `fit`, which QAT uses) keeps the older rule: `amp` / `channels_last` as given, else on CUDA only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from edgeseg.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Precision:
    """What a run computes in: `amp` (bf16 autocast on), `channels_last`, and why (for model.json)."""

    amp: bool
    channels_last: bool
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.amp else "fp32"

    def autocast(self, device_type: str):
        """A fresh context for one forward pass: bf16 autocast on `device_type`, or nothing."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=torch.bfloat16)

    def to_json(self) -> dict:
        return {"precision": self.name, "channels_last": self.channels_last, "precision_reason": self.reason}


def cpu_native_bf16() -> tuple[bool, str]:
    """(whether this CPU computes bf16 natively, the flags that say so or the CPU's name)."""
    from edgeseg.cpu import BF16_FLAGS, host_cpu

    cpu = host_cpu()
    have = [f for f in BF16_FLAGS if f in cpu.flags]
    forced = "; flags forced" if cpu.forced else ""
    return bool(have), (", ".join(have) if have else f"no {'/'.join(BF16_FLAGS)} on {cpu.model}") + forced


def resolve(choice: str | None, device_type: str, amp: bool | None = None,
            channels_last: bool | None = None) -> Precision:
    """The run's Precision. `choice` None: the older rule (`amp`, `channels_last`, default on CUDA only);
    'auto' / 'fp32' / 'bf16' as in the module doc. An explicit `channels_last` always wins (QAT passes False)."""
    cuda = device_type == "cuda"
    if choice is None:
        use = cuda if amp is None else bool(amp)
        why = "default: bf16 on CUDA" if amp is None else ("amp on" if amp else "amp off")
        return Precision(use, cuda if channels_last is None else bool(channels_last), why)
    if choice not in PRECISIONS:
        raise UsageError(f"--precision {choice}: expected one of {', '.join(PRECISIONS)}")
    if choice == "auto":
        if cuda:
            use, why = True, "auto: CUDA"
        else:
            use, flags = cpu_native_bf16()
            why = f"auto: {flags}"
    else:
        use, why = choice == "bf16", f"--precision {choice}"
        if use and not cuda and not cpu_native_bf16()[0]:
            log.warning("--precision bf16: %s, so bf16 is emulated (slower than fp32)", cpu_native_bf16()[1])
    return Precision(use, (use or cuda) if channels_last is None else bool(channels_last), why)


def set_threads(n: int | None) -> int:
    """`torch.set_num_threads(n)` when given (n >= 1); returns the intra-op thread count in force."""
    if n is not None:
        if n < 1:
            raise UsageError(f"--threads {n}: must be >= 1")
        torch.set_num_threads(int(n))
    return torch.get_num_threads()
