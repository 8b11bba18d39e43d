"""OpenVINO target package (profile export_targets/openvino.toml).

A target package holds everything specific to one runtime; generic code (edgeseg.export, edgeseg.runtime,
edgeseg.targets) names none. Parts:
  exporter.py: ov.convert_model of the exported program; fp16 weights; int8 through NNCF or a QAT graph
  quantize.py: NNCF post-training quantization with edgeseg's float policy
  inspection.py: what the IR holds (precisions, FakeQuantize nodes, the float islands)
  session.py: the OpenVINO session (inference precision from the CPU's flags), profiler and device-kit runner
"""

from edgeseg.targets import Flow

# The contract pins the float compute to f32: on CPUs with native bf16 the auto setting computes in bf16, where the
# random-weight tiny variants' nearly tied logits flip (~94 % agreement measured); tests/test_export_openvino.py checks
# the auto setting itself. int8 agreement measured on an Intel Xeon (AVX-512, VNNI, AMX; full 8-bit weights):
# tiny_ops 0.985, test_offseg 1.0, test_offseg_afm 0.921, test_segnext 0.930, test_segnext_afm 0.902,
# test_segnext_offset 0.996, test_segnext_ssa 0.941, test_offseg_lite0 1.0; floors are those minus 0.08: AVX2 CPUs
# without VNNI export 7-bit weights (NNCF's overflow fix), a coarser grid than the one measured.
FLOW = Flow(extra="openvino", contract_models=None, contract_options={"inference_precision": "f32"},
            int8={"tiny_ops": 0.90, "test_offseg": 0.92, "test_offseg_afm": 0.84, "test_segnext": 0.85,
                  "test_segnext_afm": 0.82, "test_segnext_offset": 0.91, "test_segnext_ssa": 0.86,
                  "test_offseg_lite0": 0.92},
            quiet={"fp32": (), "int8": ()}, vendor_says="not found in decomp table", device_kit=(("fp32", {}),))
