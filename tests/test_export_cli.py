"""`vitreg export onnx` on the shared layer: models opened by `vitreg.core.opening.open_model` (any source, any head,
conversion imported only for what needs converting), outputs written by `atomic_output_file`, the common flags
declared once, refusals before any weights load, and a missing `[onnx]` package named in one line."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import randomize_, tiny_config

from vitreg.cli import main
from vitreg.core.flags import add_common_flags
from vitreg.export import ONNXRuntimeModel, export_onnx, onnx_export
from vitreg.export import cli as export_cli
from vitreg.modeling_vitreg import ViTRegModel

ONE_LINE_EXTRA = "needs the package {!r}, which the [onnx] extra installs: pip install 'vitreg[onnx]'"


@pytest.fixture
def model_folder(tmp_path):
    """A saved one-block ViTReg with a 4 x 4 grid of 14 px patches."""
    model = randomize_(ViTRegModel(tiny_config(num_hidden_layers=1, image_size=56)))
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


# `vitreg export onnx` in a fresh interpreter where `hidden` cannot be imported (as without the [onnx] extra), or
# where everything is there and the modules it imported are listed afterwards.
RUNNER = """
import json, sys
hidden = sys.argv[1]
if hidden:
    sys.modules[hidden] = None  # `import hidden` now raises ModuleNotFoundError, as for a package not installed
from vitreg.cli import main
status = main(["export", "onnx", *sys.argv[2:], "--no-progress"])
print("MODULES " + json.dumps(sorted(name for name in sys.modules if name.startswith("vitreg."))))
sys.exit(status)
"""


def run_export(hidden: str, *arguments: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RUNNER, hidden, *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_a_missing_extra_is_one_line(model_folder, tmp_path, package):
    done = run_export(package, str(model_folder), str(tmp_path / "model.onnx"), cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [f"vitreg export: error: {ONE_LINE_EXTRA.format(package)}"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # nothing written


def test_a_vitreg_folder_exports_without_the_converters(model_folder, tmp_path):
    """Opening a ViTReg folder is the Auto classes' job: the conversion package is not even imported."""
    done = run_export("", str(model_folder), str(tmp_path / "model.onnx"), "--dynamic", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    modules = json.loads(done.stdout.split("MODULES ", 1)[1])
    assert "vitreg.core.opening" in modules and "vitreg.export.onnx_export" in modules
    assert not [name for name in modules if name.startswith("vitreg.conversion")]
    runtime = ONNXRuntimeModel(tmp_path / "model.onnx")
    pixel_values = torch.randn(1, 3, 70, 42)  # a size the export never saw
    with torch.inference_mode():
        expected = ViTRegModel.from_pretrained(model_folder).eval()(pixel_values).last_hidden_state
    np.testing.assert_allclose(runtime(pixel_values)["last_hidden_state"], expected.numpy(), atol=1e-4, rtol=0)


def test_any_source_exports_as_a_backbone(tmp_path):
    """A transformers Dinov2WithRegisters folder, converted in memory by the opening layer, as `--head backbone`:
    its feature maps equal transformers' own Dinov2WithRegistersBackbone on the same folder."""
    from transformers import Dinov2WithRegistersBackbone, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
        image_size=56, num_register_tokens=4,
    )  # fmt: skip
    randomize_(Dinov2WithRegistersModel(config)).save_pretrained(tmp_path / "hf")
    output = tmp_path / "backbone.onnx"
    assert main(["export", "onnx", str(tmp_path / "hf"), str(output), "--head", "backbone", "--no-progress"]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["backbone.onnx", "hf"]  # no converted folder
    reference = Dinov2WithRegistersBackbone.from_pretrained(tmp_path / "hf", out_features=["stage2"]).eval()
    pixel_values = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        expected = reference(pixel_values).feature_maps[0]  # [2, 32, 4, 4]
    runtime = ONNXRuntimeModel(output)
    assert runtime.head == "backbone" and runtime.output_names == ["stage2"]
    np.testing.assert_allclose(runtime(pixel_values)["stage2"], expected.numpy(), atol=1e-4, rtol=0)


def test_image_size_takes_one_side_or_two(model_folder, tmp_path, capsys):
    """`--image-size N` is the N x N square the model sees, as in every command; `H W` stays for other shapes."""
    output = tmp_path / "square.onnx"
    assert main(["export", "onnx", str(model_folder), str(output), "--image-size", "42", "--no-verify"]) == 0
    meta = {prop.key: prop.value for prop in onnx.load(str(output), load_external_data=False).metadata_props}
    assert meta["vitreg.image_size"] == "42x42" and meta["vitreg.dynamic"] == "false"
    capsys.readouterr()
    assert main(["export", "onnx", str(model_folder), str(output), "--image-size", "1", "2", "3"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--image-size takes N or H W, got 3 numbers" in line


def test_common_flags_are_the_shared_ones():
    """--revision, --overwrite and --no-progress: the same spellings, help and defaults as every command's."""
    export_parser, shared = argparse.ArgumentParser(), argparse.ArgumentParser()
    export_cli.add_arguments(export_parser)
    add_common_flags(shared, "revision", "overwrite", "no_progress")

    def described(parser, dest):
        (action,) = [action for action in parser._actions if action.dest == dest]
        return action.option_strings, action.help, action.default, type(action)

    for dest in ("revision", "overwrite", "no_progress"):
        assert described(export_parser, dest) == described(shared, dest), dest


def refusals(folder, tmp_path):
    """(arguments after `vitreg export onnx`, expected message) for refusals that need no weights."""
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"an earlier graph")
    return [
        ([str(folder), str(taken)], "taken.onnx exists; pass --overwrite to replace it"),
        ([str(folder), str(tmp_path)], "is a folder, not a file"),
        ([str(folder), "."], ". is a folder, not a file"),
        ([str(folder), "out.onnx", "--head"], "has no classification head"),
        ([str(folder), "out.onnx", "--image-size", "56", "60"], "--image-size 60 is not a positive multiple of"),
        ([str(folder), "out.onnx", "--image-size", "14", "--dynamic"], "at least 28 px a side"),
        ([str(folder), "out.onnx", "--opset", "11"], "opset 11 is too old"),
    ]


def test_refusals_come_before_any_weights_load(model_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was opened before the refusal")

    monkeypatch.setattr(onnx_export, "open_model", must_not_load)
    cases = refusals(model_folder, tmp_path)
    before = sorted(path.name for path in tmp_path.rglob("*"))
    for arguments, message in cases:
        assert main(["export", "onnx", *arguments]) == 1, arguments
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (arguments, err)
    assert sorted(path.name for path in tmp_path.rglob("*")) == before  # nothing written, nothing left
    assert (tmp_path / "taken.onnx").read_bytes() == b"an earlier graph"


def test_a_failed_overwrite_keeps_the_old_graph_and_weights(tmp_path, monkeypatch):
    """The graph and its external weights are replaced together, or neither is; a later small graph drops the
    older export's weights file."""
    model = randomize_(ViTRegModel(tiny_config(num_hidden_layers=1, image_size=56)))
    output = tmp_path / "model.onnx"
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # every weight in model.onnx.data
    export_onnx(model, output, progress=False)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert sorted(before) == ["model.onnx", "model.onnx.data"]
    graph = onnx.load(str(output), load_external_data=False)
    locations = {entry.value for tensor in graph.graph.initializer for entry in tensor.external_data}
    assert "model.onnx.data" in locations and not any(".tmp-" in value for value in locations)

    monkeypatch.setattr(onnx_export, "TOLERANCE", 0.0)  # every check fails
    with pytest.raises(onnx_export.UserError, match="disagrees with PyTorch"):
        export_onnx(model, output, overwrite=True, dynamic=True, progress=False)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before  # untouched, no temporaries

    monkeypatch.setattr(onnx_export, "TOLERANCE", 1e-4)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1 << 30)
    export_onnx(model, output, overwrite=True, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]
