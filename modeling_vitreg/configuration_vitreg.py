"""ViTReg configuration: a DINOv2-style Vision Transformer with register tokens (and DINOv3's RoPE variant)."""

from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig

POOLING_TYPES = ("cls", "mean")
POSITION_EMBEDDING_TYPES = ("absolute", "rope")
ROPE_NORMALIZE_COORDS = ("separate", "min", "max")
ROPE_PERIODS_DTYPES = ("float32", "bfloat16", "float16")
CLASSIFIER_POOLING_TYPES = ("cls_mean", "cls")


class ViTRegConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a [`ViTRegModel`]: a ViT whose token sequence is `[CLS, registers, patches]`.

    The defaults describe DINOv2 ViT-B/14 with 4 registers (`dinov2_vitb14_reg4`). DINOv3's ViTs are the same model with
    `position_embedding_type="rope"`, `mask_k_bias=True`, patch 16 and LayerNorm eps 1e-5 (the switches below are off by
    default, so every DINOv2 folder loads unchanged).

    Args:
        hidden_size: width D of every token.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: heads per attention layer (DINOv2 uses D / 64).
        mlp_ratio: MLP hidden size as a multiple of D (ignored when `intermediate_size` is set).
        intermediate_size: explicit MLP hidden size; for SwiGLU the size of each of the two gated halves.
        hidden_act: MLP activation (`"gelu"` is the exact erf GELU of DINOv2).
        layer_norm_eps: epsilon of every LayerNorm.
        image_size: side of the square image the position embeddings were trained at.
        patch_size: side of a square patch.
        num_channels: input channels.
        qkv_bias / proj_bias / ffn_bias: biases of the qkv projection, attention output and MLP linears.
        layerscale_value: initial LayerScale gamma; `None` builds blocks without LayerScale.
        drop_path_rate: stochastic depth rate, spread linearly over depth (`drop_path_uniform` for a constant rate).
        drop_path_uniform: use the same stochastic-depth rate in every block, as DINOv2 does.
        use_swiglu_ffn: SwiGLU MLP (DINOv2 ViT-g, DINOv3 S+/L+/H+/7B) instead of Linear-GELU-Linear.
        swiglu_align_to: the SwiGLU width is two thirds of the MLP width rounded up to a multiple of this (8; DINOv3
            7B: 64), as DINOv2's and DINOv3's `SwiGLUFFN` compute it.
        num_register_tokens: learnable register tokens R; 0 is a plain DINOv2 ViT.
        num_test_time_registers: untrained, all-zero tokens T appended after the registers at inference ("Vision
            Transformers Don't Need Trained Registers", Jiang et al. 2025); 0 (the default) adds none.
        register_neurons: `[layer, neuron]` pairs (0-based block, MLP hidden unit) whose activations move from the
            patch tokens to the test-time registers in every forward pass (`vitreg registers find` finds them).
        initializer_range: std of the truncated normal used for weights and embeddings.
        position_embedding_type: `"absolute"`: learned position embeddings, interpolated to the image (DINOv2);
            `"rope"`: 2-D axial rotary embeddings of the patch queries and keys, no learned positions (DINOv3).
        rope_theta: RoPE base: periods `theta ** (2i / (head_dim / 2))` for `i < head_dim / 4` (DINOv3: 100).
        rope_min_period / rope_max_period: the other parametrisation, geometric periods from min to max (set both and
            `rope_theta=None`).
        rope_normalize_coords: patch-centre coordinates divided by the rows and columns (`"separate"`), or both by
            the smaller (`"min"`) or larger (`"max"`) side, then mapped to [-1, 1].
        rope_periods_dtype: the precision the periods are stored in: DINOv3's released weights hold them rounded to
            `"bfloat16"` in a buffer its code then computes with, so exact conversions keep that rounding (transformers
            and timm recompute them in float32); angles are always computed in float32.
        rope_shift_coords / rope_jitter_coords / rope_rescale_coords: train-time coordinate augmentations (uniform
            shift, log-uniform per-axis and joint scale), as DINOv3's `RopePositionEmbedding`; inactive in eval.
        mask_k_bias: ignore the key third of the qkv bias (DINOv3's `LinearKMaskedBias` with its released mask).
        untie_cls_and_patch_norms: a separate final norm (`cls_norm`) for the CLS and register tokens.
        untie_global_and_local_cls_norm: keep DINOv3's `local_cls_norm` (used by its trainer on local crops only,
            never at inference) so a converted checkpoint exports back unchanged; held as buffers, never trained.
        interpolate_antialias: antialiased bicubic position interpolation (DINOv2 register models).
        interpolate_offset: when non-zero, interpolate by scale factor `(grid + offset) / old_grid` as DINOv2
            models without registers do (0.1); when 0, interpolate to the target size.
        use_mask_token: a learned mask token that replaces the patches `bool_masked_pos` marks (masked image
            modelling, iBOT); off by default, since nothing but masked pretraining uses it. Every ViTReg class builds
            it exactly when this is set (the config alone decides the module tree, so a classifier or backbone loads
            the checkpoint of the bare model, mask token included); the classifier and the backbone hold it frozen, as a
            buffer under the same key, because classification and feature extraction never train it and DDP refuses a
            trainable parameter that gets no gradient. Saved `config.json` files always carry this field, so folders
            written while it defaulted to True load unchanged.
        use_cls_token: prepend a CLS token (timm's SBB "gap" models have none).
        use_fc_norm: apply the final LayerNorm to the pooled mean instead of to every token (timm's "gap" models).
        cls_token_position_embedding: add a position embedding to the CLS token (timm folds it into the token).
        pooling: `"cls"` pools the CLS token, `"mean"` averages the patch tokens (registers never take part).
        classifier_num_layers: ViTRegForImageClassification reads the CLS token of the last n blocks (1 or 4,
            DINOv2's linear and linear4 heads) plus, with `classifier_pooling="cls_mean"`, the mean patch token.
        classifier_pooling: features of ViTRegForImageClassification: `"cls_mean"` (CLS token(s) and the mean patch
            token, DINOv2's linear heads) or `"cls"` (the CLS token(s) only, as DeiT III and ViT classify).
        apply_layernorm / reshape_hidden_states: ViTRegBackbone feature maps are normed / `[B, D, h, w]`.
        out_features / out_indices: stages ViTRegBackbone returns (`"stem"`, `"stage1"`, ...).
    """

    model_type = "vitreg"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float | int = 4
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 518
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    layerscale_value: float | None = 1.0
    drop_path_rate: float | int = 0.0
    drop_path_uniform: bool = False
    use_swiglu_ffn: bool = False
    swiglu_align_to: int = 8
    num_register_tokens: int = 4
    num_test_time_registers: int = 0
    register_neurons: list[list[int]] | None = None
    initializer_range: float = 0.02
    position_embedding_type: str = "absolute"
    rope_theta: float | int | None = 100.0
    rope_min_period: float | int | None = None
    rope_max_period: float | int | None = None
    rope_normalize_coords: str = "separate"
    rope_periods_dtype: str = "float32"
    rope_shift_coords: float | int | None = None
    rope_jitter_coords: float | int | None = None
    rope_rescale_coords: float | int | None = None
    mask_k_bias: bool = False
    untie_cls_and_patch_norms: bool = False
    untie_global_and_local_cls_norm: bool = False
    interpolate_antialias: bool = True
    interpolate_offset: float | int = 0.0
    use_mask_token: bool = False
    use_cls_token: bool = True
    use_fc_norm: bool = False
    cls_token_position_embedding: bool = True
    pooling: str = "cls"
    classifier_num_layers: int = 1
    classifier_pooling: str = "cls_mean"
    apply_layernorm: bool = True
    reshape_hidden_states: bool = True
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    @property
    def uses_rope(self) -> bool:
        """Whether positions are rotary (DINOv3) rather than learned and interpolated (DINOv2)."""
        return self.position_embedding_type == "rope"

    def __post_init__(self, **kwargs):
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)
        self.validate_vitreg()

    def validate_vitreg(self) -> None:
        """Refuse field combinations that describe no model, with a message naming the field."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ViTRegConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) is not a multiple of patch_size ({self.patch_size})")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")
        self.validate_test_time_registers()
        self.validate_rope()
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {POOLING_TYPES}, got {self.pooling!r}")
        if self.pooling == "cls" and not self.use_cls_token:
            raise ValueError("pooling='cls' needs use_cls_token=True; use pooling='mean' for models without CLS")
        if self.classifier_num_layers < 1 or self.classifier_num_layers > self.num_hidden_layers:
            raise ValueError(
                f"classifier_num_layers must be in [1, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.classifier_num_layers}"
            )

        if self.classifier_num_layers > 1 and (self.use_fc_norm or not self.use_cls_token):
            raise ValueError("classifier_num_layers > 1 reads CLS tokens: it needs use_cls_token and no fc norm")
        if self.classifier_pooling not in CLASSIFIER_POOLING_TYPES:
            raise ValueError(
                f"classifier_pooling must be one of {CLASSIFIER_POOLING_TYPES}, got {self.classifier_pooling!r}"
            )
        if self.classifier_pooling == "cls" and (self.use_fc_norm or not self.use_cls_token):
            raise ValueError("classifier_pooling='cls' reads the CLS token: it needs use_cls_token and no fc norm")
        if self.untie_cls_and_patch_norms and self.use_fc_norm:
            raise ValueError("untie_cls_and_patch_norms norms every token: it cannot go with use_fc_norm")
        if self.use_fc_norm and self.pooling != "mean":
            raise ValueError("use_fc_norm normalises the pooled mean: it needs pooling='mean'")

    def validate_rope(self) -> None:
        """Refuse position settings that describe no model (DINOv3's RoPE rules), naming the field."""
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            kind = self.position_embedding_type
            raise ValueError(f"position_embedding_type must be one of {POSITION_EMBEDDING_TYPES}, got {kind!r}")
        if self.position_embedding_type != "rope":
            return
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 4:
            raise ValueError(f"RoPE rotates 2 axes in pairs: the head dimension ({head_dim}) must be a multiple of 4")
        periods = (self.rope_min_period, self.rope_max_period)
        by_base = self.rope_theta is not None and periods == (None, None)
        if not by_base and (self.rope_theta is not None or None in periods):
            raise ValueError("RoPE needs either rope_theta or both rope_min_period and rope_max_period, not both")
        if self.rope_periods_dtype not in ROPE_PERIODS_DTYPES:
            dtype = self.rope_periods_dtype
            raise ValueError(f"rope_periods_dtype must be one of {ROPE_PERIODS_DTYPES}, got {dtype!r}")
        if self.rope_normalize_coords not in ROPE_NORMALIZE_COORDS:
            raise ValueError(
                f"rope_normalize_coords must be one of {ROPE_NORMALIZE_COORDS}, got {self.rope_normalize_coords!r}"
            )

    def validate_test_time_registers(self) -> None:
        """Refuse test-time registers without register neurons (or the reverse) and neurons the model does not have."""
        if self.num_test_time_registers < 0:
            raise ValueError(f"num_test_time_registers must be >= 0, got {self.num_test_time_registers}")
        if bool(self.num_test_time_registers) != bool(self.register_neurons):
            raise ValueError("num_test_time_registers and register_neurons go together: set both or neither")
        for pair in self.register_neurons or []:
            if len(pair) != 2:
                raise ValueError(f"register_neurons holds [layer, neuron] pairs, got {pair}")
            layer, neuron = pair
            if not (0 <= layer < self.num_hidden_layers and 0 <= neuron < self.mlp_hidden_size):
                raise ValueError(
                    f"register neuron {pair} is outside the model's {self.num_hidden_layers} blocks x "
                    f"{self.mlp_hidden_size} MLP units"
                )

    def neurons_of_layer(self, layer: int) -> list[int]:
        """The sorted register neurons of block `layer` (0-based); empty without test-time registers."""
        return sorted({neuron for block, neuron in self.register_neurons or [] if block == layer})

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the CLS token (if any), the registers and the test-time registers."""
        return int(self.use_cls_token) + self.num_register_tokens + self.num_test_time_registers

    @property
    def mlp_hidden_size(self) -> int:
        """Hidden width of the MLP (of each SwiGLU half), as DINOv2 derives it."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            # DINOv2's SwiGLUFFNFused and DINOv3's SwiGLUFFN: two thirds, rounded up to a multiple of the alignment.
            hidden = int(hidden * 2 / 3)
            hidden += -hidden % self.swiglu_align_to
        return hidden


__all__ = ["ViTRegConfig"]
