"""The shared layer every tool stands on: one way to open a model, one meaning per common flag, safe outputs."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from torchvision import transforms

from vitreg.conversion import write_random_checkpoint, write_random_dinov3_checkpoint
from vitreg.core import Provenance, UserError
from vitreg.core.flags import add_common_flags, parse_layers
from vitreg.core.folders import atomic_output_dir, atomic_output_file
from vitreg.core.images import IMAGENET_MEAN, IMAGENET_STD, default_processor, image_processor, size_options
from vitreg.core.opening import open_model
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegBackbone, ViTRegForImageClassification, ViTRegModel


def test_layers_have_one_format():
    assert parse_layers("0,5,10-11", 12) == [0, 5, 10, 11]
    assert parse_layers("-1", 12) == [11]
    assert parse_layers(["3", "-2"], 12) == [3, 10]
    assert parse_layers("0-2,1", 12) == [0, 1, 2]
    for bad in ("12", "a", "3-1", "", "-13"):
        with pytest.raises(UserError, match="--layers"):
            parse_layers(bad, 12)


def test_common_flags_take_both_spellings_and_one_help():
    parsers = [argparse.ArgumentParser(), argparse.ArgumentParser()]
    for parser in parsers:
        add_common_flags(parser, "revision", "device", "overwrite", "no_progress", "image_size")
    args = parsers[0].parse_args(["--no_progress", "--image-size", "112", "--revision", "v1"])
    assert (args.no_progress, args.image_size, args.revision, args.device, args.overwrite) == (
        True, 112, "v1", "cpu", False
    )  # fmt: skip
    assert parsers[0].format_help() == parsers[1].format_help()


def test_no_progress_silences_the_libraries_bars():
    code = (
        "from vitreg.cli import main; import sys; "
        "from transformers.utils import logging; from huggingface_hub.utils import are_progress_bars_disabled; "
        "from vitreg.core.flags import apply_common_flags; import argparse; "
        "apply_common_flags(argparse.Namespace(no_progress=True)); "
        "print(logging.is_progress_bar_enabled(), are_progress_bars_disabled())"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.split() == ["False", "True"]


def test_help_and_version_import_neither_torch_nor_transformers():
    code = "import sys; from vitreg.cli import main; main(['--version'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.startswith("vitreg ")
    code = (
        "import sys; from vitreg.cli import build_parser; import vitreg.core; build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def official_transform(resize: int, crop: int | None, photo: Image.Image) -> np.ndarray:
    """DINOv2's evaluation transform (torchvision, as dinov2/data/transforms.py builds it) or, without crop,
    DINOv3's README transform (whole image resized to a square, antialiased)."""
    steps = [transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC)]
    if crop is None:
        steps = [transforms.Resize((resize, resize), interpolation=transforms.InterpolationMode.BILINEAR)]
    else:
        steps.append(transforms.CenterCrop(crop))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)(photo).numpy()


def test_image_size_is_the_side_the_model_sees(photos):
    photo = photos[1]  # chelsea: 451x300
    dinov2 = image_processor()
    ours = dinov2(photo, return_tensors="np", **size_options(dinov2, 112))["pixel_values"][0]
    assert ours.shape == (3, 112, 112)  # crop 112 of the short side resized to 128 (256/224 of it)
    assert np.abs(ours - official_transform(128, 112, photo)).mean() < 0.02
    dinov3 = default_processor(tiny_config(position_embedding_type="rope", patch_size=16, image_size=32))
    ours = dinov3(photo, return_tensors="np", **size_options(dinov3, 96))["pixel_values"][0]
    assert ours.shape == (3, 96, 96)
    assert np.abs(ours - official_transform(96, None, photo)).mean() < 0.02
    whole = dinov2(photo, return_tensors="np", **size_options(dinov2, 112, crop=False))["pixel_values"][0]
    assert whole.shape[1] == 112 and whole.shape[2] == round(451 * 112 / 300)


def test_overwrite_never_replaces_a_folder_vitreg_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="thesis.tex"):
        with atomic_output_dir(mine, overwrite=True):
            pass
    assert (mine / "thesis.tex").read_text() == "years of work"
    with atomic_output_dir(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("1")
    with atomic_output_dir(tmp_path / "out", overwrite=True) as staging:  # vitreg's own: replaced
        (staging / "b.txt").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".vitreg", "b.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging or retired folders


def test_outputs_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "folder") as staging:
            (staging / "x").write_text("1")
        with atomic_output_file(tmp_path / "file.json") as staging:
            staging.write_text("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "file.json").stat().st_mode & 0o777 == 0o644


def test_a_read_only_location_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked")
    for writer in (atomic_output_dir, atomic_output_file):
        with pytest.raises(UserError, match="cannot write in .*locked"):
            with writer(tmp_path / "locked" / "out"):
                pass


def test_the_working_folder_and_an_input_are_never_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.pth").write_bytes(b"weights")
    for output in (".", "..", str(tmp_path)):
        with pytest.raises(UserError, match="working folder"):
            with atomic_output_dir(output, overwrite=True):
                pass
    with pytest.raises(UserError, match="holds the input"):
        with atomic_output_dir(tmp_path / "src", overwrite=True, inputs=[tmp_path / "src" / "model.pth"]):
            pass


@pytest.fixture
def folder(tmp_path) -> Path:
    model = ViTRegForImageClassification(tiny_config(num_labels=3))
    return save_model_folder(model, tmp_path / "classifier", Provenance(kind="random", name="tiny"))


def test_open_a_vitreg_folder_as_each_head(folder):
    for head, kind in (("model", ViTRegModel), ("classification", ViTRegForImageClassification)):
        model, processor, provenance = open_model(folder, head=head)
        assert isinstance(model, kind) and not model.training and model.dtype == torch.float32
        assert provenance.name == "tiny" and processor.crop_size["height"] == 224
    assert isinstance(open_model(folder, head="backbone").model, ViTRegBackbone)
    with pytest.raises(UserError, match="--revision applies"):
        open_model(folder, revision="main")
    with pytest.raises(UserError, match="cannot use device"):
        open_model(folder, device="nonsense")
    with pytest.raises(UserError, match="unknown head"):
        open_model(folder, head="segmentation")


def test_a_file_and_its_converted_folder_open_with_the_same_preprocessing(tmp_path, photos):
    from vitreg.conversion import convert

    for name, writer, arch in (
        ("v2.pth", write_random_checkpoint, "dinov2_vits14_reg4"),
        ("dinov3_vits16_pretrain_lvd1689m.pth", write_random_dinov3_checkpoint, "dinov3_vits16"),
        ("dinov3_vitl16_pretrain_sat493m.pth", write_random_dinov3_checkpoint, "dinov3_vitl16"),
    ):
        writer(tmp_path / name, arch, num_hidden_layers=1)
        convert(tmp_path / name, tmp_path / f"{name}.folder")
        in_memory, from_folder = open_model(tmp_path / name), open_model(tmp_path / f"{name}.folder")
        opened = (in_memory, from_folder)
        pixels = [each.processor(photos[0], return_tensors="pt")["pixel_values"] for each in opened]
        assert torch.equal(*pixels), name
        tokens = [each.model(pixels[0]).last_hidden_state for each in opened]
        torch.testing.assert_close(*tokens, rtol=0, atol=0)
        if "sat493m" in name:
            assert in_memory.processor.image_mean == pytest.approx([0.430, 0.411, 0.296])
        elif "dinov3" in name:
            assert in_memory.processor.do_center_crop is False


def test_the_sample_photos_are_different_photos():
    from vitreg.core.images import SAMPLE_PHOTOS, sample_images

    images = [np.asarray(image) for image in sample_images(SAMPLE_PHOTOS, max_side=64)]
    assert all(a.shape != b.shape or not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1 :])
