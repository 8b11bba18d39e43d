"""LiteRT (TensorFlow Lite) target package (profile export_targets/litert.toml), for Android phones.

A target package holds everything specific to one runtime; generic code (edgeseg.export, edgeseg.runtime,
edgeseg.targets) names none. Parts:
  exporter.py: litert_torch.convert at the static export size; int8 full-integer through ai-edge-quantizer
  quantize.py: the calibrated full-integer quantization
  inspection.py: op histogram, XNNPACK partitions and the ops left off XNNPACK
  session.py: the LiteRT Interpreter (XNNPACK delegate, pinned threads), profiler and device-kit runner
"""

from edgeseg.targets import Flow

# litert-torch converts the same export forms as ExecuTorch (the sampler's gather form), so the contract runs the
# variants whose op families differ most for a converter: tiny_ops (LayerNorm, GELU, Linear, grid_sample, softmax)
# and the EfficientNet-Lite0 + FPN + offset head model (depth-wise, ReLU6, the float policy's offset head). int8
# agreement measured on an Intel Xeon (AVX-512, VNNI, AMX): tiny_ops 0.87, test_offseg_lite0 0.97 (the default
# recipe, the OffsetLearning head float by the float policy); floors are those minus ~0.08.
FLOW = Flow(extra="litert", contract_models=("tiny_ops", "test_offseg_lite0"),
            contract_note="each litert-torch conversion costs ~20-60 s here; the other variants' export forms are "
                          "ExecuTorch's, whose contract runs them",
            int8={"tiny_ops": 0.79, "test_offseg_lite0": 0.89},
            quiet={"fp32": (), "int8": ()}, device_kit=(("int8", {}),))
