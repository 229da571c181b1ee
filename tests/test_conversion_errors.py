"""Conversion safety and the CLI: one-line errors, nothing left behind, refusal of code in pickles, batch, export back
to DINOv2, dtype and sharding."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import vitreg.conversion.converter as converter
from vitreg.cli import main
from vitreg.conversion import (
    convert_batch,
    export_dinov2,
    random_head_state_dict,
    random_official_state_dict,
    write_random_checkpoint,
)

TINY = dict(hidden_size=64, num_hidden_layers=1)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write_random_checkpoint(tmp_path / "src" / "dinov2_vits14_reg4_pretrain.pth", **TINY)


class Payload:
    """A pickle that would create a marker file when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def broken_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words the one-line error must contain)."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    good = write_random_checkpoint(src / "good.pth", **TINY)
    data = good.read_bytes()
    (src / "truncated.pth").write_bytes(data[: len(data) // 2])
    (src / "garbage.pth").write_bytes(bytes(range(256)) * 64)
    (src / "notes.pth").write_text("these are my notes, not weights\n")
    (src / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    torch.save(
        {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "fc.weight": torch.zeros(10, 64)},
        src / "resnet.pth",
    )
    state = random_official_state_dict("dinov2_vits14_reg4", **TINY)
    torch.save({**state, "blocks.0.attn.qkv.weight": torch.zeros(100, 64)}, src / "wrong_shape.pth")
    torch.save({key: value for key, value in state.items() if key != "blocks.0.norm1.weight"}, src / "missing.pth")
    torch.save({**state, "blocks.0.attn.extra.weight": torch.zeros(3)}, src / "unknown.pth")
    return {
        "missing file": (src / "absent.pth", "no such file"),
        "truncated": (src / "truncated.pth", "truncated or corrupt"),
        "garbage": (src / "garbage.pth", "garbage.pth"),
        "text": (src / "notes.pth", "text file"),
        "broken safetensors": (src / "broken.safetensors", "safetensors"),
        "resnet": (src / "resnet.pth", "not a Vision Transformer"),
        "wrong shape": (src / "wrong_shape.pth", "blocks.0.attn.qkv.weight: shape [100, 64], expected [192, 64]"),
        "missing key": (src / "missing.pth", "missing keys"),
        "unknown key": (src / "unknown.pth", "unknown keys"),
    }


def test_bad_inputs_give_one_line_and_leave_nothing(tmp_path, capsys):
    for name, (path, words) in broken_inputs(tmp_path).items():
        out = tmp_path / "out" / "model"
        assert main(["convert", str(path), str(out)]) == 1, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert words in err, (name, err)
        assert not out.exists() and not any((tmp_path / "out").glob("*")), name


def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "marker"
    torch.save({"cls_token": torch.zeros(1, 1, 64), "payload": Payload(marker)}, tmp_path / "evil.pth")
    assert main(["convert", str(tmp_path / "evil.pth"), str(tmp_path / "out")]) == 1
    assert "refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_in_a_subprocess_prints_one_line(tmp_path):
    (tmp_path / "notes.pth").write_text("hello\n")
    result = subprocess.run(
        [sys.executable, "-m", "vitreg", "convert", str(tmp_path / "notes.pth"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "vitreg convert: error: notes.pth: a text file, not a checkpoint"


def test_non_empty_output_is_refused_and_untouched(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["convert", str(checkpoint), str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    # A folder vitreg did not write is not replaced even with --overwrite.
    assert main(["convert", str(checkpoint), str(out), "--overwrite", "--no-progress"]) == 1
    assert "did not write" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    (out / "mine.txt").unlink()
    assert main(["convert", str(checkpoint), str(out), "--no-progress"]) == 0
    (out / "model.safetensors").write_bytes(b"stale")
    assert main(["convert", str(checkpoint), str(out), "--overwrite", "--no-progress"]) == 0  # its own output
    assert (out / "model.safetensors").read_bytes() != b"stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary or .old- folder left


def test_folder_contents_provenance_and_verify(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(checkpoint), str(out), "--verify", "--no-progress"]) == 0
    assert "verify: max abs difference" in capsys.readouterr().err  # logged, and shown by the command
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vitreg" and "AutoModel" in config["auto_map"]
    assert (out / "modeling_vitreg.py").exists() and (out / "configuration_vitreg.py").exists()
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 224, "width": 224} and processor["image_mean"] == [0.485, 0.456, 0.406]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["source_format"] == "dinov2-hub" and provenance["kind"] == "converted"
    assert provenance["source_sha256"] == converter.sha256(checkpoint, progress=False)
    assert provenance["parity"]["reference"] == "timm" and provenance["parity"]["max_abs_diff"] <= 1e-5
    assert "official_name" not in provenance  # a shrunk model is no official one
    assert (out / "README.md").read_text().startswith("---")


def test_dtype_and_sharding(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(converter, "MAX_SHARD_SIZE", "100KB")
    out = converter.convert(checkpoint, tmp_path / "out", dtype="bfloat16", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    with safe_open(out / shards[0], "pt") as shard:
        assert all(shard.get_tensor(key).dtype == torch.bfloat16 for key in shard.keys())
    source = torch.load(checkpoint, weights_only=True)
    exported = export_dinov2(out, tmp_path / "back.pth")
    back = torch.load(exported, weights_only=True)
    assert torch.equal(back["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"].bfloat16())


@pytest.mark.parametrize("name", ["dinov2_vitg14", "dinov2_vits14_reg4"])
def test_export_round_trip_is_exact(tmp_path, name):
    source = write_random_checkpoint(tmp_path / "src.pth", name, **TINY)
    folder = converter.convert(source, tmp_path / "out", progress=False)
    assert main(["convert", "--to", "dinov2", str(folder), str(tmp_path / "back.pth")]) == 0
    original, back = torch.load(source, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == list(original)  # the official key order, loadable strictly
    assert all(torch.equal(back[key], original[key]) for key in original)


def test_export_of_timm_layout_unfolds_the_cls_position(tmp_path):
    import timm

    model = timm.create_model("vit_small_patch14_reg4_dinov2", embed_dim=64, depth=1, num_heads=1, img_size=56)
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    folder = converter.convert(tmp_path / "timm.pth", tmp_path / "out", progress=False)
    back = torch.load(export_dinov2(folder, tmp_path / "back.pth"), weights_only=True)
    assert back["pos_embed"].shape == (1, 1 + 16, 64) and not back["pos_embed"][:, 0].any()
    assert torch.equal(back["cls_token"], model.cls_token) and not back["mask_token"].any()


def test_batch_names_folders_after_the_official_models(tmp_path, capsys):
    src = tmp_path / "src"
    write_random_checkpoint(src / "dinov2_vits14_reg4_pretrain.pth", "dinov2_vits14_reg4", **TINY)
    write_random_checkpoint(src / "dinov2_vitb14_pretrain.pth", "dinov2_vitb14", **TINY)
    torch.save(random_head_state_dict(64, 1), src / "dinov2_vits14_reg4_linear_head.pth")
    (src / "unrelated.pth").write_text("ignored")
    written = convert_batch(src, tmp_path / "out", progress=False)
    assert [p.name for p in written] == ["dinov2-vitb14", "dinov2-vits14-reg4", "dinov2-vits14-reg4-linear"]
    head_config = json.loads((tmp_path / "out" / "dinov2-vits14-reg4-linear" / "config.json").read_text())
    assert head_config["architectures"] == ["ViTRegForImageClassification"]
    assert len(head_config["id2label"]) == 1000
    # A second run refuses before converting anything.
    assert main(["convert", "--batch", str(src), str(tmp_path / "out")]) == 1
    assert "not empty" in capsys.readouterr().err


def test_heads_that_do_not_fit_are_refused(checkpoint, tmp_path, capsys):
    torch.save(random_head_state_dict(48, 1), tmp_path / "head.pth")
    assert main(["convert", str(checkpoint), str(tmp_path / "out"), "--head", str(tmp_path / "head.pth")]) == 1
    assert "does not fit a backbone of width 64" in capsys.readouterr().err
    torch.save(random_head_state_dict(64, 4), tmp_path / "head4.pth")  # linear4 on a 1-block backbone
    assert main(["convert", str(checkpoint), str(tmp_path / "out"), "--head", str(tmp_path / "head4.pth")]) == 1
    assert "classifier_num_layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_num_heads(checkpoint, tmp_path, capsys):
    assert main(["convert", str(checkpoint), str(tmp_path / "a"), "--num-heads", "3"]) == 1
    assert "does not divide the width 64" in capsys.readouterr().err
    assert main(["convert", str(checkpoint), str(tmp_path / "b"), "--num-heads", "4", "--no-progress"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_attention_heads"] == 4


def test_verify_fails_loudly_when_the_reference_disagrees(checkpoint, tmp_path, monkeypatch, capsys):
    real_reference = converter.timm_reference

    def nudged_reference(*args):
        reference = real_reference(*args)
        with torch.no_grad():
            reference.blocks[0].attn.proj.bias.add_(1e-2)
        return reference

    monkeypatch.setattr(converter, "timm_reference", nudged_reference)
    assert main(["convert", str(checkpoint), str(tmp_path / "out"), "--verify", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "verification failed at " in err and "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no folder, complete or partial, left behind


def test_legacy_pickle_format_and_nested_state_dict(tmp_path):
    state = random_official_state_dict("dinov2_vits14", **TINY)
    torch.save({"state_dict": state}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    out = converter.convert(tmp_path / "legacy.pth", tmp_path / "out", progress=False)
    back = torch.load(export_dinov2(out, tmp_path / "back.pth"), weights_only=True)
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_verify_a_transformers_folder_against_transformers(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        image_size=56,
        patch_size=14,
        num_register_tokens=2,
        layerscale_value=0.5,
    )
    Dinov2WithRegistersModel(config).save_pretrained(tmp_path / "hf")
    out = converter.convert(tmp_path / "hf", tmp_path / "out", verify=True, progress=False)
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["source_format"] == "transformers" and "source_sha256" not in provenance
    assert provenance["parity"]["reference"] == "transformers" and provenance["parity"]["max_abs_diff"] <= 1e-5
