"""Artifact analysis on a model whose weights plant high-norm tokens at known patches: detection, report, CLI."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from vitreg.analysis import analyze, run_analysis
from vitreg.analysis.hooks import capture_last_qkv, cls_attention
from vitreg.cli import main
from vitreg.core.errors import UserError
from vitreg.core.images import image_processor
from vitreg.core.provenance import Provenance
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegModel

DETECT, ARTIFACT = 0, 1  # channels: "this patch is magenta", and the one the artifact is written into
SIZE, PATCH = 518, 14  # the paper's 37x37 grid
MAGENTA = (255, 0, 255)


def native_processor():
    """DINOv2's preprocessing at SIZE with no enlargement before the crop: a SIZE x SIZE photo reaches the model as it
    is, its magenta squares on whole patches."""
    return image_processor(SIZE, resize_size=SIZE)


def planted_model(num_register_tokens: int = 0, plant: bool = True) -> ViTRegModel:
    """A 3-block model whose middle MLP writes a huge ARTIFACT channel into magenta patches (only those).

    Block 2's MLP has one neuron reading the DETECT channel of the patch embedding (mean of R - 2G + B, > 0 only for
    magenta) and writing 10 into ARTIFACT, which nothing else touches; the final LayerNorm weighs ARTIFACT 20x,
    so those tokens leave with ~15x the norm of the others, as DINOv2's artifacts do. `plant=False`: never fires.
    """
    torch.manual_seed(0)
    config = tiny_config(
        num_hidden_layers=3, num_attention_heads=2, image_size=SIZE, num_register_tokens=num_register_tokens
    )
    model = ViTRegModel(config).eval()
    with torch.no_grad():
        projection = model.embeddings.patch_embeddings.projection
        projection.weight.normal_(0, 0.05)
        colour = torch.tensor([1.0, -2.0, 1.0]).view(3, 1, 1).expand(3, PATCH, PATCH)
        projection.weight[DETECT] = 3 * colour / PATCH**2
        projection.bias[DETECT] = -18.0  # magenta gives 3 * 9.0 - 18 > 0; natural colours stay below 0
        projection.weight[ARTIFACT] = 0
        model.embeddings.position_embeddings[..., ARTIFACT] = 0
        for layer in model.encoder.layer:
            for linear in (layer.attention.proj, layer.mlp.fc2):
                linear.weight[ARTIFACT] = 0
                linear.bias[ARTIFACT] = 0
        mlp = model.encoder.layer[1].mlp
        mlp.fc1.weight[0] = 0
        mlp.fc1.weight[0, DETECT] = 4.0
        mlp.fc1.bias[0] = -4.0 if plant else -1e4
        mlp.fc2.weight[:, 0] = 0
        mlp.fc2.weight[ARTIFACT, 0] = 10.0
        model.layernorm.weight.uniform_(0.5, 1.5)
        model.layernorm.weight[ARTIFACT] = 20.0
    return model


def planted_photo(photo: Image.Image, positions: set) -> Image.Image:
    """`photo` at 518x518 with the patches at `positions` (row, col) painted magenta."""
    pixels = np.asarray(photo.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)).copy()
    for row, col in positions:
        pixels[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = MAGENTA
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def planted(photos):
    """Four real photos with 8..40 magenta patches each, and where they are."""
    rng = np.random.default_rng(0)
    positions = [{tuple(p) for p in rng.integers(0, SIZE // PATCH, size=(count, 2))} for count in (8, 20, 30, 40)]
    return [planted_photo(photo, pos) for photo, pos in zip(photos, positions)], positions


@pytest.fixture(scope="module")
def folders(tmp_path_factory, planted):
    """Saved ViTReg folders: the planted model without registers, a clean one with 4, and two planted photos."""
    root = tmp_path_factory.mktemp("analysis")
    planted_record, clean_record = Provenance(kind="random", name="planted artifacts"), Provenance(kind="random")
    save_model_folder(planted_model(0), root / "artifacts", planted_record, processor=native_processor())
    save_model_folder(planted_model(4, plant=False), root / "registers", clean_record, processor=native_processor())
    images = root / "images"
    images.mkdir()
    for index, image in enumerate(planted[0][:2]):
        image.save(images / f"photo_{index}.png")
    return root


def test_detector_finds_planted_artifacts_at_518(planted):
    images, positions = planted
    result = analyze(planted_model(0), native_processor(), images, image_size=SIZE, progress=False)
    assert result.threshold_rule == "auto"
    found = set()
    truth = set()
    for index, (analysis, expected) in enumerate(zip(result.images, positions)):
        assert analysis.grid == (37, 37)
        found |= {(index, r, c) for r, c in analysis.outliers}
        truth |= {(index, r, c) for r, c in expected}
    hits = len(found & truth)
    assert hits / len(found) >= 0.9 and hits / len(truth) >= 0.9, (hits, len(found), len(truth))
    # The outliers are ~10x the others (as in the paper), and appear after the middle block, not before.
    outlier_norms = np.concatenate([a.norms[a.outlier_mask] for a in result.images])
    normal_norms = np.concatenate([a.norms[~a.outlier_mask] for a in result.images])
    assert outlier_norms.min() > 5 * np.median(normal_norms)
    assert result.layer_outlier_fractions()[:2] == [0.0, 0.0]
    assert result.layer_outlier_fractions()[2] == pytest.approx(len(truth) / (4 * 37 * 37))


def test_clean_model_has_no_outliers(planted):
    images, _ = planted
    result = analyze(planted_model(4, plant=False), native_processor(), images, image_size=SIZE, progress=False)
    assert sum(len(a.outliers) for a in result.images) == 0
    assert all(a.register_norms.shape == (4,) for a in result.images)


def test_fixed_threshold_and_model_preprocessing(planted):
    images, _ = planted
    result = analyze(planted_model(0), image_processor(), images[:1], threshold=1e9, progress=False)
    assert result.threshold_rule == "fixed" and result.images[0].outliers == []
    assert result.images[0].grid == (16, 16)  # the model's own 256 -> 224 crop


def test_whole_image_without_crop(photos):
    chelsea = photos[1]  # 451x300
    model = ViTRegModel(tiny_config()).eval()
    own = analyze(model, image_processor(), [chelsea], crop=False, progress=False).images[0]
    assert own.grid == (256 // 14, 385 // 14)  # short side 256, long side 385, trimmed to whole patches
    paper = analyze(model, image_processor(), [chelsea], image_size=SIZE, crop=False, progress=False).images[0]
    assert paper.grid == (37, 779 // 14) and paper.photo.shape == (round(448 * 37 / 55), 448, 3)


def test_cls_attention_matches_the_models_eager_attention():
    model = ViTRegModel(tiny_config(num_register_tokens=3)).eval()
    pixels = torch.randn(1, 3, 42, 56)
    with capture_last_qkv(model) as captured, torch.no_grad():
        outputs = model(pixels, output_attentions=True)
    expected = outputs.attentions[-1][:, :, 0]  # [1, heads, P + hw]
    torch.testing.assert_close(cls_attention(captured["qkv"], model.config.num_attention_heads), expected)


def test_attention_masses_add_up(planted):
    images, _ = planted
    result = analyze(planted_model(4, plant=False), image_processor(), images[:1], image_size=SIZE, progress=False)
    analysis = result.images[0]
    assert analysis.cls_attention.shape == (2, 37, 37)
    total = analysis.cls_attention.sum(axis=(1, 2)) + analysis.attention_on_registers
    assert np.all(total < 1.0) and np.all(total > 0.9)  # the rest is CLS attending to itself


def test_model_without_cls_token(photos, tmp_path):
    """timm's average-pool models have registers but no CLS: norms still work, attention is simply absent."""
    model = ViTRegModel(tiny_config(use_cls_token=False, pooling="mean", num_register_tokens=2)).eval()
    report = run_analysis((model, image_processor(), "gap"), photos[:1], tmp_path / "gap", progress=False)
    record = report["images"][0]
    assert record["grid"] == [16, 16] and record["cls_norm"] is None and record["cls_attention"] is None
    assert len(record["register_norms"]) == 2 and report["summary"]["attention_on_outliers"] is None
    assert (tmp_path / "gap" / "index.html").is_file()


def test_report_schema_figures_and_compare(folders, tmp_path):
    out = tmp_path / "report"
    report = run_analysis(
        folders / "artifacts", [folders / "images"], out, image_size=SIZE, compare=folders / "registers", progress=False
    )
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["model"] == str(folders / "artifacts")
    assert len(on_disk["images"]) == 2
    for record in on_disk["images"]:
        keys = ("image", "grid", "norms", "threshold", "outliers", "outlier_fraction", "cls_norm", "register_norms")
        assert all(key in record for key in keys)
        h, w = record["grid"]
        assert (h, w) == (37, 37) and np.asarray(record["norms"]).shape == (h, w)
        assert record["outlier_fraction"] == len(record["outliers"]) / (h * w)
        assert all(record["norms"][r][c] > record["threshold"] for r, c in record["outliers"])
        assert record["register_norms"] == []
        heads = np.asarray(record["cls_attention_per_head"])
        assert heads.shape == (2, h, w)
        np.testing.assert_allclose(heads.mean(axis=0), record["cls_attention"], atol=1e-6)
        on_outliers = [sum(head[r][c] for r, c in record["outliers"]) for head in heads]
        np.testing.assert_allclose(record["attention_on_outliers_per_head"], on_outliers, atol=1e-4)
    summary, other = on_disk["summary"], on_disk["compare"]["summary"]
    # The planted MLP is block 1's: hidden state 2 (0 is the embeddings) is the first to show them.
    assert summary["outlier_fraction"] > 0.01 and summary["emergence_hidden_state"] == 2
    assert other["outlier_fraction"] == 0.0 and other["emergence_hidden_state"] is None
    assert len(on_disk["compare"]["images"][0]["register_norms"]) == 4
    assert [entry["hidden_state"] for entry in summary["layers"]] == [0, 1, 2, 3]
    for name in on_disk["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(on_disk["figures"]) == 2 + 2  # one per image, the histogram, the per-layer curves
    page = (out / "index.html").read_text()
    assert all(name in page for name in on_disk["figures"])
    assert str(folders / "registers") in page


def test_cli_analyze(folders, tmp_path, capsys):
    out = tmp_path / "cli"
    images = [str(folders / "images" / "photo_0.png"), str(folders / "images" / "photo_1.png")]
    argv = ["analyze", str(folders / "artifacts"), *images, "--out", str(out), "--image-size", "518", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "report.json" in printed and "high-norm patch tokens" in printed
    report = json.loads((out / "report.json").read_text())
    assert [r["image"] for r in report["images"]] == images
    # An existing report is kept unless --overwrite.
    assert main(["analyze", str(folders / "artifacts"), images[0], "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    args = ["analyze", str(folders / "artifacts"), images[0], "--out", str(out), "--overwrite", "--threshold", "1e9"]
    assert main(args) == 0
    assert json.loads((out / "report.json").read_text())["images"][0]["outliers"] == []


def test_hub_id_from_the_offline_cache(folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--planted"
    shutil.copytree(folders / "artifacts", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    images = [folders / "images"]
    hub = run_analysis("org/planted", images, tmp_path / "hub-report", image_size=SIZE, progress=False)
    local = run_analysis(folders / "artifacts", images, tmp_path / "local-report", image_size=SIZE, progress=False)
    assert hub["model"] == "org/planted" and hub["images"][0]["norms"] == local["images"][0]["norms"]
    with pytest.raises(UserError, match="org/absent is not in the Hub cache"):
        run_analysis("org/absent", images, tmp_path / "absent", progress=False)


def test_bad_inputs_are_one_line_errors(folders, tmp_path, capsys):
    model = str(folders / "artifacts")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "does not exist": [model, str(tmp_path / "missing.png")],
        "is not a readable image": [model, str(not_image)],
        "holds no images": [model, str(empty)],
        "is not a model folder": [str(empty), str(folders / "images")],
        "missing-model does not exist": [str(tmp_path / "missing-model"), str(folders / "images")],
        "not a positive multiple of the patch size": [model, str(folders / "images"), "--image-size", "500"],
        "give at least one image": [model],
        "cannot use device 'nowhere'": [model, str(folders / "images"), "--device", "nowhere"],
        "--threshold must be a positive norm, got -1.0": [model, str(folders / "images"), "--threshold", "-1"],
    }
    for message, argv in cases.items():
        assert main(["analyze", *argv, "--out", str(tmp_path / "out")]) == 1, message
        error = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar of the model loading
        assert error.startswith("vitreg analyze: error: ") and message in error, error
    assert not (tmp_path / "out").exists()
    config_only = tmp_path / "bert"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="not a ViTReg model"):
        run_analysis(config_only, [folders / "images"], tmp_path / "out", progress=False)


BACKEND_CHECK = """
import sys
from pathlib import Path

import matplotlib

before = matplotlib.get_backend()
import vitreg.analysis
from vitreg.analysis.figures import lost_figure
from vitreg.core.images import sample_photos

folder = Path(sys.argv[1])
[photo] = sample_photos(folder, ("chelsea",))
entry = {"image": str(photo), "gt_boxes": [[10, 10, 200, 150]], "box": [0, 0, 196, 154], "seed": [2, 3], "iou": 0.8}
lost_figure(folder, "lost.png", [{"model": "m", "patch_size": 14, "images": [entry]}])
assert (folder / "lost.png").read_bytes()[:4] == b"\\x89PNG"
print(before, matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_importing_and_drawing_leave_the_matplotlib_backend_alone(tmp_path):
    """A library must not switch the importing program's backend (the old figures.py called matplotlib.use)."""
    env = {**os.environ, "MPLBACKEND": "svg"}  # valid, and not what the figures are saved with (PNG, via Agg)
    done = subprocess.run(
        [sys.executable, "-c", BACKEND_CHECK, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "svg", "False"]  # backend kept, pyplot never imported
