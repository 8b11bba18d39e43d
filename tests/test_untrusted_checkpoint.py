"""A downloaded checkpoint is data: loading a QAT checkpoint's program never unpickles, and no path in model.json
reaches outside the checkpoint folder.

The crafted programs below put a pickle whose loading creates a directory (the sentinel) where torch 2.13's
`torch.export.load` unpickles it; `test_torch_loader_would_run_the_payload` shows that each one does run through
torch's own loader, so the refusals tested after it are not the refusal of a malformed archive.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from edgeseg.models.registry import list_models, register_model

MODEL = "untrusted_tiny"
HW = (16, 16)
PAYLOADS = ("sample_inputs", "weight", "constant", "legacy_weights")


class UntrustedTiny(nn.Module):
    output_stride = 2

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.decode_head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


if MODEL not in list_models(MODEL):
    @register_model
    def untrusted_tiny(num_classes: int, **kw) -> nn.Module:
        """A conv, a ReLU and a 1x1 classifier (untrusted-checkpoint tests only)."""
        return UntrustedTiny(num_classes, **kw)


class Payload:
    """Unpickling this creates the directory `path`: the code a malicious checkpoint would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def qat_ckpt(tmp_path_factory) -> Path:
    """A real QAT checkpoint (prepare_qat -> init_observers -> convert_qat, ONNX scheme), written by
    save_qat_checkpoint."""
    from edgeseg.models import create_model
    from edgeseg.quant.policy import FloatPolicy
    from edgeseg.train.qat import (PROGRAM_FILE, QAT_TARGETS, convert_qat, init_observers, prepare_qat,
                                   save_qat_checkpoint)
    from edgeseg.types import ModelSpec

    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=4)
    prepared = prepare_qat(model, "onnx", HW, FloatPolicy({}))
    init_observers(prepared, [torch.randn(1, 3, *HW) for _ in range(2)])
    ep = convert_qat(prepared, HW)
    quant = {"target": "onnx", "scheme": QAT_TARGETS["onnx"][1], "quantizer": QAT_TARGETS["onnx"][0],
             "program": PROGRAM_FILE, "input_hw": list(HW), "output_stride": 2}
    spec = ModelSpec(model=MODEL, num_classes=4, class_names=("a", "b", "c", "d"),
                     palette=((0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3)), ignore_index=255, input_hw=HW,
                     quant=quant)
    return save_qat_checkpoint(tmp_path_factory.mktemp("ck") / "qat", model, spec, ep)


def _craft(src: Path, dst: Path, kind: str, sentinel: Path) -> Path:
    """Copy checkpoint `src` to `dst` with a payload placed in its program where torch's loader unpickles it."""
    shutil.copytree(src, dst)
    prog = dst / "qat_int8.pt2"
    with zipfile.ZipFile(prog) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    root = next(n for n in entries if n.endswith("/archive_format"))[:-len("archive_format")]
    evil = _torch_save_bytes(Payload(sentinel))
    if kind == "sample_inputs":  # torch.load(weights_only=True) refuses it, then torch retries with False
        entries[root + "data/sample_inputs/model.pt"] = evil
    elif kind == "weight":  # a payload config entry marked use_pickle: torch.load(weights_only=False)
        cfg_name = root + "data/weights/model_weights_config.json"
        cfg = json.loads(entries[cfg_name])
        meta = next(iter(cfg["config"].values()))
        meta["use_pickle"] = True
        entries[root + "data/weights/" + meta["path_name"]] = evil
        entries[cfg_name] = json.dumps(cfg).encode()
    elif kind == "constant":  # an "opaque object" constant: pickle.loads
        cfg_name = root + "data/constants/model_constants_config.json"
        cfg = json.loads(entries[cfg_name])
        cfg["config"]["planted"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                    "tensor_meta": None}
        entries[root + "data/constants/opaque_obj_0"] = pickle.dumps(Payload(sentinel))
        entries[cfg_name] = json.dumps(cfg).encode()
    elif kind == "legacy_weights":  # the pre-2.8 weights file: torch.load, falling back to weights_only=False
        entries[root + "data/weights/model.pt"] = evil
    else:
        raise ValueError(kind)
    with zipfile.ZipFile(prog, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return dst


def _export(ck: Path, out: Path, capsys) -> tuple[int, list[str]]:
    from edgeseg.cli import main

    capsys.readouterr()
    rc = main(["export", "--checkpoint", str(ck), "--target", "onnx", "--precision", "int8", "--out", str(out)])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_torch_loader_would_run_the_payload(qat_ckpt, tmp_path, kind):
    """The control: each crafted program is one that plain torch.export.load unpickles (the sentinel appears)."""
    import torch.ao.quantization.fx._decomposed  # registers the q/dq ops the graph names

    sentinel = tmp_path / "ran"
    ck = _craft(qat_ckpt, tmp_path / "crafted", kind, sentinel)
    with contextlib.suppress(Exception):  # the payload returns None where torch expects a tensor
        torch.export.load(str(ck / "qat_int8.pt2"))
    assert sentinel.is_dir(), f"the {kind} payload did not run through torch.export.load: the test proves nothing"


def test_genuine_qat_checkpoint_loads(qat_ckpt):
    """The uncrafted checkpoint loads through the data-only reader and computes what torch's loader gives."""
    from edgeseg.train.qat import load_qat_program

    gm, quant = load_qat_program(qat_ckpt)
    ref = torch.export.load(str(qat_ckpt / "qat_int8.pt2")).module()
    x = torch.randn(3, 3, *HW)
    assert quant["target"] == "onnx"
    assert torch.equal(gm(x), ref(x))


@pytest.mark.parametrize("kind", PAYLOADS)
def test_export_refuses_a_pickle_in_the_program(qat_ckpt, tmp_path, capsys, kind):
    sentinel = tmp_path / "ran"
    ck = _craft(qat_ckpt, tmp_path / "crafted", kind, sentinel)
    rc, err = _export(ck, tmp_path / "out", capsys)
    assert rc == 1, err
    assert len(err) == 1 and err[0].startswith("edgeseg: error: ") and "refused" in err[0], err
    assert "qat_int8.pt2" in err[0] and "pickle" in err[0], err
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()


def test_export_refusal_in_a_fresh_process(qat_ckpt, tmp_path):
    """The same through `python -m edgeseg`: exit 1, one line on stderr, the payload never ran."""
    from edgeseg.checkpoint import load_spec, save_checkpoint
    from edgeseg.models import create_model

    sentinel = tmp_path / "ran"
    ck = _craft(qat_ckpt, tmp_path / "crafted", "sample_inputs", sentinel)
    # a fresh process knows only edgeseg's own models: the float half becomes test_segnext's, so that loading
    # gets as far as the program
    spec = load_spec(ck)
    program = (ck / "qat_int8.pt2").read_bytes()
    spec = dataclasses.replace(spec, model="test_segnext")
    save_checkpoint(ck, create_model("test_segnext", num_classes=4), spec, force=True,
                    extra={"qat_int8.pt2": lambda tmp: tmp.write_bytes(program)})
    proc = subprocess.run([sys.executable, "-m", "edgeseg", "export", "--checkpoint", str(ck), "--target", "onnx",
                           "--precision", "int8", "--out", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(err) == 1 and err[0].startswith("edgeseg: error: "), proc.stderr
    assert "data/sample_inputs/model.pt is a pickle" in err[0], proc.stderr
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("program,why", [("../elsewhere.pt2", "'..'"), ("ABSOLUTE", "absolute"),
                                         ("sub/../../elsewhere.pt2", "'..'"), (5, "not a file path"),
                                         ("qat\nint8.pt2", "not a file path")])
def test_program_path_outside_the_checkpoint_is_refused(qat_ckpt, tmp_path, capsys, program, why):
    ck = tmp_path / "ck"
    shutil.copytree(qat_ckpt, ck)
    (tmp_path / "elsewhere.pt2").write_bytes((ck / "qat_int8.pt2").read_bytes())  # a real program, outside
    spec = json.loads((ck / "model.json").read_text())
    # the escaping ones name a real program outside the folder, which the loader used to open
    spec["quant"]["program"] = str(tmp_path / "elsewhere.pt2") if program == "ABSOLUTE" else program
    (ck / "model.json").write_text(json.dumps(spec))
    rc, err = _export(ck, tmp_path / "out", capsys)
    assert rc == 1, err
    assert len(err) == 1 and "model.json" in err[0] and "quant.program" in err[0] and why in err[0], err
    assert not (tmp_path / "out").exists()


def test_program_symlink_out_of_the_checkpoint_is_refused(qat_ckpt, tmp_path):
    from edgeseg.errors import ArtifactError
    from edgeseg.train.qat import load_qat_program

    ck = tmp_path / "ck"
    shutil.copytree(qat_ckpt, ck)
    (ck / "qat_int8.pt2").rename(tmp_path / "elsewhere.pt2")
    (ck / "qat_int8.pt2").symlink_to(tmp_path / "elsewhere.pt2")
    with pytest.raises(ArtifactError, match=r"model\.json: quant\.program 'qat_int8\.pt2' resolves outside"):
        load_qat_program(ck)


def test_qat_checkpoint_is_not_overwritten_without_force(qat_ckpt, tmp_path):
    from edgeseg.checkpoint import load_spec
    from edgeseg.errors import UsageError
    from edgeseg.models import create_model
    from edgeseg.train.qat import load_program_data_only, save_qat_checkpoint

    ck = tmp_path / "ck"
    shutil.copytree(qat_ckpt, ck)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    ep = load_program_data_only(ck / "qat_int8.pt2")
    with pytest.raises(UsageError, match="exists"):
        save_qat_checkpoint(ck, create_model(MODEL, num_classes=4), load_spec(ck), ep)
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    save_qat_checkpoint(ck, create_model(MODEL, num_classes=4), load_spec(ck), ep, force=True)
    assert sorted(p.name for p in ck.iterdir()) == sorted(before)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary left beside it
