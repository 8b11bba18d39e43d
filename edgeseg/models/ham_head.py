"""SegNeXt's LightHamHead (Hamburger with NMF) and its offset-learning variant, in plain PyTorch.

Parameter names follow mmseg (`decode_head.squeeze.conv`, `.squeeze.gn`, `.hamburger.ham_in.conv`,
`.hamburger.ham_out.{conv,gn}`, `.align.{conv,gn}`, `.conv_seg`, `.offset_learning.*`) so official state dicts
load strictly.

NMF bases. The official NMF2D draws `torch.rand((B*S, D, R))` (then L2-normalises over D) at every forward.
Here the bases are a persistent buffer `hamburger.ham.bases` (S, D, R), already normalised, used in eval and
in exported graphs (no random op, the 7 multiplicative-update steps are unrolled). Its default value is the
draw `torch.rand((1, D, R))` from a generator seeded with 42, which equals the official draw after
`torch.manual_seed(42)`. Official checkpoints do not contain this key; loading tolerates its absence (the
buffer keeps its value), so strict loads of official state dicts succeed.

Edgeseg-only buffers. A module whose state holds entries that official checkpoints lack lists them in
`EDGESEG_ONLY_BUFFERS` (buffer name -> how it is filled) and provides `fill_edgeseg_only_buffers()`, which
resets them to that documented value. `edgeseg import` accepts exactly these keys as absent (every official
key stays strict), calls the fill, and stores the result in the edgeseg checkpoint. Here: NMF2D `bases` =
`default_bases(S, D, R)`, the seeded (NMF_SEED) draw that equals the official forward's after
`torch.manual_seed(42)`. `bases_mode="random"` reproduces the
official per-forward draw from the global generator (parity mode); in training the bases are drawn at random
as in the official code unless `rand_in_train=False`.

Must not import export/ or runtime/.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

NMF_SEED = 42


class ConvModule(nn.Module):
    """mmcv ConvModule subset: conv (bias only without norm), optional GroupNorm `gn`, optional ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *, norm: bool = True,
                 gn_groups: int = 32, act: bool = True, bias: bool | None = None):
        super().__init__()
        if bias is None:
            bias = not norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        if norm:
            self.gn = nn.GroupNorm(gn_groups, out_channels)
        self.with_norm = norm
        self.activate = nn.ReLU(inplace=False) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.with_norm:
            x = self.gn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


def default_bases(S: int, D: int, R: int, seed: int = NMF_SEED) -> torch.Tensor:
    """The official draw `F.normalize(torch.rand((S, D, R)), dim=1)` from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    # Drawn on the CPU (where the generator lives) whatever the default device, then moved: under
    # `with torch.device("meta"|"cuda")` the draw would otherwise meet a CPU generator on another device.
    b = F.normalize(torch.rand((S, D, R), generator=g, device="cpu"), dim=1)
    return b.to(torch.get_default_device())


class NMF2D(nn.Module):
    """Non-negative matrix factorisation by multiplicative updates (official NMF2D; inv_t is forced to 1)."""

    def __init__(self, MD_S: int = 1, MD_R: int = 64, train_steps: int = 6, eval_steps: int = 7,
                 channels: int = 512, bases_mode: str = "fixed", rand_in_train: bool = True, **_ignored):
        super().__init__()
        self.S, self.R = int(MD_S), int(MD_R)
        self.D = channels // self.S
        self.train_steps, self.eval_steps = int(train_steps), int(eval_steps)
        self.inv_t = 1  # the official NMF2D overrides the config's inv_t with 1
        if bases_mode not in ("fixed", "random"):
            raise ValueError(f"bases_mode must be 'fixed' or 'random', got {bases_mode!r}")
        self.bases_mode = bases_mode
        self.rand_in_train = rand_in_train
        self.register_buffer("bases", default_bases(self.S, self.D, self.R))

    # official checkpoints lack these (the official NMF2D draws its bases per forward); see the module docstring
    EDGESEG_ONLY_BUFFERS = {"bases": "default_bases(S, D, R): the NMF_SEED-seeded draw, normalised over D"}

    def fill_edgeseg_only_buffers(self) -> None:
        """Reset `bases` to the documented default (`default_bases`, the official seeded draw)."""
        with torch.no_grad():
            self.bases.copy_(default_bases(self.S, self.D, self.R).to(self.bases.device, self.bases.dtype))

    # -- bases -----------------------------------------------------------------------------------------
    def set_bases(self, bases: torch.Tensor, normalize: bool = True) -> None:
        """Inject bases (S, D, R) (e.g. the parity draw); they are L2-normalised over D unless told not to."""
        b = bases.detach().to(self.bases.dtype).reshape(self.S, self.D, self.R)
        if normalize:
            b = F.normalize(b, dim=1)
        self.bases.copy_(b)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        absent = (prefix + "bases") not in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if absent and (prefix + "bases") in missing_keys:
            missing_keys.remove(prefix + "bases")  # official checkpoints have no bases: keep ours

    def prepare_for_export(self, input_hw) -> None:
        self.bases_mode = "fixed"

    def _initial_bases(self, B: int, x: torch.Tensor) -> torch.Tensor:
        if self.bases_mode == "random" or (self.training and self.rand_in_train):
            b = torch.rand((B * self.S, self.D, self.R)).to(device=x.device, dtype=x.dtype)
            return F.normalize(b, dim=1)
        b = self.bases.to(dtype=x.dtype)
        return b.repeat(B, 1, 1) if B > 1 else b

    # -- updates ---------------------------------------------------------------------------------------
    @staticmethod
    def _update_coef(x, bases, coef):
        numerator = torch.bmm(x.transpose(1, 2), bases)
        denominator = coef.bmm(bases.transpose(1, 2).bmm(bases))
        return coef * numerator / (denominator + 1e-6)

    @staticmethod
    def _update_bases(x, bases, coef):
        numerator = torch.bmm(x, coef)
        denominator = bases.bmm(coef.transpose(1, 2).bmm(coef))
        return bases * numerator / (denominator + 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.reshape(B * self.S, C // self.S, H * W)
        bases = self._initial_bases(B, x)
        coef = torch.bmm(x.transpose(1, 2), bases)
        coef = F.softmax(self.inv_t * coef, dim=-1)
        steps = self.train_steps if self.training else self.eval_steps
        for _ in range(steps):  # unrolled when exported
            coef = self._update_coef(x, bases, coef)
            bases = self._update_bases(x, bases, coef)
        coef = self._update_coef(x, bases, coef)
        x = torch.bmm(bases, coef.transpose(1, 2))
        return x.reshape(B, C, H, W)


class Hamburger(nn.Module):
    """ham_in (1x1 conv + bias) -> ReLU -> NMF -> ham_out (1x1 conv + GN) -> ReLU(x + .)."""

    def __init__(self, ham_channels: int = 512, ham_kwargs: dict | None = None, gn_groups: int = 32):
        super().__init__()
        self.ham_in = ConvModule(ham_channels, ham_channels, 1, norm=False, act=False)
        self.ham = NMF2D(channels=ham_channels, **(ham_kwargs or {}))
        self.ham_out = ConvModule(ham_channels, ham_channels, 1, norm=True, gn_groups=gn_groups, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enjoy = F.relu(self.ham_in(x))
        enjoy = self.ham(enjoy)
        enjoy = self.ham_out(enjoy)
        return F.relu(x + enjoy)


class LightHamHead(nn.Module):
    """SegNeXt decode head: backbone outputs `in_index` resized (bilinear, align_corners=False) to the first
    selected level, concatenated, squeezed to `ham_channels`, Hamburger, align, then the classifier.

    Subclasses override `fuse_inputs` (multi-scale fusion) and/or `classify` (the classifier on the aligned
    feature)."""

    def __init__(self, in_channels: Sequence[int] = (64, 160, 256), in_index: Sequence[int] = (1, 2, 3),
                 channels: int = 256, ham_channels: int = 256, num_classes: int = 150, dropout_ratio: float = 0.1,
                 gn_groups: int = 32, ham_kwargs: dict | None = None, align_corners: bool = False):
        super().__init__()
        self.in_channels = list(in_channels)
        self.in_index = list(in_index)
        self.channels = channels
        self.ham_channels = ham_channels
        self.num_classes = num_classes
        self.align_corners = align_corners
        kw = dict(MD_S=1, MD_R=16, train_steps=6, eval_steps=7)
        kw.update(ham_kwargs or {})
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.squeeze = ConvModule(sum(self.in_channels), ham_channels, 1, gn_groups=gn_groups)
        self.hamburger = Hamburger(ham_channels, kw, gn_groups=gn_groups)
        self.align = ConvModule(ham_channels, channels, 1, gn_groups=gn_groups)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def fuse_inputs(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[2:]
        out = [f if f.shape[2:] == size else
               F.interpolate(f, size=size, mode="bilinear", align_corners=self.align_corners) for f in feats]
        return torch.cat(out, dim=1)

    def forward_features(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        feats = [inputs[i] for i in self.in_index]
        x = self.squeeze(self.fuse_inputs(feats))
        x = self.hamburger(x)
        return self.align(x)

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)

    def classify(self, feat: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(feat)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.forward_features(inputs))


def _offset_learning_cls():
    from edgeseg.models.offset_learning import OffsetLearning  # shared with OffSeg

    return OffsetLearning


class LightHamHeadOffsetLearning(LightHamHead):
    """LightHamHead with OffSeg's offset-learning classifier after `align` (keeps the unused `conv_seg`, as the
    official head does, so official checkpoints load strictly)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.offset_learning = _offset_learning_cls()(self.num_classes, self.channels)

    def classify(self, feat: torch.Tensor) -> torch.Tensor:
        return self.offset_learning(feat)
