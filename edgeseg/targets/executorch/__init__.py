"""ExecuTorch + XNNPACK target package (profile export_targets/executorch-xnnpack.toml).

A target package holds everything specific to one runtime; generic code (edgeseg.export, edgeseg.runtime,
edgeseg.targets) names none. Parts:
  exporter.py: torch.export -> PT2E int8 -> to_edge_transform_and_lower(XnnpackPartitioner) -> .pte
  passes.py: graph rewrites XNNPACK needs (last-dim softmax, pads with exact quantize pairs)
  session.py: the ExecuTorch runtime session, its ETDump profiler and device-kit runner
"""
