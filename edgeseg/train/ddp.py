"""DistributedDataParallel for `fit` (gloo on CPU, nccl on CUDA): the wrap, with find_unused_parameters only when
a parameter really gets no gradient (probed once, without changing weights or RNG states)."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from edgeseg.train.losses import seg_loss

log = logging.getLogger(__name__)


def wrap_ddp(net: nn.Module, d, env) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignore = int(d.info.ignore_index)
    unused = unused_params(net, d.crop_hw, env.dev, d.info.num_classes, ignore)
    if unused and env.is_main:
        log.info("DDP: %d parameter tensors get no gradient (e.g. %s); find_unused_parameters on",
                 len(unused), unused[0])
    return DDP(net, device_ids=[env.dev.index] if env.dev.type == "cuda" else None,
               find_unused_parameters=bool(unused))


def unused_params(net: nn.Module, crop_hw, dev: torch.device, num_classes: int, ignore: int) -> list[str]:
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
