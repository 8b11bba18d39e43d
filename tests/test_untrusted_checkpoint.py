"""A downloaded QAT checkpoint is data: safetensors and JSON only, rebuilt from the registered model; nothing it holds
reaches a deserializer that can run code, and no path in model.json reaches outside the checkpoint folder.

The older format (a `torch.export.save` archive) is refused before it is read: the crafted archives below carry a
payload that creates a directory (the sentinel) where torch 2.13's `torch.export.load` runs it (a pickle it
unpickles, or a symbolic shape expression its deserializer hands to `sympy.sympify`, which evaluates Python);
`test_torch_loader_would_run_the_payload` shows that each one does run through torch's own loader, so the refusal
tested after it is not the refusal of a malformed archive.
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
HW = (32, 32)  # QAT prepares the export form, which needs multiples of 32
PAYLOADS = ("sympify", "sample_inputs", "weight")


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


def _spec(quant: dict):
    from edgeseg.types import ModelSpec

    return ModelSpec(model=MODEL, num_classes=4, class_names=("a", "b", "c", "d"),
                     palette=((0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3)), ignore_index=255, input_hw=HW,
                     quant=quant)


@pytest.fixture(scope="module")
def qat_made(tmp_path_factory):
    """A real QAT checkpoint (prepare_qat -> init_observers, ONNX scheme) written by save_qat_checkpoint, and the
    program convert_qat makes of the same prepared graph (what the checkpoint must rebuild)."""
    from edgeseg.models import create_model
    from edgeseg.quant.policy import FloatPolicy
    from edgeseg.train.qat import QAT_TARGETS, convert_qat, init_observers, prepare_qat, save_qat_checkpoint

    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=4)
    prepared = prepare_qat(model, "onnx", HW, FloatPolicy({}))
    init_observers(prepared, [torch.randn(1, 3, *HW) for _ in range(2)])
    ep = convert_qat(prepared, HW)
    quant = {"target": "onnx", "scheme": QAT_TARGETS["onnx"][1], "quantizer": QAT_TARGETS["onnx"][0],
             "per_channel_weights": True, "bn_stats_frozen": True, "float_modules": {}, "input_hw": list(HW),
             "export_form": {"sampler": "gather"},
             "output_stride": 2}
    ck = save_qat_checkpoint(tmp_path_factory.mktemp("ck") / "qat", model, _spec(quant), prepared)
    return ck, ep


@pytest.fixture
def qat_ckpt(qat_made, tmp_path) -> Path:
    """A copy of the QAT checkpoint that a test may tamper with."""
    shutil.copytree(qat_made[0], tmp_path / "ck")
    return tmp_path / "ck"


@pytest.fixture(scope="module")
def legacy_ckpt(qat_made, tmp_path_factory) -> Path:
    """The same QAT checkpoint in the older format: the converted program as a torch.export.save archive."""
    from edgeseg.checkpoint import load_checkpoint, load_spec, save_checkpoint

    ck, ep = qat_made
    spec = load_spec(ck)
    quant = {k: v for k, v in spec.quant.items() if k not in ("format", "params", "fake_quants")}
    quant["program"] = "qat_int8.pt2"
    return save_checkpoint(tmp_path_factory.mktemp("legacy") / "qat", load_checkpoint(ck)[0],
                           dataclasses.replace(spec, quant=quant),
                           extra={"qat_int8.pt2": lambda tmp: torch.export.save(ep, str(tmp))})


def _craft(src: Path, dst: Path, kind: str, sentinel: Path) -> Path:
    """Copy the older-format checkpoint `src` to `dst` with a payload in its program where torch's loader runs it."""
    shutil.copytree(src, dst)
    prog = dst / "qat_int8.pt2"
    with zipfile.ZipFile(prog) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    root = next(n for n in entries if n.endswith("/archive_format"))[:-len("archive_format")]
    if kind == "sympify":  # a symbolic size whose expression the deserializer hands to sympy.sympify
        name = root + "models/model.json"
        text = entries[name].decode()
        start = text.index('"expr_str": "') + len('"expr_str": "')
        expr = json.loads('"' + text[start:text.index('"', start)] + '"')
        evil = f"{expr} if __import__('os').mkdir({str(sentinel)!r}) else {expr}"
        entries[name] = (text[:start] + json.dumps(evil)[1:-1] + text[text.index('"', start):]).encode()
    elif kind == "sample_inputs":  # torch.load(weights_only=True) refuses it, then torch retries with False
        entries[root + "data/sample_inputs/model.pt"] = _torch_save_bytes(Payload(sentinel))
    elif kind == "weight":  # a payload config entry marked use_pickle: torch.load(weights_only=False)
        cfg_name = root + "data/weights/model_weights_config.json"
        cfg = json.loads(entries[cfg_name])
        meta = next(iter(cfg["config"].values()))
        meta["use_pickle"] = True
        entries[root + "data/weights/" + meta["path_name"]] = _torch_save_bytes(Payload(sentinel))
        entries[cfg_name] = json.dumps(cfg).encode()
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


def test_genuine_qat_checkpoint_rebuilds_the_converted_program(qat_made):
    """The checkpoint holds no program, only data; the rebuilt int8 graph computes exactly what convert_qat made of
    the prepared graph at the end of training (dynamic batch included)."""
    from edgeseg.train.qat import load_qat_program

    ck, ep = qat_made
    assert sorted(p.name for p in ck.iterdir()) == ["model.json", "model.safetensors", "qat_params.safetensors"]
    gm, quant = load_qat_program(ck)
    x = torch.randn(3, 3, *HW)
    assert quant["target"] == "onnx" and quant["format"] == "edgeseg-qat/2"
    assert torch.equal(gm(x), ep.module()(x))


@pytest.mark.parametrize("kind", PAYLOADS)
def test_torch_loader_would_run_the_payload(legacy_ckpt, tmp_path, kind):
    """The control: each crafted older-format program is one that plain torch.export.load runs (the sentinel
    appears)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers the q/dq ops the graph names

    sentinel = tmp_path / "ran"
    ck = _craft(legacy_ckpt, tmp_path / "crafted", kind, sentinel)
    with contextlib.suppress(Exception):  # the payload returns None where torch expects a tensor
        torch.export.load(str(ck / "qat_int8.pt2"))
    assert sentinel.is_dir(), f"the {kind} payload did not run through torch.export.load: the test proves nothing"


@pytest.mark.parametrize("kind", PAYLOADS)
def test_export_refuses_the_older_format_before_reading_it(legacy_ckpt, tmp_path, capsys, kind):
    sentinel = tmp_path / "ran"
    ck = _craft(legacy_ckpt, tmp_path / "crafted", kind, sentinel)
    rc, err = _export(ck, tmp_path / "out", capsys)
    assert rc == 1, err
    assert len(err) == 1 and err[0].startswith("edgeseg: error: ") and "older format" in err[0], err
    assert "edgeseg qat --checkpoint" in err[0] and "model.json" in err[0], err
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()


def test_export_refusal_in_a_fresh_process(legacy_ckpt, tmp_path):
    """The same through `python -m edgeseg`: exit 1, one line on stderr, the sympify payload never ran."""
    from edgeseg.checkpoint import load_spec, save_checkpoint
    from edgeseg.models import create_model

    sentinel = tmp_path / "ran"
    ck = _craft(legacy_ckpt, tmp_path / "crafted", "sympify", sentinel)
    # a fresh process knows only edgeseg's own models: the float half becomes test_segnext's, so that loading
    # gets as far as the QAT record
    program = (ck / "qat_int8.pt2").read_bytes()
    spec = dataclasses.replace(load_spec(ck), model="test_segnext")
    save_checkpoint(ck, create_model("test_segnext", num_classes=4), spec, force=True,
                    extra={"qat_int8.pt2": lambda tmp: tmp.write_bytes(program)})
    proc = subprocess.run([sys.executable, "-m", "edgeseg", "export", "--checkpoint", str(ck), "--target", "onnx",
                           "--precision", "int8", "--out", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(err) == 1 and err[0].startswith("edgeseg: error: ") and "older format" in err[0], proc.stderr
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()


def _edit_params(ck: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(ck / "qat_params.safetensors"))
    edit(state)
    save_file(state, str(ck / "qat_params.safetensors"))


def _edit_quant(ck: Path, edit) -> None:
    spec = json.loads((ck / "model.json").read_text())
    edit(spec["quant"])
    (ck / "model.json").write_text(json.dumps(spec))


def _first_scale(state: dict) -> str:
    return next(k for k in sorted(state) if k.endswith(".scale"))


@pytest.mark.parametrize("tamper,why", [
    (lambda ck, s: (ck / "qat_params.safetensors").write_bytes(_torch_save_bytes(Payload(s))),
     "not a safetensors file"),
    (lambda ck, s: _edit_params(ck, lambda st: st[_first_scale(st)].fill_(float("nan"))), "non-finite"),
    (lambda ck, s: _edit_params(ck, lambda st: st[_first_scale(st)].fill_(-1.0)), "scale <= 0"),
    (lambda ck, s: _edit_params(ck, lambda st: st.pop(_first_scale(st))), "is missing here"),
    (lambda ck, s: _edit_params(ck, lambda st: st.update(planted=torch.zeros(3))), "planted is (3,) here"),
    (lambda ck, s: _edit_quant(ck, lambda q: q["fake_quants"].update({next(iter(q["fake_quants"])): "x_1"})),
     "rebuilt here differs"),
    (lambda ck, s: _edit_quant(ck, lambda q: q.update(format="edgeseg-qat/9")), "quant.format"),
    (lambda ck, s: _edit_quant(ck, lambda q: q.update(target="nope")), "quant.target"),
    (lambda ck, s: _edit_quant(ck, lambda q: q.update(input_hw=[16, -16])), "quant.input_hw"),
    (lambda ck, s: _edit_quant(ck, lambda q: q.update(float_modules={"__import__('os')": "x"})),
     "quant.float_modules"),
    (lambda ck, s: _edit_quant(ck, lambda q: q.update(export_form={"carafe": "x; __import__('os')"})),
     "quant.export_form"),
], ids=["pickle-as-params", "nan-scale", "negative-scale", "missing-key", "extra-key", "node-map", "format",
        "target", "input_hw", "float_modules", "export_form"])
def test_a_tampered_qat_checkpoint_is_refused_in_one_line(qat_ckpt, tmp_path, capsys, tamper, why):
    sentinel = tmp_path / "ran"
    tamper(qat_ckpt, sentinel)
    rc, err = _export(qat_ckpt, tmp_path / "out", capsys)
    assert rc in (1, 2), err
    assert len(err) == 1 and err[0].startswith("edgeseg: error: ") and why in err[0], err
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("params,why", [("../elsewhere.safetensors", "'..'"), ("ABSOLUTE", "absolute"),
                                        ("sub/../../elsewhere.safetensors", "'..'"), (5, "not a file path"),
                                        ("qat\nparams", "not a file path")])
def test_params_path_outside_the_checkpoint_is_refused(qat_ckpt, tmp_path, capsys, params, why):
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((qat_ckpt / "qat_params.safetensors").read_bytes())  # real params, outside
    _edit_quant(qat_ckpt, lambda q: q.update(params=str(outside) if params == "ABSOLUTE" else params))
    rc, err = _export(qat_ckpt, tmp_path / "out", capsys)
    assert rc == 1, err
    assert len(err) == 1 and "model.json" in err[0] and "quant.params" in err[0] and why in err[0], err
    assert not (tmp_path / "out").exists()


def test_params_symlink_out_of_the_checkpoint_is_refused(qat_ckpt, tmp_path):
    from edgeseg.errors import ArtifactError
    from edgeseg.train.qat import load_qat_program

    (qat_ckpt / "qat_params.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (qat_ckpt / "qat_params.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ArtifactError, match=r"model\.json: quant\.params 'qat_params\.safetensors' resolves outside"):
        load_qat_program(qat_ckpt)


def test_qat_checkpoint_is_not_overwritten_without_force(qat_made, tmp_path):
    from edgeseg.checkpoint import load_spec
    from edgeseg.errors import UsageError
    from edgeseg.models import create_model
    from edgeseg.quant.policy import FloatPolicy
    from edgeseg.train.qat import prepare_qat, save_qat_checkpoint

    ck = tmp_path / "ck"
    shutil.copytree(qat_made[0], ck)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    model = create_model(MODEL, num_classes=4)
    prepared = prepare_qat(model, "onnx", HW, FloatPolicy({}))
    with pytest.raises(UsageError, match="exists"):
        save_qat_checkpoint(ck, model, load_spec(ck), prepared)
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    save_qat_checkpoint(ck, model, load_spec(ck), prepared, force=True)
    assert sorted(p.name for p in ck.iterdir()) == sorted(before)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary left beside it


def test_resume_state_is_data_only_and_a_crafted_one_is_refused(tmp_path, capsys):
    """The training resume point is a safetensors file with a JSON structure (edgeseg.datatree): it round-trips
    what a run saves (int dict keys, tuples, non-finite floats, tensors) and loading builds nothing else; a pickle
    under its name, a tampered structure, and the older torch.save resume file are refused in one line without
    running anything."""
    from edgeseg.cli import main
    from edgeseg.datatree import load_tree, save_tree
    from edgeseg.errors import ArtifactError
    from edgeseg.train.state import LEGACY_STATE_FILE, STATE_FILE

    state = {"format": "edgeseg-train-state", "step": 3, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]}, "best": float("-inf"),
             "rng": [{"torch": torch.arange(5, dtype=torch.uint8)}], "none": None}
    save_tree(tmp_path / "s.safetensors", state)
    back = load_tree(tmp_path / "s.safetensors")
    assert back["optimizer"]["state"][0]["exp_avg"].tolist() == [1.0, 1.0]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999) and back["best"] == float("-inf")
    assert back["rng"][0]["torch"].dtype == torch.uint8 and back["none"] is None and back["step"] == 3
    with pytest.raises(TypeError, match="Payload is not data"):
        save_tree(tmp_path / "x.safetensors", {"x": Payload(tmp_path / "ran")})
    sentinel = tmp_path / "ran"
    (tmp_path / "p.safetensors").write_bytes(_torch_save_bytes({"x": Payload(sentinel)}))
    with pytest.raises(ArtifactError, match="not an edgeseg data file"):
        load_tree(tmp_path / "p.safetensors")
    from safetensors.torch import save_file
    save_file({"t0": torch.zeros(1)}, str(tmp_path / "odd.safetensors"),
              metadata={"edgeseg-tree": json.dumps({"$obj": "os.system"})})
    with pytest.raises(ArtifactError, match="unknown node"):
        load_tree(tmp_path / "odd.safetensors")
    run = tmp_path / "run"  # a run folder holding only the older pickle resume file
    run.mkdir()
    (run / LEGACY_STATE_FILE).write_bytes(_torch_save_bytes({"x": Payload(sentinel)}))
    (tmp_path / "data").mkdir()
    rc = main(["train", "--model", MODEL, "--data", str(tmp_path / "data"), "--out", str(run), "--resume",
               "--iters", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "older resume format" in err[0], err
    assert not sentinel.exists() and STATE_FILE != LEGACY_STATE_FILE
