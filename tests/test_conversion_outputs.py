"""What a conversion writes and where (issue 19): the mask token exactly when the source has one (item 3), the source's
own preprocessing or the satellite statistics (item 2), one-line refusals of places it must not write (item 14) and
of export file names that would lie about their format (item 20)."""

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import randomize_
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model

from vitreg.cli import main
from vitreg.conversion import (
    OFFICIAL_ARCHITECTURES,
    convert,
    export_official,
    official_config,
    random_dinov3_state_dict,
    random_official_state_dict,
    read_source,
    write_random_checkpoint,
    write_random_dinov3_checkpoint,
)
from vitreg.conversion.dinov3 import dinov3_config
from vitreg.model_cards.registry import DINOV3_BACKBONES

TINY = dict(hidden_size=64, num_hidden_layers=1)
# DINOv3's README (facebookresearch/dinov3, "Image transforms"): the SAT-493M weights' normalisation.
SATELLITE_MEAN, SATELLITE_STD = [0.430, 0.411, 0.296], [0.213, 0.156, 0.143]
IMAGENET_MEAN = [0.485, 0.456, 0.406]


def one_line_error(capsys) -> str:
    """The command's error, which must be one line and no traceback (its notes may come before it; call
    `capsys.readouterr()` before the command)."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("vitreg convert: error: ") and "Traceback" not in err, err
    return lines[0]


# --- Item 3: the mask token -----------------------------------------------------------------------------------------


def test_official_configs_carry_the_mask_token_their_checkpoints_hold():
    # The checkpoints always hold one: the configs must say so whatever ViTRegConfig's default is.
    assert all(official_config(arch).use_mask_token for arch in OFFICIAL_ARCHITECTURES.values())
    assert all(dinov3_config(name).use_mask_token for name in DINOV3_BACKBONES)


def sources_with_and_without_a_mask_token(tmp_path: Path) -> dict[str, tuple[Path, bool]]:
    """name -> (a checkpoint of that layout, whether it holds a mask token)."""
    dinov2 = random_official_state_dict("dinov2_vits14_reg4", **TINY)
    torch.save({"teacher": {f"backbone.{key}": value for key, value in dinov2.items()}}, tmp_path / "train.pth")
    hf = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=28))
    hf.save_pretrained(tmp_path / "transformers")
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    dinov3_hf = DINOv3ViTModel(
        DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1)
    )
    dinov3_hf.save_pretrained(tmp_path / "dinov3-transformers")
    vit = timm.create_model("vit_small_patch14_reg4_dinov2", embed_dim=64, depth=1, num_heads=1, img_size=28)
    torch.save(vit.state_dict(), tmp_path / "timm.pth")
    return {
        "official DINOv2": (write_random_checkpoint(tmp_path / "dinov2.pth", **TINY), True),
        "DINOv2 training": (tmp_path / "train.pth", True),
        "official DINOv3": (write_random_dinov3_checkpoint(tmp_path / "dinov3.pth", **TINY), True),
        "transformers Dinov2": (tmp_path / "transformers", True),
        "transformers DINOv3ViT": (tmp_path / "dinov3-transformers", True),
        "timm": (tmp_path / "timm.pth", False),
    }


def test_every_converter_keeps_a_mask_token_exactly_when_the_source_has_one(tmp_path):
    for name, (source, has_mask_token) in sources_with_and_without_a_mask_token(tmp_path).items():
        conversion, _ = read_source(source)
        assert conversion.config.use_mask_token == has_mask_token, name
        assert ("embeddings.mask_token" in conversion.state_dict) == has_mask_token, name


@pytest.mark.parametrize("layout", ["dinov2", "dinov3"])
def test_the_mask_token_exports_back_unchanged(tmp_path, layout):
    if layout == "dinov2":
        state = random_official_state_dict("dinov2_vits14", **TINY)
    else:
        state = random_dinov3_state_dict("dinov3_vits16", **TINY)
    assert state["mask_token"].abs().sum() > 0
    torch.save(state, tmp_path / "source.pth")
    folder = convert(tmp_path / "source.pth", tmp_path / "out", progress=False)
    assert json.loads((folder / "config.json").read_text())["use_mask_token"] is True
    back = torch.load(export_official(folder, tmp_path / "back.pth"), weights_only=True)
    assert torch.equal(back["mask_token"], state["mask_token"])


# --- Item 2: preprocessing ------------------------------------------------------------------------------------------


def test_a_source_folder_keeps_its_own_preprocessing(tmp_path):
    from transformers import BitImageProcessor

    model = randomize_(Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=1)))
    model.save_pretrained(tmp_path / "hf")
    own = BitImageProcessor(
        size={"shortest_edge": 200}, crop_size={"height": 196, "width": 196}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    own.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert written["crop_size"] == {"height": 196, "width": 196} and written["size"] == {"shortest_edge": 200}
    assert written["image_mean"] == [0.5] * 3 and written["image_std"] == [0.25] * 3


@pytest.mark.parametrize(
    "file_name, mean, std",
    [
        ("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", SATELLITE_MEAN, SATELLITE_STD),
        ("dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", IMAGENET_MEAN, [0.229, 0.224, 0.225]),
    ],
)
def test_satellite_weights_get_the_satellite_statistics(tmp_path, file_name, mean, std):
    source = write_random_dinov3_checkpoint(tmp_path / file_name, "dinov3_vitl16", **TINY)
    convert(source, tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert written["image_mean"] == pytest.approx(mean) and written["image_std"] == pytest.approx(std)
    assert not written.get("do_center_crop")  # DINOv3's whole-image resize


# --- Item 14: places a conversion must not write --------------------------------------------------------------------


def read_only_folder() -> Path:
    """A folder nobody may create files in, root included (sysfs); skips where there is none."""
    folder = Path("/sys")
    probe = folder / "vitreg-write-probe"
    try:
        probe.mkdir()
    except OSError:
        return folder
    probe.rmdir()
    pytest.skip("no read-only folder on this machine")


def test_a_read_only_location_is_one_line(tmp_path, capsys):
    source = write_random_checkpoint(tmp_path / "src.pth", **TINY)
    folder = read_only_folder()
    capsys.readouterr()
    assert main(["convert", str(source), str(folder / "vitreg-out"), "--no-progress"]) == 1
    assert "cannot" in one_line_error(capsys)
    convert(source, tmp_path / "out", progress=False)
    capsys.readouterr()
    for layout in ("dinov2", "official"):
        assert main(["convert", "--to", layout, str(tmp_path / "out"), str(folder / "back.pth")]) == 1
        assert "cannot" in one_line_error(capsys)


def test_the_working_folder_and_a_folder_holding_the_source_are_refused(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    source = write_random_checkpoint(work / "src.pth", **TINY)
    monkeypatch.chdir(work)
    for output in (".", "..", str(work)):
        assert main(["convert", "src.pth", output, "--overwrite", "--no-progress"]) == 1, output
        assert "working folder" in one_line_error(capsys)
    # A vitreg output folder that now holds the source checkpoint is not replaced by its own conversion.
    monkeypatch.chdir(tmp_path)
    convert(source, tmp_path / "out", progress=False)
    inner = tmp_path / "out" / "src.pth"
    inner.write_bytes(source.read_bytes())
    capsys.readouterr()
    assert main(["convert", str(inner), str(tmp_path / "out"), "--overwrite", "--no-progress"]) == 1
    assert "holds the input" in one_line_error(capsys)
    assert inner.is_file() and source.is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "work"]  # no .*.old-* or .*.tmp-* left
    assert sorted(path.name for path in work.iterdir()) == ["src.pth"]


# --- Item 20: export file names -------------------------------------------------------------------------------------


def test_export_refuses_a_suffix_that_is_not_a_state_dict_and_writes_safetensors(tmp_path, capsys):
    source = write_random_checkpoint(tmp_path / "src.pth", **TINY)
    folder = convert(source, tmp_path / "out", progress=False)
    capsys.readouterr()
    for name in ("weights.onnx", "weights.bin", "weights"):
        assert main(["convert", "--to", "dinov2", str(folder), str(tmp_path / name)]) == 1, name
        assert ".pth or .pt" in one_line_error(capsys)
        assert not (tmp_path / name).exists()
    assert main(["convert", "--to", "dinov2", str(folder), str(tmp_path / "back.safetensors")]) == 0
    assert main(["convert", "--to", "dinov2", str(folder), str(tmp_path / "back.pt")]) == 0
    pickled, safe = torch.load(tmp_path / "back.pt", weights_only=True), load_file(tmp_path / "back.safetensors")
    original = torch.load(source, weights_only=True)
    assert set(safe) == set(pickled) == set(original)
    assert all(torch.equal(safe[key], original[key]) and torch.equal(pickled[key], original[key]) for key in original)
