"""Mixed-precision policy: which modules of a model stay in float when the rest is int8, and how each target's
quantizer is told so.

Defaults (by module class, so every model family that uses the block gets them):
  * `AFM` (MPLSeg spectral path): the matmul-DFT carries the image's DC energy next to tiny high frequencies;
    one int8 scale per tensor cannot hold both (the issue's design note).
  * `NMF2D` (SegNeXt's LightHam): the multiplicative updates divide by a product of quantized tensors; int8
    rounds small denominators to 0 and the division gives inf/NaN (measured here on test_segnext: the first QAT
    forward with the XNNPACK quantizer, torchao 0.18, returned NaN at `decode_head.hamburger.ham`'s div).
  * `OffsetLearning` (OffSeg's offset head): softmax + the inline mask LayerNorm (`rsqrt(var + eps)`); int8
    rounds the variance to 0 and rsqrt gives inf (measured on test_offseg: NaN at `decode_head.offset_learning`'s
    rsqrt in the first QAT forward, depending on the input).
  * `BilinearGather` (FreqFusion's sampler in its gather export form): index and bilinear-weight arithmetic;
    int8 would quantize the sampling coordinates (offseg_t's ExecuTorch int8 at 64x96: argmax agreement with
    PyTorch 83.2 % with it quantized, against 98.5 % for the grid_sample form).
  * `SSAClassifier` (SSA-Seg's adaptive classifier, the scope of all its ops): spatial/class softmaxes, prototype
    means divided by mask sums, L2 normalisation and a x15 cosine; tiny compute (K x C products). Its int8 OpenVINO
    IR (NNCF) failed `compile_model` on an AVX-512/VNNI/AMX Intel CPU ("No suitable implementations ... memory
    descriptors are not compatible") while it compiled on AVX2; float, every SSA-specific op leaves int8.

A user adds module-name patterns (`fnmatch`, e.g. "backbone.stages.3.*") to keep more in float, or removes a
default with a pattern prefixed by "!" (e.g. "!decode_head.offset_learning").

Mechanisms per target: the policy says which modules stay float; each target's quantization reads it its way.
  * PT2E quantizers (XNNPACK, CoreMLQuantizer, executorch's OpenVINOQuantizer for QAT): `FloatPolicy.apply_pt2e`,
    a node filter on the node's `nn_module_stack` (`quantizer.set_filter_function`); the quantizer then leaves
    those ops unannotated. It stays here because several targets share it.
  * NNCF (OpenVINO IR): `edgeseg.targets.openvino.quantize` (`fx_node_names`, `nncf_patterns`) turns the policy into
    the OpenVINO node names of an `nncf.IgnoredScope`.
  * ONNX Runtime `quantize_static(nodes_to_exclude=...)`: `edgeseg.targets.onnx.quantize.onnx_nodes_to_exclude`, the
    ONNX nodes whose `pkg.torch.onnx.name_scopes` metadata (torch.onnx dynamo exporter) lies under a float module.

Must not import export runtimes at module level.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch.nn as nn

log = logging.getLogger(__name__)

# class name -> why it stays float by default
DEFAULT_FLOAT_TYPES: dict[str, str] = {
    "AFM": "spectral path: DFT matmuls carry the image's DC energy (one int8 scale cannot hold it)",
    "NMF2D": "NMF multiplicative updates divide by int8-rounded denominators (inf/NaN, measured)",
    "OffsetLearning": "softmax + inline LayerNorm: rsqrt of an int8-rounded variance (inf, measured)",
    "BilinearGather": ("FreqFusion sampler's gather form (ExecuTorch): int8 sampling coordinates and bilinear weights "
                       "move the sampling positions (argmax agreement 98.5 -> 83.2 % for offseg_t at 64x96, measured)"),
    "SSAClassifier": ("cosine classifier: L2 norms and a x15 cosine of int8-rounded prototypes; its int8 OpenVINO IR "
                      "failed to compile on an AVX-512/AMX Intel CPU (reported)"),
}


@dataclass(frozen=True)
class FloatPolicy:
    """The modules (fully qualified names) kept in float, with the reason for each."""

    modules: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def covers(self, fqn: str) -> bool:
        """Whether module `fqn` (or an ancestor) is float."""
        return any(fqn == m or fqn.startswith(m + ".") for m in self.modules)

    def to_json(self) -> dict[str, str]:
        return dict(sorted(self.modules.items()))

    # -- PT2E ---------------------------------------------------------------------------------------------------
    def node_is_float(self, node) -> bool:
        """True when an FX node was traced from inside a float module (its `nn_module_stack`)."""
        stack = node.meta.get("nn_module_stack") or {}
        for entry in stack.values():
            fqn = _clean_fqn(entry[0] if isinstance(entry, (tuple, list)) else str(entry))
            if self.covers(fqn):
                return True
        return False

    def apply_pt2e(self, quantizer):
        """Make a PT2E quantizer skip the float modules' ops; returns the quantizer.

        Uses `set_filter_function` when the quantizer has it (XNNPACKQuantizer; executorch 1.5.1's
        `set_module_name(name, None)` asserts a non-None config), else `set_module_name(name, None)`.
        """
        if not self.modules:
            return quantizer
        if hasattr(quantizer, "set_filter_function"):
            previous = getattr(quantizer, "filter_fn", None)

            def keep(n) -> bool:
                return not self.node_is_float(n) and (previous is None or previous(n))

            quantizer.set_filter_function(keep)
            return quantizer
        for name in self.names:
            quantizer.set_module_name(name, None)
        return quantizer


def _clean_fqn(fqn: str) -> str:
    # torch.export records FQNs like "L__self__.backbone" or "model.backbone" (through the ExportWrapper)
    fqn = fqn.replace("L__self__.", "").replace("L['self'].", "")
    return fqn


def _prune(mods: dict[str, str]) -> dict[str, str]:
    """Drop entries already covered by an ancestor entry."""
    keep = {}
    for n in sorted(mods, key=lambda s: s.count(".")):
        if not any(n == k or n.startswith(k + ".") for k in keep):
            keep[n] = mods[n]
    return keep


def float_policy(model: nn.Module, patterns: Sequence[str] = (), defaults: bool = True,
                 prefix: str = "") -> FloatPolicy:
    """The float policy of `model`.

    Args:
        model: the eager model (names are relative to it; pass `prefix="model."` for an ExportWrapper's view).
        patterns: fnmatch patterns over module names to keep in float; "!pattern" removes matches (defaults too).
        defaults: include DEFAULT_FLOAT_TYPES.
    Returns:
        FloatPolicy with fully qualified names (prefix included).
    """
    names = [n for n, _ in model.named_modules() if n]
    mods: dict[str, str] = {}
    if defaults:
        for n, m in model.named_modules():
            why = DEFAULT_FLOAT_TYPES.get(type(m).__name__)
            if n and why:
                mods[n] = why
    for pat in patterns:
        if pat.startswith("!"):
            for n in [k for k in mods if fnmatch.fnmatchcase(k, pat[1:])]:
                del mods[n]
            continue
        hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            from edgeseg.errors import UsageError

            raise UsageError(f"--keep-float: pattern {pat!r} matches no module of {type(model).__name__}")
        for n in hit:
            mods.setdefault(n, f"pattern {pat}")
    return FloatPolicy(_prune({prefix + k: v for k, v in mods.items()}))


__all__ = ["DEFAULT_FLOAT_TYPES", "FloatPolicy", "float_policy"]
