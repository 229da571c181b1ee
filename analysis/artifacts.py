"""High-norm artifact tokens and CLS attention of a ViTReg model over a set of images: the numbers of the report."""

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import BaseImageProcessor, PreTrainedModel

from vitreg.core.errors import UserError
from vitreg.core.images import check_image_size
from vitreg.modeling_vitreg import split_tokens

from .hooks import capture_last_qkv, cls_attention
from .loading import none_readable, preprocess, readable_images, unnormalize
from .threshold import auto_threshold, check_threshold

PHOTO_SIDE = 448


def hidden_state(block: int) -> int:
    """Where the output of block `block` (0-based) sits among the hidden states, whose 0 is the embeddings: the
    layer axis of every per-layer array here, numbered as the model's `hidden_states` and `keep` (the conventions are
    in modeling_vitreg's module docstring)."""
    return block + 1


@dataclass
class ImageAnalysis:
    """What one image shows about one model; norms are of the output tokens (after the final norm)."""

    image: str
    photo: np.ndarray  # [H', W', 3] uint8: the model's input, at most PHOTO_SIDE pixels a side, for figures
    norms: np.ndarray  # [h, w] output norm of every patch token
    cls_norm: float | None
    register_norms: np.ndarray  # [R]
    # Per hidden state (0: the embeddings, `hidden_state(b)`: after block b), un-normed:
    layer_norms: np.ndarray  # [L + 1, h, w] patch-token norms
    layer_cls_norms: np.ndarray  # [L + 1] (empty without a CLS token)
    layer_register_norms: np.ndarray  # [L + 1, R]
    cls_attention: np.ndarray | None  # [heads, h, w] last-layer attention of CLS to every patch
    cls_attention_registers: np.ndarray | None  # [heads, R] last-layer attention of CLS to every register
    threshold: float = 0.0
    outlier_mask: np.ndarray | None = None  # [h, w] bool, set by `mark_outliers`

    def norms_after(self, block: int) -> np.ndarray:
        """`[h, w]` un-normed patch-token norms after block `block` (0-based, counted from the first)."""
        return self.layer_norms[hidden_state(block)]

    @property
    def grid(self) -> tuple[int, int]:
        """The `(rows, cols)` patch grid."""
        return tuple(self.norms.shape)

    @property
    def outliers(self) -> list[list[int]]:
        """`[row, col]` of every high-norm patch token, row-major."""
        return [[int(r), int(c)] for r, c in np.argwhere(self.outlier_mask)]

    @property
    def outlier_fraction(self) -> float:
        """Share of patch tokens that are outliers: `len(outliers) / (h * w)`."""
        return len(self.outliers) / self.norms.size

    @property
    def attention_on_outliers(self) -> np.ndarray | None:
        """`[heads]` last-layer CLS attention mass that falls on outlier patches."""
        if self.cls_attention is None:
            return None
        return self.cls_attention[:, self.outlier_mask].sum(axis=-1)

    @property
    def attention_on_registers(self) -> np.ndarray | None:
        """`[heads]` last-layer CLS attention mass that falls on the registers."""
        if self.cls_attention_registers is None or self.cls_attention_registers.shape[-1] == 0:
            return None
        return self.cls_attention_registers.sum(axis=-1)


@dataclass
class ModelAnalysis:
    """One model over all images: per-image results and the thresholds, pooled over images, of each hidden state."""

    model: str
    num_register_tokens: int
    patch_size: int
    threshold: float
    threshold_rule: str  # "auto" or "fixed"
    images: list[ImageAnalysis]
    layer_thresholds: list[float]  # [L + 1] automatic threshold of the un-normed norms of each hidden state
    num_test_time_registers: int = 0  # untrained registers after the trained ones (counted in the register norms)
    skipped: list[list[str]] = field(default_factory=list)  # [name, reason] of each image that could not be read

    def threshold_after(self, block: int) -> float:
        """The automatic threshold of the un-normed patch-token norms after block `block` (0-based, from the first)."""
        return self.layer_thresholds[hidden_state(block)]

    def layer_outlier_fractions(self) -> list[float]:
        """Share of patch tokens above their own automatic threshold, pooled over images, per hidden state."""
        return [
            float(np.mean(np.concatenate([a.layer_norms[layer].ravel() for a in self.images]) > cut))
            for layer, cut in enumerate(self.layer_thresholds)
        ]

    def layer_norm_ratios(self) -> list[float]:
        """Largest over median patch-token norm, pooled over images, per hidden state."""
        ratios = []
        for layer in range(len(self.layer_thresholds)):
            norms = np.concatenate([a.layer_norms[layer].ravel() for a in self.images])
            ratios.append(float(norms.max() / max(np.median(norms), 1e-12)))
        return ratios


def thumbnail(photo: torch.Tensor) -> np.ndarray:
    """`[H, W, 3]` in [0, 1] -> uint8 with at most PHOTO_SIDE pixels a side: kept per image, so kept small."""
    image = Image.fromarray((photo.numpy() * 255).round().astype(np.uint8))
    image.thumbnail((PHOTO_SIDE, PHOTO_SIDE))
    return np.asarray(image)


def _norms(tokens: torch.Tensor) -> np.ndarray:
    return tokens.float().norm(dim=-1).numpy()


@torch.no_grad()
def analyze_image(
    model: PreTrainedModel,
    processor: BaseImageProcessor,
    image: Image.Image,
    name: str,
    image_size: int | None = None,
    crop: bool = True,
) -> ImageAnalysis:
    """Norms (output and per hidden state) and last-layer CLS attention of one image; outliers are marked later."""
    config = model.config
    pixel_values = preprocess(processor, image, config.patch_size, image_size, crop)  # [1, 3, H, W]
    rows, cols = pixel_values.shape[-2] // config.patch_size, pixel_values.shape[-1] // config.patch_size
    param = next(model.parameters())
    # All layers' attention maps would be heads * N^2 per block (GBs for ViT-g at 518 px): recompute the last one's.
    with capture_last_qkv(model) as captured:
        outputs = model(pixel_values.to(device=param.device, dtype=param.dtype), output_hidden_states=True)
    # One notion of prefix tokens, the model's: [CLS, registers, patches].
    cls_token, registers, patches = split_tokens(config, outputs.last_hidden_state.cpu())  # batch of one
    layers = torch.stack(outputs.hidden_states)[:, 0].cpu()  # [L + 1, P + hw, D]
    layer_cls, layer_registers, layer_patches = split_tokens(config, layers)
    has_cls = config.use_cls_token
    attention_map = cls_registers = None
    if has_cls:
        attention = cls_attention(captured["qkv"], config.num_attention_heads, captured["rope"])
        attention = attention[0].cpu()  # [heads, P + hw]
        _, attention_registers, attention_patches = split_tokens(config, attention)
        attention_map = attention_patches.reshape(-1, rows, cols).numpy()
        cls_registers = attention_registers.numpy()
    return ImageAnalysis(
        image=name,
        photo=thumbnail(unnormalize(processor, pixel_values)),
        norms=_norms(patches[0]).reshape(rows, cols),
        cls_norm=float(_norms(cls_token[0])) if has_cls else None,
        register_norms=_norms(registers[0]),
        layer_norms=_norms(layer_patches).reshape(-1, rows, cols),
        layer_cls_norms=_norms(layer_cls) if has_cls else np.zeros(0),
        layer_register_norms=_norms(layer_registers),
        cls_attention=attention_map,
        cls_attention_registers=cls_registers,
    )


def mark_outliers(analyses: Sequence[ImageAnalysis], threshold: float) -> None:
    """Mark the patch tokens whose output norm exceeds `threshold` in every analysis."""
    for analysis in analyses:
        analysis.threshold = float(threshold)
        analysis.outlier_mask = analysis.norms > threshold


def analyze(
    model: PreTrainedModel,
    processor: BaseImageProcessor,
    images: Sequence[str | Image.Image],
    image_size: int | None = None,
    threshold: float | None = None,
    name: str | None = None,
    progress: bool = True,
    crop: bool = True,
) -> ModelAnalysis:
    """Analyse `model` on `images` (paths or PIL images): norms, outliers (automatic or fixed threshold), attention.

    `image_size` is the side of the square the model sees (518: the paper's 37x37 grid at patch 14), taken as the
    model's processor takes it (`vitreg.core.images.size_options`); `crop=False` keeps the whole image instead;
    neither: the model's own preprocessing. One threshold per model, from the output norms pooled over all images, so
    that images are compared on the same scale. Unreadable files are skipped and listed in `skipped`.
    """
    if image_size is not None:
        check_image_size(image_size, model.config.patch_size)
    check_threshold(threshold)
    if not images:
        raise UserError("no images to analyse")
    skipped: list[list[str]] = []
    named = tqdm(
        readable_images(images, skipped), total=len(images), desc="analysing", unit="image", disable=not progress
    )
    results = [analyze_image(model, processor, image, image_name, image_size, crop) for image_name, image in named]
    if not results:
        raise none_readable(skipped)
    pooled = np.concatenate([a.norms.ravel() for a in results])
    cut = auto_threshold(pooled) if threshold is None else float(threshold)
    mark_outliers(results, cut)
    depth = results[0].layer_norms.shape[0]
    layer_thresholds = [
        auto_threshold(np.concatenate([a.layer_norms[layer].ravel() for a in results])) for layer in range(depth)
    ]
    return ModelAnalysis(
        model=name or str(getattr(model, "name_or_path", "") or type(model).__name__),
        num_register_tokens=model.config.num_register_tokens,
        patch_size=model.config.patch_size,
        threshold=cut,
        threshold_rule="auto" if threshold is None else "fixed",
        images=results,
        layer_thresholds=layer_thresholds,
        num_test_time_registers=getattr(model.config, "num_test_time_registers", 0),
        skipped=skipped,
    )
