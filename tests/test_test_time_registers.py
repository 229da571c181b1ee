"""Test-time registers (Jiang et al. 2025) on a model with planted register neurons: the finder recovers them,
applying them removes the outliers and leaves clean images alone, and the result saves, loads and is analysed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_analysis_lost import write_voc

from vitreg.analysis import analyze, run_analysis
from vitreg.analysis.loading import preprocess
from vitreg.cli import main
from vitreg.core.errors import UserError
from vitreg.core.images import image_processor
from vitreg.core.provenance import Provenance
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegModel
from vitreg.registers import RegisterNeurons, find_register_neurons, with_test_time_registers
from vitreg.registers.demo import PATCH, SIDE, marked_images, planted_model, write_planted_demo
from vitreg.registers.demo import PLANTED as PLANTED_NEURONS
from vitreg.registers.neurons import parse_layers

ROOT = Path(__file__).resolve().parents[1]
PLANTED = set(PLANTED_NEURONS)
NUM_MARKED, NUM_CLEAN = 8, 4  # marked_images(): images with white patches (outliers), then images without


@pytest.fixture(scope="module")
def planted():
    """The planted model, its images, and what the finder makes of them."""
    model, processor, images = planted_model(), image_processor(SIDE), marked_images()
    found = find_register_neurons(model, processor, images, image_size=SIDE, top_k=len(PLANTED), progress=False)
    return model, processor, images, found


def test_finder_recovers_the_planted_neurons(planted):
    _, _, _, found = planted
    chosen = {(n["layer"], n["neuron"]) for n in found.neurons}
    precision, recall = len(chosen & PLANTED) / len(chosen), len(chosen & PLANTED) / len(PLANTED)
    print(f"precision {precision:.2f} recall {recall:.2f}")
    assert precision >= 0.9 and recall >= 0.9
    # Outliers emerge after block 1, so blocks 0-1 are searched (upstream's highest_layer rule).
    assert found.layers == [0, 1] and found.detect_layer == 2
    assert found.images_with_outliers == NUM_MARKED and found.outlier_fraction > 0.01


def test_planted_neurons_stand_far_above_the_rest(planted):
    model, processor, images, _ = planted
    ranked = find_register_neurons(model, processor, images, image_size=SIDE, progress=False).neurons  # top 50
    assert {(n["layer"], n["neuron"]) for n in ranked[: len(PLANTED)]} == PLANTED
    assert ranked[len(PLANTED)]["score"] < 0.05 * ranked[len(PLANTED) - 1]["score"]


def test_applying_removes_the_outliers_and_keeps_clean_images(planted):
    model, processor, images, found = planted
    shifted = with_test_time_registers(model, found.pairs())
    before, after = (analyze(m, processor, images, SIDE, progress=False) for m in (model, shifted))
    fraction_before = np.mean([a.outlier_mask.mean() for a in before.images])
    fraction_after = np.mean([a.outlier_mask.mean() for a in after.images])
    # The finder's own detector too: block 1's output against the threshold found on the original model.
    at_detection = np.mean([(a.layer_norms[found.detect_layer] > found.threshold).mean() for a in after.images])
    cosines = []
    for image in images[NUM_MARKED:]:
        pixel_values = preprocess(processor, image, PATCH, SIDE)
        with torch.no_grad():
            cosines.append(
                float(torch.cosine_similarity(model(pixel_values).pooler_output, shifted(pixel_values).pooler_output))
            )
    print(f"outlier fraction {fraction_before:.4f} -> {fraction_after:.4f} (detection layer {at_detection:.4f}), "
          f"clean-image CLS cosine min {min(cosines):.5f}")  # fmt: skip
    assert fraction_before > 0.01 and fraction_after <= 0.001 and at_detection <= 0.001
    assert min(cosines) >= 0.99
    # The outliers moved into the test-time register, which comes back among the registers.
    register_norms = np.array([a.register_norms[0] for a in after.images[:NUM_MARKED]])
    assert (register_norms > before.threshold).all()


def test_shift_follows_upstream_activate_on_registers():
    config = tiny_config(num_register_tokens=1, num_test_time_registers=1, register_neurons=[[0, 1], [0, 2]])
    shift = ViTRegModel(config).encoder.layer[0].mlp.register_shift
    hidden = torch.arange(2 * 7 * 4, dtype=torch.float32).reshape(2, 7, 4) / 10  # [B, CLS + reg + ttr + 4 patches, M]
    hidden[1, 5, 2] = -40.0  # sample 1's largest magnitude is negative: the sign is kept
    out = shift(hidden)
    assert torch.equal(out[:, :, [0, 3]], hidden[:, :, [0, 3]])  # other units untouched
    assert torch.equal(out[:, :2, 1:3], hidden[:, :2, 1:3])  # CLS and the trained register keep theirs
    assert torch.equal(out[:, 3:, 1:3], torch.zeros(2, 4, 2))  # patches: zero
    assert out[0, 2, 1] == out[0, 2, 2] == hidden[0, :, 1:3].max()  # test-time register: one max per layer
    assert out[1, 2, 1] == out[1, 2, 2] == -40.0


def test_compiles_as_one_graph_with_the_same_gradients():
    config = tiny_config(num_test_time_registers=1, register_neurons=[[0, 1], [1, 7]], use_mask_token=False)
    model = ViTRegModel(config).train()
    pixel_values = torch.randn(2, 3, 28, 28)
    model(pixel_values).pooler_output.square().sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    torch.compile(model, fullgraph=True, backend="aot_eager")(pixel_values).pooler_output.square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_config_refuses_neurons_the_model_lacks():
    with pytest.raises(ValueError, match="outside the model's 2 blocks"):
        tiny_config(num_test_time_registers=1, register_neurons=[[2, 0]])
    with pytest.raises(ValueError, match="set both or neither"):
        tiny_config(num_test_time_registers=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The planted model as a folder, its images as files, and the CLI's neurons file and shifted folder."""
    root = tmp_path_factory.mktemp("ttr")
    write_planted_demo(root / "plain", root / "images")
    neurons, shifted = root / "neurons.json", root / "shifted"
    argv = ["registers", "find", str(root / "plain"), str(root / "images"), "--output", str(neurons)]
    assert main([*argv, "--top-k", str(len(PLANTED)), "--image-size", str(SIDE)]) == 0
    assert main(["registers", "apply", str(root / "plain"), str(neurons), str(shifted)]) == 0
    return root


def test_cli_find_writes_the_ranked_neurons(folders):
    record = RegisterNeurons.load(folders / "neurons.json")
    assert {tuple(pair) for pair in record.pairs()} == PLANTED
    assert record.architecture == {"num_hidden_layers": 3, "hidden_size": 32, "mlp_hidden_size": 128}
    assert len(record.images) == NUM_MARKED + NUM_CLEAN and record.images[0].endswith("image_00.png")


def test_folder_round_trip_card_and_remote_code(folders, planted):
    model, processor, images, _ = planted
    loaded = ViTRegModel.from_pretrained(folders / "shifted").eval()
    assert loaded.config.num_test_time_registers == 1
    assert {tuple(pair) for pair in loaded.config.register_neurons} == PLANTED
    expected = with_test_time_registers(model, sorted(PLANTED))
    pixel_values = preprocess(processor, images[0], PATCH, SIDE)
    with torch.no_grad():
        out, want = loaded(pixel_values), expected(pixel_values)
    assert torch.equal(out.last_hidden_state, want.last_hidden_state)
    assert out.register_tokens.shape == (1, 1, 32) and out.patch_tokens.shape == (1, 64, 32)
    card = (folders / "shifted" / "README.md").read_text()
    assert "1 test-time register" in card and "block 1: 5, 37, 70, 101" in card and "image_00.png" in card
    assert "Don't Need Trained Registers" in card and "`[B, 1, 32]`" in card
    provenance = Provenance.load(folders / "shifted")
    assert (
        provenance.name == "planted register neurons"
        and len(provenance.test_time_registers.images) == NUM_MARKED + NUM_CLEAN
    )
    # As remote code, without the vitreg package (what `vitreg publish` checks).
    check = [sys.executable, "-I", str(ROOT / "model_cards" / "load_check.py"), str(folders / "shifted")]
    done = subprocess.run(check, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["register_tokens"] == [1, 1, 32]


def test_analyze_compare_shows_before_and_after(folders, tmp_path):
    voc = tmp_path / "voc"
    write_voc(voc, wrong=-1)
    report = run_analysis(
        folders / "plain", [folders / "images"], tmp_path / "report", image_size=SIDE,
        compare=folders / "shifted", lost_root=voc, progress=False,
    )  # fmt: skip
    before, after = report["summary"], report["compare"]["summary"]
    assert before["outlier_fraction"] > 0.01 and after["outlier_fraction"] <= 0.001
    assert report["compare"]["num_test_time_registers"] == 1 and report["num_test_time_registers"] == 0
    assert after["register_norm_mean"] > before["patch_norm_median"]
    assert [run["model"] for run in report["lost"]] == [str(folders / "plain"), str(folders / "shifted")]
    page = (tmp_path / "report" / "index.html").read_text()
    assert "test-time registers" in page and page.count("CorLoc") >= 2


def test_bad_neurons_files_are_refused_in_one_line(folders, tmp_path, capsys):
    record = json.loads((folders / "neurons.json").read_text())
    other = dict(record, architecture={**record["architecture"], "mlp_hidden_size": 4096})
    wrong_index = dict(record, neurons=[{"layer": 1, "neuron": 999, "score": 1.0}])
    for name, values in (("other.json", other), ("index.json", wrong_index), ("junk.json", {"neurons": 3})):
        (tmp_path / name).write_text(json.dumps(values))
    cases = {
        "other.json": "found on a model of 3 blocks x 4096 MLP units (width 32); this one has 3 blocks x 128",
        "index.json": "register neuron [1, 999] is outside this model's 3 blocks x 128 MLP units",
        "junk.json": "is not a register-neurons file",
    }
    for name, message in cases.items():
        argv = ["registers", "apply", str(folders / "plain"), str(tmp_path / name), str(tmp_path / "out")]
        assert main(argv) == 1
        err = capsys.readouterr().err
        [line] = [line for line in err.splitlines() if line.startswith("vitreg registers: error:")]
        assert message in line and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()
    # Applying to a model that already has test-time registers.
    argv = ["registers", "apply", str(folders / "shifted"), str(folders / "neurons.json"), str(tmp_path / "out")]
    assert main(argv) == 1 and "already has test-time registers" in capsys.readouterr().err


def test_images_without_outliers_find_nothing(folders, planted, tmp_path, capsys):
    _, processor, images, _ = planted
    with pytest.raises(UserError, match="no high-norm outlier tokens"):
        find_register_neurons(planted_model(), processor, images[NUM_MARKED:], image_size=SIDE, progress=False)
    clean = tmp_path / "clean"
    clean.mkdir()
    for index, image in enumerate(images[NUM_MARKED:]):
        image.save(clean / f"clean_{index}.png")
    out = tmp_path / "neurons.json"
    argv = ["registers", "find", str(folders / "plain"), str(clean), "--output", str(out), "--image-size", str(SIDE)]
    assert main(argv) == 1
    assert "no register neurons to find" in capsys.readouterr().err and not out.exists()


def test_a_model_with_trained_registers_is_allowed(tmp_path, capsys):
    model = ViTRegModel(tiny_config(num_register_tokens=2, image_size=SIDE, patch_size=PATCH)).eval()
    save_model_folder(model, tmp_path / "reg2", Provenance(kind="random"), crop_size=SIDE)
    record = {
        "format": "vitreg-register-neurons/1", "model": "elsewhere",
        "architecture": {"num_hidden_layers": 2, "hidden_size": 32, "mlp_hidden_size": 128},
        "neurons": [{"layer": 1, "neuron": 7, "score": 3.0}], "detect_layer": 1, "threshold": 10.0,
        "threshold_rule": "fixed", "layers": [0, 1], "top_k": 50, "sparsity_filter": True, "images": ["a.png"],
        "images_with_outliers": 1, "outlier_fraction": 0.02,
    }  # fmt: skip
    (tmp_path / "neurons.json").write_text(json.dumps(record))
    argv = ["registers", "apply", str(tmp_path / "reg2"), str(tmp_path / "neurons.json"), str(tmp_path / "out")]
    assert main(argv) == 0
    assert "already has 2 trained registers" in capsys.readouterr().out
    loaded = ViTRegModel.from_pretrained(tmp_path / "out")
    assert loaded.config.num_prefix_tokens == 1 + 2 + 1
    with torch.no_grad():
        out = loaded(torch.randn(1, 3, SIDE, SIDE))
    assert out.register_tokens.shape == (1, 3, 32) and out.patch_tokens.shape == (1, 64, 32)


def test_parse_layers():
    assert parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    for text in ("8", "a-b", "3-1"):
        with pytest.raises(UserError, match="--layers"):
            parse_layers(text, 8)
