"""A QAT checkpoint's `quant` record: the format (data only), its scheme per target (each profile's `[qat]` table),
the check that a checkpoint exports to a target, and the checks on the record itself.

The format (`QAT_FORMAT`, written and read by edgeseg.export.qat_checkpoint) holds data only and never goes through
`torch.export`'s deserializer (whose JSON graph turns symbolic shape expressions into sympy with `sympify`, which
evaluates Python, and whose archive loader unpickles payloads):

    model.safetensors        the fine-tuned float weights and buffers (the registered model's state dict)
    qat_params.safetensors   every fake quant's frozen state (scale, zero point, observer min/max, switches),
                             keyed by its module name in the prepared graph
    model.json `quant`       the scheme (target, quantizer family, per-channel weights, float modules, BN statistics,
                             the model's export forms QAT trained: the profile's [export_form]),
                             `params` (the file above), and `fake_quants`: {module name: name of the graph node it
                             observes} -- the rebuilt graph must match it node for node

Loading rebuilds the quantized program from the registered model (the target's quantizer over the same
`torch.export` graph, as `edgeseg qat` prepared it), installs those parameters and converts. A checkpoint of the
older format (`quant.program`, a `torch.export.save` archive) is refused in one line that says how to re-export it.
"""
from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from edgeseg.errors import ArtifactError, UsageError
from edgeseg.targets import qat_targets, targets_exporting

# target -> (quantizer family, scheme line for the manifest), a view of the profiles' [qat] tables
QAT_TARGETS: dict[str, tuple[str, str]] = {t: (q.scheme, q.about) for t, q in qat_targets().items()}

QAT_FORMAT = "edgeseg-qat/2"
PARAMS_FILE = "qat_params.safetensors"
_LEGACY_PROGRAM_KEY = "program"  # format 1: a torch.export.save archive (no longer loaded)
_NAME = re.compile(r"^[A-Za-z0-9_.]{1,300}$")  # module and node names of a prepared graph


def is_qat_record(quant: dict[str, Any] | None) -> bool:
    """True for the `quant` record of a QAT checkpoint, of this format or an older one."""
    return bool(quant) and isinstance(quant, dict) and bool(quant.get("params") or quant.get(_LEGACY_PROGRAM_KEY))


def check_qat_record(quant: dict[str, Any], where: str) -> None:
    """ArtifactError (one line naming `where`) unless `quant` is a QAT record of QAT_FORMAT with sane fields; an
    older format is refused with how to re-export it."""
    if quant.get(_LEGACY_PROGRAM_KEY) and quant.get("format") != QAT_FORMAT:
        raise ArtifactError(
            f"{where}: a QAT checkpoint of an older format (quant.program = {str(quant[_LEGACY_PROGRAM_KEY])[:80]!r}, "
            "a torch.export archive, whose loader can run code) is no longer read; re-run `edgeseg qat --checkpoint "
            "<its float checkpoint> --target T` to write the data-only format, or export its float weights at fp32")
    if quant.get("format") != QAT_FORMAT:
        raise ArtifactError(f"{where}: quant.format {str(quant.get('format'))[:40]!r} is not {QAT_FORMAT!r}")
    target = quant.get("target")
    if target not in QAT_TARGETS:
        raise ArtifactError(f"{where}: quant.target {str(target)[:40]!r} is not a QAT target "
                            f"({', '.join(QAT_TARGETS)})")
    hw = quant.get("input_hw")
    if not (isinstance(hw, list) and len(hw) == 2 and all(type(v) is int and 0 < v <= 8192 for v in hw)):
        raise ArtifactError(f"{where}: quant.input_hw {str(hw)[:40]} is not two positive integers")
    for key in ("per_channel_weights", "bn_stats_frozen"):
        if not isinstance(quant.get(key), bool):
            raise ArtifactError(f"{where}: quant.{key} must be true or false")
    forms = quant.get("export_form")
    if not isinstance(forms, dict) or not all(isinstance(k, str) and isinstance(v, str) and _NAME.match(k)
                                              and _NAME.match(v) for k, v in forms.items()):
        raise ArtifactError(f"{where}: quant.export_form must map form names to forms (a profile's [export_form])")
    fq, fm = quant.get("fake_quants"), quant.get("float_modules")
    if not isinstance(fq, dict) or not fq or not all(
            isinstance(k, str) and isinstance(v, str) and _NAME.match(k) and _NAME.match(v) for k, v in fq.items()):
        raise ArtifactError(f"{where}: quant.fake_quants must map fake-quant module names to graph node names")
    if not isinstance(fm, dict) or not all(isinstance(k, str) and _NAME.match(k) and isinstance(v, str)
                                           for k, v in fm.items()):
        raise ArtifactError(f"{where}: quant.float_modules must map module names to reasons")


def check_export_target(quant: dict[str, Any], target: str, where: str) -> None:
    """UsageError unless a QAT checkpoint's graph (its `quant` record) can be exported to `target`."""
    family = quant.get("quantizer") or QAT_TARGETS.get(quant.get("target", ""), ("",))[0]
    ok = targets_exporting(family)
    if target not in ok:
        raise UsageError(f"--target {target}: {where} was fine-tuned for {quant.get('target')}'s int8 scheme "
                         f"({family}), which exports to {', '.join(ok) or 'no target'}; re-run `edgeseg qat "
                         f"--target {target}`, or export the float checkpoint it came from")


_RANDOM_OPS = ("bernoulli", "rand", "dropout", "native_dropout", "feature_dropout", "alpha_dropout",
               "normal", "multinomial")


def check_deterministic(gm: nn.Module, where: str) -> None:
    """Refuse a QAT graph that still draws random numbers (ArtifactError naming the first such op)."""
    for n in gm.graph.nodes:
        parts = str(n.target).split(".")  # "aten.bernoulli.p" -> "bernoulli"
        op = (parts[1] if len(parts) > 1 and parts[0] == "aten" else parts[-1]).lstrip("_")
        if "dropout" in op and len(n.args) > 2 and n.args[2] is False:
            continue  # dropout(x, p, train=False) is the identity
        if n.op == "call_function" and op.startswith(_RANDOM_OPS):
            raise ArtifactError(f"{where}: the QAT graph draws random numbers ({n.target} at {n.name}); an int8 "
                                "artifact must be deterministic")


__all__ = ["QAT_TARGETS", "QAT_FORMAT", "PARAMS_FILE", "is_qat_record", "check_qat_record", "check_export_target",
           "check_deterministic"]
