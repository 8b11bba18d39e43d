"""Quantization-aware training: fine-tune a checkpoint with fake quantization that matches a target's int8
scheme, then save a checkpoint whose int8 export carries the learned scales.

Flow (PT2E, torchao 0.18 / executorch 1.5.1):
  1. `torch.export.export(model.train(), (x,), dynamic_shapes={0: batch})`: the batch dimension is dynamic
     (a fixed batch at torch.export bakes the training batch into reshapes, and validation at batch 1 breaks).
  2. `prepare_qat_pt2e(graph, quantizer)` with the target's quantizer (`target_quantizer`) and the model's
     float policy (`edgeseg.quant.policy`); `allow_exported_model_train_eval` so `.train()/.eval()` switch the
     exported graph's BN/dropout the PT2E way.
  2b. `init_observers`: the calibration set (default: up to 64 images of --data's train split, stratified) runs
     through the prepared graph so every activation range starts at the mean of its per-image min/max. Why:
     torchao's moving-average observers otherwise take their first range from the first augmented training batch
     and move 1 % per step; measured on offseg_t (CamVid val, ONNX scheme, no training): calibrated 45.91
     (converted program) vs 45.36 (fake-quant) after 20 uncalibrated QAT iterations (fp32 45.87).
  3. `edgeseg.train.loop.fit` trains the prepared graph (progress, validation mIoU of the fake-quant model,
     exact resume) in `<out>/train/`. Observers run in training only (`set_observers`), and the fake quants ask
     the observers for their scales (`edgeseg.quant.pt2e_specs.unfused_fake_quant`), so the validated fake-quant
     graph computes what convert freezes. The target's exporter may rewrite the graph first
     (`Exporter.qat_graph_passes`; ExecuTorch: extra uses of a shared weight read a clone, `unshare_weight_uses`).
  4. The checkpoint (`save_qat_checkpoint`, edgeseg.export.qat_checkpoint; format: edgeseg.quant.qat_program) is
     data only: the fine-tuned float weights (`model.safetensors`), every fake quant's frozen state
     (`qat_params.safetensors`) and a `model.json` whose `quant` records target, scheme, quantizer, float
     modules, BN handling and which graph node each fake quant observes; written atomically.
  5. `edgeseg export --checkpoint <out>/checkpoint --target T --precision int8` rebuilds the prepared graph from the
     registered model (`load_qat_program`: same export, same quantizer), checks it against the record node for
     node, installs the learned state, runs `convert_pt2e` -> `torch.export.export` (dynamic batch) and hands the
     int8 graph to the exporter, which exports it without its own PTQ: executorch/onnx (QDQ), jetson-tensorrt
     (ONNX QDQ, symmetric: zero points checked), openvino (ov.convert_model: q/dq -> FakeQuantize, no NNCF),
     coreml (ct.convert: quantize/dequantize + int8 constexpr weights). Each profile's `[qat]` table says which QAT
     schemes a target exports. Nothing is read through `torch.export.load` or its deserializer.

Modules: edgeseg.export.qat_quantizers (each target's quantizer, served by its exporter), edgeseg.export.qat_graph
(prepare ... convert), edgeseg.export.qat_checkpoint (the checkpoint on disk, read by export). Must not import export
runtimes at module level.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

from edgeseg.errors import UsageError
from edgeseg.train.config import TrainConfig
from edgeseg.export.qat_checkpoint import load_qat_program, save_qat_checkpoint  # noqa: F401
from edgeseg.export.qat_graph import (  # noqa: F401
    _copy_weights,
    convert_qat,
    freeze_activation_ranges,
    freeze_bn_stats,
    init_observers,
    observer_scales,
    prepare_qat,
    program_scales,
    set_observers,
    unshare_weight_uses,
)
from edgeseg.export.qat_quantizers import WEIGHT_7BIT, target_quantizer  # noqa: F401
from edgeseg.quant.qat_program import (  # noqa: F401
    PARAMS_FILE,
    QAT_FORMAT,
    QAT_TARGETS,
    check_deterministic,
    check_export_target,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class QatOptions:
    """What QAT adds to a training run (`qat(..., options=QatOptions(...))` or the same names as keywords)."""

    keep_float: Sequence[str] = ()        # module-name patterns kept in float (edgeseg.quant.policy)
    defaults: bool = True                 # the float policy's default float modules
    per_channel: bool = True              # per-channel weight scales
    input_hw: Sequence[int] | None = None  # static size of the graph (default: the checkpoint's input_hw)
    freeze_bn: bool = True                # keep the float checkpoint's BatchNorm statistics (freeze_bn_stats)
    calib: str | None = None              # range-initialisation recipe (default: --data's train split)
    init_ranges: bool = True              # start activation ranges from the calibration set (init_observers)
    freeze_ranges: bool = False           # keep them fixed after initialisation


def qat_train_config(**keywords: Any) -> TrainConfig:
    """The training run of a QAT fine-tune: TrainConfig with QAT's defaults (lr 1e-5, no warmup, no channels_last,
    whose layout change the prepared graph does not take), then `keywords` (TrainConfig's field names)."""
    return dataclasses.replace(TrainConfig(lr=1e-5, warmup_iters=0, channels_last=False), **keywords)


def qat(checkpoint: str | Path, target: str, data: str | Path, out: str | Path, *,
        config: TrainConfig | None = None, options: QatOptions | None = None, **keywords: Any) -> dict[str, Any]:
    """QAT fine-tuning of `checkpoint` for `target` on dataset `data`.

    `config` is the training run (TrainConfig; default `qat_train_config()`), `options` what QAT adds (QatOptions);
    `keywords` are fields of either, by name (`iters=200, keep_float=["*offset*"]`). QAT sets the run's crop and
    input size to the graph's static size, its mean/std to the checkpoint's and its folder to `<out>/train`.

    BatchNorm statistics stay those of the float checkpoint unless `freeze_bn=False` (see freeze_bn_stats).
    Activation ranges start from a calibration set (`calib`: a recipe name/path, default `data`'s train split;
    see calibration_for_training and init_observers) unless `init_ranges=False`; a resumed run keeps its saved ranges.

    Writes `<out>/train/` (fit's run folder: log.jsonl, train_state.safetensors for --resume) and `<out>/checkpoint/`
    (the QAT checkpoint: float weights, `qat_params.safetensors` and model.json with `quant`).

    Returns:
        dict(checkpoint, params, fit summary, float_modules, target, scheme, observer_scales).
    Raises:
        TypeError: a keyword that is neither a TrainConfig nor a QatOptions field.
    """
    qat_names = {f.name for f in dataclasses.fields(QatOptions)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(keywords) - qat_names - train_names)
    if unknown:
        raise TypeError(f"qat() got unexpected keyword(s) {', '.join(unknown)}")
    opts = dataclasses.replace(options or QatOptions(), **{k: v for k, v in keywords.items() if k in qat_names})
    cfg = dataclasses.replace(config or qat_train_config(),
                              **{k: v for k, v in keywords.items() if k in train_names})
    resume, force, progress = cfg.resume, cfg.force, cfg.progress
    from edgeseg.checkpoint import load_checkpoint
    from edgeseg.models import prepare_for_export
    from edgeseg.quant.calibration import calibration_for_training
    from edgeseg.targets import load_profile
    from edgeseg.quant.policy import float_policy
    from edgeseg.train.loop import fit
    from edgeseg.train.state import STATE_FILE

    if target not in QAT_TARGETS:
        raise UsageError(f"--target: no QAT scheme for {target!r}; known: {', '.join(QAT_TARGETS)}")
    out = Path(out)
    ck = out / "checkpoint"
    overwrite = force or resume  # a resumed run replaces the checkpoint it wrote before
    if ck.exists() and not overwrite:  # refused before training; the atomic write re-checks
        raise UsageError(f"--out {out}: {ck} exists (use --force to overwrite it or --resume to continue its run)")
    model, spec = load_checkpoint(checkpoint)
    hw = tuple(int(v) for v in (opts.input_hw or spec.input_hw))
    # QAT trains the exact export forms the target's exporter lowers (its profile's [export_form]), so a QAT
    # artifact has PTQ's graph; before the float policy, which covers modules an export form adds
    forms = dict(load_profile(target).export_form)
    prepare_for_export(model, hw, **forms)
    policy = float_policy(model, opts.keep_float, defaults=opts.defaults)
    prepared = prepare_qat(model, target, hw, policy, per_channel=opts.per_channel, freeze_bn=opts.freeze_bn)
    calib_info = None
    if opts.init_ranges:
        cal = calibration_for_training(opts.calib, data, hw, spec.mean, spec.std, progress=progress)
        calib_info = cal.info()
        if resume and (out / "train" / STATE_FILE).exists():
            log.info("qat: resuming; activation ranges come from the saved run")
        else:
            init_observers(prepared, cal.arrays, progress=progress)
    if opts.freeze_ranges:
        freeze_activation_ranges(prepared)
    summary = fit(prepared, data, dataclasses.replace(
        cfg, model_name=spec.model, model_kwargs=spec.model_kwargs, crop_hw=hw, input_hw=hw, mean=spec.mean,
        std=spec.std, out_dir=out / "train", channels_last=False))
    prepared = prepared.cpu()
    _copy_weights(prepared, model)
    quant = {"target": target, "scheme": QAT_TARGETS[target][1], "quantizer": QAT_TARGETS[target][0],
             "per_channel_weights": opts.per_channel, "input_hw": list(hw), "export_form": forms,
             "output_stride": int(getattr(model, "output_stride", 1)), "float_modules": policy.to_json(),
             "iters": int(summary["step"]), "val": summary.get("last"),
             "bn_stats_frozen": bool(opts.freeze_bn),
             "bn_stats": "frozen (float checkpoint's)" if opts.freeze_bn else "updated during QAT",
             "range_init": ({k: calib_info[k] for k in ("recipe", "source", "split", "count", "files",
                                                        "classes_missing")} if calib_info else
                            "first training batch (init_ranges off)"),
             "activation_ranges": "fixed after initialisation" if opts.freeze_ranges else "moving average in training",
             "loader": "edgeseg load_qat_program (rebuilt from the registered model; safetensors + JSON only)"}
    qspec = dataclasses.replace(spec, quant=quant, metrics={**spec.metrics, "qat_val": summary.get("last")})
    save_qat_checkpoint(ck, model, qspec, prepared, force=overwrite)
    return {"checkpoint": str(ck), "params": str(ck / PARAMS_FILE), "fit": summary,
            "float_modules": policy.names, "target": target, "scheme": quant["scheme"],
            "observer_scales": observer_scales(prepared)}


__all__ = ["QAT_TARGETS", "QAT_FORMAT", "PARAMS_FILE", "check_export_target", "QatOptions", "qat_train_config",
           "target_quantizer", "freeze_bn_stats", "check_deterministic", "unshare_weight_uses", "prepare_qat",
           "init_observers", "freeze_activation_ranges", "set_observers", "convert_qat",
           "observer_scales", "program_scales", "load_qat_program", "save_qat_checkpoint", "qat"]
