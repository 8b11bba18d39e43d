"""The one segmentor shape every registered model shares: `decode_head(backbone(x))`, logits at a fixed stride.

Parameter names are `backbone.*` and `decode_head.*`, as in the official mmseg checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class EncoderDecoder(nn.Module):
    """`decode_head(backbone(x))`: logits (N, K, H / output_stride, W / output_stride)."""

    output_stride = 4

    def __init__(self, backbone: nn.Module, decode_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(x))


__all__ = ["EncoderDecoder"]
