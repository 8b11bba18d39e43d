"""`TrainConfig`: every knob of a training run (`edgeseg train`'s flags, `fit`'s keywords)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from edgeseg.types import IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a training run; `fit(model, data, **keywords)` takes these names as keywords."""

    model_name: str | None = None        # name recorded in model.json when `model` is a module
    model_kwargs: dict | None = None     # extra arguments of the registered model
    fmt: str | None = None               # dataset layout (None: detected)
    train_split: str = "train"
    val_split: str | None = "val"        # None: no validation
    val_data: Any = None                 # validation from another dataset folder / pack / object
    holdout_split: str | None = None     # also validated, and `best/` is picked on it (CamVid: "holdout", a
                                         # sequence no training image comes from; val shares one with train)
    iters: int | None = None             # exactly one of iters / epochs (default 1000 iters)
    epochs: int | None = None
    batch_size: int = 8                  # global batch, split evenly over DDP processes
    crop_hw: tuple[int, int] | None = None   # training crop (default: the data size rounded down to /32)
    input_hw: tuple[int, int] | None = None  # validation / model.json input size (same default)
    data_hw: tuple[int, int] | None = None   # resize every pair on load (mixed-size datasets)
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    scale_range: tuple[float, float] = (0.5, 2.0)
    photometric: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    device: str | None = None            # None: cuda when available
    out_dir: str | os.PathLike = "runs/train"
    resume: bool = False
    force: bool = False
    val_interval: int | None = None
    save_interval: int | None = None
    log_interval: int = 10
    seed: int = 0
    num_workers: int = 0                 # decoding threads for the preload
    augment_on_device: bool = True
    amp: bool | None = None              # None: bf16 autocast on CUDA (used when `precision` is None)
    channels_last: bool | None = None    # None: on CUDA, or with bf16 when `precision` is given
    precision: str | None = None         # 'auto' | 'fp32' | 'bf16' (edgeseg.train.precision); None: `amp`
    threads: int | None = None           # torch.set_num_threads (None: leave it)
    class_weights: str = "none"          # 'none' | 'enet' (1/ln(1.02 + p), cached in out/class_weights.json)
    ohem: bool = False                   # online hard example mining (losses.Ohem)
    ohem_thresh: float = 0.7             # ... keep pixels whose class probability is below this
    ohem_min_kept: float = 1 / 16        # ... and at least this fraction of the valid pixels
    ema: float | None = None             # weight EMA decay (e.g. 0.999): validation, best/ and last/ use it
    teacher: str | os.PathLike | None = None  # distil from this checkpoint folder
    kd_temp: float = 1.0                 # distillation temperature
    kd_weight: float = 1.0               # weight of the distillation loss
    val_batch_size: int | None = None
    skip_bad: bool = False
    stop_after: int | None = None        # end this invocation after that many total steps (chunked training)
    time_limit_s: float | None = None    # ... or after that many seconds
    progress: bool = True
    spec_overrides: dict | None = None   # fields of the saved ModelSpec to override
    init: str | os.PathLike | None = None  # starting weights (init_weights)
    pretrained_backbone: bool = False    # ImageNet weights into the backbone first (edgeseg.models.
                                         # efficientnet_lite.load_imagenet_backbone; give its mean/std)
