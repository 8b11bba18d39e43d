"""The steps of one training iteration, in the order `fit` runs them: gather and augment the batch, optimise,
write the log line, validate (saving `best/`), decide whether to stop, save (`last/` + the resume point)."""
from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgeseg.data.transforms import gpu_augment
from edgeseg.train.losses import Ohem, kd_loss, seg_loss
from edgeseg.train.state import LOG_FILE, Saver, append_log, step_seed

log = logging.getLogger(__name__)


def validate(model: nn.Module, dataset, input_hw: tuple[int, int], mean, std, device: torch.device,
             batch_size: int = 1, progress: bool = False, channels_last: bool | None = None) -> dict:
    """Validation with the evaluation protocol of `edgeseg eval` (edgeseg.eval.evaluate.evaluate): resize the
    image to `input_hw`, predict (float32; channels_last inputs when asked, default on CUDA), upsample the logits
    bilinearly to the label size, argmax, accumulate."""
    was_training = model.training
    model.eval()
    channels_last = device.type == "cuda" if channels_last is None else channels_last

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


def _metrics_summary(res: dict, step: int, split: str, input_hw) -> dict:
    keep = ("miou", "aacc", "macc", "fwiou", "per_class_iou", "excluded_classes", "num_images")
    d = {k: res[k] for k in keep if k in res}
    d.update(split=split, step=int(step), input_hw=list(input_hw))
    return d


class Loop:
    """The training loop's steps: one optimisation step, the periodic log line, validation with `best/`, the
    stop decision and the save. Holds what changes from step to step."""

    def __init__(self, cfg, env, d, net, core, optimizer, scheduler, saver: Saver,
                 progress, name: str, bar, teacher=None):
        self.cfg, self.env, self.d, self.net, self.core = cfg, env, d, net, core
        self.optimizer, self.scheduler, self.saver, self.p, self.bar = optimizer, scheduler, saver, progress, bar
        self.teacher, self.ema = teacher, saver.ema
        self.eval_model = self.ema.module if self.ema is not None else core  # what validation scores
        self.ohem = Ohem(cfg.ohem_thresh, cfg.ohem_min_kept) if cfg.ohem else None
        self.out = Path(cfg.out_dir)
        self.amp_ctx = lambda: env.precision.autocast(env.dev.type)
        self.loss_acc = torch.zeros((), device=env.dev)
        self.kd_acc = torch.zeros((), device=env.dev)
        self.loss_n = 0
        self.t_log, self.imgs_since = time.time(), 0
        self.epoch_cached, self.order = -1, None
        self.steps_this_run = 0

    def batch(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The epoch and the augmented (x, y) of the current step: sampler order from (seed, epoch), the
        augmentation's generator from (seed, step, rank)."""
        d, cfg, env = self.d, self.cfg, self.env
        epoch, pos = divmod(self.p.step, d.iters_per_epoch)
        if epoch != self.epoch_cached:
            d.sampler.set_epoch(epoch)
            self.order = torch.tensor(list(d.sampler), dtype=torch.long)
            self.epoch_cached = epoch
        idx = self.order[pos * d.per_rank:(pos + 1) * d.per_rank]
        bi, bl = d.images[idx.to(d.images.device)], d.labels[idx.to(d.images.device)]
        if cfg.augment_on_device and bi.device != env.dev:
            bi, bl = bi.to(env.dev, non_blocking=True), bl.to(env.dev, non_blocking=True)
        gen = torch.Generator(device=bi.device).manual_seed(step_seed(cfg.seed, self.p.step, env.rank))
        x, y = gpu_augment(bi.permute(0, 3, 1, 2), bl, d.crop_hw, cfg.mean, cfg.std, int(d.info.ignore_index),
                           scale_range=cfg.scale_range, jitter=cfg.photometric, generator=gen)
        x, y = x.to(env.dev, non_blocking=True), y.to(env.dev, non_blocking=True)
        if env.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return epoch, x, y

    def optimise(self, x: torch.Tensor, y: torch.Tensor) -> None:
        cfg, ignore = self.cfg, int(self.d.info.ignore_index)
        with self.amp_ctx():
            logits = self.net(x)
            t_logits = self.teacher(x) if self.teacher is not None else None
        loss, _parts = seg_loss(logits, y, ignore, self.core, class_weight=self.d.class_weight, ohem=self.ohem)
        if t_logits is not None:
            kd = kd_loss(logits, t_logits, cfg.kd_temp, y, ignore)
            loss = loss + cfg.kd_weight * kd
            self.kd_acc += kd.detach()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.p.step += 1
        self.steps_this_run += 1
        if self.ema is not None:
            self.ema.update(self.core, self.p.step)
        self.loss_acc += loss.detach()
        self.loss_n += 1
        self.imgs_since += self.cfg.batch_size
        self.bar.update()

    def log_line(self, epoch: int) -> None:
        step, env = self.p.step, self.env
        if not (step % self.cfg.log_interval == 0 or step == self.d.total):
            return
        mean_loss = float(self.loss_acc) / max(1, self.loss_n)
        if env.distributed:
            t = torch.tensor([mean_loss], device=env.reduce_device)
            torch.distributed.all_reduce(t)
            mean_loss = float(t) / env.world
        now = time.time()
        throughput = self.imgs_since / max(1e-9, now - self.t_log)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                             img_s=f"{throughput:.1f}")
        if env.is_main:
            kd = {"kd": float(self.kd_acc) / max(1, self.loss_n)} if self.teacher is not None else {}
            append_log(self.out / LOG_FILE, {"step": step, "epoch": epoch, "loss": mean_loss, **kd,
                                             "lr": {g.get("name", str(i)): g["lr"] for i, g in
                                                    enumerate(self.optimizer.param_groups)},
                                             "images_per_s": throughput, "time": now})
        self.loss_acc.zero_()
        self.kd_acc.zero_()
        self.loss_n, self.t_log, self.imgs_since = 0, now, 0

    def validate(self) -> None:
        """Validate on val (and holdout when given) at the interval; `best/` follows holdout's mIoU when there is
        a holdout split, else val's."""
        step, d, env, cfg = self.p.step, self.d, self.env, self.cfg
        if (d.val_ds is None and d.holdout_ds is None) or not (step % d.val_interval == 0 or step == d.total):
            return
        if env.is_main:
            last = self.p.last_metrics = self._evaluate(d.val_ds, cfg.val_split or "val")
            hold = self.p.last_holdout = self._evaluate(d.holdout_ds, cfg.holdout_split)
            append_log(self.out / LOG_FILE, {"step": step, **({"val": last} if last else {}),
                                             **({"holdout": hold} if hold else {})})
            self.bar.write(f"step {step}: " + "  ".join(
                f"{name} mIoU {100 * m['miou']:.2f} aAcc {100 * m.get('aacc', 0):.2f}"
                for name, m in (("val", last), ("holdout", hold)) if m), file=sys.stderr)
            chosen = hold or last
            if chosen["miou"] > self.p.best_miou:
                self.p.best_miou, self.p.best_metrics, self.p.best_holdout = float(chosen["miou"]), last, hold
                self.saver.save_model("best", last, step, hold)
        if env.distributed:
            torch.distributed.barrier()

    def _evaluate(self, ds, split: str | None) -> dict | None:
        if ds is None:
            return None
        cfg, env = self.cfg, self.env
        res = validate(self.eval_model, ds, self.d.input_hw, cfg.mean, cfg.std, env.dev,
                       batch_size=cfg.val_batch_size or (8 if env.dev.type == "cuda" else 1), progress=False,
                       channels_last=env.channels_last)
        return _metrics_summary(res, self.p.step, split, self.d.input_hw)

    def should_stop(self, t_start: float, interrupted: bool) -> bool:
        cfg, env = self.cfg, self.env
        stop = (cfg.stop_after is not None and self.p.step >= cfg.stop_after) or interrupted
        if cfg.time_limit_s is not None and time.time() - t_start > cfg.time_limit_s:
            stop = True
        if env.distributed:  # every rank stops at the same step
            flag = torch.tensor([1.0 if stop else 0.0], device=env.reduce_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item() > 0)
        return stop

    def save(self, epoch: int, stop_now: bool) -> None:
        step = self.p.step
        if step % self.d.save_interval == 0 or step == self.d.total or stop_now:
            self.saver.save_all(step, epoch, self.p.best_miou, self.p.best_metrics, self.p.last_metrics,
                                self.p.best_holdout, self.p.last_holdout)


class SigintOnce:
    """First Ctrl-C: finish the step, save and stop; a second one aborts at once. Only in the main thread."""

    def __init__(self):
        self.flag = False
        self.old = None

    def __enter__(self):
        if threading_main():
            self.old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        log.warning("interrupt: finishing this step and saving (press Ctrl-C again to abort now)")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
