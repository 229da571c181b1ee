"""LOST object discovery on keys that see brightness, and CorLoc over a synthetic VOC folder."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from vitreg.analysis.lost import corloc, iou, lost, lost_image, read_voc
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegModel

from vitreg.cli import main
from vitreg.core.errors import UserError
from vitreg.core.images import image_processor


def brightness_model() -> ViTRegModel:
    """A model whose last-block keys are +v on bright patches and -v on dark ones (plus position noise).

    The patch embedding computes the mean pixel (and its negative), the first block is switched off by zero
    LayerScale, and the last block's key projection is the identity.
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
        qkv.weight[width : 2 * width] = torch.eye(width)
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


def test_lost_on_keys_picks_the_seeds_component():
    grid = (6, 8)
    signs = -np.ones(grid)
    signs[1:3, 1:4] = 1  # the object: 6 patches; with the fewest positive similarities, it holds the seed
    signs[4:6, 6:8] = 1  # a similar object elsewhere: it votes, but lies outside the seed's connected component
    keys = torch.tensor(signs.reshape(-1, 1) * np.array([[1.0, -1.0, 0.5]]), dtype=torch.float32)
    box, seed, mask = lost(keys, grid)
    assert seed == (1, 1)
    assert box == (1, 1, 3, 4)
    assert mask.sum() == 6


def test_lost_on_degenerate_keys_returns_the_seed_patch():
    box, seed, mask = lost(torch.zeros(12, 4), (3, 4))
    assert seed == (0, 0) and box == (0, 0, 1, 1) and mask.sum() == 1


@pytest.mark.parametrize("width, height, box", SCENES)
def test_lost_finds_the_bright_object(width, height, box):
    found = lost_image(brightness_model(), image_processor(), scene(width, height, box, seed=width))
    assert iou(found.box, box) >= 0.7, (found.box, box)


def write_voc(root, wrong: int) -> None:
    """A VOC folder of the SCENES (1-based inclusive boxes), with annotation `wrong` pointing elsewhere."""
    for name in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / name).mkdir(parents=True)
    stems = []
    for index, (width, height, box) in enumerate(SCENES):
        stem = f"2007_{index:06d}"
        stems.append(stem)
        scene(width, height, box, seed=index).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        x0, y0, x1, y1 = (0, 0, 20, 20) if index == wrong else box
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{width}</width><height>{height}</height>"
            "</size><object><name>thing</name><difficult>0</difficult>"
            f"<bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
            "</object></annotation>"
        )
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(stems[:2]) + "\n")


def test_read_voc_and_corloc(tmp_path):
    write_voc(tmp_path, wrong=2)
    items = read_voc(tmp_path)
    assert [path.name for path, _ in items] == [f"2007_{i:06d}.jpg" for i in range(4)]
    assert items[0][1] == [[50.0, 60.0, 170.0, 200.0]]
    result = corloc(brightness_model(), image_processor(), tmp_path, progress=False)
    assert result["num_images"] == 4
    assert [entry["correct"] for entry in result["images"]] == [True, True, False, True]
    assert result["corloc"] == 0.75
    assert corloc(brightness_model(), image_processor(), tmp_path, split="test", progress=False)["num_images"] == 2


def test_cli_lost(tmp_path, capsys):
    voc = tmp_path / "voc"
    write_voc(voc, wrong=0)
    save_model_folder(brightness_model(), tmp_path / "model", {"kind": "random", "name": "brightness keys"})
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "model"), "--lost", str(voc), "--out", str(out)]) == 0
    assert "LOST CorLoc 0.7500" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [(run["model"], run["corloc"]) for run in report["lost"]] == [(str(tmp_path / "model"), 0.75)]
    assert (out / "figures" / "lost.png").read_bytes()[:4] == b"\x89PNG"
    assert "CorLoc 0.7500" in (out / "index.html").read_text()


def test_bad_voc_folders(tmp_path):
    with pytest.raises(UserError, match="not a VOC-format folder"):
        read_voc(tmp_path)
    write_voc(tmp_path / "voc", wrong=0)
    with pytest.raises(UserError, match="missing.txt does not exist"):
        read_voc(tmp_path / "voc", split="missing")
    (tmp_path / "voc" / "Annotations" / "2007_000000.xml").write_text("<annotation><object>")
    with pytest.raises(UserError, match="not a readable VOC annotation"):
        read_voc(tmp_path / "voc")
