"""QAT checkpoints on disk, data only (format: edgeseg.quant.qat_program): `save_qat_checkpoint` writes the fine-tuned
weights, every fake quant's frozen state and the scheme; `load_qat_program` rebuilds the quantized program from the
registered model with the target's quantizer (edgeseg.export.qat_graph.prepare_qat, as `edgeseg qat` prepared it),
installs that state, checks the rebuilt graph against the recorded one node for node, and converts it. Nothing read
here can run code: safetensors and JSON only, never `torch.export.load` or its deserializer.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgeseg.errors import ArtifactError, one_line
from edgeseg.quant.qat_program import PARAMS_FILE, QAT_FORMAT, check_qat_record


def observed_nodes(prepared: nn.Module) -> dict[str, str]:
    """{fake-quant module name: name of the graph node it observes (its first call's input)} of a prepared graph."""
    out: dict[str, str] = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and "activation_post_process" in str(node.target):
            src = node.args[0] if node.args else None
            out.setdefault(str(node.target), src.name if isinstance(src, torch.fx.Node) else "")
    return out


def qat_state(prepared: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
    """The prepared graph's state that the float model does not hold (fake quants' scales, zero points, observer
    ranges and switches), each tensor its own contiguous copy."""
    ref = set(model.state_dict())
    return {k: v.detach().cpu().clone().contiguous() for k, v in prepared.state_dict().items() if k not in ref}


def save_qat_checkpoint(path: str | Path, model: nn.Module, spec, prepared: nn.Module, force: bool = False) -> Path:
    """Write a QAT checkpoint folder atomically: the fine-tuned float weights of `model`, `qat_params.safetensors`
    (the fake-quant state of `prepared`) and `model.json` whose `quant` (from `spec.quant`) gains the format, the
    params file and the observed-node map. Raises UsageError if `path` exists and not `force`."""
    from safetensors.torch import save_file

    from edgeseg.checkpoint import save_checkpoint

    quant = {**(spec.quant or {}), "format": QAT_FORMAT, "params": PARAMS_FILE,
             "fake_quants": observed_nodes(prepared)}
    quant.pop("program", None)
    state = qat_state(prepared, model)
    return save_checkpoint(path, model, dataclasses.replace(spec, quant=quant), force=force,
                           extra={PARAMS_FILE: lambda tmp: save_file(state, str(tmp))})


def _read_params(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ArtifactError(f"{path}: missing (named by model.json quant.params)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: corrupted or not a safetensors file ({one_line(e)})") from None
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ArtifactError(f"{path}: {k} holds non-finite values")
        if k.endswith(".scale") and v.numel() and not bool((v > 0).all()):
            raise ArtifactError(f"{path}: {k} holds a scale <= 0")
    return state


def _install(prepared: nn.Module, model: nn.Module, quant: dict[str, Any], state: dict, where: Path) -> None:
    """Check the rebuilt graph against the record and load the fake-quant state into it (ArtifactError naming
    the first difference)."""
    rebuilt = observed_nodes(prepared)
    recorded = quant["fake_quants"]
    if rebuilt != recorded:
        diff = next((k for k in sorted(set(rebuilt) | set(recorded)) if rebuilt.get(k) != recorded.get(k)))
        raise ArtifactError(
            f"{where}: the QAT graph rebuilt here differs from the recorded one ({diff} observes "
            f"{rebuilt.get(diff)!r} here, {recorded.get(diff)!r} in model.json); re-run `edgeseg qat` with this "
            "edgeseg and torch")
    ref = set(model.state_dict())
    expected = {k: tuple(v.shape) for k, v in prepared.state_dict().items() if k not in ref}
    got = {k: tuple(v.shape) for k, v in state.items()}

    def fits(k: str) -> bool:  # per-channel ranges and scales are (0,) / (1,) until the first batch resizes them
        e, g = expected.get(k), got.get(k)
        return e == g or (e in ((0,), (1,)) and g is not None and len(g) == 1)

    diff = next((k for k in sorted(set(expected) | set(got)) if not fits(k)), None)
    if diff is not None:
        raise ArtifactError(f"{where}: {diff} is {got.get(diff, 'missing')} here, the rebuilt QAT graph needs "
                            f"{expected.get(diff, 'no such tensor')}")
    dtypes = prepared.state_dict()
    prepared.load_state_dict({k: v.to(dtypes[k].dtype) for k, v in state.items()}, strict=False)


def load_qat_program(checkpoint: str | Path, loaded: tuple[nn.Module, Any] | None = None
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """The converted int8 graph of a QAT checkpoint as a module, with its `quant` record.

    Rebuilt from the registered model and the checkpoint's data (see the module docstring); the graph equals what
    `edgeseg qat` would have converted at the end of training. `loaded`: the checkpoint's (model, spec) when the
    caller has loaded it already (the model is used up).

    Raises:
        ArtifactError: not a QAT checkpoint, an older format, a record or params file that does not match the
        rebuilt graph (one line naming the file).
    """
    from edgeseg.checkpoint import SPEC, contained_file, load_checkpoint
    from edgeseg.export.qat_graph import convert_qat, prepare_qat
    from edgeseg.models import prepare_for_export
    from edgeseg.quant.policy import FloatPolicy
    from edgeseg.targets import qat_targets

    checkpoint = Path(checkpoint)
    spec_file = checkpoint / SPEC
    model, spec = loaded or load_checkpoint(checkpoint)
    quant = spec.quant or {}
    if not quant:
        raise ArtifactError(f"{spec_file}: not a QAT checkpoint (model.json has no quant record)")
    check_qat_record(quant, str(spec_file))
    state = _read_params(contained_file(checkpoint, quant["params"], "quant.params", spec_file))
    target, hw = quant["target"], tuple(quant["input_hw"])
    try:  # the export forms QAT trained (checked names; a form a module does not know is its ValueError)
        prepare_for_export(model, hw, **quant["export_form"])
    except ValueError as e:
        raise ArtifactError(f"{spec_file}: quant.export_form: {one_line(e)}") from None
    prepared = prepare_qat(model, target, hw, FloatPolicy(dict(quant["float_modules"])),
                           per_channel=quant["per_channel_weights"], freeze_bn=quant["bn_stats_frozen"])
    _install(prepared, model, quant, state, spec_file)
    # NNCF's scheme keeps weight quantize ops unfolded: ov.convert_model turns the q/dq pairs into FakeQuantize
    ep = convert_qat(prepared, hw, fold_quantize=qat_targets()[target].fold_quantize)
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    gm = ep.module()
    allow_exported_model_train_eval(gm)  # ExportWrapper(...).eval() must work on the converted graph
    gm.output_stride = int(getattr(model, "output_stride", 1))  # the registered model's, not the record's
    return gm, quant


__all__ = ["observed_nodes", "qat_state", "save_qat_checkpoint", "load_qat_program"]
