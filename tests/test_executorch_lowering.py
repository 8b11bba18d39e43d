"""ExecuTorch/XNNPACK lowering of the model parts that used to split the graph or fail inside the delegate at run
time: small modules, lowered with the exporter's own graph preparation, run in a child process (a
delegate crash is a segfault, which must fail one test, not the whole run).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("executorch")

from edgeseg.models import create_model  # noqa: E402
from edgeseg.models.offset_learning import OffsetLearning  # noqa: E402


def _lower(module: nn.Module, x: torch.Tensor, tmp_path: Path):
    """The exporter's path: torch.export, softmax rewrite, delegate-friendly decompositions, unshared constants,
    to_edge_transform_and_lower(XNNPACK). Returns (path of the .pte, ops left off XNNPACK, delegate calls)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgeseg.targets.executorch.exporter import (delegate_friendly_decompositions, non_delegated_ops,
                                           rewrite_last_dim_softmax, unshare_constants)

    ep = torch.export.export(module, (x,), strict=False)
    ep, _ = rewrite_last_dim_softmax(ep, (x,))
    ep, _ = unshare_constants(delegate_friendly_decompositions(ep))
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    program = edge.exported_program()
    calls = sum(1 for n in program.graph_module.graph.nodes
                if n.op == "call_function" and "executorch_call_delegate" in str(n.target))
    pte = tmp_path / "m.pte"
    pte.write_bytes(edge.to_executorch().buffer)
    return pte, non_delegated_ops(program), calls


def _run_in_child(pte: Path, x: torch.Tensor, tmp_path: Path, output: int = 0) -> torch.Tensor:
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import torch
        from executorch.runtime import Runtime
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        out = Runtime.get().load_program({str(pte)!r}).load_method("forward").execute([x])[{output}]
        torch.save(out.clone(), {str(tmp_path / 'y.pt')!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ExecuTorch run failed (rc {proc.returncode}): {proc.stderr[-800:]}"
    return torch.load(tmp_path / "y.pt", weights_only=True)


def _assert_one_partition_and_equal(module: nn.Module, x: torch.Tensor, want: torch.Tensor, tmp_path: Path):
    """Lowered whole into one XNNPACK partition, and the .pte computes `want`."""
    pte, off, calls = _lower(module, x, tmp_path)
    assert off == {} and calls == 1, (off, calls)
    got = _run_in_child(pte, x, tmp_path)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


class _SSAClassifier(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, feat):
        return self.head.classify(feat)


def test_ssa_classifier_runs_on_xnnpack(tmp_path):
    """SSA-Seg's classifier reads conv_seg's 4-D weight as prototype data; lowered as is, the XNNPACK delegate
    crashed at run time (segfault / "Propagating input shapes failed"). The export form reads a baked copy."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_model("test_segnext_ssa", 4).eval()
    head = model.decode_head
    head.prepare_for_export((64, 64))
    feat = torch.randn(1, head.channels, 8, 8)
    module = _SSAClassifier(head).eval()
    with torch.no_grad():
        want = module(feat)
    _assert_one_partition_and_equal(module, feat, want, tmp_path)


class _DecoderTail(nn.Module):
    """OffSeg's decoder in miniature: conv-GroupNorm-ReLU, a channel softmax written as a last-axis softmax
    between permutes (FreqFusion's kernel normalisation), pixel_unshuffle / pixel_shuffle, offset learning."""

    def __init__(self, c: int = 16, k: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.gn = nn.GroupNorm(4, c)
        self.mix = nn.Conv2d(4 * c, 4 * c, 1)
        self.ol = OffsetLearning(k, c)

    def forward(self, x):
        y = F.relu(self.gn(self.conv(x)))
        y = y.permute(0, 2, 3, 1).softmax(dim=-1).permute(0, 3, 1, 2)
        y = F.pixel_shuffle(self.mix(F.pixel_unshuffle(y, 2)), 2)
        return self.ol(y)


def test_decoder_ops_lower_into_one_xnnpack_partition(tmp_path):
    """GroupNorm, channels-last clones from pixel_(un)shuffle of a permuted tensor, expand ops of 4-D / batched
    matmuls, a non-last-axis softmax and a 3-D mean each left XNNPACK and split the graph (31 partitions on
    OffSeg-T, most of the lowering time). Now: one partition, same values."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = _DecoderTail().eval()
    with torch.no_grad():
        module.ol.cls_repr.normal_()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        want = module(x)
    _assert_one_partition_and_equal(module, x, want, tmp_path)


def test_export_forms_match_eager():
    """The export forms (selected while tracing) compute what eager computes."""
    torch.manual_seed(0)
    ol = OffsetLearning(7, 16).eval()
    with torch.no_grad():
        ol.cls_repr.normal_()
        x = torch.randn(2, 16, 6, 10)
        assert torch.allclose(ol._forward_export(x), ol(x), atol=1e-5)
    head = create_model("test_segnext_ssa", 4).eval().decode_head
    feat = torch.randn(2, head.channels, 6, 10)
    with torch.no_grad():
        want = head.classify(feat)
        assert torch.allclose(head._classify_export(feat), want, atol=1e-4)  # not baked: reads the weight
        head.prepare_for_export((64, 64))
        assert torch.allclose(head._classify_export(feat), want, atol=1e-4)
        head.load_state_dict(head.state_dict())  # new weights drop the baked copy
        assert head._export_proto is None


class _SharedKernel(nn.Module):
    """One conv weight read by two convolutions, as FreqFusion's one-hot kernels and its content encoder on the
    high- and low-resolution paths are."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(c, c, 3, 3) * 0.2)

    def forward(self, x):
        y = F.relu(self.stem(x))
        a = F.conv2d(y, self.weight, padding=1)
        b = F.conv2d(y, self.weight, stride=2, padding=1)
        return a + F.interpolate(b, scale_factor=2.0, mode="nearest")


def test_int8_shared_conv_weight_loads_and_runs(tmp_path):
    """Regression: a conv weight shared by two convs was left unannotated by the XNNPACK quantizer
    behind a dequantized input; the int8 .pte then failed at load ("Failed to create convolution node"). The
    exporter unshares constants before PT2E; the .pte must load, run and match the quantized eager graph."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from edgeseg.targets.executorch.exporter import ExecutorchExporter, unshare_constants

    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = _SharedKernel().eval()
    x = torch.randn(1, 3, 16, 16)
    ep, copies = unshare_constants(torch.export.export(module, (x,), strict=False))
    assert copies >= 1
    prepared = prepare_pt2e(ep.module(), ExecutorchExporter().quantizer())
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(1, 3, 16, 16))
        prepared(x)
        converted = convert_pt2e(prepared)
        want = converted(x)
    convs = [n for n in converted.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
    assert len(convs) == 3 and all("dequantize" in str(n.args[1].target) for n in convs), "a conv kept fp32 weights"
    pte, _, _ = _lower(converted, x, tmp_path)
    got = _run_in_child(pte, x, tmp_path)
    # int8 arithmetic in XNNPACK vs the simulated q/dq graph: off by a few quantization steps at most
    step = want.abs().max() / 127
    assert (got - want).abs().max() <= 3 * step, ((got - want).abs().max(), step)


class _LocalGlobalQuery(nn.Module):
    """EfficientFormerV2's LGQuery pattern: a strided depthwise conv plus AvgPool2d(1, 2) subsampling, its input
    also a graph output (as the backbone's stage outputs are), and an ordinary 3x3 average pool beside it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.local = nn.Conv2d(8, 8, 3, 2, 1, groups=8)
        self.sub = nn.AvgPool2d(1, 2, 0)
        self.smooth = nn.AvgPool2d(3, 1, 1)
        self.proj = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.stem(x)
        return y, self.proj(self.local(y) + self.sub(y)) + self.smooth(self.sub(y))


def test_int8_one_by_one_average_pool_runs(tmp_path):
    """Regression (offseg_t's ExecuTorch QAT .pte): XNNPACK takes a quantized 1x1 average pool into its graph and
    fails at the first run ("Propagating input shapes failed ... xnn_status_invalid_parameter"). The exporter
    turns a 1x1 unpadded pool into the strided slice it is; wider pools stay pools."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from edgeseg.targets.executorch.exporter import ExecutorchExporter, delegate_friendly_decompositions

    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = _LocalGlobalQuery().eval()
    x = torch.randn(1, 3, 16, 16)
    prepared = prepare_pt2e(torch.export.export(module, (x,), strict=False).module(),
                            ExecutorchExporter().quantizer())
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(1, 3, 16, 16))
        converted = convert_pt2e(prepared)
        want = converted(x)[1]
    pools = [n.args[1] for n in delegate_friendly_decompositions(torch.export.export(converted, (x,))).graph.nodes
             if n.op == "call_function" and "avg_pool2d" in str(n.target)]
    assert pools == [[3, 3]], pools  # the 1x1 pool became a slice, the 3x3 one stayed
    pte, _, _ = _lower(converted, x, tmp_path)
    got = _run_in_child(pte, x, tmp_path, output=1)  # failed before the fix
    step = want.abs().max() / 127
    assert (got - want).abs().max() <= 3 * step, ((got - want).abs().max(), step)
