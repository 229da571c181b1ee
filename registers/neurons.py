"""Finding register neurons: the MLP units that write the high-norm outlier tokens of a ViT trained without registers.

Follows `find_register_neurons` of the paper's code (nickjiang2378/test-time-registers, shared/algorithms.py, used
with `apply_sparsity_filter=True` as its register_neurons.ipynb does): per image, the outlier positions are the tokens
whose norm after block `detect_layer` (0-based, like every block number here; negatives count from the end) is above
the threshold; a neuron's score is the mean absolute activation
(after the MLP non-linearity) at those positions, zeroed unless the neuron is sparse (below 0.5 on at least half of
the tokens), averaged over the images that have outliers; all `(layer, neuron)` pairs are ranked together, restricted
to a range of blocks (upstream's `filter_layers`) and the first `top_k` kept (the notebook's `top_k`).

Where upstream uses a fixed norm (150 for DINOv2 ViT-L), the outliers here come from the analysis tool's detector:
its automatic threshold over the pooled patch-token norms of that layer. Only patch tokens count as outliers (upstream
also lets a CLS token above the threshold in). Without `layers`, the search stops at the block where the outliers
emerge, as the notebook advises for `highest_layer` (17 for DINOv2 ViT-L, whose outliers emerge there).
"""

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import BaseImageProcessor

from vitreg.analysis.artifacts import ModelAnalysis, analyze
from vitreg.analysis.loading import preprocess, readable_images
from vitreg.analysis.threshold import check_threshold
from vitreg.core.errors import UserError
from vitreg.core.flags import parse_layers
from vitreg.core.folders import atomic_output_file
from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel

FORMAT = "vitreg-register-neurons/2"
# Format 1 counted `detect_layer` as a hidden state (0: the embeddings); format 2 as a block, 0-based like `layers`.
FORMAT_1 = "vitreg-register-neurons/1"
DETECT_LAYER = -2  # upstream's `detect_outliers_layer` for DINOv2 (configs/dinov2_large.yaml): the second to last block
TOP_K = 50  # upstream's `top_k` for DINOv2 ViT-L (configs/dinov2_large.yaml)
SPARSE_ACTIVATION = 0.5  # upstream's `sparsity_activation_threshold`
SPARSE_FRACTION = 0.5  # upstream's `sparsity_frac_threshold`


@dataclass
class RegisterNeurons:
    """Register neurons of one model, best first, with how and on which images they were found."""

    model: str
    architecture: dict  # num_hidden_layers, hidden_size, mlp_hidden_size: the shape the neurons index into
    neurons: list[dict]  # {"layer", "neuron", "score"}, highest score first
    detect_layer: int  # the block (0-based) after which the high-norm patch tokens are the outliers
    threshold: float
    threshold_rule: str  # "auto" (the analysis tool's) or "fixed"
    layers: list[int]  # the blocks searched
    top_k: int
    sparsity_filter: bool
    images: list[str]
    images_with_outliers: int
    outlier_fraction: float  # share of patch tokens above the threshold at `detect_layer`, pooled over images
    num_register_tokens: int = 0  # trained registers the model already has
    skipped: list[list[str]] = field(default_factory=list)  # [name, reason] of each image that could not be read
    format: str = field(default=FORMAT)

    def pairs(self, top_k: int | None = None, layers: Sequence[int] | None = None) -> list[list[int]]:
        """`[layer, neuron]` of the best `top_k` neurons (all by default) within `layers` (all by default)."""
        chosen = [n for n in self.neurons if layers is None or n["layer"] in layers]
        return [[n["layer"], n["neuron"]] for n in chosen[:top_k]]

    def to_dict(self) -> dict:
        """The record as JSON values."""
        return asdict(self)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the record as JSON, atomically."""
        with atomic_output_file(path, overwrite) as staging:
            self.write(staging)
        return Path(path)

    def write(self, path: Path) -> None:
        """Write the record as JSON to `path` (`save` does it atomically)."""
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RegisterNeurons":
        """Read a neurons file; anything else is a UserError."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        try:
            values = json.loads(path.read_text())
            if values.get("format") == FORMAT_1:
                values.update(format=FORMAT, detect_layer=int(values["detect_layer"]) - 1)  # a hidden state then
            if values.get("format") != FORMAT:
                raise ValueError(f"format is {values.get('format')!r}, not {FORMAT!r}")
            record = cls(**values)
            record.neurons = [{**n, "layer": int(n["layer"]), "neuron": int(n["neuron"])} for n in record.neurons]
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path} is not a register-neurons file ({error})") from None
        return record


def architecture(config: ViTRegConfig) -> dict:
    """What a neuron index depends on: depth, width and MLP width."""
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "mlp_hidden_size": config.mlp_hidden_size,
    }


def describe(shape: dict) -> str:
    """`24 blocks x 4096 MLP units (width 1024)`."""
    return f"{shape['num_hidden_layers']} blocks x {shape['mlp_hidden_size']} MLP units (width {shape['hidden_size']})"


def mlp_output_linear(model: ViTRegModel, layer: int) -> torch.nn.Linear:
    """The MLP's second linear of block `layer`: its input is the activation of every MLP unit."""
    mlp = model.encoder.layer[layer].mlp
    return mlp.fc2 if hasattr(mlp, "fc2") else mlp.weights_out


@torch.no_grad()
def mlp_activations(model: ViTRegModel, pixel_values: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """`{layer: [N, M]}` MLP activations (after the non-linearity) of one image's tokens in the listed blocks."""
    captured: dict[int, torch.Tensor] = {}
    handles = [
        mlp_output_linear(model, layer).register_forward_pre_hook(
            lambda module, inputs, layer=layer: captured.__setitem__(layer, inputs[0][0].float().cpu())
        )
        for layer in layers
    ]
    try:
        model(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def neuron_scores(activations: torch.Tensor, positions: torch.Tensor, sparsity_filter: bool) -> torch.Tensor:
    """`[N, M]` activations -> `[M]` mean |activation| at the outlier token `positions` (upstream's score)."""
    scores = activations[positions].abs().mean(dim=0)
    if sparsity_filter:
        # Upstream's sparsity filter: a register neuron is quiet (below 0.5) on at least half of the tokens.
        quiet = (activations < SPARSE_ACTIVATION).sum(dim=0) >= SPARSE_FRACTION * activations.shape[0]
        scores = scores * quiet
    return scores


def emergence_block(found: ModelAnalysis, masks: Sequence[np.ndarray], detect: int) -> int:
    """The first block after which at least half of the outlier tokens are already above that block's threshold.

    `masks`: per image `[h, w]`, the outliers after block `detect` (0-based); the rule of the analysis report's
    `emergence_hidden_state`, on the detection block's outliers.
    """
    for block in range(detect + 1):
        norms = np.concatenate([a.norms_after(block)[mask] for a, mask in zip(found.images, masks)])
        if (norms > found.threshold_after(block)).mean() >= 0.5:
            return block
    return detect


def find_register_neurons(
    model: ViTRegModel,
    processor: BaseImageProcessor,
    images: Sequence[str | Path | Image.Image],
    *,
    detect_layer: int = DETECT_LAYER,
    threshold: float | None = None,
    layers: Sequence[int] | None = None,
    top_k: int = TOP_K,
    sparsity_filter: bool = True,
    image_size: int | None = None,
    crop: bool = True,
    name: str | None = None,
    progress: bool = True,
) -> RegisterNeurons:
    """Rank the MLP units of `model` by their activation at the high-norm outlier tokens of `images` (upstream's rule).

    `detect_layer` and `layers` are blocks, 0-based (negatives count from the end); `threshold` a positive norm.
    Unreadable image files are skipped and listed in `skipped`. A UserError when the images show no outliers: no
    neurons are invented.
    """
    config = model.config
    depth = config.num_hidden_layers
    if config.num_test_time_registers:
        raise UserError("the model already has test-time registers: find register neurons on the model without them")
    [detect] = parse_layers(str(detect_layer), depth, flag="--detect-layer")
    check_threshold(threshold)
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    name = name or str(getattr(model, "name_or_path", "") or type(model).__name__)

    # Pass 1, the analysis tool: every block's patch-token norms and its automatic outlier threshold.
    found = analyze(model, processor, images, image_size, name=name, progress=progress, crop=crop)
    cut = found.threshold_after(detect) if threshold is None else float(threshold)
    masks = [a.norms_after(detect) > cut for a in found.images]  # per image [h, w]
    with_outliers = sum(bool(m.any()) for m in masks)
    fraction = float(np.mean(np.concatenate([m.ravel() for m in masks])))
    if not with_outliers:
        raise UserError(
            f"no high-norm outlier tokens after block {detect} in {len(masks)} image(s) (threshold {cut:.4g}): "
            "no register neurons to find. Use more images (large uniform areas show outliers best), another "
            "--detect-layer, or --threshold"
        )
    layers = list(range(emergence_block(found, masks, detect) + 1)) if layers is None else parse_layers(layers, depth)

    # Pass 2: the MLP activations at the outlier positions of every image that has outliers (the readable ones of
    # pass 1, in the same order).
    totals = torch.zeros(len(layers), config.mlp_hidden_size)
    param = next(model.parameters())
    named = readable_images(images, [])
    bar = tqdm(named, total=len(masks), desc="scoring neurons", unit="image", disable=not progress)
    for (_, image), mask in zip(bar, masks):
        if not mask.any():
            continue  # upstream skips images without outliers
        pixel_values = preprocess(processor, image, config.patch_size, image_size, crop)
        activations = mlp_activations(model, pixel_values.to(device=param.device, dtype=param.dtype), layers)
        positions = torch.from_numpy(np.flatnonzero(mask)) + config.num_prefix_tokens  # row-major patch -> token
        for row, layer in enumerate(layers):
            totals[row] += neuron_scores(activations[layer], positions, sparsity_filter)
    scores = (totals / with_outliers).flatten()  # mean over the images with outliers
    order = torch.argsort(scores, descending=True, stable=True)
    ranked = [
        {"layer": layers[int(i) // config.mlp_hidden_size], "neuron": int(i) % config.mlp_hidden_size, "score": s}
        for i in order[:top_k]
        if (s := float(scores[i])) > 0
    ]
    return RegisterNeurons(
        model=name,
        architecture=architecture(config),
        neurons=ranked,
        detect_layer=detect,
        threshold=cut,
        threshold_rule="auto" if threshold is None else "fixed",
        layers=list(layers),
        top_k=top_k,
        sparsity_filter=sparsity_filter,
        images=[a.image for a in found.images],
        images_with_outliers=with_outliers,
        outlier_fraction=fraction,
        num_register_tokens=config.num_register_tokens,
        skipped=found.skipped,
    )
