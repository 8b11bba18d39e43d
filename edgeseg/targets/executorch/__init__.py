"""ExecuTorch + XNNPACK target package (profile export_targets/executorch-xnnpack.toml).

A target package holds everything specific to one runtime; generic code (edgeseg.export, edgeseg.runtime,
edgeseg.targets) names none. Parts:
  exporter.py: torch.export -> PT2E int8 -> to_edge_transform_and_lower(XnnpackPartitioner) -> .pte
  passes.py: graph rewrites XNNPACK needs (last-dim softmax, pads with exact quantize pairs)
  session.py: the ExecuTorch runtime session, its ETDump profiler and device-kit runner
"""

from edgeseg.targets import Flow

# ExecuTorch lowering is the suite's slowest step (30-130 s per tiny model on 2 cores), so its fp32 round trip runs
# on the variants that add a distinct op family: the offseg backbone + FreqFusion + offset head, the AFM spectral
# path, MSCAN + LightHamHead + offset head, and EfficientNet-Lite0 (ReLU6, depth-wise) + FPN + offset head.
FLOW = Flow(extra="executorch",
            contract_models=("tiny_ops", "test_offseg", "test_segnext_afm", "test_segnext_offset", "test_offseg_lite0"),
            contract_note="test_segnext and test_offseg_afm only recombine the op families of these; the SSA head "
                          "has its own XNNPACK tests (tests/test_executorch_lowering.py)",
            # int8 agreement of tiny_ops measured on an Intel Xeon (AVX-512, VNNI, AMX): 0.991; XNNPACK's int8
            # does not depend on the CPU's flags, so the floor is that minus 0.05
            int8={"tiny_ops": 0.94},
            quiet={"fp32": (), "int8": ()}, device_kit=(("fp32", {}),))
