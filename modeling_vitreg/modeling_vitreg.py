"""ViTReg: a DINOv2-style Vision Transformer with register tokens ("Vision Transformers Need Registers").

Token order everywhere is `[CLS, registers, patches]`; `config.num_prefix_tokens` (CLS + registers) is the one
notion of "what comes before the patches" used by pooling, patch maps, masks and intermediate layers. Test-time
registers ("Vision Transformers Don't Need Trained Registers") are registers too: they follow the trained ones.
DINOv3's ViTs are the same model with rotary positions (`config.position_embedding_type == "rope"`): the patch
queries and keys are rotated by their 2-D coordinates and there is no learned position embedding.

Block indices, one convention per interface (D = `config.num_hidden_layers`):
- `keep` (`forward_blocks`, `ViTRegEncoder`): 0 is the embeddings, i (1..D) the output of block i; the same
  numbering as `hidden_states` (D + 1 entries).
- `get_intermediate_layers(n=...)`: 0-based block indices (0..D-1), as DINOv2's and DINOv3's; block b is `keep`
  index b + 1. An int n takes the last n blocks.
- Backbone stages (`out_features` / `out_indices`): "stem" (index 0) is the embeddings, "stage{i}" (index i) the
  output of block i: stage indices are `keep` indices.
- `register_neurons` `[layer, neuron]` pairs: 0-based block, as `get_intermediate_layers`.

This file imports nothing from the rest of the project (its numerics sibling `position_interpolation.py` only with a
single dot), so `save_pretrained` ships both as remote code.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.output_capturing import capture_outputs

from .configuration_vitreg import ViTRegConfig
from .position_interpolation import ResamplingMatrixCache, resample_grid, resampling_matrices


@dataclass
class ViTRegModelOutput(ModelOutput):
    """
    Outputs of [`ViTRegModel`].

    Args:
        last_hidden_state: `[B, P + HW, D]` every token after the final norm (P = `config.num_prefix_tokens`).
        pooler_output: `[B, D]` the CLS token (or the mean patch token when `config.pooling == "mean"`).
        register_tokens: `[B, R + T, D]` the normed register tokens (trained, then test-time), the scratch space.
        patch_tokens: `[B, HW, D]` the normed patch tokens in row-major order of the `h x w` grid.
        hidden_states: `num_hidden_layers + 1` tensors `[B, P + HW, D]`: the embeddings, then every block's output.
        attentions: `num_hidden_layers` tensors `[B, heads, P + HW, P + HW]`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    register_tokens: torch.FloatTensor | None = None
    patch_tokens: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def grid_size(config: ViTRegConfig, height: int, width: int) -> tuple[int, int]:
    """The `(rows, cols)` patch grid of an image, refusing sizes the patch size does not divide."""
    p = config.patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
    return height // p, width // p


class ViTRegPatchEmbeddings(nn.Module):
    """Non-overlapping `patch_size` convolution: `[B, C, H, W]` -> `[B, HW, D]`."""

    def __init__(self, config: ViTRegConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"expected pixel_values of shape [batch, {self.num_channels}, height, width], "
                f"got {list(pixel_values.shape)}"
            )
        pixel_values = pixel_values.to(self.projection.weight.dtype)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # [B, HW, D]


def rope_periods(config: ViTRegConfig, device: torch.device | None = None) -> torch.Tensor:
    """`[head_dim / 4]` float32 RoPE periods of `config`, as DINOv3's `RopePositionEmbedding` computes them.

    Rounded to `config.rope_periods_dtype` (the precision DINOv3's checkpoints store them in), built on `device`.
    """
    quarter = config.hidden_size // config.num_attention_heads // 4
    if config.rope_theta is not None:
        exponents = 2 * torch.arange(quarter, dtype=torch.float32, device=device) / (2 * quarter)
        periods = config.rope_theta**exponents
    else:
        ratio = config.rope_max_period / config.rope_min_period
        periods = ratio ** torch.linspace(0, 1, quarter, dtype=torch.float32, device=device)  # [1, max / min]
        periods = periods / ratio * config.rope_max_period  # [min, max]
    return periods.to(getattr(torch, config.rope_periods_dtype)).float()


class ViTRegRopePositionEmbedding(nn.Module):
    """DINOv3's 2-D axial RoPE: `(sin, cos)`, each `[h*w, head_dim]` float32, of the patch-centre coordinates.

    Coordinates are patch centres scaled to [-1, 1] (rows and columns separately by default); a head's first half
    rotates by the row coordinate, its second half by the column one, at the periods `rope_periods(config)`. The
    train-time shift / jitter / rescale augmentations apply in training mode only, as in DINOv3's trainer.
    """

    def __init__(self, config: ViTRegConfig):
        super().__init__()
        self.config = config

    def forward(self, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        options = {"dtype": torch.float32, "device": device}
        row_scale, col_scale = {
            "separate": (rows, cols),
            "min": (torch.sym_min(rows, cols),) * 2,
            "max": (torch.sym_max(rows, cols),) * 2,
        }[config.rope_normalize_coords]
        coords_h = (torch.arange(rows, **options) + 0.5) / row_scale  # [h] patch centres in (0, 1)
        coords_w = (torch.arange(cols, **options) + 0.5) / col_scale  # [w]
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)  # [hw, 2]
        coords = 2.0 * coords - 1.0
        if self.training:
            coords = self.augment(coords)
        periods = rope_periods(config, device)  # [d / 4]
        angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # [hw, 2, d / 4]
        angles = angles.flatten(1, 2).tile(2)  # [hw, d]: (rows, cols) angles, twice
        return torch.sin(angles), torch.cos(angles)

    def augment(self, coords: torch.Tensor) -> torch.Tensor:
        """DINOv3's train-time coordinate augmentations: a uniform shift, then log-uniform jitter and rescale."""
        config = self.config
        if config.rope_shift_coords is not None:
            shift = config.rope_shift_coords
            coords = coords + torch.empty(2, dtype=coords.dtype, device=coords.device).uniform_(-shift, shift)
        if config.rope_jitter_coords is not None:
            bound = math.log(config.rope_jitter_coords)
            coords = coords * torch.empty(2, dtype=coords.dtype, device=coords.device).uniform_(-bound, bound).exp()
        if config.rope_rescale_coords is not None:
            bound = math.log(config.rope_rescale_coords)
            coords = coords * torch.empty(1, dtype=coords.dtype, device=coords.device).uniform_(-bound, bound).exp()
        return coords


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2]` -> `[-x2, x1]` along the last dimension (halves, not interleaved pairs, as DINOv3)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(tokens: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the patch positions of `[B, H, N, d]` queries or keys in float32; the prefix tokens stay unrotated."""
    sin, cos = rope  # [hw, d]
    prefix = tokens.shape[-2] - sin.shape[-2]  # CLS + registers
    rotated = tokens.float()
    patches = rotated[..., prefix:, :]
    patches = patches * cos + rotate_half(patches) * sin
    return torch.cat((rotated[..., :prefix, :], patches), dim=-2).to(tokens.dtype)


class ViTRegEmbeddings(nn.Module):
    """CLS token, register tokens, (masked) patch embeddings and their position embeddings (learned, or RoPE)."""

    def __init__(self, config: ViTRegConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.grid = config.image_size // config.patch_size
        self.patch_embeddings = ViTRegPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.use_cls_token else None
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, dim)) if config.num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, dim)) if config.use_mask_token else None
        self.num_cls_positions = int(config.use_cls_token and config.cls_token_position_embedding)
        if config.uses_rope:
            self.position_embeddings, self.rope = None, ViTRegRopePositionEmbedding(config)
        else:
            self.position_embeddings = nn.Parameter(torch.zeros(1, self.num_cls_positions + self.grid**2, dim))
            self.rope = None
        self.resampling = ResamplingMatrixCache(self.grid)  # not a buffer: never saved

    def freeze_mask_token(self) -> None:
        """Hold the mask token (when the config has one) as a saved buffer, not a parameter: it is never trained.

        Classifiers and backbones never mask patches in training, so a trainable mask token would be a parameter
        without gradient, which DDP with `find_unused_parameters=False` (Trainer's choice under gradient
        checkpointing) refuses. As a buffer it keeps its state-dict key, so every class loads the same checkpoint,
        and `from_pretrained` cannot turn it back into a trainable parameter.
        """
        if isinstance(self.mask_token, nn.Parameter):
            token = self.mask_token.detach()
            del self.mask_token
            self.register_buffer("mask_token", token)

    def rotary(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE `(sin, cos)` of an image of `height x width` pixels, or None for learned absolute positions."""
        if self.rope is None:
            return None
        return self.rope(*grid_size(self.config, height, width), device)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings `[1, (1) + h*w, D]` for an image of `height x width` pixels, as DINOv2 computes them.

        The bicubic resampling is linear in the embedding, `R_rows @ P @ R_cols^T` (position_interpolation.py). When
        run eagerly, the trained table comes back as it is at the native square grid (as DINOv2, transformers and
        timm return it), and the matrices of other sizes are built once per size and device, then reused. Traced
        (`torch.compile`, `torch.export`, ONNX), the matrices are computed in the graph from the symbolic size, with
        the same float32 arithmetic, so one graph serves every size and equals the eager model.
        """
        rows, cols = grid_size(self.config, height, width)
        pos = self.position_embeddings
        traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if not traced and rows == cols == self.grid:
            return pos
        offset, antialias = self.config.interpolate_offset, self.config.interpolate_antialias
        if traced:
            matrices = resampling_matrices(self.grid, rows, cols, offset, antialias, pos.device)
        else:
            matrices = self.resampling.get(rows, cols, offset, antialias, pos.device)
        cls_pos, patch_pos = pos[:, : self.num_cls_positions], pos[0, self.num_cls_positions :]
        patch_pos = resample_grid(patch_pos, *matrices).to(pos.dtype)  # [rows * cols, D]
        return torch.cat((cls_pos, patch_pos[None]), dim=1)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values)  # [B, HW, D]
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos needs a model whose config has use_mask_token=True")
            if bool_masked_pos.shape != embeddings.shape[:2]:
                raise ValueError(
                    f"bool_masked_pos must have shape {list(embeddings.shape[:2])}, got {list(bool_masked_pos.shape)}"
                )
            mask_token = self.mask_token.to(embeddings.dtype).unsqueeze(0)
            embeddings = torch.where(bool_masked_pos.unsqueeze(-1), mask_token, embeddings)

        if self.position_embeddings is not None:
            pos = self.interpolate_pos_encoding(height, width).to(embeddings.dtype)
            embeddings = embeddings + pos[:, self.num_cls_positions :]
        prefix = []
        if self.cls_token is not None:
            cls_token = self.cls_token.to(embeddings.dtype)
            if self.num_cls_positions and self.position_embeddings is not None:
                cls_token = cls_token + pos[:, :1]
            prefix.append(cls_token.expand(batch_size, -1, -1))
        if self.register_tokens is not None:
            # Registers carry no position (and RoPE leaves them unrotated): they are global scratch space.
            prefix.append(self.register_tokens.to(embeddings.dtype).expand(batch_size, -1, -1))
        if self.config.num_test_time_registers:
            # Test-time registers start as zeros without position, as upstream's DINOv2 `prepare_tokens_with_masks`;
            # it appends them after the patches, which attention, blind to order without positions, cannot tell apart.
            prefix.append(embeddings.new_zeros(batch_size, self.config.num_test_time_registers, embeddings.shape[-1]))
        if prefix:
            embeddings = torch.cat((*prefix, embeddings), dim=1)
        return embeddings  # [B, P + HW, D]


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns its weights; `[B, H, N, d]` in, `[B, N, H, d]` out."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class ViTRegLinearKMaskedBias(nn.Linear):
    """The fused q | k | v projection without the key third of its bias, as DINOv3's `LinearKMaskedBias`.

    DINOv3 multiplies the bias by a stored mask that its released weights hold at (1, 0, 1) per third; the mask is
    that constant here, so the module keeps nn.Linear's state dict (`weight`, `bias`) and remains the module that
    hooks, PEFT adapters and quantisers see.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        query_bias, key_bias, value_bias = self.bias.chunk(3)
        bias = torch.cat((query_bias, torch.zeros_like(key_bias), value_bias))
        return F.linear(hidden_states, self.weight, bias)


class ViTRegAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (rows ordered q | k | v, as in DINOv2)."""

    def __init__(self, config: ViTRegConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        qkv_class = ViTRegLinearKMaskedBias if config.mask_k_bias and config.qkv_bias else nn.Linear
        self.qkv = qkv_class(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.proj_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, d]
        if rope is not None:
            query, key = apply_rope(query, rope), apply_rope(key, rope)

        implementation = self.config._attn_implementation
        # Attention weights exist only in eager attention: use it for calls that ask for them.
        if kwargs.get("output_attentions", self.config.output_attentions):
            implementation = "eager"
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query, key, value, None, scaling=self.scaling, dropout=0.0, is_causal=False
        )
        attn_output = attn_output.reshape(batch_size, seq_len, dim)  # [B, N, D]
        return self.proj(attn_output), attn_weights


def sign_max(values: torch.Tensor) -> torch.Tensor:
    """`[B, ...]` -> `[B]`: each sample's entry of largest magnitude, sign kept (upstream `sign_max`)."""
    flat = values.flatten(1)
    largest, smallest = flat.amax(dim=1), flat.amin(dim=1)
    return torch.where(largest.abs() > smallest.abs(), largest, smallest)


class ViTRegRegisterNeuronShift(nn.Module):
    """Moves the register neurons' activations of one MLP from the patch tokens to the test-time registers.

    Follows upstream's `activate_on_registers` (nickjiang2378/test-time-registers, shared/hook_fn.py) with its
    defaults `scale=1, normal_values="zero"`: every listed neuron of the test-time registers takes the value of
    largest magnitude (sign kept) among all tokens and all listed neurons of this layer, and the patch tokens'
    activations of those neurons become 0; CLS and trained registers keep theirs. Upstream edits sample 0 of the
    batch in place; here every sample gets its own maximum, without in-place writes (autograd and compile).
    """

    def __init__(self, config: ViTRegConfig, neurons: Sequence[int]):
        super().__init__()
        self.neurons = tuple(neurons)
        # Built once and moved with the model, not rebuilt on the host in every forward; derived from the config,
        # so not saved (`_init_weights` refills it after loading).
        self.register_buffer("neuron_index", torch.tensor(self.neurons, dtype=torch.long), persistent=False)
        self.first_register = int(config.use_cls_token) + config.num_register_tokens  # first test-time register
        self.num_prefix_tokens = config.num_prefix_tokens

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        index = self.neuron_index
        selected = hidden_states.index_select(-1, index)  # [B, N, k]
        peak = sign_max(selected)  # [B]
        position = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None, :, None]  # [1, N, 1]
        shifted = torch.where(position >= self.num_prefix_tokens, torch.zeros_like(selected), selected)
        is_register = (position >= self.first_register) & (position < self.num_prefix_tokens)
        shifted = torch.where(is_register, peak[:, None, None].to(selected.dtype).expand_as(selected), shifted)
        return hidden_states.index_copy(-1, index, shifted)  # [B, N, M]

    def extra_repr(self) -> str:
        return f"neurons={list(self.neurons)}"


def register_neuron_shift(config: ViTRegConfig, layer_index: int) -> ViTRegRegisterNeuronShift | None:
    """The shift of block `layer_index`'s register neurons, or None when the block has none."""
    neurons = config.neurons_of_layer(layer_index)
    return ViTRegRegisterNeuronShift(config, neurons) if neurons else None


class ViTRegMLP(nn.Module):
    """Linear -> activation -> Linear (with test-time registers, the register neurons shifted in between)."""

    def __init__(self, config: ViTRegConfig, layer_index: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_hidden_size, bias=config.ffn_bias)
        self.activation = ACT2FN[config.hidden_act]
        self.register_shift = register_neuron_shift(config, layer_index)
        self.fc2 = nn.Linear(config.mlp_hidden_size, config.hidden_size, bias=config.ffn_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation(self.fc1(hidden_states))  # [B, N, M]
        if self.register_shift is not None:
            hidden_states = self.register_shift(hidden_states)
        return self.fc2(hidden_states)


class ViTRegSwiGLUFFN(nn.Module):
    """SwiGLU with one packed input projection: `w_out(silu(a) * b)` where `a, b = w_in(x).chunk(2)`."""

    def __init__(self, config: ViTRegConfig, layer_index: int = 0):
        super().__init__()
        self.weights_in = nn.Linear(config.hidden_size, 2 * config.mlp_hidden_size, bias=config.ffn_bias)
        self.register_shift = register_neuron_shift(config, layer_index)
        self.weights_out = nn.Linear(config.mlp_hidden_size, config.hidden_size, bias=config.ffn_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, value = self.weights_in(hidden_states).chunk(2, dim=-1)
        hidden_states = F.silu(gate) * value  # [B, N, M]: upstream's `hidden_identity`, where its hook sits
        if self.register_shift is not None:
            hidden_states = self.register_shift(hidden_states)
        return self.weights_out(hidden_states)


class ViTRegLayerScale(nn.Module):
    """Per-channel residual-branch scale (CaiT / DINOv2 LayerScale)."""

    def __init__(self, config: ViTRegConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class ViTRegDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        keep = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * keep / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class ViTRegLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: `x + ls1 * attn(norm1(x))`, then `x + ls2 * mlp(norm2(x))`."""

    def __init__(self, config: ViTRegConfig, drop_path_rate: float = 0.0, layer_index: int = 0):
        super().__init__()
        with_scale = config.layerscale_value is not None
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ViTRegAttention(config)
        self.layer_scale1 = ViTRegLayerScale(config) if with_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = (ViTRegSwiGLUFFN if config.use_swiglu_ffn else ViTRegMLP)(config, layer_index)
        self.layer_scale2 = ViTRegLayerScale(config) if with_scale else nn.Identity()
        self.drop_path = ViTRegDropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.attention(self.norm1(hidden_states), rope=rope, **kwargs)
        hidden_states = self.add_branch(hidden_states, attn_output, self.layer_scale1)
        mlp_output = self.mlp(self.norm2(hidden_states))
        return self.add_branch(hidden_states, mlp_output, self.layer_scale2)

    def add_branch(self, residual: torch.Tensor, branch: torch.Tensor, layer_scale: nn.Module) -> torch.Tensor:
        """`residual + drop_path(layer_scale(branch))`."""
        dropping = self.training and isinstance(self.drop_path, ViTRegDropPath)
        if isinstance(layer_scale, ViTRegLayerScale) and not dropping:
            # One fused multiply-add instead of two passes over [B, N, D] (see BENCHMARKS.md, inference).
            return torch.addcmul(residual, layer_scale.lambda1, branch)
        return residual + self.drop_path(layer_scale(branch))


class ViTRegEncoder(nn.Module):
    """The stack of blocks; can hand back the hidden states after chosen blocks (0 = the embeddings)."""

    def __init__(self, config: ViTRegConfig):
        super().__init__()
        depth = config.num_hidden_layers
        if config.drop_path_uniform or depth == 1:
            rates = [config.drop_path_rate] * depth
        else:
            rates = [config.drop_path_rate * i / (depth - 1) for i in range(depth)]
        self.layer = nn.ModuleList([ViTRegLayer(config, rate, index) for index, rate in enumerate(rates)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        keep: Sequence[int] = (),
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        kept = [hidden_states] if 0 in keep else []
        for index, layer in enumerate(self.layer, start=1):
            hidden_states = layer(hidden_states, rope=rope, **kwargs)
            if index in keep:
                kept.append(hidden_states)
        return hidden_states, kept


# The Auto classes a saved folder opens with as remote code (module names of the copied files).
REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_vitreg.ViTRegConfig",
    "AutoModel": "modeling_vitreg.ViTRegModel",
    "AutoModelForImageClassification": "modeling_vitreg.ViTRegForImageClassification",
    "AutoBackbone": "modeling_vitreg.ViTRegBackbone",
}


class ViTRegPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers plumbing shared by every ViTReg head."""

    config: ViTRegConfig
    config_class = ViTRegConfig
    base_model_prefix = "vitreg"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTRegEmbeddings", "ViTRegLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": ViTRegLayer, "attentions": ViTRegAttention}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as transformers does, with an `auto_map` naming every ViTReg class, not only the saved one.

        transformers records only the saved class, so a classifier's folder would not open with `AutoModel` or
        `AutoBackbone` as remote code.
        """
        if self._auto_class is not None:
            self.config.auto_map = {**REMOTE_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal weights, zero biases, DINOv2's token initialisation."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ViTRegEmbeddings):
            # DINOv2 starts the tokens near zero; DINOv3 (RoPE) draws them with std 0.02.
            token_std = std if self.config.uses_rope else 1e-6
            if module.position_embeddings is not None:
                init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            if module.cls_token is not None:
                init.normal_(module.cls_token, std=token_std)
            if module.register_tokens is not None:
                init.normal_(module.register_tokens, std=token_std)
            if module.mask_token is not None:
                init.zeros_(module.mask_token)
        elif isinstance(module, ViTRegLayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)
        elif isinstance(module, ViTRegStoredNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ViTRegRegisterNeuronShift):
            init.copy_(module.neuron_index, torch.tensor(module.neurons, dtype=torch.long))


class ViTRegStoredNorm(nn.Module):
    """DINOv3's local-crop CLS norm, kept as saved buffers `weight` and `bias` that no ViTReg forward applies.

    DINOv3's trainer uses it on local crops only; it is kept so that a converted checkpoint exports back unchanged,
    as buffers so that no training sees a parameter without gradient (DDP refuses one, and `from_pretrained` would
    make a frozen parameter trainable again).
    """

    def __init__(self, config: ViTRegConfig):
        super().__init__()
        self.register_buffer("weight", torch.ones(config.hidden_size))
        self.register_buffer("bias", torch.zeros(config.hidden_size))


class ViTRegEncoderMixin:
    """What the encoders (ViTRegModel, ViTRegBackbone) share: the final norms and the pass through the blocks."""

    def build_final_norms(self) -> None:
        """The final LayerNorm, and DINOv3's untied norms of the CLS and register tokens when the config asks."""
        config = self.config

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

        self.layernorm = norm()
        self.cls_norm = norm() if config.untie_cls_and_patch_norms else None
        self.local_cls_norm = ViTRegStoredNorm(config) if config.untie_global_and_local_cls_norm else None

    def normalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm of `[B, P + HW, D]` tokens: one LayerNorm, or `cls_norm` on the prefix when untied (DINOv3)."""
        if self.cls_norm is None:
            return self.layernorm(tokens)
        prefix = self.config.num_prefix_tokens
        return torch.cat((self.cls_norm(tokens[:, :prefix]), self.layernorm(tokens[:, prefix:])), dim=1)

    def normalize_cls(self, cls_token: torch.Tensor) -> torch.Tensor:
        """Final norm of a `[B, D]` CLS token (the prefix norm when the norms are untied)."""
        return (self.layernorm if self.cls_norm is None else self.cls_norm)(cls_token)

    def forward_blocks(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        keep: Sequence[int] = (),
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Un-normed output of the last block and of the blocks in `keep` (0 = embeddings)."""
        embeddings = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        rope = self.embeddings.rotary(pixel_values.shape[-2], pixel_values.shape[-1], embeddings.device)
        return self.encoder(embeddings, keep=keep, rope=rope, **kwargs)


def split_tokens(config: ViTRegConfig, tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`[B, P + HW, D]` -> CLS `[B, D]` (or None), registers `[B, R + T, D]` (test-time ones last), patches."""
    cls_token = tokens[:, 0] if config.use_cls_token else None
    registers = tokens[:, int(config.use_cls_token) : config.num_prefix_tokens]
    return cls_token, registers, tokens[:, config.num_prefix_tokens :]


def to_feature_map(patches: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Patch tokens `[B, HW, D]` in row-major order -> a feature map `[B, D, rows, cols]`."""
    return patches.reshape(patches.shape[0], rows, cols, -1).permute(0, 3, 1, 2).contiguous()


class ViTRegModel(ViTRegEncoderMixin, ViTRegPreTrainedModel):
    """The bare ViTReg encoder: embeddings, blocks and the final LayerNorm."""

    def __init__(self, config: ViTRegConfig):
        super().__init__(config)
        self.embeddings = ViTRegEmbeddings(config)
        self.encoder = ViTRegEncoder(config)
        self.build_final_norms()
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The patch projection, the layer that embeds the input (hooked by `enable_input_require_grads`)."""
        return self.embeddings.patch_embeddings.projection

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, P + HW, D]` -> `[B, D]`: the CLS token, or the mean of the patch tokens (never the registers)."""
        cls_token, _, patches = split_tokens(self.config, tokens)
        return cls_token if self.config.pooling == "cls" else patches.mean(dim=1)

    def finalize(self, hidden_states: torch.Tensor) -> ViTRegModelOutput:
        """Final norm and pooling of the last block's `[B, P + HW, D]` output."""
        if self.config.use_fc_norm:
            # timm's average-pool models: tokens stay un-normed, the norm applies to the pooled mean.
            sequence_output = hidden_states
            pooled_output = self.layernorm(self.pool(hidden_states))
        else:
            sequence_output = self.normalize(hidden_states)  # [B, P + HW, D]
            pooled_output = self.pool(sequence_output)
        _, registers, patches = split_tokens(self.config, sequence_output)
        return ViTRegModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            register_tokens=registers,
            patch_tokens=patches,
        )

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ViTRegModelOutput:
        r"""
        pixel_values: `[B, C, H, W]` with H and W multiples of the patch size; any aspect ratio.
        bool_masked_pos: `[B, HW]`, True where a patch is replaced by the mask token (masked image modelling).
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        hidden_states, _ = self.forward_blocks(pixel_values, bool_masked_pos, **kwargs)
        return self.finalize(hidden_states)

    def get_intermediate_layers(
        self,
        pixel_values: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
        *,
        return_extra_tokens: bool = False,
    ) -> tuple:
        """DINOv2's and DINOv3's helper: patch tokens of the last `n` blocks (or of the listed 0-based blocks).

        Returns a tuple with one entry per block: `[B, HW, D]` patches (`[B, D, h, w]` with `reshape`), or, as DINOv3's
        `get_intermediate_layers`, `(patches, cls)`, `(patches, extra)` or `(patches, cls, extra)` tuples with
        `return_class_token` / `return_extra_tokens`; extra tokens are the `[B, R + T, D]` registers (trained, then
        test-time). Arguments take DINOv2's positions (`norm` fifth); `return_extra_tokens` is keyword-only, as
        every argument of DINOv3's is. Gradients flow, as in both: wrap the call in `torch.no_grad()` to save memory.
        """
        depth = self.config.num_hidden_layers
        # Like DINOv2: the blocks come back in block order, each once, whatever order the list gives.
        blocks = list(range(depth - n, depth)) if isinstance(n, int) else sorted(set(n))
        if not blocks or any(not 0 <= b < depth for b in blocks):
            raise ValueError(f"blocks to take must lie in [0, {depth}), got {n}")
        rows, cols = grid_size(self.config, pixel_values.shape[-2], pixel_values.shape[-1])
        _, kept = self.forward_blocks(pixel_values, keep=[b + 1 for b in blocks])  # keep index = block + 1
        outputs = []
        for hidden_state in kept:
            tokens = self.normalize(hidden_state) if norm else hidden_state
            cls_token, registers, patches = split_tokens(self.config, tokens)
            if reshape:
                patches = to_feature_map(patches, rows, cols)
            extras = ((cls_token,) if return_class_token else ()) + ((registers,) if return_extra_tokens else ())
            outputs.append((patches, *extras) if extras else patches)
        return tuple(outputs)


class ViTRegForImageClassification(ViTRegPreTrainedModel):
    """ViTReg with DINOv2's linear head: CLS of the last n blocks + mean patch token (registers never averaged)."""

    def __init__(self, config: ViTRegConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vitreg = ViTRegModel(config)
        if config.use_fc_norm:
            in_features = config.hidden_size
        else:
            with_mean = config.classifier_pooling == "cls_mean"
            in_features = config.hidden_size * (config.classifier_num_layers * int(config.use_cls_token) + with_mean)
        self.classifier = nn.Linear(in_features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.vitreg.embeddings.freeze_mask_token()
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        labels: `[B]` class indices (cross-entropy; or regression when `num_labels == 1`) or `[B, num_labels]`
            multi-hot targets (`problem_type="multi_label_classification"`).
        bool_masked_pos: `[B, HW]`, True where a patch is replaced by the mask token (needs `use_mask_token`; the
            token is frozen here, see `ViTRegEmbeddings.freeze_mask_token`).
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        config = self.config
        # DINOv2's linear4 head also reads the CLS token of the 3 blocks before the last.
        earlier = range(config.num_hidden_layers - config.classifier_num_layers + 1, config.num_hidden_layers)
        hidden_states, kept = self.vitreg.forward_blocks(pixel_values, bool_masked_pos, keep=earlier, **kwargs)
        outputs = self.vitreg.finalize(hidden_states)
        if config.use_fc_norm:
            features = outputs.pooler_output
        else:
            parts = [self.vitreg.normalize_cls(tokens[:, 0]) for tokens in kept]  # CLS of the earlier blocks
            if config.use_cls_token:
                parts.append(outputs.last_hidden_state[:, 0])
            if config.classifier_pooling == "cls_mean":
                parts.append(outputs.patch_tokens.mean(dim=1))  # registers are never averaged in
            features = torch.cat(parts, dim=-1)  # [B, (n + 1) * D] with the mean, [B, n * D] without
        logits = self.classifier(features)
        loss = self.loss_function(labels, logits, config) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class ViTRegBackbone(BackboneMixin, ViTRegEncoderMixin, ViTRegPreTrainedModel):
    """Feature maps `[B, D, h, w]` of chosen stages, for transformers' dense-prediction heads (`AutoBackbone`)."""

    def __init__(self, config: ViTRegConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.embeddings = ViTRegEmbeddings(config)
        self.encoder = ViTRegEncoder(config)
        self.embeddings.freeze_mask_token()
        self.build_final_norms()
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The patch projection, the layer that embeds the input (hooked by `enable_input_require_grads`)."""
        return self.embeddings.patch_embeddings.projection

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BackboneOutput:
        r"""
        pixel_values: `[B, C, H, W]`; the feature maps come out as `[B, D, H / patch, W / patch]`.
        bool_masked_pos: `[B, HW]`, True where a patch is replaced by the mask token (needs `use_mask_token`).
        """
        rows, cols = grid_size(self.config, pixel_values.shape[-2], pixel_values.shape[-1])
        out_indices = [index % len(self.stage_names) for index in self.out_indices]  # out_indices may be negative
        stages = sorted(set(out_indices))
        _, kept = self.forward_blocks(pixel_values, bool_masked_pos, keep=stages, **kwargs)
        by_stage = dict(zip(stages, kept))
        feature_maps = []
        for stage in out_indices:
            hidden_state = by_stage[stage]
            if self.config.apply_layernorm:
                hidden_state = self.normalize(hidden_state)
            if self.config.reshape_hidden_states:
                _, _, patches = split_tokens(self.config, hidden_state)
                hidden_state = to_feature_map(patches, rows, cols)
            feature_maps.append(hidden_state)
        return BackboneOutput(feature_maps=tuple(feature_maps))


__all__ = [
    "ViTRegPreTrainedModel",
    "ViTRegModel",
    "ViTRegModelOutput",
    "ViTRegForImageClassification",
    "ViTRegBackbone",
    "split_tokens",
    "to_feature_map",
]
