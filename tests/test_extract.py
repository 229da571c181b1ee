"""`vitreg extract`: the same features as `pipeline("image-feature-extraction")`, from a folder or a `datasets`
imagefolder, unreadable images skipped and listed, and an interrupted run resumed without recomputing its shards."""

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import make_vitreg, tiny_config
from PIL import Image
from transformers import pipeline

from vitreg.cli import main
from vitreg.core import Provenance, UserError, image_processor, sample_photos
from vitreg.extract import BACKENDS, extract_features, load_features
from vitreg.extract.output import ShardWriter
from vitreg.model_cards import save_model_folder

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    save_model_folder(make_vitreg(tiny_config()), root / "model", Provenance(kind="random"))
    sample_photos(root / "photos", PHOTOS[:3], max_side=160)
    sample_photos(root / "photos" / "more", PHOTOS[3:], max_side=160)  # folders are searched recursively
    return root


def array(dataset, column: str) -> np.ndarray:
    return np.asarray(dataset.with_format("numpy")[column])


def test_features_match_the_pipeline(folders, tmp_path):
    out = tmp_path / "features"
    summary = extract_features(
        folders / "model", folders / "photos", out, what="cls,patch,registers,pooled", batch_size=2, workers=1
    )
    assert summary["rows"] == 5 and summary["grid"] == [16, 16] and summary["skipped"] == []
    features = load_features(out)
    assert features["id"] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "more/cat.jpg", "more/rocket.jpg"]
    extractor = pipeline("image-feature-extraction", model=str(folders / "model"))
    for row, name in enumerate(features["id"]):
        tokens = np.asarray(extractor(Image.open(folders / "photos" / name))[0])  # [1 + R + HW, D]
        assert np.abs(array(features, "cls")[row] - tokens[0]).max() <= 1e-4
        assert np.abs(array(features, "registers")[row] - tokens[1:5]).max() <= 1e-4
        assert np.abs(array(features, "patch")[row] - tokens[5:]).max() <= 1e-4  # registers never among patches
        assert np.abs(array(features, "pooled")[row] - tokens[0]).max() <= 1e-4
    assert datasets.load_from_disk(str(out)).num_rows == 5  # a plain datasets folder


def test_the_onnxruntime_backend_gives_the_same_features(folders, tmp_path):
    what = "cls,patch,registers,pooled"
    options = dict(what=what, batch_size=2, workers=0, progress=False)
    extract_features(folders / "model", folders / "photos", tmp_path / "torch", **options)
    extract_features(folders / "model", folders / "photos", tmp_path / "ort", backend="onnxruntime", **options)
    eager, exported = load_features(tmp_path / "torch"), load_features(tmp_path / "ort")
    assert exported["id"] == eager["id"]
    for column in what.split(","):
        assert np.abs(array(exported, column) - array(eager, column)).max() <= 1e-4, column
    with pytest.raises(UserError, match="drop --layers"):
        extract_features(folders / "model", folders / "photos", tmp_path / "x", backend="onnxruntime", layers=[0])


def test_a_datasets_imagefolder_and_unreadable_images(folders, tmp_path):
    photos = tmp_path / "photos"
    sample_photos(photos, PHOTOS[:3], max_side=160)
    (photos / "broken.jpg").write_text("not an image")
    summary = extract_features(folders / "model", photos, tmp_path / "from-folder", workers=0)
    assert summary["rows"] == 3 and [image for image, _ in summary["skipped"]] == ["broken.jpg"]
    with pytest.raises(UserError, match="broken.jpg: not a readable image"):
        extract_features(folders / "model", photos, tmp_path / "strict", workers=0, strict=True)
    saved = tmp_path / "saved"
    datasets.load_dataset("imagefolder", data_dir=str(photos), split="train").save_to_disk(str(saved))
    summary = extract_features(folders / "model", saved, tmp_path / "from-dataset", workers=0, what="cls")
    assert summary["rows"] == 3 and len(summary["skipped"]) == 1
    by_folder = load_features(tmp_path / "from-folder")
    by_dataset = load_features(tmp_path / "from-dataset")
    assert sorted(map(tuple, array(by_dataset, "cls").round(4))) == sorted(map(tuple, array(by_folder, "cls").round(4)))
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "texts"))
    with pytest.raises(UserError, match=r"has no image column \(columns: text\)"):
        extract_features(folders / "model", tmp_path / "texts", tmp_path / "none")


def test_an_interrupted_run_resumes_without_recomputing_finished_shards(folders, tmp_path, monkeypatch):
    out = tmp_path / "features"
    options = dict(shard_size=2, batch_size=1, workers=0, what="cls,patch")
    commit = ShardWriter.commit
    commits = []

    def killed_after_the_first_shard(writer):
        if commits:
            raise KeyboardInterrupt
        commits.append(writer.path)
        commit(writer)

    monkeypatch.setattr(ShardWriter, "commit", killed_after_the_first_shard)
    with pytest.raises(KeyboardInterrupt):
        extract_features(folders / "model", folders / "photos", out, **options)
    monkeypatch.setattr(ShardWriter, "commit", commit)
    assert sorted(path.name for path in (out / "shards").iterdir()) == ["00000.arrow", "00000.json"]
    with pytest.raises(UserError, match="unfinished extraction; run the same command again"):
        load_features(out)
    with pytest.raises(FileNotFoundError):
        datasets.load_from_disk(str(out))  # never presented as complete
    with pytest.raises(UserError, match=r"other settings \(--what was cls,patch, now cls\): rerun it as it was"):
        extract_features(folders / "model", folders / "photos", out, **{**options, "what": "cls"})
    first_shard = (out / "shards" / "00000.arrow").stat().st_mtime_ns
    seen = []
    torch_backend = BACKENDS["torch"]

    def counting(*args):
        run = torch_backend(*args)
        return lambda pixels: seen.append(len(pixels)) or run(pixels)

    monkeypatch.setitem(BACKENDS, "torch", counting)
    summary = extract_features(folders / "model", folders / "photos", out, **options)
    assert sum(seen) == 3 and summary["images_this_run"] == 3  # shards 1 and 2 only
    assert (out / "shards" / "00000.arrow").stat().st_mtime_ns == first_shard
    resumed = load_features(out)
    extract_features(folders / "model", folders / "photos", tmp_path / "whole", workers=0)
    whole = load_features(tmp_path / "whole")
    assert resumed["id"] == whole["id"]
    assert np.abs(array(resumed, "patch") - array(whole, "patch")).max() <= 1e-5
    with pytest.raises(UserError, match="holds finished features; pass --overwrite"):
        extract_features(folders / "model", folders / "photos", out, **options)


def test_cli_layers_and_sizes(folders, tmp_path, capsys):
    out = tmp_path / "layers"
    argv = ["extract", str(folders / "model"), str(folders / "photos"), "--out", str(out), "--image-size", "56"]
    assert main([*argv, "--layers", "0,-1", "--workers", "0", "--no-progress"]) == 0  # the one --layers format
    printed = capsys.readouterr().out
    assert "5 images" in printed and "images/s" in printed
    features = load_features(out)
    assert array(features, "cls").shape == (5, 2, 32) and array(features, "patch").shape == (5, 2, 16, 32)
    summary = json.loads((out / "extract.json").read_text())
    assert summary["layers"] == [0, 1] and summary["image_size"] == [56, 56]
    final = tmp_path / "final"
    assert main(["extract", str(folders / "model"), str(folders / "photos"), "--output_dir", str(final),
                 "--image_size", "56", "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    last_block = array(features, "patch")[:, 1]
    assert np.abs(last_block - array(load_features(final), "patch")).max() <= 1e-5  # the final output is block -1


def test_bad_requests_are_one_line_errors(folders, tmp_path, capsys):
    model, photos = str(folders / "model"), str(folders / "photos")
    no_registers = tmp_path / "plain"
    save_model_folder(make_vitreg(tiny_config(num_register_tokens=0)), no_registers, Provenance(kind="random"))
    cases = {
        "--what takes a comma-separated list": [model, photos, "--what", "cls,everything"],
        "no register tokens": [str(no_registers), photos, "--what", "registers"],
        "--image-size 50 is not a positive multiple of the patch size 14": [model, photos, "--image-size", "50"],
        "'pooled' is the final output's": [model, photos, "--what", "pooled", "--layers", "1"],
        "--layers '2': the model has blocks 0-1": [model, photos, "--layers", "2"],
        "--layers '1-0': range 1-0 runs backwards": [model, photos, "--layers", "1-0"],
        "does not exist": [model, str(tmp_path / "absent")],
        "org/absent is not in the Hub cache": ["org/absent", photos],
    }
    for message, argv in cases.items():
        assert main(["extract", *argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 1, message
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("vitreg extract: error: ") and message in error, error
    assert not (tmp_path / "out" / "state.json").exists()


def model_tokens(folder, image: Image.Image, processor=None):
    """The model's own output for one image, through transformers' Auto classes and the folder's processor."""
    from transformers import AutoImageProcessor, AutoModel

    processor = processor or AutoImageProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(processor(image, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("trained, test_time", [(4, 1), (0, 2)])
def test_registers_include_the_test_time_ones(folders, tmp_path, trained, test_time):
    # Issue 19 item 1: the column was declared with the trained registers only and written with all of them
    # (unreadable later), and a model with test-time registers only was refused `registers`.
    config = tiny_config(
        num_register_tokens=trained, num_test_time_registers=test_time, register_neurons=[[0, 3], [1, 7]]
    )
    save_model_folder(make_vitreg(config), tmp_path / "model", Provenance(kind="random"))
    what = "cls,registers,patch"
    summary = extract_features(tmp_path / "model", folders / "photos", tmp_path / "final", what=what, workers=0,
                               progress=False)  # fmt: skip
    assert summary["num_register_tokens"] == trained + test_time
    final = load_features(tmp_path / "final")
    assert array(final, "registers").shape == (5, trained + test_time, 32)
    extract_features(tmp_path / "model", folders / "photos", tmp_path / "layers", what=what, layers="0,-1", workers=0,
                     progress=False)  # fmt: skip
    layers = load_features(tmp_path / "layers")
    assert array(layers, "registers").shape == (5, 2, trained + test_time, 32)
    for row, name in enumerate(final["id"]):
        reference = model_tokens(tmp_path / "model", Image.open(folders / "photos" / name))
        registers = reference.register_tokens[0].numpy()  # [R + T, D]: the model's own cut
        assert np.abs(registers[trained:]).max() > 0.1  # the test-time registers carry something
        assert np.abs(array(final, "registers")[row] - registers).max() <= 1e-4
        assert np.abs(array(layers, "registers")[row, 1] - registers).max() <= 1e-4  # block -1, normed: the output
        assert np.abs(array(final, "patch")[row] - reference.patch_tokens[0].numpy()).max() <= 1e-4


def test_image_size_keeps_the_processors_resize_ratio(folders, tmp_path):
    # Issue 19 item 2/19: --image-size N is the side the model sees, the short side resized by the processor's own
    # ratio (here 1: resize to 224, crop 224), not always DINOv2's 256/224.
    tight = image_processor(224, resize_size=224)
    save_model_folder(make_vitreg(tiny_config()), tmp_path / "model", Provenance(kind="random"), processor=tight)
    summary = extract_features(tmp_path / "model", folders / "photos", tmp_path / "out", image_size=112, what="cls",
                               workers=0, progress=False)  # fmt: skip
    assert summary["image_size"] == [112, 112]
    features = load_features(tmp_path / "out")
    reference_processor = image_processor(112, resize_size=112)  # restated: short side to 112, center crop 112
    for row, name in enumerate(features["id"]):
        reference = model_tokens(tmp_path / "model", Image.open(folders / "photos" / name), reference_processor)
        assert np.abs(array(features, "cls")[row] - reference.last_hidden_state[0, 0].numpy()).max() <= 1e-4
