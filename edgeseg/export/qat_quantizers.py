"""The PT2E quantizer of each target's QAT scheme (`target_quantizer`): the target's exporter serves it
(`Exporter.quantizer(options, is_qat=True)`, the same source as the PT2E PTQ), made usable for training there:
fake quants that compute what convert freezes, explicit input specs for torchao's conv-BN fusion, 7-bit weights
where a target's int8 kernels need them (edgeseg.quant.pt2e_specs). See edgeseg.train.qat for the whole flow.
"""
from __future__ import annotations

from edgeseg.errors import UsageError
from edgeseg.quant.pt2e_specs import WEIGHT_7BIT  # noqa: F401  (re-exported)
from edgeseg.quant.qat_program import QAT_TARGETS


def target_quantizer(target: str, per_channel: bool = True, is_qat: bool = True):
    """The PT2E quantizer matching `target`'s int8 scheme (its exporter's `quantizer`).

    Raises:
        UsageError: unknown target, or its quantizer cannot be imported here (names the package).
    """
    from edgeseg.export import get_exporter

    if target not in QAT_TARGETS:
        raise UsageError(f"--target: no QAT scheme for {target!r}; known: {', '.join(QAT_TARGETS)}")
    exporter = get_exporter(target)
    options = exporter.Options()
    # QAT's --per-channel choice; exporters whose Options have no such field read it with getattr
    options.per_channel = per_channel
    try:
        quantizer = exporter.quantizer(options, is_qat=is_qat)
    except ImportError as e:
        raise UsageError(f"--target {target}: its QAT quantizer is not importable here ({e})") from None
    if quantizer is None:  # pragma: no cover - a profile with [qat] whose exporter has no PT2E scheme
        raise UsageError(f"--target {target}: no quantizer")
    return quantizer
