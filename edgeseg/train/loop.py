"""`fit`: supervised training of a registered model on a segmentation dataset.

Recipe (OffSeg/SegFormer): AdamW lr 6e-5, head lr ×10, weight decay 0.01 (none on norms, biases, embeddings),
linear warm-up then poly decay, cross-entropy with the ignore index (+ `model.aux_loss` when defined), bf16
autocast and channels_last on CUDA.

Data path: the training split is decoded once and kept as one uint8 tensor (on the GPU when it fits, else in
pinned memory); every step gathers a batch by index and augments it as a batch on the device
(`edgeseg.data.transforms.gpu_augment`: random scale 0.5–2.0, crop with ignore padding, horizontal flip,
photometric jitter, one `grid_sample`), so there is no loader process to starve the GPU.

Determinism and exact resume: the sampler order is a function of (seed, epoch) (DistributedSampler), the
augmentation of (seed, step, rank) through its own generator, and the global torch/numpy/python RNG states are
saved with the optimizer, scheduler and weights in `out/train_state.pt` (atomically; loaded with
`weights_only=True`). A run stopped or killed and resumed from its last save reaches the same weights as an
uninterrupted run (same seed, CPU).

DDP: under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on
CUDA); `batch_size` is the global batch, split evenly over the processes; only rank 0 validates and writes.

Outputs in `out_dir`: `last/` and `best/` checkpoints (edgeseg.checkpoint), `train_state.pt`, `log.jsonl`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from edgeseg.data.transforms import gpu_augment, resize_label
from edgeseg.errors import ArtifactError, DataError, UsageError
from edgeseg.fileio import atomic_file, write_text
from edgeseg.train.losses import seg_loss
from edgeseg.train.schedule import build_optimizer, build_scheduler
from edgeseg.types import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
OUR_OUTPUTS = ("last", "best", STATE_FILE, LOG_FILE)


# ----------------------------------------------------------------------------------------------- helpers

def _round32(v: int) -> int:
    return max(32, (int(v) // 32) * 32)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(rank)]).generate_state(1)[0])


def _dist_info() -> tuple[bool, int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world > 1, world, rank, local


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    random.seed(seed)


# ----------------------------------------------------------------------------------------------- data

def open_split(data, split: str, fmt: str | None = None, skip_bad: bool = False):
    """A dataset folder (any layout open_dataset reads) or a `.npz` pack; a dataset object passes through."""
    if not isinstance(data, (str, os.PathLike)):
        return data
    from edgeseg.train.pack import is_pack, open_pack

    if is_pack(data):
        return open_pack(data, split)
    from edgeseg.data.datasets import open_dataset

    return open_dataset(data, split=split, fmt=fmt, skip_bad=skip_bad)


def preload(ds, num_workers: int = 0, data_hw: tuple[int, int] | None = None, progress: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole split into `images` uint8 (N,H,W,3) and `labels` (N,H,W) (uint8, or int16 when the
    class indices need it). Pairs of different sizes are resized to `data_hw` (image bilinear, label nearest);
    without `data_hw` they must all have one size."""
    import cv2
    from tqdm import tqdm

    n = len(ds)
    if n == 0:
        raise DataError(f"{getattr(ds, 'root', 'dataset')}: the training split is empty")
    getter = ds.get if hasattr(ds, "get") else ds.__getitem__

    def load(i):
        item = getter(i)
        if item is None:
            return None
        img, lab = item
        if data_hw is not None and tuple(img.shape[:2]) != tuple(data_hw):
            img = cv2.resize(img, (data_hw[1], data_hw[0]), interpolation=cv2.INTER_LINEAR)
            lab = resize_label(np.asarray(lab), tuple(data_hw))
        return img, np.asarray(lab)

    bar = tqdm(total=n, desc="loading train split", unit="img", disable=not progress, file=sys.stderr)
    items = []
    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as ex:  # OpenCV decodes without the GIL
            for it in ex.map(load, range(n)):
                items.append(it)
                bar.update()
    else:
        for i in range(n):
            items.append(load(i))
            bar.update()
    bar.close()
    items = [it for it in items if it is not None]
    if not items:
        raise DataError(f"{getattr(ds, 'root', 'dataset')}: no readable training pairs")
    shapes = {it[0].shape[:2] for it in items}
    if len(shapes) > 1:
        raise DataError(f"{getattr(ds, 'root', 'dataset')}: training images have {len(shapes)} different sizes "
                        f"(e.g. {sorted(shapes)[:3]}); pass data_hw / --data-size HxW to resize them on load")
    images = torch.from_numpy(np.stack([it[0] for it in items]))
    labels = np.stack([it[1] for it in items])
    dtype = np.uint8 if labels.max(initial=0) <= 255 and labels.min(initial=0) >= 0 else np.int16
    return images, torch.from_numpy(labels.astype(dtype))


# ----------------------------------------------------------------------------------------------- validation

def validate(model: nn.Module, dataset, input_hw: tuple[int, int], mean, std, device: torch.device,
             batch_size: int = 1, progress: bool = False) -> dict:
    """Validation with the evaluation protocol of `edgeseg eval` (edgeseg.eval.evaluate.evaluate): resize the
    image to `input_hw`, predict, upsample the logits bilinearly to the label size, argmax, accumulate."""
    was_training = model.training
    model.eval()
    channels_last = device.type == "cuda"

    @torch.no_grad()
    def predict_logits(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return model(t).float().cpu().numpy()

    from edgeseg.eval.evaluate import evaluate

    try:
        return evaluate(predict_logits, dataset, input_hw, mean, std, batch_size=batch_size, progress=progress)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------- fit

@dataclasses.dataclass
class _Run:
    out: Path
    rank: int
    world: int
    is_main: bool


def _prepare_out(out: Path, resume: bool, force: bool) -> None:
    present = [p for p in OUR_OUTPUTS if (out / p).exists()]
    nonempty = out.exists() and any(out.iterdir())
    if resume:
        if not (out / STATE_FILE).is_file():
            raise UsageError(f"--resume: {out / STATE_FILE} not found; nothing to resume")
        return
    if nonempty and not force:
        raise UsageError(f"--out {out}: folder is not empty; pass --resume to continue its run or --force to "
                         f"start over")
    if force:
        import shutil

        for p in present:
            q = out / p
            shutil.rmtree(q) if q.is_dir() else q.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _metrics_summary(res: dict, step: int, split: str, input_hw) -> dict:
    keep = ("miou", "aacc", "macc", "fwiou", "per_class_iou", "excluded_classes", "num_images")
    d = {k: res[k] for k in keep if k in res}
    d.update(split=split, step=int(step), input_hw=list(input_hw))
    return d


def init_weights(net: nn.Module, src: str | Path) -> list[str]:
    """Load starting weights into `net` from an edgeseg checkpoint folder or an official state-dict file.

    Every tensor must exist in both with the same name (a wrong model is refused, naming the keys). Tensors whose
    shape differs only because the class count differs (classifier, class embedding: e.g. an ADE20K checkpoint
    fine-tuned on CamVid) are left freshly initialised and returned, with a warning.
    """
    from edgeseg.checkpoint import WEIGHTS, load_state_dict_file

    p = Path(src)
    wfile = p / WEIGHTS if p.is_dir() else p
    if p.is_dir() and not wfile.is_file():
        raise UsageError(f"--init {src}: no {WEIGHTS} in that folder (expected an edgeseg checkpoint)")
    state = load_state_dict_file(wfile)
    ref = net.state_dict()
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref))
    if missing or unexpected:
        raise UsageError(f"--init {src}: does not match this model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); use `edgeseg import` for other layouts")
    reset = [k for k in ref if tuple(state[k].shape) != tuple(ref[k].shape)]
    with torch.no_grad():
        for k, v in ref.items():
            if k not in reset:
                v.copy_(state[k].to(v.dtype))
    if reset:
        log.warning("--init %s: %d tensor(s) differ in shape (class count?) and start fresh: %s", src, len(reset),
                    ", ".join(reset[:6]) + (" ..." if len(reset) > 6 else ""))
    return reset


def fit(model: str | nn.Module, data, *, model_name: str | None = None, model_kwargs: dict | None = None,
        fmt: str | None = None, train_split: str = "train", val_split: str | None = "val", val_data=None,
        iters: int | None = None, epochs: int | None = None, batch_size: int = 8,
        crop_hw: tuple[int, int] | None = None, input_hw: tuple[int, int] | None = None,
        data_hw: tuple[int, int] | None = None,
        lr: float = 6e-5, head_lr_mult: float = 10.0, weight_decay: float = 0.01, warmup_iters: int = 1500,
        warmup_ratio: float = 1e-6, power: float = 1.0, scale_range=(0.5, 2.0), photometric: bool = True,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, device: str | None = None, out_dir="runs/train",
        resume: bool = False, force: bool = False, val_interval: int | None = None,
        save_interval: int | None = None, log_interval: int = 10, seed: int = 0, num_workers: int = 0,
        augment_on_device: bool = True, amp: bool | None = None, channels_last: bool | None = None,
        val_batch_size: int | None = None, skip_bad: bool = False, stop_after: int | None = None,
        time_limit_s: float | None = None, progress: bool = True, spec_overrides: dict | None = None,
        init: str | Path | None = None, on_step: Callable[[int], None] | None = None) -> dict:
    """Train `model` (a registered name, or a module with `model_name` given) on `data` (dataset folder,
    `.npz` pack or dataset object). Exactly one of `iters` / `epochs` sets the length (default 1000 iters).

    `stop_after` / `time_limit_s` end this invocation early (after that many total steps / seconds) with a
    save, for chunked training; call again with `resume=True` to continue. `on_step(step)` is called after
    every completed step (tests use it to simulate a crash). `init` starts from the weights of an edgeseg
    checkpoint or an official state-dict file (`init_weights`) instead of a random init. Returns a summary dict (steps, best and last
    validation metrics, images/s, paths).
    """
    t_start = time.time()
    distributed, world, rank, local_rank = _dist_info()
    is_main = rank == 0
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        if distributed:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = (dev.type == "cuda") if amp is None else amp
    channels_last = (dev.type == "cuda") if channels_last is None else channels_last
    if iters is not None and epochs is not None:
        raise UsageError("--iters and --epochs are exclusive; give one")
    if batch_size < 1 or batch_size % world:
        raise UsageError(f"--batch-size {batch_size}: must be a positive multiple of the {world} processes")
    per_rank = batch_size // world
    out = Path(out_dir)
    old_handler = None

    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    try:
        if is_main:
            _prepare_out(out, resume, force)
        if distributed:
            torch.distributed.barrier()

        # ---- data
        train_ds = open_split(data, train_split, fmt, skip_bad)
        info = train_ds.info
        ignore = int(info.ignore_index)
        if val_data is not None:
            val_ds = open_split(val_data, val_split or "val", fmt, skip_bad)
        elif val_split:
            try:
                val_ds = open_split(data, val_split, fmt, skip_bad)
            except DataError as e:
                log.warning("no validation: %s", e)
                val_ds = None
        else:
            val_ds = None
        images, labels = preload(train_ds, num_workers, data_hw, progress=progress and is_main)
        n_train, H, W = images.shape[0], images.shape[1], images.shape[2]
        crop_hw = tuple(crop_hw) if crop_hw else (_round32(H), _round32(W))
        input_hw = tuple(input_hw) if input_hw else (_round32(H), _round32(W))
        data_bytes = images.numel() + labels.numel() * labels.element_size()
        if dev.type == "cuda" and augment_on_device and data_bytes < 4 * 2**30:
            images, labels = images.to(dev), labels.to(dev)  # whole split on the GPU: no transfers per step
        elif dev.type == "cuda":
            images, labels = images.pin_memory(), labels.pin_memory()

        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(range(n_train), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=False)
        iters_per_epoch = len(sampler) // per_rank
        if iters_per_epoch < 1:
            raise UsageError(f"--batch-size {batch_size}: larger than the {n_train} training images "
                             f"({len(sampler)} per process)")
        total = int(epochs * iters_per_epoch if epochs is not None else (iters if iters is not None else 1000))
        if total < 1:
            raise UsageError("--iters/--epochs: must give at least one iteration")
        val_interval = val_interval or max(1, min(total, 1000))
        save_interval = save_interval or val_interval

        # ---- model
        if isinstance(model, str):
            from edgeseg.models import create_model

            model_name = model
            _seed_all(seed)
            net = create_model(model, num_classes=info.num_classes, **(model_kwargs or {}))
            if init is not None and not resume:
                init_weights(net, init)
        else:
            if not model_name:
                raise UsageError("fit: pass model_name= with a model object (it goes into model.json)")
            net = model
        net = net.to(dev)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(net, lr=lr, weight_decay=weight_decay, head_lr_mult=head_lr_mult)
        scheduler = build_scheduler(optimizer, total, warmup_iters, warmup_ratio, power)
        config = {"model": model_name, "model_kwargs": model_kwargs or {}, "batch_size": batch_size,
                  "crop_hw": list(crop_hw), "input_hw": list(input_hw), "iters": total, "lr": lr,
                  "head_lr_mult": head_lr_mult, "weight_decay": weight_decay, "warmup_iters": warmup_iters,
                  "power": power, "seed": seed, "world_size": world, "scale_range": list(scale_range),
                  "data": str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__,
                  "train_split": train_split, "val_split": val_split, "num_train": int(n_train),
                  "init": str(init) if init is not None else None}

        step, best_miou, best_metrics, last_metrics = 0, -1.0, None, None
        if resume:
            state = _load_state(out / STATE_FILE)
            old = state["config"]
            for k in ("model", "batch_size", "crop_hw", "world_size", "seed"):
                if old.get(k) != config.get(k):
                    raise UsageError(f"--resume: {k} was {old.get(k)!r} in {out / STATE_FILE}, now {config.get(k)!r}")
            if old.get("iters") != total:
                log.warning("--resume: the run was set up for %s iterations, now %s (the poly schedule changes)",
                            old.get("iters"), total)
                state["scheduler"]["base_lrs"] = scheduler.state_dict()["base_lrs"]
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            sched_state = scheduler.state_dict()
            sched_state.update({k: v for k, v in state["scheduler"].items() if k in ("last_epoch", "_step_count",
                                                                                      "_last_lr")})
            scheduler.load_state_dict(sched_state)
            step = int(state["step"])
            best_miou = float(state.get("best_miou", -1.0))
            best_metrics = state.get("best_metrics")
            last_metrics = state.get("last_metrics")
            _set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)] if isinstance(state["rng"], list)
                           else state["rng"])
            if is_main:
                _truncate_log(out / LOG_FILE, step)
            log.info("resuming %s at step %d of %d", out, step, total)
        elif not isinstance(model, str):
            _seed_all(seed)

        core = net
        if distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            unused = _unused_params(net, crop_hw, dev, info.num_classes, ignore)
            if unused and is_main:
                log.info("DDP: %d parameter tensors get no gradient (e.g. %s); find_unused_parameters on",
                         len(unused), unused[0])
            net = DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None,
                      find_unused_parameters=bool(unused))

        spec_base = ModelSpec(model=model_name, num_classes=info.num_classes, class_names=tuple(info.class_names),
                              palette=tuple(tuple(int(v) for v in c) for c in info.palette), ignore_index=ignore,
                              input_hw=tuple(input_hw), mean=tuple(float(v) for v in mean),
                              std=tuple(float(v) for v in std), model_kwargs=dict(model_kwargs or {}))
        if spec_overrides:
            spec_base = dataclasses.replace(spec_base, **spec_overrides)

        run = _Run(out, rank, world, is_main)
        ctx = _Saver(run, core, optimizer, scheduler, config, spec_base)

        # ---- loop
        from tqdm import tqdm

        interrupted = {"flag": False}
        if threading_main():
            def _on_sigint(signum, frame):
                if interrupted["flag"]:
                    raise KeyboardInterrupt
                interrupted["flag"] = True
                log.warning("interrupt: finishing this step and saving (press Ctrl-C again to abort now)")
            old_handler = signal.signal(signal.SIGINT, _on_sigint)

        bar = tqdm(total=total, initial=step, desc=f"train {model_name}", unit="it", dynamic_ncols=True,
                   disable=not (progress and is_main), file=sys.stderr)
        net.train()
        amp_ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (amp and dev.type == "cuda") else \
            contextlib.nullcontext
        loss_acc = torch.zeros((), device=dev)
        loss_n = 0
        t_log, imgs_since = time.time(), 0
        throughput = None
        stopped = None
        epoch_cached, order = -1, None
        steps_this_run = 0
        t_train0 = time.time()
        while step < total:
            epoch, pos = divmod(step, iters_per_epoch)
            if epoch != epoch_cached:
                sampler.set_epoch(epoch)
                order = torch.tensor(list(sampler), dtype=torch.long)
                epoch_cached = epoch
            idx = order[pos * per_rank:(pos + 1) * per_rank]
            bi, bl = images[idx.to(images.device)], labels[idx.to(images.device)]
            if augment_on_device and bi.device != dev:
                bi, bl = bi.to(dev, non_blocking=True), bl.to(dev, non_blocking=True)
            gen = torch.Generator(device=bi.device).manual_seed(_step_seed(seed, step, rank))
            x, y = gpu_augment(bi.permute(0, 3, 1, 2), bl, crop_hw, mean, std, ignore, scale_range=scale_range,
                               jitter=photometric, generator=gen)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp_ctx():
                logits = net(x)
            loss, _parts = seg_loss(logits, y, ignore, core)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            steps_this_run += 1
            loss_acc += loss.detach()
            loss_n += 1
            imgs_since += batch_size
            bar.update()

            if step % log_interval == 0 or step == total:
                mean_loss = float(loss_acc) / max(1, loss_n)
                if distributed:
                    t = torch.tensor([mean_loss], device=dev if dev.type == "cuda" else "cpu")
                    torch.distributed.all_reduce(t)
                    mean_loss = float(t) / world
                now = time.time()
                throughput = imgs_since / max(1e-9, now - t_log)
                cur_lr = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{cur_lr:.2e}", img_s=f"{throughput:.1f}")
                if is_main:
                    _append_log(out / LOG_FILE, {"step": step, "epoch": epoch, "loss": mean_loss,
                                                 "lr": {g.get("name", str(i)): g["lr"] for i, g in
                                                        enumerate(optimizer.param_groups)},
                                                 "images_per_s": throughput, "time": now})
                loss_acc.zero_()
                loss_n, t_log, imgs_since = 0, now, 0

            do_val = val_ds is not None and (step % val_interval == 0 or step == total)
            if do_val:
                if is_main:
                    res = validate(core, val_ds, input_hw, mean, std, dev, batch_size=val_batch_size or
                                   (8 if dev.type == "cuda" else 1), progress=False)
                    last_metrics = _metrics_summary(res, step, val_split or "val", input_hw)
                    _append_log(out / LOG_FILE, {"step": step, "val": last_metrics})
                    bar.write(f"step {step}: val mIoU {100 * last_metrics['miou']:.2f}  aAcc "
                              f"{100 * last_metrics.get('aacc', 0):.2f}", file=sys.stderr)
                    if last_metrics["miou"] > best_miou:
                        best_miou, best_metrics = float(last_metrics["miou"]), last_metrics
                        ctx.save_model("best", best_metrics, step)
                if distributed:
                    torch.distributed.barrier()

            stop_now = (stop_after is not None and step >= stop_after) or interrupted["flag"]
            if time_limit_s is not None and time.time() - t_start > time_limit_s:
                stop_now = True
            if distributed:
                flag = torch.tensor([1.0 if stop_now else 0.0], device=dev if dev.type == "cuda" else "cpu")
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop_now = bool(flag.item() > 0)
            if step % save_interval == 0 or step == total or stop_now:
                ctx.save_all(step, epoch, best_miou, best_metrics, last_metrics)
            if on_step is not None:
                on_step(step)
            if stop_now and step < total:
                stopped = "interrupted" if interrupted["flag"] else "stopped"
                break
        bar.close()
        if interrupted["flag"]:
            raise KeyboardInterrupt
        train_time = time.time() - t_train0
        summary = {
            "out": str(out), "step": step, "total_iters": total, "stopped": stopped,
            "best": best_metrics, "last": last_metrics,
            "images_per_s": (steps_this_run * batch_size / train_time) if train_time > 0 and steps_this_run else None,
            "seconds": time.time() - t_start, "world_size": world,
            "checkpoint_best": str(out / "best") if (out / "best").exists() else None,
            "checkpoint_last": str(out / "last"),
        }
        return summary
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _unused_params(net: nn.Module, crop_hw, dev: torch.device, num_classes: int, ignore: int) -> list[str]:
    """Names of trainable parameters that receive no gradient in a training step (e.g. a head's unused
    `conv_seg`, kept for strict loading of official checkpoints). Probed with one step on zeros; weights,
    buffers and RNG states are restored afterwards, so the run is unaffected."""
    import copy

    saved = copy.deepcopy(net.state_dict())
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if dev.type == "cuda" else None
    was_training = net.training
    net.train()
    try:
        x = torch.zeros(2, 3, *crop_hw, device=dev)
        y = torch.zeros(2, *crop_hw, dtype=torch.long, device=dev)
        loss, _ = seg_loss(net(x), y, ignore, net)
        loss.backward()
        unused = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        for p in net.parameters():
            p.grad = None
        net.load_state_dict(saved)
        net.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return unused


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _Saver:
    def __init__(self, run: _Run, core: nn.Module, optimizer, scheduler, config: dict, spec_base: ModelSpec):
        self.run, self.core, self.optimizer, self.scheduler = run, core, optimizer, scheduler
        self.config, self.spec_base = config, spec_base

    def _spec(self, metrics: dict | None, step: int) -> ModelSpec:
        prov = dict(self.spec_base.provenance)
        prov.update(trained_by="edgeseg train", step=int(step), torch=torch.__version__,
                    **{k: v for k, v in self.config.items() if k not in ("model", "model_kwargs", "input_hw")})
        return dataclasses.replace(self.spec_base, metrics={"val": metrics} if metrics else {}, provenance=prov)

    def save_model(self, which: str, metrics: dict | None, step: int) -> None:
        from edgeseg.checkpoint import save_checkpoint

        if self.run.is_main:
            save_checkpoint(self.run.out / which, self.core, self._spec(metrics, step), force=True)

    def save_all(self, step: int, epoch: int, best_miou: float, best_metrics, last_metrics) -> None:
        """`last/` first, then `train_state.pt` (the resume point), each written atomically. Every rank
        contributes its RNG state; rank 0 writes."""
        rng = _rng_state()
        if self.run.world > 1:
            gathered = [None] * self.run.world
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        if not self.run.is_main:
            return
        self.save_model("last", last_metrics, step)
        state = {
            "format": "edgeseg-train-state", "version": 1, "step": int(step), "epoch": int(epoch),
            "model": {k: v.detach().cpu() for k, v in self.core.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": _clean_sched(self.scheduler.state_dict()),
            "rng": rng, "config": self.config, "best_miou": float(best_miou),
            "best_metrics": best_metrics, "last_metrics": last_metrics,
        }
        with atomic_file(self.run.out / STATE_FILE, "wb") as f:
            torch.save(state, f)


def _clean_sched(sd: dict) -> dict:
    # LambdaLR keeps lr_lambdas (functions: not stored by state_dict, but keep only plain values)
    return {k: v for k, v in sd.items() if k != "lr_lambdas"}


def _load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
        raise ArtifactError(f"{path}: unreadable training state ({str(e).splitlines()[0] if str(e) else e})"
                            ) from None
    if not isinstance(state, dict) or state.get("format") != "edgeseg-train-state":
        raise ArtifactError(f"{path}: not an edgeseg training state")
    return state


def _append_log(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the saved step (they will be written again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    write_text(path, "".join(k + "\n" for k in keep))
