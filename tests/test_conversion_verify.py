"""`convert --verify` checks a conversion against the source itself (issue 19, item 16): a guessed head count is said,
a timm folder's own architecture (its config.json) gives the heads and the reference, the tolerance is relative to
the tokens' scale, a failure names the worst size and leaves no folder behind."""

import json
import re

import pytest
import timm
import torch
from conftest import randomize_
from safetensors.torch import save_file

import vitreg.conversion.converter as converter
from vitreg.cli import main
from vitreg.conversion import convert, random_official_state_dict
from vitreg.core.provenance import Provenance

GUESS = "guessed num_attention_heads=3 from width 192 (DINOv2's width/64); pass --num-heads if wrong"


def six_head_vit() -> torch.nn.Module:
    """A timm ViT of width 192 with 6 heads (head dimension 32): width / 64 would say 3."""
    model = timm.create_model("vit_tiny_patch16_224", num_heads=6, depth=2, img_size=64, num_classes=0)
    return randomize_(model)


@pytest.fixture
def timm_folder(tmp_path):
    """The six-head ViT as timm saves it for the Hub: weights and a config.json naming the architecture and args."""
    model = six_head_vit()
    timm.models.save_for_hf(model, tmp_path / "timm", safe_serialization=True)
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]["num_heads"] == 6
    return tmp_path / "timm", model


def test_a_timm_folder_takes_its_heads_from_its_own_architecture(timm_folder, tmp_path, capsys):
    folder, model = timm_folder
    assert main(["convert", str(folder), str(tmp_path / "out"), "--verify", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "guessed" not in err and "vit_tiny_patch16_224 as the source's config.json defines it" in err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_attention_heads"] == 6
    # A contradicting --num-heads is refused, not obeyed.
    assert main(["convert", str(folder), str(tmp_path / "other"), "--num-heads", "3"]) == 1
    assert "contradicts the source's timm architecture vit_tiny_patch16_224 (6)" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_verify_compares_with_the_source_not_the_converted_config(timm_folder, tmp_path, monkeypatch, capsys):
    # Convert as before this check existed (heads = width / 64): the reference must still be timm's six-head model.
    folder, _ = timm_folder
    monkeypatch.setattr(converter, "_timm_folder_heads", lambda source, num_heads, width: num_heads)
    assert main(["convert", str(folder), str(tmp_path / "out"), "--verify", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert GUESS in err
    assert "verification failed at " in err and "nothing was written" in err
    assert re.fullmatch(r"vitreg convert: error: verification failed at \d+x\d+: .*", err.strip().splitlines()[-1])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["timm"]  # no folder, no staging left


def test_a_bare_state_dict_says_what_was_guessed(tmp_path, capsys):
    torch.save(six_head_vit().state_dict(), tmp_path / "vit.pth")
    assert main(["convert", str(tmp_path / "vit.pth"), str(tmp_path / "out"), "--verify", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert GUESS in err and "goes unchecked" in err  # the reference shares the guess: --verify says it cannot help
    assert main(["convert", str(tmp_path / "vit.pth"), str(tmp_path / "six"), "--num-heads", "6", "--no-progress"]) == 0
    assert "guessed" not in capsys.readouterr().err
    assert json.loads((tmp_path / "six" / "config.json").read_text())["num_attention_heads"] == 6


def test_the_tolerance_is_relative_to_the_tokens(tmp_path):
    # Large tokens (a final norm scaled by 1e4) turn float rounding into absolute differences far above 1e-5 in an
    # exact conversion; relative to the tokens they stay at rounding level.
    state = random_official_state_dict("dinov2_vits14_reg4", hidden_size=64, num_hidden_layers=2)
    state["norm.weight"] = state["norm.weight"] * 1e4
    torch.save(state, tmp_path / "large.pth")
    out = convert(tmp_path / "large.pth", tmp_path / "out", verify=True, progress=False)
    parity = Provenance.load(out).parity
    assert parity.reference == "timm" and 1e-5 < parity.max_abs_diff < 1e4 * 1e-4


def test_a_failed_verify_keeps_the_previous_folder(tmp_path, monkeypatch, capsys):
    state = random_official_state_dict("dinov2_vits14_reg4", hidden_size=64, num_hidden_layers=1)
    save_file(state, tmp_path / "model.safetensors")
    out = convert(tmp_path / "model.safetensors", tmp_path / "out", progress=False)
    before = sorted(path.name for path in out.iterdir())
    real_reference = converter.timm_reference

    def nudged_reference(*args):
        reference = real_reference(*args)
        with torch.no_grad():
            reference.blocks[0].mlp.fc2.bias.add_(0.1)
        return reference

    monkeypatch.setattr(converter, "timm_reference", nudged_reference)
    arguments = ["convert", str(tmp_path / "model.safetensors"), str(out), "--overwrite", "--verify", "--no-progress"]
    assert main(arguments) == 1
    assert "verification failed" in capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == before and "parity" not in Provenance.load(out).to_dict()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.safetensors", "out"]
