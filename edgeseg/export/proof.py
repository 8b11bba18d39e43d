"""The proof of an exported artifact: it runs in its runtime on the same images as the eager wrapper, and the two
agree (argmax per pixel, and logits where the artifact outputs them)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeseg.errors import ArtifactError

# fp32 artifacts that run here must agree with eager PyTorch at least this well (argmax, per pixel), where the
# runtime computes them in fp32. Where it computes their float parts in bf16 (OpenVINO's inference precision on CPUs
# with native bf16: 8 mantissa bits) bf16 is a precision like fp16 or int8: the proof records the agreement (offseg_t's
# fp32 IR at 384x480: 99.57 % on the 4 proof images; random-weight tiny models, whose logits are nearly tied: ~94 %)
# and `validate` measures the mIoU drop; no floor here.
FP32_MIN_AGREEMENT = 0.999


def prove(artifact_dir: Path, wrapper, num_images: int, num_threads: int = 1) -> dict[str, Any]:
    """Run the artifact in its runtime and eager `wrapper` on the same inputs; return the proof record.

    Returns:
        {source, images, argmax_agreement (0..1), max_abs_logit_diff (None for argmax outputs), seconds}.
    """
    from edgeseg.quant.calibration import default_images, resize_image
    from edgeseg.runtime import open_session

    imgs, _, source = default_images(max(1, num_images))
    inputs = [wrapper.make_input(resize_image(im, wrapper.input_hw)) for im in imgs]
    agree = total = 0
    max_diff = 0.0
    t0 = time.perf_counter()
    with open_session(artifact_dir, num_threads=num_threads) as sess:
        float_compute = sess.float_compute
        for x in inputs:
            with torch.no_grad():
                ref = wrapper(x).numpy()
            got = np.asarray(sess.run(x.numpy()))
            if got.shape != ref.shape:
                raise ArtifactError(f"{artifact_dir}: artifact output shape {got.shape} != eager {ref.shape}")
            if wrapper.output == "argmax":
                agree += int((got == ref).sum())
                total += ref.size
            else:
                agree += int((got.argmax(1) == ref.argmax(1)).sum())
                total += ref.shape[0] * ref.shape[2] * ref.shape[3]
                max_diff = max(max_diff, float(np.abs(got.astype(np.float64) - ref).max()))
    return {"source": source, "images": len(inputs), "argmax_agreement": agree / max(total, 1),
            "max_abs_logit_diff": None if wrapper.output == "argmax" else max_diff, "float_compute": float_compute,
            "seconds": round(time.perf_counter() - t0, 2)}


def check_fp32_proof(target: str, precision: str, proof: dict[str, Any]) -> None:
    """ArtifactError when an fp32 artifact computed in fp32 disagrees with eager PyTorch (< FP32_MIN_AGREEMENT
    argmax)."""
    if precision == "fp32" and proof.get("float_compute", "fp32") == "fp32" \
            and proof["argmax_agreement"] < FP32_MIN_AGREEMENT:
        diff = proof["max_abs_logit_diff"]
        raise ArtifactError(
            f"--target {target}: the fp32 artifact disagrees with PyTorch: argmax agreement "
            f"{proof['argmax_agreement']:.4%} < {FP32_MIN_AGREEMENT:.1%}"
            f"{'' if diff is None else f' (max |dlogit| {diff:.3g})'}; nothing was written")


__all__ = ["FP32_MIN_AGREEMENT", "prove", "check_fp32_proof"]
