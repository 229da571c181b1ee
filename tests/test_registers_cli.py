"""`vitreg registers find|apply` as a user meets them: separate flags for each action, 0-based blocks everywhere, the
one `--layers` format, a positive `--threshold`, unreadable images skipped, a read-only output refused in one line,
--no-progress, and `apply` keeping what `open_model` says of the source (its processor and its provenance)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from vitreg.cli import main
from vitreg.conversion import write_random_dinov3_checkpoint
from vitreg.core.errors import UserError
from vitreg.core.opening import open_model
from vitreg.core.provenance import Provenance
from vitreg.modeling_vitreg import ViTRegConfig
from vitreg.registers import RegisterNeurons, with_test_time_registers
from vitreg.registers.demo import PLANTED, planted_model, write_planted_demo

FIND_ONLY = ("--detect-layer", "--threshold", "--no-sparsity-filter", "--image-size", "--no-crop", "--output")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The planted model (3 blocks, outliers after block 1) and its images, in nested folders beside a broken file."""
    root = tmp_path_factory.mktemp("registers-cli")
    write_planted_demo(root / "plain", root / "images")
    nested = root / "images" / "more" / "deeper"
    nested.mkdir(parents=True)
    for name in ("image_10.png", "image_11.png"):
        shutil.move(root / "images" / name, nested / name)
    (root / "images" / "notes.png").write_text("not an image")
    return root


def find(demo: Path, output: Path, *flags: str) -> int:
    """`vitreg registers find` on the demo model and images."""
    argv = ["registers", "find", str(demo / "plain"), str(demo / "images"), "--output", str(output), "--no-progress"]
    return main([*argv, *flags])


def test_find_and_apply_have_their_own_flags(demo, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["registers", "apply", "--help"])
    assert done.value.code == 0
    apply_help = capsys.readouterr().out
    assert "--num-registers" in apply_help and not any(flag in apply_help for flag in FIND_ONLY)
    with pytest.raises(SystemExit):
        main(["registers", "find", "--help"])
    find_help = capsys.readouterr().out
    assert all(flag in find_help for flag in FIND_ONLY) and "--num-registers" not in find_help
    # A find flag given to apply is an error, not silently ignored.
    neurons = tmp_path / "neurons.json"
    assert find(demo, neurons, "--top-k", "4") == 0
    with pytest.raises(SystemExit) as done:
        main(["registers", "apply", str(demo / "plain"), str(neurons), str(tmp_path / "out"), "--threshold", "3"])
    assert done.value.code == 2 and "unrecognized arguments: --threshold" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_blocks_are_0_based_and_layers_take_the_one_format(demo, tmp_path, capsys):
    neurons = tmp_path / "neurons.json"
    # The outliers appear after block 1 (0-based): --detect-layer 1 is the default -2 of a 3-block model.
    assert find(demo, neurons, "--detect-layer", "1", "--top-k", "4") == 0
    record = RegisterNeurons.load(neurons)
    assert record.detect_layer == 1 and {tuple(pair) for pair in record.pairs()} == set(PLANTED)
    assert "have outliers after block 1 " in capsys.readouterr().out
    assert find(demo, neurons, "--detect_layer", "-2", "--top-k", "4", "--overwrite") == 0
    assert RegisterNeurons.load(neurons).detect_layer == 1
    assert find(demo, neurons, "--detect-layer", "3", "--overwrite") == 1  # blocks 0-2
    assert "--detect-layer '3': the model has blocks 0-2" in capsys.readouterr().err
    # --layers: comma-separated numbers and ranges, negatives from the end, as in every command.
    assert find(demo, neurons, "--layers=-2", "--top-k", "4", "--overwrite") == 0
    assert RegisterNeurons.load(neurons).layers == [1]
    assert find(demo, neurons, "--layers", "0,1-2", "--top-k", "4", "--overwrite") == 0
    assert RegisterNeurons.load(neurons).layers == [0, 1, 2]
    capsys.readouterr()
    assert find(demo, neurons, "--layers", "1-0", "--overwrite") == 1
    assert "range 1-0 runs backwards" in capsys.readouterr().err


def test_format_1_files_counted_hidden_states(demo, tmp_path):
    values = json.loads((demo / "plain" / "config.json").read_text())
    old = {
        "format": "vitreg-register-neurons/1", "model": "m", "neurons": [{"layer": 1, "neuron": 5, "score": 1.0}],
        "architecture": {"num_hidden_layers": values["num_hidden_layers"], "hidden_size": 32, "mlp_hidden_size": 128},
        "detect_layer": 2, "threshold": 1.0, "threshold_rule": "auto", "layers": [0, 1], "top_k": 50,
        "sparsity_filter": True, "images": ["a.png"], "images_with_outliers": 1, "outlier_fraction": 0.1,
    }  # fmt: skip
    (tmp_path / "old.json").write_text(json.dumps(old))
    record = RegisterNeurons.load(tmp_path / "old.json")
    assert record.detect_layer == 1 and record.format == "vitreg-register-neurons/2"  # hidden state 2: after block 1


def test_a_threshold_must_be_positive(demo, tmp_path, capsys):
    for value in ("-1", "0"):
        argv = ["registers", "find", str(tmp_path / "no-model"), str(demo / "images"), "--output", str(tmp_path / "n")]
        assert main([*argv, "--threshold", value]) == 1  # refused before the model is looked for
        err = capsys.readouterr().err
        assert err.strip() == f"vitreg registers: error: --threshold must be a positive norm, got {float(value)}"
    assert not (tmp_path / "n").exists()


def test_unreadable_images_are_skipped_and_folders_searched_recursively(demo, tmp_path, capsys):
    neurons = tmp_path / "neurons.json"
    assert find(demo, neurons, "--top-k", "4") == 0
    record = RegisterNeurons.load(neurons)
    assert [Path(name).name for name in record.images] == [f"image_{index:02d}.png" for index in range(12)]
    assert record.images[-1] == str(demo / "images" / "more" / "deeper" / "image_11.png")
    assert [name for name, _ in record.skipped] == [str(demo / "images" / "notes.png")]
    assert record.skipped[0][1].startswith("UnidentifiedImageError")
    printed = capsys.readouterr().out
    assert f"skipped {demo / 'images' / 'notes.png'}: UnidentifiedImageError" in printed
    assert "1 unreadable images skipped" in printed


def test_a_read_only_output_is_refused_in_one_line_before_the_model_loads(demo, tmp_path, monkeypatch, capsys):
    (tmp_path / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked" and real_access(path, mode))
    missing_model = str(tmp_path / "not-yet-downloaded")
    argv = ["registers", "find", missing_model, str(demo / "images"), "--output", str(tmp_path / "locked" / "n.json")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitreg registers: error: cannot write in") and "locked" in err
    assert list((tmp_path / "locked").iterdir()) == []


def test_no_progress_silences_find_and_apply(demo, tmp_path, capsys):
    neurons, out = tmp_path / "neurons.json", tmp_path / "shifted"
    assert find(demo, neurons, "--top-k", "4") == 0
    assert main(["registers", "apply", str(demo / "plain"), str(neurons), str(out), "--no_progress"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["registers", "find", str(demo / "plain"), str(demo / "images"), "--output", str(neurons),
                 "--overwrite", "--top-k", "4"]) == 0  # fmt: skip
    assert "scoring neurons" in capsys.readouterr().err  # the bars, without --no-progress


def test_apply_keeps_the_sources_processor(demo, tmp_path):
    neurons, out = tmp_path / "neurons.json", tmp_path / "shifted"
    assert find(demo, neurons, "--top-k", "4") == 0
    assert main(["registers", "apply", str(demo / "plain"), str(neurons), str(out), "--no-progress"]) == 0
    source = json.loads((demo / "plain" / "preprocessor_config.json").read_text())
    assert source["size"] == {"shortest_edge": 64} and source["crop_size"] == {"height": 64, "width": 64}
    assert json.loads((out / "preprocessor_config.json").read_text()) == source


def test_apply_keeps_what_open_model_knows_of_a_converted_source(tmp_path):
    """A DINOv3 checkpoint converted in memory keeps its DINOv3 licence and format in the written folder."""
    source = write_random_dinov3_checkpoint(tmp_path / "v3.pth", "dinov3_vits16", hidden_size=64, num_hidden_layers=2)
    config = open_model(source).model.config
    record = {
        "format": "vitreg-register-neurons/2", "model": str(source), "neurons": [{"layer": 1, "neuron": 3, "score": 2}],
        "architecture": {"num_hidden_layers": 2, "hidden_size": 64, "mlp_hidden_size": config.mlp_hidden_size},
        "detect_layer": 0, "threshold": 1.0, "threshold_rule": "auto", "layers": [0, 1], "top_k": 50,
        "sparsity_filter": True, "images": ["a.png"], "images_with_outliers": 1, "outlier_fraction": 0.1,
    }  # fmt: skip
    (tmp_path / "neurons.json").write_text(json.dumps(record))
    argv = ["registers", "apply", str(source), str(tmp_path / "neurons.json"), str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    provenance = Provenance.load(tmp_path / "out")
    assert provenance.license == "dinov3-license" and provenance.source_format.startswith("dinov3")
    assert provenance.test_time_registers.neurons == [[1, 3]]


def test_neurons_are_validated_by_the_config_alone():
    """registers refuses what ViTRegConfig refuses, with the config's own words."""
    model = planted_model()
    with pytest.raises(ValueError) as refused:
        ViTRegConfig.from_dict({**model.config.to_dict(), "num_test_time_registers": 1, "register_neurons": [[1, 999]]})
    with pytest.raises(UserError) as error:
        with_test_time_registers(model, [[1, 999]])
    assert str(error.value) == str(refused.value)
