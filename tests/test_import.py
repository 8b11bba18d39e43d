"""`edgeseg import`: official mmseg checkpoints load strictly; code-carrying pickles and truncated files are refused."""
from __future__ import annotations

import os

import pytest
import torch

from edgeseg.cli import main

PARITY = "offseg_t_k150.state_dict.pt"


def _need_model(name: str):
    from edgeseg.models import list_models

    if name not in list_models():
        pytest.fail(f"model {name} is not registered; edgeseg.models must provide it")


@pytest.fixture(scope="module")
def official(parity_dir):
    p = parity_dir / PARITY
    if not p.is_file():
        pytest.skip(f"{p} not present")
    return p


def test_import_official_offseg_t(official, parity_dir, tmp_path, capsys):
    """The official OffSeg-T state dict, wrapped as mmseg saves it (meta + state_dict + data_preprocessor
    entries), imports strictly and gives the reference logits."""
    _need_model("offseg_t")
    sd = torch.load(official, weights_only=True)
    wrapped = {"meta": {"mmseg_version": "1.2.2", "epoch": 0},
               "state_dict": {**sd, "data_preprocessor.mean": torch.zeros(3, 1, 1),
                              "data_preprocessor.std": torch.ones(3, 1, 1)}}
    src = tmp_path / "offseg-t_ade20k.pth"
    torch.save(wrapped, src)
    out = tmp_path / "ckpt"
    assert main(["import", "--from", "offseg", str(src), "--model", "offseg_t", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "150 classes (ade20k)" in printed and "data_preprocessor.mean" in printed

    from edgeseg.checkpoint import load_checkpoint

    model, spec = load_checkpoint(out)
    assert spec.num_classes == 150 and spec.class_names[0] == "wall" and spec.class_names[-1] == "flag"
    assert spec.model == "offseg_t" and tuple(spec.input_hw) == (512, 512) and spec.ignore_index == 255
    assert spec.provenance["dropped_keys"] == ["data_preprocessor.mean", "data_preprocessor.std"]
    # the imported weights are exactly the official ones
    w = model.state_dict()
    assert all(torch.equal(w[k].float(), v.float()) for k, v in sd.items())
    x = torch.load(parity_dir / "input_512.pt", weights_only=True)
    ref = torch.load(parity_dir / "offseg_t_k150.logits.pt", weights_only=True)
    torch.set_num_threads(1)
    with torch.no_grad():
        got = model(x)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 3e-4
    # refuses to overwrite without --force; --force works
    assert main(["import", "--from", "offseg", str(src), "--model", "offseg_t", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_import_reports_missing_and_unexpected_keys(official, tmp_path, capsys):
    _need_model("offseg_t")
    sd = torch.load(official, weights_only=True)
    gone = "decode_head.align.0.weight" if "decode_head.align.0.weight" in sd else sorted(sd)[-1]
    sd.pop(gone)
    sd["decode_head.extra_thing.weight"] = torch.zeros(1)
    src = tmp_path / "bad_keys.pt"
    torch.save(sd, src)
    assert main(["import", "--from", "offseg", str(src), "--model", "offseg_t", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgeseg: error:") and "missing 1" in err and gone in err
    assert "unexpected 1" in err and "decode_head.extra_thing.weight" in err
    assert not (tmp_path / "o").exists()
    # the wrong family / class list
    assert main(["import", "--from", "segnext", str(official), "--model", "offseg_t", "--out",
                 str(tmp_path / "o")]) == 2
    assert "not a segnext variant" in capsys.readouterr().err
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    assert main(["import", "--from", "offseg", str(official), "--model", "offseg_t", "--out", str(tmp_path / "o"),
                 "--classes", str(names)]) == 2
    assert "has 2 names but the checkpoint has 150" in capsys.readouterr().err


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = _Evil()
    evil.marker = marker
    src = tmp_path / "evil.pth"
    torch.save({"state_dict": {"decode_head.conv_seg.weight": torch.zeros(150, 8, 1, 1)}, "payload": evil}, src)
    assert not marker.exists()  # saving did not run it either
    assert main(["import", "--from", "offseg", str(src), "--model", "offseg_t", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "refused to load" in err and str(src) in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_truncated_file_is_an_error(tmp_path, capsys):
    src = tmp_path / "full.pth"
    torch.save({"state_dict": {"decode_head.conv_seg.weight": torch.randn(150, 64, 1, 1)}}, src)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    assert main(["import", "--from", "offseg", str(cut), "--model", "offseg_t", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "truncated" in err and str(cut) in err
    assert main(["import", "--from", "offseg", str(tmp_path / "nope.pth"), "--model", "offseg_t", "--out",
                 str(tmp_path / "o")]) == 1
    assert "not found" in capsys.readouterr().err


# official SegNeXt checkpoints: the stored NMF bases (edgeseg-only) are filled, every official key stays strict
SEGNEXT = {  # parity file -> (model, tolerance on max |Δlogits| from shared/parity/README.md)
    "segnext_t_k150": ("segnext_t", 2e-4),
    "segnext_t_offset_k150": ("segnext_t_offset", 1e-3),
}
BASES = "decode_head.hamburger.ham.bases"


@pytest.mark.parametrize("name", sorted(SEGNEXT))
def test_import_official_segnext(parity_dir, name, tmp_path, capsys):
    """`edgeseg import --from segnext` on the bare official state dict: strict on the official keys, the NMF bases
    filled with the seeded draw (= the official run's draw), and the reference logits (OffSeg-T: see
    test_import_official_offseg_t)."""
    model_name, tol = SEGNEXT[name]
    _need_model(model_name)
    src = parity_dir / f"{name}.state_dict.pt"
    out = tmp_path / "ckpt"
    assert main(["import", "--from", "segnext", str(src), "--model", model_name, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "150 classes (ade20k)" in printed and f"filled edgeseg-only buffers (absent from official " \
        f"checkpoints): {BASES}" in printed

    from edgeseg.checkpoint import load_checkpoint

    model, spec = load_checkpoint(out)
    assert spec.model == model_name and spec.num_classes == 150 and spec.provenance["filled_keys"] == [BASES]
    sd = torch.load(src, weights_only=True)
    w = model.state_dict()
    assert set(w) - set(sd) == {BASES}
    assert all(torch.equal(w[k].float(), v.float()) for k, v in sd.items())
    rand = torch.load(parity_dir / f"{name}.nmf_rand.pt", weights_only=True)
    # the stored bases already are the official draw: the checkpoint alone reproduces the official run
    assert torch.equal(w[BASES], torch.nn.functional.normalize(rand, dim=1))
    model.decode_head.hamburger.ham.set_bases(rand)  # the parity protocol's injection (a no-op here)
    x = torch.load(parity_dir / "input_512.pt", weights_only=True)
    ref = torch.load(parity_dir / f"{name}.logits.pt", weights_only=True)
    torch.set_num_threads(1)
    with torch.no_grad():
        got = model(x)
    assert got.shape == ref.shape == (1, 150, 64, 64)
    diff = float((got - ref).abs().max())
    agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
    assert diff <= tol, diff
    assert agree >= 0.999, agree


@pytest.mark.parametrize("change", ["extra", "missing", "missing_hamburger"])
def test_import_segnext_still_strict(parity_dir, change, tmp_path, capsys):
    """Filling the NMF bases does not loosen anything else: one extra or one missing official key is refused with
    a one-line error naming it (and the absent bases are never reported)."""
    _need_model("segnext_t")
    sd = torch.load(parity_dir / "segnext_t_k150.state_dict.pt", weights_only=True)
    if change == "extra":
        key = "decode_head.hamburger.ham.extra_bases"
        sd[key] = torch.zeros(1, 256, 16)
        what = "unexpected 1"
    else:
        key = "decode_head.hamburger.ham_in.conv.weight" if change == "missing_hamburger" else \
            "backbone.block2.0.attn.spatial_gating_unit.conv0.weight"
        assert key in sd
        sd.pop(key)
        what = "missing 1"
    src = tmp_path / "bad.pt"
    torch.save(sd, src)
    out = tmp_path / "o"
    assert main(["import", "--from", "segnext", str(src), "--model", "segnext_t", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("edgeseg: error:")
    assert f"{what}: {key}" in err and BASES not in err
    assert not out.exists()
