"""The model as it is deployed: `ExportWrapper` adds the artifact's in-graph pre/post-processing around a model and
states its input/output contract (recorded in the manifest). Exporters export it; the eager runtime runs it as the
reference, so both read the same contract.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeseg.errors import UsageError

INPUT_NAME = "image"
OUTPUT_LOGITS = "logits"
OUTPUT_ARGMAX = "class_map"


class ExportWrapper(nn.Module):
    """The module that is exported: the model plus optional in-graph pre/post-processing.

    Input (manifest `input`):
        input_dtype "float32": normalised float32 image, NCHW (N,3,H,W) or NHWC (N,H,W,3).
        input_dtype "uint8": raw RGB uint8 0..255, NCHW or NHWC; `(x - mean) / std` happens in the graph.
    Output (manifest `output`):
        "logits": (N,K,H/s,W/s) float32 logits, s = model.output_stride.
        "argmax": (N,H,W) uint8 class map at the input resolution (bilinear upsample of logits, then argmax).
    """

    def __init__(self, model: nn.Module, input_hw: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 input_dtype: str = "float32", input_layout: str = "NCHW", output: str = "logits"):
        super().__init__()
        self.model = model
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.input_dtype = input_dtype
        self.input_layout = input_layout
        self.output = output
        self.output_stride = int(getattr(model, "output_stride", 1))
        # 1/std folded into a multiply: one Sub + one Mul in the graph.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        if self.input_dtype == "uint8":
            x = (x.to(torch.float32) - self.mean) * self.inv_std
        y = self.model(x)
        if self.output == "argmax":
            if tuple(y.shape[-2:]) != self.input_hw:
                y = F.interpolate(y, size=self.input_hw, mode="bilinear", align_corners=False)
            y = y.argmax(dim=1).to(torch.uint8)
        return y

    # -- the input/output contract, as recorded in the manifest --------------------------------------------------
    def input_shape(self, batch: int = 1) -> list[int]:
        h, w = self.input_hw
        return [batch, 3, h, w] if self.input_layout == "NCHW" else [batch, h, w, 3]

    def input_contract(self) -> dict[str, Any]:
        return {"name": INPUT_NAME, "shape": self.input_shape(1), "dtype": self.input_dtype,
                "layout": self.input_layout,
                "normalisation": "in graph: (x - mean) / std" if self.input_dtype == "uint8" else
                "by the caller: (x - mean) / std on the 0..255 RGB scale"}

    def output_contract(self, num_classes: int) -> dict[str, Any]:
        h, w = self.input_hw
        if self.output == "argmax":
            return {"name": OUTPUT_ARGMAX, "kind": "argmax", "shape": [1, h, w], "dtype": "uint8", "stride": 1,
                    "meaning": "class index per pixel at input resolution (argmax of bilinearly upsampled logits)"}
        s = self.output_stride
        return {"name": OUTPUT_LOGITS, "kind": "logits", "shape": [1, num_classes, h // s, w // s],
                "dtype": "float32", "stride": s, "meaning": f"class logits at stride {s}"}

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A deterministic input in the contract (normalised-like floats, or uint8 pixels)."""
        g = torch.Generator().manual_seed(seed)
        shape = self.input_shape(batch)
        if self.input_dtype == "uint8":
            return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        return torch.randn(shape, generator=g, dtype=torch.float32)

    def make_input(self, images_uint8: np.ndarray) -> torch.Tensor:
        """Turn a batch of RGB uint8 images (N,H,W,3) already at input_hw into the wrapper's input tensor."""
        x = torch.from_numpy(np.ascontiguousarray(images_uint8))
        if x.ndim == 3:
            x = x[None]
        if tuple(x.shape[1:3]) != self.input_hw:
            raise UsageError(f"calibration/proof image of size {tuple(x.shape[1:3])}; expected {self.input_hw}")
        x = x.permute(0, 3, 1, 2).contiguous()  # NCHW uint8
        if self.input_dtype == "float32":
            x = (x.to(torch.float32) - self.mean) * self.inv_std
        if self.input_layout == "NHWC":
            x = x.permute(0, 2, 3, 1).contiguous()
        return x
