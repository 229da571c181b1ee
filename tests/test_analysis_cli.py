"""`vitreg analyze` as a user meets it: folders searched recursively, unreadable images skipped and listed, progress
while figures are drawn (and a limit on them), --no-progress, a read-only output refused in one line, and
`--image-size` with the one meaning every tool gives it."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from vitreg.analysis.loading import preprocess
from vitreg.cli import main
from vitreg.core.images import image_processor
from vitreg.core.provenance import Provenance
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegModel

CROP = 56  # a 4 x 4 grid of 14 px patches: fast


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny ViTReg folder whose processor crops 56 px (after a 64 px resize)."""
    folder = tmp_path_factory.mktemp("analyze-cli") / "model"
    save_model_folder(ViTRegModel(tiny_config()), folder, Provenance(kind="random", name="tiny"), crop_size=CROP)
    return folder


@pytest.fixture
def tree(tmp_path, photos) -> Path:
    """Photos in a folder and its subfolders, beside a text file named .jpg and a truncated JPEG."""
    root = tmp_path / "photos"
    for relative, photo in zip(("b.jpg", "a.png", "sub/c.jpg", "sub/deeper/d.png"), photos):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        photo.resize((90, 70)).save(root / relative)
    (root / "broken.jpg").write_text("not an image")
    whole = (root / "b.jpg").read_bytes()
    (root / "sub" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    return root


def test_folders_are_searched_recursively_and_unreadable_images_skipped(model_folder, tree, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["analyze", str(model_folder), str(tree), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    readable = ["a.png", "b.jpg", "sub/c.jpg", "sub/deeper/d.png"]  # sorted, subfolders included
    assert [record["image"] for record in report["images"]] == [str(tree / name) for name in readable]
    skipped = dict(report["skipped"])
    assert list(skipped) == [str(tree / "broken.jpg"), str(tree / "sub" / "truncated.jpg")]
    assert skipped[str(tree / "broken.jpg")].startswith("UnidentifiedImageError")
    assert "truncated" in skipped[str(tree / "sub" / "truncated.jpg")]
    printed = capsys.readouterr().out
    for name, reason in skipped.items():
        assert f"skipped {name}: {reason}" in printed
    assert "2 unreadable images skipped" in printed
    assert "Skipped (unreadable)" in (out / "index.html").read_text()


def test_only_unreadable_images_is_a_one_line_error(model_folder, tree, tmp_path, capsys):
    argv = ["analyze", str(model_folder), str(tree / "broken.jpg"), str(tree / "sub" / "truncated.jpg")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "broken.jpg is not a readable image" in error[0] and "nothing to analyse" in error[0]
    assert not (tmp_path / "out").exists()


def test_figures_show_progress_and_can_be_limited(model_folder, tree, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["analyze", str(model_folder), str(tree), "--out", str(out), "--max-figures", "1"]) == 0
    err = capsys.readouterr().err
    assert "analysing" in err and "figures" in err  # tqdm's bars, on stderr
    report = json.loads((out / "report.json").read_text())
    assert len(report["images"]) == 4 and report["image_figures_omitted"] == 3
    drawn = sorted(path.name for path in (out / "figures").iterdir())
    assert drawn == ["image_000_a.png", "layer_outliers.png", "norm_histogram.png"]
    assert sorted(Path(name).name for name in report["figures"]) == drawn
    assert "--max-figures" in (out / "index.html").read_text()
    # --max_figures too, and --no-progress silences every bar
    argv = ["analyze", str(model_folder), str(tree), "--out", str(out), "--overwrite", "--max_figures", "0"]
    assert main([*argv, "--no_progress"]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads((out / "report.json").read_text())["image_figures_omitted"] == 4
    assert main([*argv[:-2], "--max-figures", "-1"]) == 1
    assert "--max-figures must be 0 or more" in capsys.readouterr().err


def test_a_read_only_output_is_refused_in_one_line_before_the_model_loads(tree, tmp_path, monkeypatch, capsys):
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked" and real_access(path, mode))
    missing_model = str(tmp_path / "not-yet-downloaded")  # would fail too, but only after the output is checked
    argv = ["analyze", missing_model, str(tree / "a.png"), "--out", str(tmp_path / "locked" / "report")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitreg analyze: error: cannot write in") and "locked" in err
    assert list((tmp_path / "locked").iterdir()) == []


def test_image_size_is_the_side_the_model_sees_as_every_tool_means_it(photos):
    """--image-size N: a cropping processor resizes the short side by its own resize/crop ratio (DINOv2: 256/224)
    and crops N x N; one that does not crop (DINOv3) resizes the whole image to N x N (vitreg.core.images)."""
    photo = photos[1]  # 451 x 300
    dinov2 = image_processor(224)  # short side 256, crop 224
    expected = dinov2(photo, size={"shortest_edge": 128}, crop_size={"height": 112, "width": 112}, return_tensors="pt")
    torch.testing.assert_close(preprocess(dinov2, photo, 14, 112), expected["pixel_values"], rtol=0, atol=0)
    dinov3 = image_processor(224, square=True)  # the whole image to 224 x 224
    expected = dinov3(photo, size={"height": 112, "width": 112}, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(preprocess(dinov3, photo, 16, 112), expected, rtol=0, atol=0)
    assert expected.shape == (1, 3, 112, 112)
