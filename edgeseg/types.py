"""Dataclasses that cross module boundaries. Nothing else lives here."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 scale (mmseg's SegDataPreProcessor)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class DatasetInfo:
    """What travels with a dataset into every checkpoint and artifact."""

    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and feed it: stored as `model.json` beside the weights.

    mean/std are RGB on the 0..255 scale; input_hw is the (H, W) the model was trained/exported for.
    """

    model: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int
    input_hw: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    quant: dict[str, Any] | None = None  # set by QAT: {"target": ..., "scheme": ...}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format_version"] = 1
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        d.pop("format_version", None)
        d["class_names"] = tuple(d["class_names"])
        d["palette"] = tuple(tuple(int(v) for v in c) for c in d["palette"])
        d["input_hw"] = tuple(int(v) for v in d["input_hw"])
        d["mean"] = tuple(float(v) for v in d["mean"])
        d["std"] = tuple(float(v) for v in d["std"])
        return cls(**d)

    @property
    def dataset(self) -> DatasetInfo:
        return DatasetInfo("checkpoint", self.class_names, self.palette, self.ignore_index)
