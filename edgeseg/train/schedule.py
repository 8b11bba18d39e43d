"""Optimizer and learning-rate schedule of the OffSeg/SegFormer recipe.

AdamW (lr 6e-5, betas 0.9/0.999, weight decay 0.01), the decode head's learning rate ×10, no weight decay on
normalisation layers, biases, embeddings, position/attention-bias tables; linear warm-up from
`warmup_ratio`·lr to lr over `warmup_iters`, then poly decay (power 1) to `min_lr_ratio`·lr at `total_iters`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_NO_DECAY_NAMES = ("pos_embed", "pos_block", "attention_biases", "relative_position", "cls_token", "embedding")


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that get no weight decay: every 0/1-D parameter (biases, norm weights, layer scales
    stored as vectors), every parameter of a norm or embedding module, and position / attention-bias tables."""
    out = set()
    for mname, mod in model.named_modules():
        is_norm = isinstance(mod, _NORMS) or type(mod).__name__.lower().endswith("norm") or isinstance(
            mod, nn.Embedding)
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if is_norm or p.ndim <= 1 or any(k in full for k in _NO_DECAY_NAMES):
                out.add(full)
    return out


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float = 10.0,
                 head_prefix: str = "decode_head.") -> list[dict]:
    """Four groups: (backbone | head) × (decay | no decay). Each group keeps its base lr in `initial_lr`."""
    nd = no_decay_names(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith(head_prefix), name in nd)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_head, no_decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": lr * (head_lr_mult if is_head else 1.0),
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": ("head" if is_head else "backbone") + ("_no_decay" if no_decay else ""),
        })
    return out


def build_optimizer(model: nn.Module, lr: float = 6e-5, weight_decay: float = 0.01, head_lr_mult: float = 10.0,
                    betas=(0.9, 0.999), fused: bool | None = None) -> torch.optim.AdamW:
    kw = {"fused": fused} if fused is not None else {}
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, head_lr_mult), lr=lr, betas=betas,
                             weight_decay=weight_decay, **kw)


def lr_factor(step: int, total_iters: int, warmup_iters: int = 1500, warmup_ratio: float = 1e-6,
              power: float = 1.0, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr used for optimizer step `step` (0-based)."""
    if warmup_iters > 0 and step < warmup_iters:
        return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_iters
    span = max(1, total_iters - warmup_iters)
    t = min(1.0, max(0.0, (step - warmup_iters) / span))
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - t) ** power


def build_scheduler(optimizer: torch.optim.Optimizer, total_iters: int, warmup_iters: int = 1500,
                    warmup_ratio: float = 1e-6, power: float = 1.0, min_lr_ratio: float = 0.0
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration LambdaLR; its state (`last_epoch` = steps taken) goes into the training state."""
    warmup_iters = min(warmup_iters, max(0, total_iters - 1))

    def fn(step: int) -> float:
        return lr_factor(step, total_iters, warmup_iters, warmup_ratio, power, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
