"""Exponential moving average of the weights (`--ema DECAY`): a copy of the model whose parameters and floating
buffers (BatchNorm statistics) follow the trained ones, `ema = d·ema + (1 - d)·w` after every optimizer step, with
the warm-up d = min(DECAY, (1 + step) / (10 + step)) so that the average does not remember the random init for
thousands of steps. Validation, `best/` and `last/` use the averaged weights; `train_state.safetensors` keeps both (the
raw ones train on), so a resumed run continues the same average. Integer buffers are copied.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn

from edgeseg.errors import UsageError

log = logging.getLogger(__name__)


def ema_decay(decay: float, step: int) -> float:
    """The decay used by the update after optimizer step `step` (1-based): the warm-up, capped at `decay`."""
    return min(float(decay), (1.0 + step) / (10.0 + step))


class ModelEma:
    """The averaged copy of `model` (`.module`, eval mode, no gradients)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise UsageError(f"--ema {decay}: the decay must be in (0, 1), e.g. 0.999")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _pairs(self, model: nn.Module):
        # parameters() / buffers() list each shared tensor once (a QAT graph shares observers), in the same order
        # in the copy as in the original
        mine = list(self.module.parameters()) + list(self.module.buffers())
        theirs = list(model.parameters()) + list(model.buffers())
        if len(mine) != len(theirs):
            raise RuntimeError("EMA: the model's tensors changed after the average was set up")
        return zip(mine, theirs)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Average in `model`'s current weights after optimizer step `step`; returns the decay used."""
        d = ema_decay(self.decay, step)
        floats_e, floats_m = [], []
        for e, m in self._pairs(model):
            if e.is_floating_point():
                floats_e.append(e)
                floats_m.append(m.detach())
            else:
                e.copy_(m)
        if floats_e:
            torch._foreach_lerp_(floats_e, floats_m, 1.0 - d)
        return d

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


def restore_ema(ema: ModelEma | None, state: dict, net: nn.Module, where) -> None:
    """On resume: the saved average into `ema`; a state without one starts it from the (restored) weights of
    `net`; a saved average without --ema is dropped. Both with a warning."""
    if ema is not None and "ema" in state:
        ema.load_state_dict(state["ema"])
    elif ema is not None:
        log.warning("--resume: %s has no EMA weights; the average starts from the saved weights", where)
        ema.load_state_dict(net.state_dict())
    elif "ema" in state:
        log.warning("--resume: the run kept EMA weights (--ema %s); without --ema they are dropped",
                    state.get("config", {}).get("ema"))
