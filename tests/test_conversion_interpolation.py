"""A converted transformers Dinov2 folder keeps its function at every size (issue 19, item 6): by default the
converter reproduces transformers' own position interpolation; `--interpolation dinov2` takes DINOv2's official one.

The references are transformers' `Dinov2Model` / `Dinov2WithRegistersModel` themselves (5.x: `F.interpolate` with
`size=`, bicubic, no offset, antialiased only with registers) and DINOv2's official algorithm restated below.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from transformers import AutoModel, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from vitreg.cli import main
from vitreg.conversion import convert

PATCH, GRID = 14, 8  # a 112 px native size: an 8x8 position table
# Native, downscaled square, downscaled non-square (126x98), upscaled non-square, the native count of patches in
# another shape (transformers interpolates unless height == width).
SIZES = [(112, 112), (70, 70), (126, 98), (224, 308), (56, 224)]
TOL = 1e-5


def transformers_folder(tmp_path, registers: bool):
    """A random transformers model saved as a folder, and the model itself (the reference)."""
    if registers:
        config = Dinov2WithRegistersConfig(num_register_tokens=4, **small())
        model = Dinov2WithRegistersModel(config)
    else:
        model = Dinov2Model(Dinov2Config(**small()))
    randomize_(model)
    with torch.no_grad():  # a position table with structure at every scale, so any resampling difference shows
        model.embeddings.position_embeddings.normal_(0, 1)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model.eval()


def small() -> dict:
    return dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=PATCH * GRID,
        patch_size=PATCH,
        layerscale_value=0.5,
    )


@torch.no_grad()
def token_difference(model, reference, height: int, width: int) -> float:
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height * 1000 + width))
    ours = model(pixel_values=pixels).last_hidden_state  # [B, 1 + R + HW, D]: CLS, registers, patches
    theirs = reference(pixel_values=pixels).last_hidden_state
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("registers", [False, True], ids=["Dinov2Model", "Dinov2WithRegistersModel"])
def test_converted_folder_equals_transformers_at_every_size(tmp_path, registers):
    folder, reference = transformers_folder(tmp_path, registers)
    out = convert(folder, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["interpolate_offset"] == 0 and config["interpolate_antialias"] == registers
    model = AutoModel.from_pretrained(out).eval()
    differences = {size: token_difference(model, reference, *size) for size in SIZES}
    assert max(differences.values()) <= TOL, differences


def official_interpolate_pos_encoding(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """DINOv2's `DinoVisionTransformer.interpolate_pos_encoding` without registers (facebookresearch/dinov2,
    dinov2/models/vision_transformer.py: interpolate_offset=0.1, interpolate_antialias=False), restated."""
    num_patches = pos_embed.shape[1] - 1
    grid = int(math.sqrt(num_patches))
    rows, cols = height // patch, width // patch
    if (rows, cols) == (grid, grid):
        return pos_embed
    class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    scale = (float(rows + 0.1) / grid, float(cols + 0.1) / grid)
    patch_pos = F.interpolate(
        patch_pos.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2),
        scale_factor=scale,
        mode="bicubic",
        antialias=False,
    )
    assert (rows, cols) == tuple(patch_pos.shape[-2:])
    return torch.cat((class_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def test_interpolation_dinov2_takes_the_official_algorithm(tmp_path, monkeypatch, capsys):
    folder, reference = transformers_folder(tmp_path, registers=False)
    assert main(["convert", str(folder), str(tmp_path / "out"), "--interpolation", "dinov2", "--no-progress"]) == 0
    assert "0.1-offset" in capsys.readouterr().err  # the converter says what differs from the source
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert model.config.interpolate_offset == 0.1 and not model.config.interpolate_antialias
    # transformers with DINOv2's official interpolation in place of its own: the converted folder matches it ...
    original = type(reference.embeddings).interpolate_pos_encoding

    def official(self, embeddings, height, width):
        return official_interpolate_pos_encoding(self.position_embeddings, height, width, PATCH)

    monkeypatch.setattr(type(reference.embeddings), "interpolate_pos_encoding", official)
    assert max(token_difference(model, reference, *size) for size in SIZES) <= TOL
    # ... and differs from transformers' own off the native size, which the default keeps.
    monkeypatch.setattr(type(reference.embeddings), "interpolate_pos_encoding", original)
    assert token_difference(model, reference, *SIZES[0]) <= TOL
    assert min(token_difference(model, reference, *size) for size in SIZES[1:4]) > 1e-3


def test_interpolation_flag_is_refused_with_to_and_unknown_values(tmp_path, capsys):
    assert main(["convert", "--to", "dinov2", "in", str(tmp_path / "x.pth"), "--interpolation", "dinov2"]) == 1
    assert "--to dinov2 takes only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "in", str(tmp_path / "out"), "--interpolation", "timm"])
