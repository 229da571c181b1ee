"""Test-time registers (Jiang et al. 2025) on a model with planted register neurons: the finder recovers them,
applying them removes the outliers and leaves clean images alone, the model equals upstream's own hooks (restated
below), and the result saves, loads and is analysed."""

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_config
from test_analysis_lost import write_voc

from vitreg.analysis import analyze, run_analysis
from vitreg.analysis.loading import preprocess
from vitreg.cli import main
from vitreg.core.errors import UserError
from vitreg.core.provenance import Provenance
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegModel
from vitreg.registers import RegisterNeurons, find_register_neurons, with_test_time_registers
from vitreg.registers.demo import PATCH, SIDE, marked_images, planted_model, planted_processor, write_planted_demo
from vitreg.registers.demo import PLANTED as PLANTED_NEURONS

ROOT = Path(__file__).resolve().parents[1]
PLANTED = set(PLANTED_NEURONS)
NUM_MARKED, NUM_CLEAN = 8, 4  # marked_images(): images with white patches (outliers), then images without


@pytest.fixture(scope="module")
def planted():
    """The planted model, its images, and what the finder makes of them."""
    model, processor, images = planted_model(), planted_processor(), marked_images()
    found = find_register_neurons(model, processor, images, image_size=SIDE, top_k=len(PLANTED), progress=False)
    return model, processor, images, found


def test_finder_recovers_the_planted_neurons(planted):
    _, _, _, found = planted
    chosen = {(n["layer"], n["neuron"]) for n in found.neurons}
    precision, recall = len(chosen & PLANTED) / len(chosen), len(chosen & PLANTED) / len(PLANTED)
    print(f"precision {precision:.2f} recall {recall:.2f}")
    assert precision >= 0.9 and recall >= 0.9
    # Outliers emerge after block 1, so blocks 0-1 are searched (upstream's highest_layer rule).
    assert found.layers == [0, 1] and found.detect_layer == 1
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
    at_detection = np.mean([(a.norms_after(found.detect_layer) > found.threshold).mean() for a in after.images])
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


# ---- Upstream's intervention, restated from nickjiang2378/test-time-registers ------------------------------------
# `sign_max` (shared/utils.py) and `activate_on_registers` (shared/hook_fn.py) at commit
# fd81fd22d64511b827ac2fa0ce109625551aad73 (the last to change either; the same at 860df435, September 2025),
# verbatim but for the branches of a list `scale` and of `normal_values` other than the default "zero".
# shared/hook_manager.py registers it as a forward hook on the MLP activation of each block with register neurons
# (dinov2/dinov2_hook_manager.py: `blocks[layer].mlp.act`), and upstream's DINOv2 appends `num_register_tokens` zero
# tokens after the patches (dinov2/dinov2/models/vision_transformer.py, `prepare_tokens_with_masks`).


def sign_max(tensor):
    pos_max = torch.max(tensor)
    neg_max = torch.min(tensor)
    return pos_max if abs(pos_max) > abs(neg_max) else neg_max


def activate_on_registers(module, input, output, num_registers, neuron_indices, scale=1.0, normal_values="zero"):
    # For all register neurons, set the activations of the extra registers to their max activation across patches
    peak = sign_max(output[0, :, neuron_indices])  # (upstream writes this inline)
    output[0, -num_registers:, neuron_indices] = scale * peak.unsqueeze(0).expand(num_registers, -1)
    if normal_values == "zero":
        # Set all image patch activations to 0
        output[0, 1:-num_registers, neuron_indices] = 0
    else:
        raise NotImplementedError(f"not restated: normal_values={normal_values!r}")


def upstream_hidden_states(plain: ViTRegModel, pixel_values, num_registers: int, pairs) -> list[torch.Tensor]:
    """Every block's output (and the final normed tokens) of `plain` with upstream's test-time registers, reordered
    from upstream's `[CLS, patches, registers]` to ViTReg's `[CLS, registers, patches]`.

    Upstream edits sample 0 of a batch in place and leaves the others alone, so this takes one image at a time.
    It has no trained registers beside test-time ones (its `1:-num_registers` would zero them, where ViTReg keeps
    them as it keeps CLS), so the model has none.
    """
    assert plain.config.num_prefix_tokens == 1 and pixel_values.shape[0] == 1

    def append_registers(module, args, output):  # [1, 1 + HW, D] -> [1, 1 + HW + T, D]
        return torch.cat((output, output.new_zeros(1, num_registers, output.shape[-1])), dim=1)

    handles = [plain.embeddings.register_forward_hook(append_registers)]
    for layer in sorted({layer for layer, _ in pairs}):
        neurons = [neuron for block, neuron in pairs if block == layer]
        hook = partial(activate_on_registers, num_registers=num_registers, neuron_indices=neurons)
        handles.append(plain.encoder.layer[layer].mlp.activation.register_forward_hook(hook))
    try:
        with torch.no_grad():
            output = plain(pixel_values, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    states = [*output.hidden_states[1:], output.last_hidden_state]
    return [torch.cat((h[:, :1], h[:, -num_registers:], h[:, 1:-num_registers]), dim=1) for h in states]


def vitreg_hidden_states(shifted: ViTRegModel, pixel_values) -> list[torch.Tensor]:
    """Every block's output and the final normed tokens, `[B, 1 + T + HW, D]` each."""
    with torch.no_grad():
        output = shifted(pixel_values, output_hidden_states=True)
    return [*output.hidden_states[1:], output.last_hidden_state]


def assert_same_tokens(got: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    """Every token of every block equal up to rounding, naming the block and token that differ. Only the order of
    the tokens in attention's sums differs between the two: 2e-7 of the largest value here."""
    assert len(got) == len(expected)
    for block, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape, (what, block)
        worst = (a - b).abs().amax(dim=-1)  # [B, N]
        token = int(worst.amax(dim=0).argmax())
        bound = 1e-6 * (1 + b.abs().max())
        assert worst.max() <= bound, f"{what}: block {block} output, token {token} differs by {worst.max():.1e}"


def plant_negative_neuron(model: ViTRegModel, layer: int, neuron: int) -> None:
    """Make a unit's GELU output negative on every token, so the largest magnitude is a negative value."""
    with torch.no_grad():
        fc1 = model.encoder.layer[layer].mlp.fc1
        fc1.weight[neuron] *= 0.05
        fc1.bias[neuron] = -1.5  # GELU(-1.5 +- small) is about -0.1: negative, never 0


def plant_cls_neuron(model: ViTRegModel, neuron: int, channel: int = 0) -> None:
    """Make a unit of block 0 fire on the CLS token far more than on any patch, so the peak is not a patch's."""
    with torch.no_grad():
        model.embeddings.cls_token[..., channel] = 30.0  # dominates the CLS token's norm, and only that token's
        fc1 = model.encoder.layer[0].mlp.fc1
        fc1.weight[neuron] = 0.0
        fc1.weight[neuron, channel] = 2.0
        fc1.bias[neuron] = -4.0  # CLS: about 2 x sqrt(32) - 4 = 7; patches: about 0


UPSTREAM_CASES = {
    # name: (test-time registers, [layer, neuron] pairs, planted unit: ("negative" | "cls", layer, neuron) or None)
    "one register, both blocks": (1, [[0, 3], [0, 17], [1, 5], [1, 100]], None),
    "two registers": (2, [[0, 3], [1, 40], [1, 41]], None),
    "negative peak keeps its sign": (1, [[0, 9], [1, 7]], ("negative", 1, 7)),
    "peak on the CLS token": (1, [[0, 11], [1, 7]], ("cls", 0, 11)),
}


@pytest.mark.parametrize("case", UPSTREAM_CASES)
def test_test_time_registers_equal_upstream_activate_on_registers(case):
    num_registers, pairs, planted = UPSTREAM_CASES[case]
    plain = randomize_(ViTRegModel(tiny_config(num_register_tokens=0, image_size=56))).eval()
    if planted and planted[0] == "negative":
        plant_negative_neuron(plain, *planted[1:])
    elif planted:
        plant_cls_neuron(plain, planted[2])
    config = tiny_config(
        num_register_tokens=0, image_size=56, num_test_time_registers=num_registers, register_neurons=pairs
    )
    shifted = ViTRegModel(config).eval()
    shifted.load_state_dict(plain.state_dict())  # the same weights: test-time registers add none
    images = torch.randn(3, 3, 56, 70)  # 4 x 5 patches
    alone = [upstream_hidden_states(plain, image[None], num_registers, pairs) for image in images]
    for index, image in enumerate(images):
        assert_same_tokens(vitreg_hidden_states(shifted, image[None]), alone[index], f"image {index}")
    # ViTReg gives every image of a batch its own peak, which upstream (sample 0 only) gives an image alone.
    batched = vitreg_hidden_states(shifted, images)
    expected = [torch.cat([states[block] for states in alone]) for block in range(len(batched))]
    assert_same_tokens(batched, expected, "batch of 3")


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
    # The folder does what upstream's hooks do to the original model, on an image whose outliers fire the neurons.
    pixel_values = preprocess(processor, images[0], PATCH, SIDE)
    expected = upstream_hidden_states(model, pixel_values, 1, sorted(PLANTED))
    assert_same_tokens(vitreg_hidden_states(loaded, pixel_values), expected, "the shifted folder")
    with torch.no_grad():
        out = loaded(pixel_values)
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
        "index.json": "register neuron [1, 999] is outside the model's 3 blocks x 128 MLP units",
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
