"""Position interpolation as resampling matrices: equal to DINOv2's `F.interpolate` call at every size, for the
antialiased (register checkpoints) and the 0.1-offset (no-register checkpoints) variants; one float32 path that
traces, exports to ONNX without float64, and runs eagerly without host work at the native grid or on a second call."""

from unittest import mock

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel, position_interpolation
from vitreg.modeling_vitreg.modeling_vitreg import ViTRegEmbeddings
from vitreg.modeling_vitreg.position_interpolation import bicubic_resampling_matrix

# (interpolate_antialias, interpolate_offset): register checkpoints, no-register checkpoints, the other two mixes
VARIANTS = [(True, 0.0), (False, 0.1), (False, 0.0), (True, 0.1)]
# Resampling weights in float32 against PyTorch's CPU kernel, which fuses some multiply-adds: Keys' kernel differs
# by up to 6e-7 (it is 9e-8 from the exact kernel here, 6e-7 in PyTorch's).
WEIGHT_TOLERANCE = 1e-6
# Embeddings of magnitude <= 1 through both axes: float32 summation on top (1.4e-6 measured over every size to twice
# the grid; the former float64 emulation of PyTorch's kernel reached 5e-7).
TOLERANCE = 2e-6


def dinov2_interpolation(embeddings: ViTRegEmbeddings, height: int, width: int) -> torch.Tensor:
    """Position embeddings as DINOv2's `interpolate_pos_encoding` computes them: one `F.interpolate` call."""
    config, grid = embeddings.config, embeddings.grid
    rows, cols = height // config.patch_size, width // config.patch_size
    pos = embeddings.position_embeddings
    if rows * cols == grid * grid and height == width:
        return pos
    count = embeddings.num_cls_positions
    patch_pos = pos[:, count:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    if config.interpolate_offset:
        offset = config.interpolate_offset
        resize = {"scale_factor": ((rows + offset) / grid, (cols + offset) / grid)}
    else:
        resize = {"size": (rows, cols)}
    patch_pos = F.interpolate(
        patch_pos, mode="bicubic", align_corners=False, antialias=config.interpolate_antialias, **resize
    )
    assert patch_pos.shape[-2:] == (rows, cols)
    return torch.cat((pos[:, :count], patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)), dim=1)


def make_embeddings(antialias: bool, offset: float, image_size: int = 518, patch_size: int = 14):
    """Embeddings with unit-scale random position embeddings (|P| <= 1, as trained DINOv2 embeddings)."""
    config = ViTRegConfig(
        hidden_size=48, num_attention_heads=3, image_size=image_size, patch_size=patch_size,
        interpolate_antialias=antialias, interpolate_offset=offset,
    )  # fmt: skip
    embeddings = ViTRegEmbeddings(config)
    with torch.no_grad():
        torch.nn.init.trunc_normal_(embeddings.position_embeddings, std=0.5, a=-1.0, b=1.0)
    return embeddings


def one_block_model(antialias: bool, offset: float) -> ViTRegModel:
    """A 1-block model on a 4 x 4 grid of 14 px patches with unit-scale position embeddings."""
    config = ViTRegConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14,
        interpolate_antialias=antialias, interpolate_offset=offset,
    )  # fmt: skip
    model = ViTRegModel(config).eval()
    with torch.no_grad():
        torch.nn.init.trunc_normal_(model.embeddings.position_embeddings, std=0.5, a=-1.0, b=1.0)
    return model


@pytest.mark.parametrize("grid", [4, 16, 37])
@pytest.mark.parametrize("antialias", [True, False])
def test_resampling_weights_equal_pytorchs_at_every_size(grid, antialias):
    # Resampling one-hot inputs with F.interpolate gives PyTorch's weight matrix column by column.
    basis = torch.eye(grid).reshape(1, grid, 1, grid)
    for out in range(1, 3 * grid + 8):
        for scale_factor in (None, (out + 0.1) / grid):
            resize = {"scale_factor": (1.0, scale_factor)} if scale_factor else {"size": (1, out)}
            want = F.interpolate(basis, mode="bicubic", align_corners=False, antialias=antialias, **resize)
            want = want[0, :, 0, :].T  # [out, grid]
            if want.shape[0] != out:
                continue
            # PyTorch's steps: float(in) / out for a size (IEEE division), float(1 / scale_factor) for a scale factor.
            if scale_factor:
                step = torch.tensor(1.0 / scale_factor, dtype=torch.float64)
            else:
                step = torch.tensor(float(grid)) / torch.tensor(float(out))
            if antialias and out == grid:
                step = torch.tensor(1.0)  # PyTorch's antialiased kernel copies an axis whose size is unchanged
            got = bicubic_resampling_matrix(grid, out, step.float(), antialias)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=WEIGHT_TOLERANCE, rtol=0, msg=f"{grid} -> {out}, {scale_factor}")


@pytest.mark.parametrize("antialias,offset", VARIANTS)
def test_position_embeddings_equal_dinov2s_interpolation(antialias, offset):
    embeddings = make_embeddings(antialias, offset)  # 37 x 37 trained grid
    grids = [(37, 37), (16, 16), (16, 22), (22, 16), (1, 1), (2, 5), (36, 38), (37, 20), (74, 74), (40, 100), (9, 3)]
    for rows, cols in grids:
        want = dinov2_interpolation(embeddings, rows * 14, cols * 14)
        got = embeddings.interpolate_pos_encoding(rows * 14, cols * 14)
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0, msg=f"{rows}x{cols}")


@pytest.mark.parametrize("antialias,offset", VARIANTS[:2])
def test_every_grid_up_to_twice_the_trained_one(antialias, offset):
    embeddings = make_embeddings(antialias, offset, image_size=224, patch_size=14)  # 16 x 16 trained grid
    for rows in range(1, 33):
        cols = 33 - rows
        want = dinov2_interpolation(embeddings, rows * 14, cols * 14)
        got = embeddings.interpolate_pos_encoding(rows * 14, cols * 14)
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0, msg=f"{rows}x{cols}")


def test_bfloat16_embeddings_are_interpolated_in_float32():
    embeddings = make_embeddings(True, 0.0, image_size=224).to(torch.bfloat16)
    got = embeddings.interpolate_pos_encoding(98, 154)
    assert got.dtype == torch.bfloat16
    reference = make_embeddings(True, 0.0, image_size=224)
    reference.load_state_dict({k: v.float() for k, v in embeddings.state_dict().items()})
    torch.testing.assert_close(got.float(), dinov2_interpolation(reference, 98, 154).bfloat16().float())


@pytest.mark.parametrize("antialias,offset", VARIANTS[:2])
def test_eager_calls_build_no_matrices_at_the_native_grid_and_once_per_other_size(antialias, offset):
    embeddings = make_embeddings(antialias, offset, image_size=224)  # 16 x 16 trained grid
    built = mock.patch.object(
        position_interpolation, "resampling_matrices", wraps=position_interpolation.resampling_matrices
    )
    with built as builds:
        for _ in range(3):
            # DINOv2, transformers and timm return the trained table itself at the native grid: so does ViTReg.
            assert embeddings.interpolate_pos_encoding(224, 224) is embeddings.position_embeddings
        assert builds.call_count == 0
        first = embeddings.interpolate_pos_encoding(98, 154)
        again = [embeddings.interpolate_pos_encoding(98, 154) for _ in range(3)]
        assert builds.call_count == 1  # the second call at a size reuses the first call's matrices
        embeddings.interpolate_pos_encoding(154, 98)
        embeddings.interpolate_pos_encoding(98, 154)
        assert builds.call_count == 2
    assert all(torch.equal(first, other) for other in again)
    # The cache is a plain attribute: nothing in the state dict, and it holds float32 matrices on the model's device.
    assert set(embeddings.state_dict()) == {
        "position_embeddings", "cls_token", "register_tokens",
        "patch_embeddings.projection.weight", "patch_embeddings.projection.bias",
    }  # fmt: skip
    assert all(m.dtype == torch.float32 for pair in embeddings.resampling.entries.values() for m in pair)


def test_the_cache_follows_the_model_to_another_device():
    embeddings = make_embeddings(True, 0.0, image_size=224)
    cpu = embeddings.interpolate_pos_encoding(98, 154)
    # The meta device stands in for an accelerator: a moved model builds that device's matrices, on that device.
    embeddings.to("meta")
    moved = embeddings.interpolate_pos_encoding(98, 154)
    assert moved.device.type == "meta" and moved.shape == cpu.shape
    devices = sorted(key[-1].type for key in embeddings.resampling.entries)
    assert devices == ["cpu", "meta"]
    assert all(m.device.type == "meta" for m in embeddings.resampling.entries[(7, 11, 0.0, True, torch.device("meta"))])


def test_matrices_built_under_inference_mode_serve_a_later_training_step():
    model = one_block_model(True, 0.0)
    pixel_values = torch.randn(2, 3, 70, 42)
    with torch.inference_mode():
        model(pixel_values)  # builds the 5 x 3 matrices as inference tensors would be
    model.train()
    model(pixel_values).last_hidden_state.square().mean().backward()
    assert model.embeddings.position_embeddings.grad.abs().sum() > 0


@pytest.mark.parametrize("antialias,offset", VARIANTS[:2])
def test_one_graph_serves_every_size(antialias, offset):
    """torch.export with symbolic height and width, and torch.compile(fullgraph, dynamic): no shape branch."""
    model = one_block_model(antialias, offset)
    rows, cols = torch.export.Dim("rows", min=2), torch.export.Dim("cols", min=2)
    example = torch.randn(1, 3, 70, 42)
    program = torch.export.export(
        model, (example,), dynamic_shapes={"pixel_values": {2: 14 * rows, 3: 14 * cols}}, strict=False
    )
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for height, width in [(56, 56), (28, 98), (112, 70), (224, 224)]:  # native, and sizes the export never saw
        pixel_values = torch.randn(1, 3, height, width)
        with torch.no_grad():
            want = model(pixel_values).last_hidden_state
            torch.testing.assert_close(program.module()(pixel_values).last_hidden_state, want, atol=1e-6, rtol=0)
            torch.testing.assert_close(compiled(pixel_values).last_hidden_state, want, atol=1e-6, rtol=0)


def double_tensors(graph: onnx.ModelProto) -> list[str]:
    """Every float64 tensor, constant or Cast-to-float64 node of an ONNX model, its functions included."""
    double = onnx.TensorProto.DOUBLE
    found = [f"initializer {t.name}" for t in graph.graph.initializer if t.data_type == double]
    inferred = onnx.shape_inference.infer_shapes(graph)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    found += [f"value {v.name}" for v in values if v.type.tensor_type.elem_type == double]
    for node in [*graph.graph.node, *(node for function in graph.functions for node in function.node)]:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == double:
                found.append(f"Cast {node.name} to DOUBLE")
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == double:
                found.append(f"{node.op_type} {node.name} holds a DOUBLE tensor")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("antialias,offset", VARIANTS[:2], ids=["registers", "no registers"])
def test_onnx_graph_has_no_float64_and_matches_at_unseen_sizes(antialias, offset, tmp_path):
    import onnxruntime

    model = one_block_model(antialias, offset)
    rows, cols = torch.export.Dim("patch_rows", min=2), torch.export.Dim("patch_cols", min=2)
    example = torch.randn(2, 3, 70, 42)
    with torch.no_grad():  # as export/onnx_export.py exports
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=18,
            input_names=["pixel_values"],
            dynamic_shapes={"pixel_values": {2: 14 * rows, 3: 14 * cols}},
            verbose=False,
        )
    path = tmp_path / "model.onnx"
    program.save(str(path))
    graph = onnx.load(str(path))
    assert double_tensors(graph) == []
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for height, width in [(56, 56), (28, 98), (112, 70), (182, 154)]:  # native, then sizes the export never saw
        pixel_values = torch.randn(2, 3, height, width)
        with torch.no_grad():
            want = model(pixel_values).last_hidden_state.numpy()
        got = session.run(None, {"pixel_values": pixel_values.numpy()})[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"{height}x{width}")
