"""PNG figures of an analysis: per-image maps, the norm histogram, per-layer curves, LOST boxes.

Drawn on `matplotlib.figure.Figure` objects, never through pyplot: saving a PNG renders with Agg for that file only,
so importing or using the analysis leaves the importing program's matplotlib backend (and its windows) alone.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .artifacts import ImageAnalysis, ModelAnalysis
from .loading import open_image


def _save(fig: Figure, folder: Path, name: str) -> str:
    fig.savefig(folder / name, dpi=100)  # a Figure without pyplot is freed with its last reference
    return name


def _label(analysis: ModelAnalysis) -> str:
    test_time = f" + {analysis.num_test_time_registers} test-time" if analysis.num_test_time_registers else ""
    return f"{Path(analysis.model).name or analysis.model} ({analysis.num_register_tokens} reg{test_time})"


def image_figure(folder: Path, name: str, per_model: Sequence[ImageAnalysis], models: Sequence[ModelAnalysis]) -> str:
    """One row per model: the input photo, the output norm map (outliers circled), the mean CLS attention map."""
    fig = Figure(figsize=(13, 4 * len(per_model)), layout="constrained")
    axes = fig.subplots(len(per_model), 3, squeeze=False)
    for row, (image, model) in zip(axes, zip(per_model, models)):
        row[0].imshow(image.photo)
        row[0].set_title(f"{_label(model)}\n{Path(image.image).name}", fontsize=9)
        shown = row[1].imshow(image.norms, cmap="viridis")
        fig.colorbar(shown, ax=row[1], fraction=0.046)
        outliers = np.argwhere(image.outlier_mask)
        if len(outliers):
            row[1].scatter(outliers[:, 1], outliers[:, 0], s=12, facecolors="none", edgecolors="red", linewidths=0.8)
        row[1].set_title(
            f"output norms\n{len(outliers)} outliers ({image.outlier_fraction:.1%}) above {image.threshold:.3g}",
            fontsize=9,
        )
        if image.cls_attention is None:
            row[2].text(0.5, 0.5, "no CLS token", ha="center", va="center")
        else:
            shown = row[2].imshow(image.cls_attention.mean(axis=0), cmap="inferno")
            fig.colorbar(shown, ax=row[2], fraction=0.046)
            title = f"CLS attention (last layer, mean of heads)\n{image.attention_on_outliers.mean():.1%} on outliers"
            if image.attention_on_registers is not None:  # trained or test-time registers
                title += f", {image.attention_on_registers.mean():.1%} on registers"
            row[2].set_title(title, fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, folder, name)


def histogram_figure(folder: Path, name: str, models: Sequence[ModelAnalysis]) -> str:
    """Histogram of output patch-token norms over all images (log scale), one panel per model, threshold marked."""
    fig = Figure(figsize=(6 * len(models), 4), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False)
    for ax, model in zip(axes[0], models):
        norms = np.concatenate([a.norms.ravel() for a in model.images])
        bins = np.geomspace(max(norms.min(), 1e-6), max(norms.max(), model.threshold) * 1.05, 60)
        ax.hist(norms, bins=bins, color="tab:blue")
        ax.axvline(model.threshold, color="red", linestyle="--", label=f"threshold {model.threshold:.3g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("output norm of patch tokens")
        ax.set_ylabel("tokens")
        ax.set_title(_label(model), fontsize=9)
        ax.legend()
    return _save(fig, folder, name)


def layer_figure(folder: Path, name: str, models: Sequence[ModelAnalysis]) -> str:
    """Per hidden state: share of high-norm patch tokens and largest / median norm, one line per model."""
    fig = Figure(figsize=(12, 4), layout="constrained")
    share, ratio = fig.subplots(1, 2)
    for model in models:
        layers = range(len(model.layer_thresholds))
        share.plot(layers, model.layer_outlier_fractions(), marker="o", label=_label(model))
        ratio.plot(layers, model.layer_norm_ratios(), marker="o", label=_label(model))
    share.set_ylabel("outlier fraction (automatic threshold per hidden state)")
    ratio.set_ylabel("max / median patch-token norm")
    for ax in (share, ratio):
        ax.set_xlabel("hidden state (0: embeddings, i: after block i - 1)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    return _save(fig, folder, name)


def lost_figure(folder: Path, name: str, runs: Sequence[dict], limit: int = 8) -> str:
    """The first images of each LOST run with the found box (red), its seed patch and the ground-truth boxes (green)."""
    count = min(limit, max(len(run["images"]) for run in runs))
    fig = Figure(figsize=(3 * count, 3 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), count, squeeze=False)
    for panels, run in zip(axes, runs):
        patch = run["patch_size"]
        for ax, entry in zip(panels, run["images"][:count]):
            ax.imshow(open_image(entry["image"]))
            found = [] if entry["box"] is None else [(entry["box"], "red")]
            for box, colour in [(b, "lime") for b in entry["gt_boxes"]] + found:
                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2))
            if entry["seed"] is not None:
                row, col = entry["seed"]
                ax.add_patch(Rectangle((col * patch, row * patch), patch, patch, color="red", alpha=0.6))
            ax.set_title(f"{Path(run['model']).name}: IoU {entry['iou']:.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, folder, name)
