"""`vitreg export onnx`: dynamic graphs exact at every size for both position-interpolation variants, the heads, the
runtime wrapper, and bad input refused in one line with nothing left behind."""

import numpy as np
import onnx
import pytest
import torch
from conftest import randomize_, tiny_config

from vitreg.cli import main
from vitreg.core.errors import UserError
from vitreg.export import ONNXRuntimeModel, export_onnx
from vitreg.export import onnx_export as onnx_export_module
from vitreg.modeling_vitreg import ViTRegBackbone, ViTRegForImageClassification, ViTRegModel

TOLERANCE = 1e-4  # fp32, max abs, every output
# Sizes the export neither traced (224 x 224) nor checked itself (224 x 224 and 266 x 196): DINOv2's 518, non-square
# both ways, and smaller than trained.
UNSEEN_SIZES = [(518, 518), (224, 308), (98, 154), (392, 182)]
OUTPUT_NAMES = ["last_hidden_state", "pooler_output", "register_tokens", "patch_tokens"]  # ViTRegModelOutput's
VARIANTS = {
    "registers": dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0),
    "no registers": dict(num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1),
    # a no-register model with a test-time register: the neuron shift is in the graph too
    "test-time register": dict(
        num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1,
        num_test_time_registers=1, register_neurons=[[0, 3], [0, 17]],
    ),
}  # fmt: skip


def small_config(**overrides):
    """One block on a 16 x 16 grid of 14 px patches, so interpolation has room to matter at every size."""
    return tiny_config(num_hidden_layers=1, image_size=224, **overrides)


def saved(model, folder):
    model.save_pretrained(folder)
    return folder


def assert_equal_to_eager(got: dict[str, np.ndarray], expected: dict[str, torch.Tensor]) -> None:
    """Every output ONNX Runtime gave equals eager PyTorch's within TOLERANCE, at every token (the worst one named)."""
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        want = want.numpy()
        assert got[name].shape == want.shape, name
        close = np.abs(got[name] - want) <= TOLERANCE  # False for NaN too
        if close.ndim == 3:  # [B, N, D]: per token
            bad = np.flatnonzero(~close.all(axis=(0, 2)))
            assert bad.size == 0, f"{name}: tokens {bad[:8].tolist()} of {close.shape[1]} differ by more than 1e-4"
        np.testing.assert_allclose(got[name], want, atol=TOLERANCE, rtol=0, err_msg=name)


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    """A dynamic export of a random model of each variant, exported at 224 x 224."""
    folder = tmp_path_factory.mktemp(request.param.replace(" ", "-"))
    torch.manual_seed(0)
    model = randomize_(ViTRegModel(small_config(**VARIANTS[request.param])))
    report = export_onnx(saved(model, folder / "model"), folder / "model.onnx", dynamic=True)
    return model, report


def test_the_graph_is_valid_and_describes_itself(exported):
    _, report = exported
    onnx.checker.check_model(str(report.path), full_check=True)
    graph = onnx.load(str(report.path))
    meta = {prop.key: prop.value for prop in graph.metadata_props}
    assert meta["vitreg.patch_size"] == "14" and meta["vitreg.dynamic"] == "true"
    assert [output.name for output in graph.graph.output] == report.output_names
    assert report.output_names == OUTPUT_NAMES
    assert report.bytes == report.path.stat().st_size > 0
    # The export checked itself at its own size and one other; the tests below use sizes it saw neither way.
    assert "224x224" in report.max_abs_diff and len(report.max_abs_diff) == 2
    assert not set(report.max_abs_diff) & {f"{height}x{width}" for height, width in UNSEEN_SIZES}


@pytest.mark.parametrize("size", UNSEEN_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_output_equals_eager_pytorch_at_sizes_never_traced(exported, size):
    # The reference is the in-memory model the folder was saved from, run eagerly here: not export's own check.
    model, report = exported
    pixel_values = torch.randn(3, 3, *size)  # and a batch size the trace did not use (2)
    with torch.no_grad():
        output = model.eval()(pixel_values)
    expected = {name: output[name] for name in OUTPUT_NAMES}
    assert_equal_to_eager(ONNXRuntimeModel(report.path)(pixel_values), expected)


@pytest.mark.parametrize("head", ["classification", "backbone"])
def test_heads(tmp_path, head):
    config = small_config(num_labels=5, out_features=["stage1"], architectures=["ViTRegForImageClassification"])
    cls = ViTRegForImageClassification if head == "classification" else ViTRegBackbone
    model = randomize_(cls(config))
    folder = saved(model, tmp_path / "model")
    report = export_onnx(folder, tmp_path / "model.onnx", head=head, dynamic=True)
    assert report.output_names == (["logits"] if head == "classification" else ["stage1"])
    pixel_values = torch.randn(1, 3, 182, 98)
    with torch.no_grad():
        expected = model.eval()(pixel_values)
        expected = expected.logits if head == "classification" else expected.feature_maps[0]  # [1, D, 13, 7] maps
    assert_equal_to_eager(ONNXRuntimeModel(report.path)(pixel_values), {report.output_names[0]: expected})


def test_a_fixed_size_export_and_the_command(tmp_path, capsys):
    folder = saved(randomize_(ViTRegModel(small_config())), tmp_path / "model")
    output = tmp_path / "fixed.onnx"
    assert main(["export", "onnx", str(folder), str(output), "--image-size", "112", "154", "--opset", "18"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {output}") and "opset 18" in line and "112x154 px" in line
    runtime = ONNXRuntimeModel(output)
    assert runtime(np.zeros((3, 3, 112, 154), np.float32))["pooler_output"].shape == (3, 32)  # any batch
    with pytest.raises(UserError, match="exported for 112x154 images, got 224x224"):
        runtime(np.zeros((1, 3, 224, 224), np.float32))
    # Exists: refused without --overwrite, replaced with it.
    assert main(["export", "onnx", str(folder), str(output), "--dynamic"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", "onnx", str(folder), str(output), "--dynamic", "--overwrite"]) == 0
    assert ONNXRuntimeModel(output).dynamic


def test_weights_beside_the_graph_for_large_models(tmp_path, monkeypatch):
    # Protobuf stops at 2 GiB: past the threshold the weights go to OUT.onnx.data, written with the graph.
    monkeypatch.setattr(onnx_export_module, "EXTERNAL_DATA_BYTES", 0)
    model = randomize_(ViTRegModel(small_config())).eval()
    report = export_onnx(model, tmp_path / "big.onnx", dynamic=True)
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and report.bytes == data.stat().st_size + report.path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    pixel_values = torch.randn(1, 3, 70, 126)
    with torch.no_grad():
        output = model(pixel_values)
    assert_equal_to_eager(ONNXRuntimeModel(report.path)(pixel_values), {name: output[name] for name in OUTPUT_NAMES})


def test_runtime_refuses_sizes_the_patch_does_not_divide(exported):
    runtime = ONNXRuntimeModel(exported[1].path)
    with pytest.raises(UserError, match="image size 100x98 is not a multiple of the patch size 14"):
        runtime(np.zeros((1, 3, 100, 98), np.float32))
    with pytest.raises(UserError, match="at least 2 patches a side"):
        runtime(np.zeros((1, 3, 14, 98), np.float32))


def bad_inputs(tmp_path):
    """(arguments after `vitreg export onnx`, expected message) for each kind of bad input."""
    folder = saved(ViTRegModel(small_config()), tmp_path / "model")
    foreign = tmp_path / "bert"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return [
        ([str(foreign), "out.onnx"], "holds a 'bert' model, not a ViTReg model or one vitreg converts"),
        ([str(tmp_path / "missing"), "out.onnx"], "missing does not exist"),
        ([str(folder), "out.onnx", "--opset", "11"], "opset 11 is too old"),
        ([str(folder), "out.onnx", "--image-size", "224", "230"], "230 is not a positive multiple of the patch"),
        ([str(folder), "out.onnx", "--head"], "has no classification head"),
        ([str(folder), str(blocker / "out.onnx")], "cannot create"),
        ([str(folder), str(tmp_path)], "is a folder, not a file"),
    ]


def test_bad_input_gets_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = bad_inputs(tmp_path)
    capsys.readouterr()
    for arguments, message in cases:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        assert main(["export", "onnx", *arguments]) == 1, arguments
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (arguments, err)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, arguments  # nothing written, nothing left


def test_a_graph_that_disagrees_is_not_written(tmp_path):
    # A planted disagreement: a hook adds 0.01 to the final norm's output in eager PyTorch only, not in the graph.
    model = randomize_(ViTRegModel(small_config()))

    def eager_only(module, args, output):
        return output if torch.compiler.is_exporting() else output + 0.01

    model.layernorm.register_forward_hook(eager_only)
    with pytest.raises(UserError, match="disagrees with PyTorch by 1.00e-02"):
        export_onnx(model, tmp_path / "model.onnx", dynamic=True)
    assert list(tmp_path.iterdir()) == []


def test_any_source_is_converted_in_memory(tmp_path):
    """A transformers Dinov2WithRegisters folder: converted on the fly, exported, equal to transformers' tokens."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14,
        image_size=224, num_register_tokens=4,
    )  # fmt: skip
    reference = randomize_(Dinov2WithRegistersModel(config)).eval()
    reference.save_pretrained(tmp_path / "hf")
    report = export_onnx(tmp_path / "hf", tmp_path / "hf.onnx", dynamic=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.onnx"]  # no converted folder written
    pixel_values = torch.randn(1, 3, 182, 294)
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values).last_hidden_state
    got = ONNXRuntimeModel(report.path)(pixel_values)
    assert_equal_to_eager({"last_hidden_state": got["last_hidden_state"]}, {"last_hidden_state": expected})
