"""LOST as the official code computes it (outputs stored by scripts/lost_reference.py), on images, and CorLoc on VOC."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from vitreg.analysis.hooks import capture_last_qkv
from vitreg.analysis.lost import (
    FEATURES,
    LostError,
    box_ious,
    corloc,
    iou,
    lost,
    lost_image,
    lost_pixels,
    read_voc,
)
from vitreg.cli import main
from vitreg.core.errors import UserError
from vitreg.core.images import image_processor
from vitreg.core.provenance import Provenance
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegModel

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((ROOT / "tests" / "data" / "lost_reference.json").read_text())


def reference_script():
    """scripts/lost_reference.py as a module: the generator of the stored inputs (it imports no official code)."""
    spec = importlib.util.spec_from_file_location("lost_reference", ROOT / "scripts" / "lost_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = reference_script()


def test_reference_covers_the_scripts_cases():
    assert [case["name"] for case in REFERENCE["lost"]] == [case[0] for case in SCRIPT.CASES]
    assert len(REFERENCE["source"]["commit"]) == 40 and REFERENCE["stubbed"] == []
    assert {case["error"] is None for case in REFERENCE["lost"]} == {True, False}  # boxes and degenerate inputs


@pytest.mark.parametrize("case", REFERENCE["lost"], ids=[case["name"] for case in REFERENCE["lost"]])
def test_lost_matches_the_official_code(case):
    keys = SCRIPT.case_keys(case["seed"], case["kind"], tuple(case["grid"]), case["dim"])
    assert SCRIPT.sha256(keys) == case["keys_sha256"], "the input generator changed: rerun scripts/lost_reference.py"
    grid, size = tuple(case["grid"]), tuple(case["image_size"])
    if case["error"] is not None:  # the official code raises: the seed gets no positive vote
        with pytest.raises(LostError, match="no positive vote"):
            lost(keys, grid, case["k"], case["patch_size"], size)
        return
    found = lost(keys, grid, case["k"], case["patch_size"], size)
    assert list(found.seed) == case["seed_patch"]  # ties broken as the official (unstable) argsort breaks them
    assert found.expanded == case["expanded"]
    assert list(found.grid_box) == case["grid_box"]
    assert list(found.box) == case["box"]  # pixels of the unpadded image: the padding clipped away
    assert found.mask[found.seed] and found.mask.shape == grid


@pytest.mark.parametrize("case", REFERENCE["iou"], ids=lambda case: str(case["box"]))
def test_iou_and_corloc_rule_match_the_official_code(case):
    ious = box_ious(case["box"], case["gt_boxes"])
    assert ious.tolist() == case["ious"]  # bit for bit: float32 with LOST's epsilons
    assert bool((ious >= 0.5).any()) == case["correct"]


def test_pixels_are_the_official_transform_zero_padded():
    seed, (height, width) = REFERENCE["pixels"]["seed"], REFERENCE["pixels"]["image_size"]
    pixels = lost_pixels(image_processor(), SCRIPT.case_image(seed, (height, width)), patch_size=14)
    assert pixels.shape == (1, 3, 42, 56)  # 37x53 padded up to whole 14-px patches, never resized
    assert SCRIPT.sha256(pixels[0, :, :height, :width]) == REFERENCE["pixels"]["sha256"]
    assert not pixels[0, :, height:].any() and not pixels[0, :, :, width:].any()


def test_lost_on_keys_picks_the_seeds_component():
    grid = (6, 8)
    labels = np.zeros(grid, dtype=int)  # 0: background, 1: the object, 2: another object, 3: background like it
    labels[1:3, 1:4] = 1  # 6 patches, similar only to objects: the lowest degree, so it holds the seed
    labels[4:6, 6:8] = 2  # votes with the object, but is not connected to it
    labels[0, 5:8] = 3
    directions = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 2.0]])
    found = lost(directions[torch.from_numpy(labels.ravel())], grid)
    assert labels[found.seed] == 1
    assert found.grid_box == (1, 1, 3, 4) and found.box == (1, 1, 4, 3)  # patches: (x0, y0, x1, y1)
    assert found.mask.sum() == 6
    assert sorted(found.expanded) == np.flatnonzero(np.isin(labels, (1, 2))).tolist()  # the objects' patches


def test_lost_on_zero_keys_finds_nothing():
    with pytest.raises(LostError, match="no positive vote"):
        lost(torch.zeros(12, 4), (3, 4))


def brightness_model(zero_keys: bool = False) -> ViTRegModel:
    """A model whose last-block keys are +v on bright patches and -v on dark ones (plus position noise).

    The patch embedding computes the mean pixel (and its negative), the first block is switched off by zero
    LayerScale, and the last block's key projection is the identity (zero with `zero_keys`).
    """
    torch.manual_seed(0)
    model = ViTRegModel(tiny_config(image_size=224)).eval()
    width = model.config.hidden_size
    with torch.no_grad():
        projection = model.embeddings.patch_embeddings.projection
        projection.weight.zero_()
        projection.bias.zero_()
        projection.weight[0] = 1 / projection.weight[0].numel()
        projection.weight[1] = -1 / projection.weight[1].numel()
        model.embeddings.position_embeddings.normal_(0, 0.02)
        first = model.encoder.layer[0]
        first.layer_scale1.lambda1.zero_()
        first.layer_scale2.lambda1.zero_()
        qkv = model.encoder.layer[-1].attention.qkv
        qkv.weight[width : 2 * width] = 0 if zero_keys else torch.eye(width)
        qkv.bias[width : 2 * width] = 0
    return model


def scene(width: int, height: int, box: tuple, seed: int) -> Image.Image:
    """One bright object (the box, exclusive ends) on a dark, slightly noisy plain background."""
    pixels = np.random.default_rng(seed).normal(35, 6, size=(height, width, 3)).clip(0, 255)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = (235, 225, 200)
    return Image.fromarray(pixels.astype(np.uint8))


SCENES = [  # (width, height, object box): non-square images, objects anywhere, not aligned to patches
    (400, 300, (50, 60, 170, 200)),
    (300, 500, (150, 300, 280, 480)),
    (640, 480, (300, 20, 500, 150)),
    (256, 256, (100, 100, 160, 170)),
]


@pytest.mark.parametrize("width, height, box", SCENES)
def test_lost_finds_the_bright_object(width, height, box):
    found = lost_image(brightness_model(), image_processor(), scene(width, height, box, seed=width))
    assert found.mask.shape == (-(-height // 14), -(-width // 14))  # the image's own resolution, padded up
    assert iou(found.box, box) >= 0.7, (found.box, box)


def test_lost_image_uses_the_last_blocks_patch_keys_at_native_resolution(photos):
    model = ViTRegModel(tiny_config(num_register_tokens=3)).eval()
    chelsea = photos[1]  # 451 x 300: padded to 462 x 308, a 22 x 33 grid
    pixels = lost_pixels(image_processor(), chelsea, 14)
    with capture_last_qkv(model) as captured, torch.no_grad():
        model(pixels)
    width = model.config.hidden_size
    keys = captured["qkv"][0, 1 + 3 :, width : 2 * width]  # [hw, D]: patches only, heads side by side
    expected = lost(keys, (22, 33), 100, 14, (300, 451))
    found = lost_image(model, image_processor(), chelsea)
    assert (found.box, found.seed, found.expanded) == (expected.box, expected.seed, expected.expanded)
    assert found.box[2] <= 451 and found.box[3] <= 300


def write_voc(root: Path, wrong: int, hard_truth: bool = False) -> None:
    """A VOC folder of the SCENES (1-based inclusive boxes) whose annotation `wrong` points elsewhere.

    With `hard_truth`, that annotation also holds the true box, marked difficult and truncated. ImageSets/Main lists
    all four in trainval.txt and the first two in test.txt.
    """
    for name in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / name).mkdir(parents=True)
    stems = []
    for index, (width, height, box) in enumerate(SCENES):
        stem = f"2007_{index:06d}"
        stems.append(stem)
        scene(width, height, box, seed=index).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        objects = [((0, 0, 20, 20) if index == wrong else box, 0)]
        if index == wrong and hard_truth:
            objects.append((box, 1))
        xml = "".join(
            f"<object><name>thing</name><truncated>{hard}</truncated><difficult>{hard}</difficult><bndbox>"
            f"<xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for (x0, y0, x1, y1), hard in objects
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{width}</width><height>{height}</height>"
            f"</size>{xml}</annotation>"
        )
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(stems) + "\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(stems[:2]) + "\n")


def test_read_voc_and_corloc_on_trainval(tmp_path):
    write_voc(tmp_path, wrong=2)
    (tmp_path / "Annotations" / "2007_000009.xml").write_text("<annotation/>")  # in no list: not read
    items = read_voc(tmp_path)
    assert [path.name for path, _ in items] == [f"2007_{i:06d}.jpg" for i in range(4)]
    assert items[0][1] == [[50, 60, 170, 200]]
    result = corloc(brightness_model(), image_processor(), tmp_path, progress=False)
    assert (result["split"], result["num_images"], result["corloc"]) == ("trainval", 4, 0.75)
    assert [entry["correct"] for entry in result["images"]] == [True, True, False, True]
    assert (result["features"], result["k"], result["patch_size"]) == (FEATURES, 100, 14)
    assert result["resolution"] == "native, zero-padded to multiples of 14 px"
    assert corloc(brightness_model(), image_processor(), tmp_path, split="test", progress=False)["num_images"] == 2


def test_difficult_and_truncated_objects_count(tmp_path):
    write_voc(tmp_path, wrong=2, hard_truth=True)
    assert read_voc(tmp_path)[2][1] == [[0, 0, 20, 20], list(SCENES[2][2])]
    assert corloc(brightness_model(), image_processor(), tmp_path, progress=False)["corloc"] == 1.0


def test_zero_keys_are_logged_misses(tmp_path):
    write_voc(tmp_path, wrong=-1)
    with CaptureLogger(logging.get_logger("vitreg.analysis.lost")) as captured:
        result = corloc(brightness_model(zero_keys=True), image_processor(), tmp_path, "test", progress=False)
    assert result["corloc"] == 0.0 and [entry["box"] for entry in result["images"]] == [None, None]
    assert captured.out.count("no positive vote") == 2


def test_cli_lost(tmp_path, capsys):
    voc = tmp_path / "voc"
    write_voc(voc, wrong=0)
    save_model_folder(brightness_model(), tmp_path / "model", Provenance(kind="random", name="brightness keys"))
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "model"), "--lost", str(voc), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LOST CorLoc 0.7500 over 4 images (split trainval, native, zero-padded to multiples of 14 px, " in printed
    assert f"{FEATURES}, k=100)" in printed
    report = json.loads((out / "report.json").read_text())
    [run] = report["lost"]
    assert (run["model"], run["corloc"], run["split"], run["k"]) == (str(tmp_path / "model"), 0.75, "trainval", 100)
    assert (out / "figures" / "lost.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "index.html").read_text()
    assert "CorLoc 0.7500" in page and "trainval" in page and "native, zero-padded" in page and "last block" in page
    # --lost-split is the old name of --split; every long flag takes dashes or underscores.
    argv = ["analyze", str(tmp_path / "model"), "--lost", str(voc), "--out", str(out), "--overwrite"]
    for split_flag, patches_flag in (("--lost-split", "--lost-patches"), ("--lost_split", "--lost_patches")):
        assert main([*argv, split_flag, "test", patches_flag, "5"]) == 0
        assert "over 2 images (split test, " in capsys.readouterr().out
        run = json.loads((out / "report.json").read_text())["lost"][0]
        assert (run["split"], run["k"], run["num_images"]) == ("test", 5, 2)


def test_unreadable_voc_images_are_skipped_and_listed(tmp_path, capsys):
    voc = tmp_path / "voc"
    write_voc(voc, wrong=0)
    damaged = voc / "JPEGImages" / "2007_000001.jpg"
    damaged.write_bytes(damaged.read_bytes()[:300])  # the header reads, the pixels do not
    (voc / "JPEGImages" / "2007_000003.jpg").write_text("not an image")
    result = corloc(brightness_model(), image_processor(), voc, progress=False)
    assert [Path(entry["image"]).name for entry in result["images"]] == ["2007_000000.jpg", "2007_000002.jpg"]
    assert [Path(name).name for name, _ in result["skipped"]] == ["2007_000001.jpg", "2007_000003.jpg"]
    (_, truncated), (_, not_image) = result["skipped"]
    assert "truncated" in truncated.lower() and not_image.startswith("UnidentifiedImageError")
    assert (result["num_images"], result["corloc"]) == (2, 0.5)  # image 0's annotation points elsewhere
    save_model_folder(brightness_model(), tmp_path / "model", Provenance(kind="random", name="brightness keys"))
    argv = ["analyze", str(tmp_path / "model"), "--lost", str(voc), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"skipped {damaged}: " in printed and "2 unreadable images skipped" in printed


def test_bad_voc_folders(tmp_path, capsys):
    with pytest.raises(UserError, match="not a VOC-format folder"):
        read_voc(tmp_path)
    write_voc(tmp_path / "VOCdevkit" / "VOC2007", wrong=0)
    with pytest.raises(UserError, match="did you mean .*VOCdevkit/VOC2007"):
        read_voc(tmp_path)
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    with pytest.raises(UserError, match="missing.txt does not exist: choose another split with --split"):
        read_voc(voc, split="missing")
    (voc / "ImageSets" / "Main" / "trainval.txt").unlink()
    with pytest.raises(UserError, match="trainval.txt does not exist"):
        read_voc(voc)
    assert len(read_voc(voc, split="all")) == 4
    (voc / "Annotations" / "2007_000000.xml").write_text("<annotation><object>")
    with pytest.raises(UserError, match="not a readable VOC annotation"):
        read_voc(voc, split="test")
    assert main(["analyze", str(tmp_path), "--lost", str(voc), "--out", str(tmp_path / "out")]) == 1
    assert "trainval.txt does not exist" in capsys.readouterr().err
