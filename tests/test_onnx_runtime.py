"""ONNX Runtime's speed-ups, each checked against eager PyTorch: the fused-attention graph (`optimize=True`) exact at
sizes never traced for both position-interpolation variants and a RoPE model, the int8 graph (`quantize="int8"`)
within its stated tolerance on real photos, and the session settings `ONNXRuntimeModel` asks for in force."""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import randomize_, tiny_config

from vitreg.cli import main
from vitreg.core.errors import UserError
from vitreg.core.images import default_processor, sample_images, size_options
from vitreg.export import ONNXRuntimeModel, export_onnx
from vitreg.export import onnx_export as onnx_export_module
from vitreg.modeling_vitreg import ViTRegForImageClassification, ViTRegModel

TOLERANCE = 1e-4  # fp32, max abs, every output and token
INT8_MIN_COSINE = 0.99  # the stated int8 tolerance: every CLS and patch token of the sample photos
OUTPUT_NAMES = ["last_hidden_state", "pooler_output", "register_tokens", "patch_tokens"]
# Exported at 56 x 56 (a 4 x 4 grid); checked at sizes and a batch the export neither traced nor checked itself.
UNSEEN_SIZES = [(98, 70), (42, 112), (126, 126)]
VARIANTS = {
    "registers": dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0),
    "no registers": dict(num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1),
    # DINOv3's layout: rotary positions on queries and keys (no learned table), the key bias masked
    "rope": dict(num_register_tokens=4, position_embedding_type="rope", mask_k_bias=True),
}


def small_config(**overrides):
    """Two blocks, four heads, on a 4 x 4 grid of 14 px patches."""
    return tiny_config(num_hidden_layers=2, image_size=56, **overrides)


def op_counts(path) -> Counter:
    """Node types of the graph at `path`, read with onnx itself."""
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture(scope="module", params=list(VARIANTS))
def fused(request, tmp_path_factory):
    """A random model of each variant and its dynamic export with `optimize=True`."""
    torch.manual_seed(0)
    model = randomize_(ViTRegModel(small_config(**VARIANTS[request.param]))).eval()
    folder = tmp_path_factory.mktemp(request.param.replace(" ", "-"))
    report = export_onnx(model, folder / "fused.onnx", dynamic=True, optimize=True, progress=False)
    return request.param, model, report


def test_attention_is_fused_where_the_pattern_is_plain_attention(fused):
    variant, model, report = fused
    counts = op_counts(report.path)
    if variant == "rope":
        # Rotated queries and keys are not the fused kernel's input: the graph keeps torch's attention.
        assert report.fused_attention == 0 and counts["Attention"] == 0 and counts["Softmax"] == 2
    else:
        assert report.fused_attention == counts["Attention"] == model.config.num_hidden_layers
        assert counts["Softmax"] == 0  # nothing of the old attention left behind
        assert "attention fused in 2 blocks (ONNX Runtime only)" in report.summary()


@pytest.mark.parametrize("size", UNSEEN_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_fused_graph_equals_eager_pytorch_at_sizes_never_traced(fused, size):
    _, model, report = fused
    pixel_values = torch.randn(3, 3, *size)
    with torch.inference_mode():
        output = model(pixel_values)
    got = ONNXRuntimeModel(report.path)(pixel_values)
    assert sorted(got) == sorted(OUTPUT_NAMES)
    for name in OUTPUT_NAMES:
        want = output[name].numpy()
        assert got[name].shape == want.shape, name
        error = np.abs(got[name] - want)
        if error.ndim == 3:  # [B, N, D]: name the tokens that differ
            bad = np.flatnonzero(~(error <= TOLERANCE).all(axis=(0, 2)))
            assert bad.size == 0, f"{name}: tokens {bad[:8].tolist()} differ by more than {TOLERANCE}"
        assert error.max(initial=0.0) <= TOLERANCE, name


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each token: [B, N]."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_the_int8_graph_stays_within_its_stated_tolerance_on_real_photos(tmp_path):
    torch.manual_seed(0)
    model = randomize_(ViTRegModel(small_config(**VARIANTS["registers"]))).eval()
    report = export_onnx(model, tmp_path / "int8.onnx", dynamic=True, optimize=True, quantize="int8", progress=False)
    counts = op_counts(report.path)
    # The linear layers are int8 (four per block: qkv inside the fused attention, proj, fc1, fc2).
    assert counts["QAttention"] == 2 and counts["MatMulInteger"] + counts["DynamicQuantizeMatMul"] == 6
    assert report.quantize == "int8" and "int8 weights" in report.summary()
    float32 = export_onnx(model, tmp_path / "float32.onnx", dynamic=True, optimize=True, progress=False)
    assert report.bytes < float32.bytes

    processor = default_processor(model.config)
    for side in (56, 84):  # the export size and one it never saw
        pixels = processor(sample_images(), return_tensors="pt", **size_options(processor, side))["pixel_values"]
        with torch.inference_mode():
            want = model(pixels).last_hidden_state.numpy()
        got = ONNXRuntimeModel(report.path)(pixels)["last_hidden_state"]
        similarity = cosines(got, want)  # [photos, 1 + R + HW]
        assert similarity[:, 0].min() >= INT8_MIN_COSINE  # CLS
        assert similarity[:, model.config.num_prefix_tokens :].min() >= INT8_MIN_COSINE  # patches
        if side == 56:  # what the export reported is what the graph does
            assert report.int8_accuracy["min CLS cosine"] == pytest.approx(similarity[:, 0].min(), abs=1e-5)
            assert report.int8_accuracy["max |error|"] == pytest.approx(np.abs(got - want).max(), abs=1e-5)
    assert not np.allclose(got, want, atol=TOLERANCE)  # int8 is not exact: the check above is not vacuous


def test_an_int8_classifier_keeps_every_top1_label(tmp_path):
    torch.manual_seed(0)
    model = randomize_(ViTRegForImageClassification(small_config(num_labels=5))).eval()
    report = export_onnx(model, tmp_path / "int8.onnx", head="classification", quantize="int8", progress=False)
    assert report.int8_accuracy["top-1 kept"] == 1.0
    processor = default_processor(model.config)
    pixels = processor(sample_images(), return_tensors="pt", **size_options(processor, 56))["pixel_values"]
    with torch.inference_mode():
        want = model(pixels).logits.numpy().argmax(-1)
    np.testing.assert_array_equal(ONNXRuntimeModel(report.path)(pixels)["logits"].argmax(-1), want)


def test_an_int8_graph_beyond_the_tolerance_is_refused_and_not_written(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export_module, "INT8_MIN_COSINE", 1.01)  # no int8 graph can reach it
    model = randomize_(ViTRegModel(small_config()))
    with pytest.raises(UserError, match=r"cosine 0\.9\d+ to float32 PyTorch .* nothing written"):
        export_onnx(model, tmp_path / "int8.onnx", quantize="int8", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_command_optimizes_and_quantizes(tmp_path, capsys):
    folder = tmp_path / "model"
    randomize_(ViTRegModel(small_config())).save_pretrained(folder)
    output = tmp_path / "model.onnx"
    arguments = ["export", "onnx", str(folder), str(output), "--dynamic", "--optimize", "--quantize", "int8"]
    assert main([*arguments, "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "attention fused in 2 blocks" in line and "int8 weights" in line and "min patch cosine" in line
    assert op_counts(output)["QAttention"] == 2
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["export", "onnx", str(folder), str(output), "--quantize", "int4", "--overwrite"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_session_settings_take_effect(tmp_path):
    report = export_onnx(randomize_(ViTRegModel(small_config())), tmp_path / "model.onnx", progress=False)

    def settings(runtime):
        options = runtime.session.get_session_options()
        spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
        mode, level = str(options.execution_mode), str(options.graph_optimization_level)
        return options.intra_op_num_threads, spinning, mode, level

    default = ONNXRuntimeModel(report.path)
    assert settings(default) == (0, "1", "ExecutionMode.ORT_SEQUENTIAL", "GraphOptimizationLevel.ORT_ENABLE_ALL")
    assert settings(ONNXRuntimeModel(report.path, threads=1, spinning=False))[:2] == (1, "0")
    with pytest.raises(UserError, match="threads must be at least 1"):
        ONNXRuntimeModel(report.path, threads=0)
