"""SegNeXt-T (MSCAN-T + LightHamHead) and its head options: offset learning (OffSeg) and SSA (SSA-Seg).

`model.backbone` / `model.decode_head` carry the official mmseg parameter names; logits at stride 8.

Must not import export/ or runtime/.
"""
from __future__ import annotations

import torch.nn as nn

from edgeseg.models.encoder_decoder import EncoderDecoder
from edgeseg.models.ham_head import LightHamHead, LightHamHeadOffsetLearning
from edgeseg.models.mscan import MSCAN, mscan_t
from edgeseg.models.registry import register_model


class SegNeXt(EncoderDecoder):
    """Encoder-decoder: `decode_head(backbone(x))`, logits (N, K, H/8, W/8)."""

    output_stride = 8

    def set_nmf_mode(self, mode: str) -> None:
        """'fixed' (stored bases; default, deterministic, exportable) or 'random' (official per-forward draw)."""
        for m in self.modules():
            if hasattr(m, "bases_mode"):
                if mode not in ("fixed", "random"):
                    raise ValueError(f"NMF mode must be 'fixed' or 'random', got {mode!r}")
                m.bases_mode = mode


# Head configuration shared by the official SegNeXt-T configs (ADE20K 512x512).
_T_HEAD = dict(in_channels=(64, 160, 256), in_index=(1, 2, 3), channels=256, ham_channels=256, gn_groups=32)
# Tiny CI configuration: same code, small widths/depths.
_TINY_BACKBONE = dict(embed_dims=(8, 16, 24, 32), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1),
                      drop_path_rate=0.0)
_TINY_HEAD = dict(in_channels=(16, 24, 32), in_index=(1, 2, 3), channels=32, ham_channels=32, gn_groups=8,
                  ham_kwargs=dict(MD_R=4))


def build_segnext(num_classes: int, head_cls=LightHamHead, tiny: bool = False, **kw) -> SegNeXt:
    bb_kw = {k[len("backbone_"):]: v for k, v in kw.items() if k.startswith("backbone_")}
    head_kw = {k: v for k, v in kw.items() if not k.startswith("backbone_")}
    if tiny:
        backbone = MSCAN(**{**_TINY_BACKBONE, **bb_kw})
        head = head_cls(num_classes=num_classes, **{**_TINY_HEAD, **head_kw})
    else:
        backbone = mscan_t(**bb_kw)
        head = head_cls(num_classes=num_classes, **{**_T_HEAD, **head_kw})
    return SegNeXt(backbone, head)


def _ssa_head():
    from edgeseg.models.ssa import LightHamHeadSSA

    return LightHamHeadSSA


@register_model
def segnext_t(num_classes: int, **kw) -> nn.Module:
    """SegNeXt-T: MSCAN-T + LightHamHead (NMF R=16, fixed bases), logits at 1/8."""
    return build_segnext(num_classes, LightHamHead, **kw)


@register_model
def segnext_t_offset(num_classes: int, **kw) -> nn.Module:
    """SegNeXt-T with OffSeg's offset-learning head after align, logits at 1/8."""
    return build_segnext(num_classes, LightHamHeadOffsetLearning, **kw)


@register_model
def segnext_t_ssa(num_classes: int, **kw) -> nn.Module:
    """SegNeXt-T with SSA-Seg's semantic/spatial adaptive classifier (inference path), logits at 1/8."""
    return build_segnext(num_classes, _ssa_head(), **kw)


@register_model
def test_segnext(num_classes: int, **kw) -> nn.Module:
    """Tiny SegNeXt (CI): same code as segnext_t, small widths/depths."""
    return build_segnext(num_classes, LightHamHead, tiny=True, **kw)


@register_model
def test_segnext_offset(num_classes: int, **kw) -> nn.Module:
    """Tiny SegNeXt + offset-learning head (CI)."""
    return build_segnext(num_classes, LightHamHeadOffsetLearning, tiny=True, **kw)


@register_model
def test_segnext_ssa(num_classes: int, **kw) -> nn.Module:
    """Tiny SegNeXt + SSA head (CI)."""
    return build_segnext(num_classes, _ssa_head(), tiny=True, **kw)
