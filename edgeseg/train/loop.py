"""`fit`: supervised training of a registered model on a segmentation dataset.

Recipe (OffSeg/SegFormer): AdamW lr 6e-5, head lr ×10, weight decay 0.01 (none on norms, biases, embeddings),
linear warm-up then poly decay, cross-entropy with the ignore index (+ `model.aux_loss` when defined), bf16
autocast and channels_last on CUDA (`precision='auto'`: also on CPUs with native bf16, edgeseg.train.precision).
Options for accuracy, all off by default: ENet class weights and OHEM in the loss (edgeseg.train.losses), an EMA
of the weights that validation and the checkpoints use (edgeseg.train.ema), distillation from a teacher
checkpoint (edgeseg.train.distill), several training splits joined with '+' (never overlapping val/holdout).

Data path: the training split is decoded once and kept as one uint8 tensor (on the GPU when it fits, else in
pinned memory); every step gathers a batch by index and augments it as a batch on the device
(`edgeseg.data.transforms.gpu_augment`: random scale 0.5–2.0, crop with ignore padding, horizontal flip,
photometric jitter, one `grid_sample`), so there is no loader process to starve the GPU.

Determinism and exact resume: the sampler order is a function of (seed, epoch) (DistributedSampler), the
augmentation of (seed, step, rank) through its own generator, and the global torch/numpy/python RNG states are
saved with the optimizer, scheduler and weights in `out/train_state.safetensors` (atomically; data only,
edgeseg.datatree). A run stopped or killed and resumed from its last save reaches the same weights as an
uninterrupted run (same seed, CPU).

DDP: under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on
CUDA); `batch_size` is the global batch, split evenly over the processes; only rank 0 validates and writes.

Outputs in `out_dir`: `last/` and `best/` checkpoints (edgeseg.checkpoint), `train_state.safetensors`, `log.jsonl`
(edgeseg.train.state). `TrainConfig` holds every knob; `fit` runs the named steps below in order.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from edgeseg.errors import DataError, UsageError
from edgeseg.train.config import TrainConfig
from edgeseg.train.data import check_disjoint, class_weights, open_split, preload  # noqa: F401  (re-exported)
from edgeseg.train.ddp import wrap_ddp
from edgeseg.train.ema import ModelEma, restore_ema
from edgeseg.train.precision import Precision, resolve, set_threads
from edgeseg.train.schedule import build_optimizer, build_scheduler
from edgeseg.train.state import (
    LOG_FILE,
    STATE_FILE,
    Run,
    Saver,
    append_log,
    drop_unstarted,
    init_weights,
    load_state,
    prepare_out,
    seed_all,
    set_rng_state,
    truncate_log,
)
from edgeseg.train.steps import Loop, SigintOnce, validate  # noqa: F401  (validate: re-exported)
from edgeseg.types import ModelSpec

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- fit steps

@dataclasses.dataclass
class _Env:
    """Where this process trains: device, DDP rank and world."""

    dev: torch.device
    distributed: bool
    world: int
    rank: int
    is_main: bool
    amp: bool
    channels_last: bool
    precision: Precision
    threads: int

    @property
    def reduce_device(self):
        return self.dev if self.dev.type == "cuda" else "cpu"


def _setup_env(cfg: TrainConfig) -> _Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world > 1
    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        if distributed:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.iters is not None and cfg.epochs is not None:
        raise UsageError("--iters and --epochs are exclusive; give one")
    if cfg.batch_size < 1 or cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size}: must be a positive multiple of the {world} processes")
    threads = set_threads(cfg.threads)
    prec = resolve(cfg.precision, dev.type, cfg.amp, cfg.channels_last)
    return _Env(dev=dev, distributed=distributed, world=world, rank=rank, is_main=rank == 0, amp=prec.amp,
                channels_last=prec.channels_last, precision=prec, threads=threads)


@dataclasses.dataclass
class _Data:
    """The decoded training split, the validation split and the schedule's length."""

    info: Any
    val_ds: Any
    holdout_ds: Any
    images: torch.Tensor
    labels: torch.Tensor
    n_train: int
    crop_hw: tuple[int, int]
    input_hw: tuple[int, int]
    sampler: Any
    per_rank: int
    iters_per_epoch: int
    total: int
    val_interval: int
    save_interval: int
    class_weight: torch.Tensor | None = None  # per-class loss weights (--class-weights)


def _round32(v: int) -> int:
    return max(32, (int(v) // 32) * 32)


def _open_val(cfg: TrainConfig, data):
    if cfg.val_data is not None:
        return open_split(cfg.val_data, cfg.val_split or "val", cfg.fmt, cfg.skip_bad)
    if not cfg.val_split:
        return None
    try:
        return open_split(data, cfg.val_split, cfg.fmt, cfg.skip_bad)
    except DataError as e:
        log.warning("no validation: %s", e)
        return None


def _load_data(cfg: TrainConfig, data, env: _Env) -> _Data:
    train_ds = open_split(data, cfg.train_split, cfg.fmt, cfg.skip_bad)
    val_ds = _open_val(cfg, data)
    holdout_ds = open_split(data, cfg.holdout_split, cfg.fmt, cfg.skip_bad) if cfg.holdout_split else None
    if isinstance(data, (str, os.PathLike)):
        check_disjoint(cfg.train_split, train_ds, {"validation": (None if cfg.val_data is not None else
                                                                  cfg.val_split, val_ds),
                                                   "holdout": (cfg.holdout_split, holdout_ds)})
    images, labels = preload(train_ds, cfg.num_workers, cfg.data_hw, progress=cfg.progress and env.is_main)
    weight = class_weights(cfg.class_weights, Path(cfg.out_dir), labels, train_ds.info, cfg.train_split,
                           progress=cfg.progress and env.is_main, write=env.is_main)
    n_train, h, w = images.shape[0], images.shape[1], images.shape[2]
    data_bytes = images.numel() + labels.numel() * labels.element_size()
    if env.dev.type == "cuda" and cfg.augment_on_device and data_bytes < 4 * 2**30:
        images, labels = images.to(env.dev), labels.to(env.dev)  # whole split on the GPU: no transfers per step
    elif env.dev.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()

    from torch.utils.data.distributed import DistributedSampler

    per_rank = cfg.batch_size // env.world
    sampler = DistributedSampler(range(n_train), num_replicas=env.world, rank=env.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    iters_per_epoch = len(sampler) // per_rank
    if iters_per_epoch < 1:
        raise UsageError(f"--batch-size {cfg.batch_size}: larger than the {n_train} training images "
                         f"({len(sampler)} per process)")
    total = int(cfg.epochs * iters_per_epoch if cfg.epochs is not None else
                (cfg.iters if cfg.iters is not None else 1000))
    if total < 1:
        raise UsageError("--iters/--epochs: must give at least one iteration")
    val_interval = cfg.val_interval or max(1, min(total, 1000))
    return _Data(info=train_ds.info, val_ds=val_ds, holdout_ds=holdout_ds, images=images, labels=labels,
                 n_train=int(n_train),
                 crop_hw=tuple(cfg.crop_hw) if cfg.crop_hw else (_round32(h), _round32(w)),
                 input_hw=tuple(cfg.input_hw) if cfg.input_hw else (_round32(h), _round32(w)),
                 sampler=sampler, per_rank=per_rank, iters_per_epoch=iters_per_epoch, total=total,
                 val_interval=val_interval, save_interval=cfg.save_interval or val_interval, class_weight=weight)


def _build_net(model, cfg: TrainConfig, info, env: _Env) -> tuple[nn.Module, str]:
    if isinstance(model, str):
        from edgeseg.models import create_model

        seed_all(cfg.seed)
        net = create_model(model, num_classes=info.num_classes, **(cfg.model_kwargs or {}))
        if cfg.pretrained_backbone and not cfg.resume:
            from edgeseg.models.efficientnet_lite import load_imagenet_backbone
            load_imagenet_backbone(net)  # ImageNet weights (edgeseg train --pretrained-backbone)
        if cfg.init is not None and not cfg.resume:
            init_weights(net, cfg.init)
        name = model
    else:
        if not cfg.model_name:
            raise UsageError("fit: pass model_name= with a model object (it goes into model.json)")
        net, name = model, cfg.model_name
    net = net.to(env.dev)
    if env.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, name


def _run_record(cfg: TrainConfig, name: str, d: _Data, env: _Env, data) -> dict:
    """The run's settings, stored in train_state.safetensors (checked on resume) and in model.json's provenance."""
    return {"model": name, "model_kwargs": cfg.model_kwargs or {}, "batch_size": cfg.batch_size,
            "crop_hw": list(d.crop_hw), "input_hw": list(d.input_hw), "iters": d.total, "lr": cfg.lr,
            "head_lr_mult": cfg.head_lr_mult, "weight_decay": cfg.weight_decay, "warmup_iters": cfg.warmup_iters,
            "power": cfg.power, "seed": cfg.seed, "world_size": env.world, "scale_range": list(cfg.scale_range),
            "data": str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__,
            "train_split": cfg.train_split, "val_split": cfg.val_split, "holdout_split": cfg.holdout_split,
            "num_train": d.n_train,
            "init": str(cfg.init) if cfg.init is not None else None, **_recipe_record(cfg, env),
            "pretrained_backbone": _pretrained_record(cfg)}


def _pretrained_record(cfg: TrainConfig) -> dict | None:
    """Where --pretrained-backbone's weights came from (package, version, sha256), else None."""
    from edgeseg.models.efficientnet_lite import imagenet_weights_record
    return imagenet_weights_record() if cfg.pretrained_backbone else None


def _recipe_record(cfg: TrainConfig, env: _Env) -> dict:
    """The arithmetic (precision, layout, threads, CPU) and the accuracy options of the run."""
    from edgeseg.cpu import host_cpu

    dev = torch.cuda.get_device_name(env.dev) if env.dev.type == "cuda" else host_cpu().model
    return {**env.precision.to_json(), "device": env.dev.type, "device_name": dev, "threads": env.threads,
            "class_weights": cfg.class_weights or "none",
            "ohem": {"thresh": cfg.ohem_thresh, "min_kept": cfg.ohem_min_kept} if cfg.ohem else None,
            "ema": cfg.ema, "teacher": str(cfg.teacher) if cfg.teacher is not None else None,
            **({"kd_temp": cfg.kd_temp, "kd_weight": cfg.kd_weight} if cfg.teacher is not None else {})}


@dataclasses.dataclass
class _Progress:
    step: int = 0
    best_miou: float = -1.0
    best_metrics: dict | None = None
    last_metrics: dict | None = None
    best_holdout: dict | None = None     # holdout metrics at the best step (best/ is picked on them when given)
    last_holdout: dict | None = None


def _resume(out: Path, config: dict, net, optimizer, scheduler, env: _Env, ema: ModelEma | None = None
            ) -> _Progress:
    """Restore weights, optimizer, scheduler, RNG states and the EMA weights from `out/train_state.safetensors`; the
    run's shape (model, batch, crop, world size, seed) must be the one it was saved with."""
    state = load_state(out / STATE_FILE)
    old = state["config"]
    for k in ("model", "batch_size", "crop_hw", "world_size", "seed"):
        if old.get(k) != config.get(k):
            raise UsageError(f"--resume: {k} was {old.get(k)!r} in {out / STATE_FILE}, now {config.get(k)!r}")
    if old.get("iters") != config["iters"]:
        log.warning("--resume: the run was set up for %s iterations, now %s (the poly schedule changes)",
                    old.get("iters"), config["iters"])
        state["scheduler"]["base_lrs"] = scheduler.state_dict()["base_lrs"]
    net.load_state_dict(state["model"])
    if env.is_main:
        restore_ema(ema, state, net, out / STATE_FILE)
    optimizer.load_state_dict(state["optimizer"])
    sched_state = scheduler.state_dict()
    sched_state.update({k: v for k, v in state["scheduler"].items() if k in ("last_epoch", "_step_count",
                                                                              "_last_lr")})
    scheduler.load_state_dict(sched_state)
    rng = state["rng"]
    set_rng_state(rng[min(env.rank, len(rng) - 1)] if isinstance(rng, list) else rng)
    if env.is_main:
        truncate_log(out / LOG_FILE, int(state["step"]))
    log.info("resuming %s at step %d of %d", out, int(state["step"]), config["iters"])
    return _Progress(step=int(state["step"]), best_miou=float(state.get("best_miou", -1.0)),
                     best_metrics=state.get("best_metrics"), last_metrics=state.get("last_metrics"),
                     best_holdout=state.get("best_holdout"), last_holdout=state.get("last_holdout"))


# the run's arithmetic and options, also written as the first line of log.jsonl
_HEADER = ("precision", "channels_last", "precision_reason", "device", "device_name", "threads", "class_weights",
           "ohem", "ema", "teacher", "kd_temp", "kd_weight", "train_split", "crop_hw", "scale_range", "batch_size")


def _spec_base(cfg: TrainConfig, name: str, info, input_hw) -> ModelSpec:
    spec = ModelSpec(model=name, num_classes=info.num_classes, class_names=tuple(info.class_names),
                     palette=tuple(tuple(int(v) for v in c) for c in info.palette),
                     ignore_index=int(info.ignore_index), input_hw=tuple(input_hw),
                     mean=tuple(float(v) for v in cfg.mean), std=tuple(float(v) for v in cfg.std),
                     model_kwargs=dict(cfg.model_kwargs or {}))
    return dataclasses.replace(spec, **cfg.spec_overrides) if cfg.spec_overrides else spec


def fit(model: str | nn.Module, data, config: TrainConfig | None = None, *,
        on_step: Callable[[int], None] | None = None, **keywords: Any) -> dict:
    """Train `model` (a registered name, or a module with `model_name` given) on `data` (dataset folder,
    `.npz` pack or dataset object). `config` and/or keywords (the fields of `TrainConfig`) set the run; exactly
    one of `iters` / `epochs` sets the length (default 1000 iters).

    The run's arithmetic and options are the first line of `log.jsonl` ({"step": 0, "run": ...}) and go into
    every model.json's provenance. `stop_after` / `time_limit_s` end this invocation early (after that many
    total steps / seconds) with a save, for chunked training; call again with `resume=True` to continue (the
    EMA weights travel in the resume point too). `on_step(step)` is called after
    every completed step (tests use it to simulate a crash). `init` starts from the weights of an edgeseg
    checkpoint or an official state-dict file (`init_weights`) instead of a random init. Returns a summary dict
    (steps, best and last validation metrics, images/s, paths).
    """
    cfg = dataclasses.replace(config or TrainConfig(), **keywords)
    t_start = time.time()
    env = _setup_env(cfg)
    out = Path(cfg.out_dir)
    if env.distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if env.dev.type == "cuda" else "gloo")
    created = None
    try:
        if env.is_main:
            created = prepare_out(out, cfg.resume, cfg.force)
        if env.distributed:
            torch.distributed.barrier()
        d = _load_data(cfg, data, env)
        net, name = _build_net(model, cfg, d.info, env)
        optimizer = build_optimizer(net, lr=cfg.lr, weight_decay=cfg.weight_decay, head_lr_mult=cfg.head_lr_mult)
        scheduler = build_scheduler(optimizer, d.total, cfg.warmup_iters, cfg.warmup_ratio, cfg.power)
        record = _run_record(cfg, name, d, env, data)
        ema = ModelEma(net, cfg.ema) if cfg.ema is not None and env.is_main else None
        progress = _Progress()
        if cfg.resume:
            progress = _resume(out, record, net, optimizer, scheduler, env, ema)
        elif not isinstance(model, str):
            seed_all(cfg.seed)
        if env.is_main and not cfg.resume:
            append_log(out / LOG_FILE, {"step": 0, "run": {k: record[k] for k in _HEADER if k in record}})
        teacher = None
        if cfg.teacher is not None:
            from edgeseg.train.distill import load_teacher

            teacher = load_teacher(cfg.teacher, d.info, cfg.mean, cfg.std, env.dev, env.channels_last)
        core = net
        if env.distributed:
            net = wrap_ddp(net, d, env)
        saver = Saver(Run(out, env.rank, env.world, env.is_main), core, optimizer, scheduler, record,
                      _spec_base(cfg, name, d.info, d.input_hw), ema=ema)
        return _train(cfg, env, d, net, core, optimizer, scheduler, saver, progress, name, on_step, t_start,
                      teacher)
    except BaseException:
        if created is not None:
            drop_unstarted(out, created)  # a run that failed before its first save leaves no empty folder
        raise
    finally:
        if env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg, env, d, net, core, optimizer, scheduler, saver, progress, name, on_step, t_start,
           teacher=None) -> dict:
    from tqdm import tqdm

    out = Path(cfg.out_dir)
    stopped = None
    with SigintOnce() as sigint:
        bar = tqdm(total=d.total, initial=progress.step, desc=f"train {name}", unit="it", dynamic_ncols=True,
                   disable=not (cfg.progress and env.is_main), file=sys.stderr)
        net.train()
        loop = Loop(cfg, env, d, net, core, optimizer, scheduler, saver, progress, name, bar, teacher)
        t_train0 = time.time()
        while progress.step < d.total:
            epoch, x, y = loop.batch()
            loop.optimise(x, y)
            loop.log_line(epoch)
            loop.validate()
            stop_now = loop.should_stop(t_start, sigint.flag)
            loop.save(epoch, stop_now)
            if on_step is not None:
                on_step(progress.step)
            if stop_now and progress.step < d.total:
                stopped = "interrupted" if sigint.flag else "stopped"
                break
        bar.close()
        if sigint.flag:
            raise KeyboardInterrupt
    train_time = time.time() - t_train0
    n = loop.steps_this_run
    return {
        "out": str(out), "step": progress.step, "total_iters": d.total, "stopped": stopped,
        "best": progress.best_metrics, "last": progress.last_metrics,
        "best_holdout": progress.best_holdout, "last_holdout": progress.last_holdout,
        "selected_on": cfg.holdout_split or cfg.val_split,
        "images_per_s": (n * cfg.batch_size / train_time) if train_time > 0 and n else None,
        "seconds": time.time() - t_start, "world_size": env.world,
        "checkpoint_best": str(out / "best") if (out / "best").exists() else None,
        "checkpoint_last": str(out / "last"),
    }


