"""Position interpolation as resampling matrices: equal to DINOv2's `F.interpolate` call at every size, for the
antialiased (register checkpoints) and the 0.1-offset (no-register checkpoints) variants, and one traceable path."""

import pytest
import torch
import torch.nn.functional as F

from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel
from vitreg.modeling_vitreg.modeling_vitreg import ViTRegEmbeddings, bicubic_resampling_matrix

# (interpolate_antialias, interpolate_offset): register checkpoints, no-register checkpoints, the other two mixes
VARIANTS = [(True, 0.0), (False, 0.1), (False, 0.0), (True, 0.1)]
TOLERANCE = 1e-6


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
            torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0, msg=f"{grid} -> {out}, {scale_factor}")


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
def test_one_graph_serves_every_size(antialias, offset):
    """torch.export with symbolic height and width, and torch.compile(fullgraph, dynamic): no shape branch."""
    config = ViTRegConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14,
        interpolate_antialias=antialias, interpolate_offset=offset,
    )  # fmt: skip
    model = ViTRegModel(config).eval()
    with torch.no_grad():
        torch.nn.init.trunc_normal_(model.embeddings.position_embeddings, std=0.5, a=-1.0, b=1.0)
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
