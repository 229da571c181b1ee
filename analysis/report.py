"""The analysis as files: report.json (numbers), PNG figures and an index.html that shows them with a summary."""

import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vitreg.core.errors import UserError
from vitreg.core.folders import atomic_output_dir
from vitreg.core.opening import model_name, open_model

from .artifacts import ImageAnalysis, ModelAnalysis, analyze
from .figures import histogram_figure, image_figure, layer_figure, lost_figure
from .loading import collect_images
from .lost import DEFAULT_SPLIT, LOST_PATCHES, corloc, read_voc
from .threshold import check_threshold

# A folder, file, official name or Hub id, or an already loaded (model, processor) or (model, processor, name).
ModelSource = str | Path | tuple


def _round(values, digits: int = 4):
    """Nested lists of rounded floats for JSON."""
    return np.round(np.asarray(values, dtype=np.float64), digits).tolist()


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def image_record(analysis: ImageAnalysis, layer_thresholds: Sequence[float]) -> dict:
    """One image's entry of report.json."""
    a = analysis
    on_outliers, on_registers = a.attention_on_outliers, a.attention_on_registers
    return {
        "image": a.image,
        "grid": list(a.grid),
        "norms": _round(a.norms),
        "threshold": a.threshold,
        "outliers": a.outliers,
        "outlier_fraction": a.outlier_fraction,
        "cls_norm": a.cls_norm,
        "register_norms": _round(a.register_norms),
        "patch_norm_median": float(np.median(a.norms)),
        "patch_norm_max": float(a.norms.max()),
        "cls_attention": None if a.cls_attention is None else _round(a.cls_attention.mean(axis=0), 6),
        "cls_attention_per_head": None if a.cls_attention is None else _round(a.cls_attention, 6),
        "attention_on_outliers": None if on_outliers is None else float(on_outliers.mean()),
        "attention_on_outliers_per_head": None if on_outliers is None else _round(on_outliers, 6),
        "attention_on_registers": None if on_registers is None else float(on_registers.mean()),
        "attention_on_registers_per_head": None if on_registers is None else _round(on_registers, 6),
        "layers": {
            "patch_norm_median": _round(np.median(a.layer_norms.reshape(len(a.layer_norms), -1), axis=1)),
            "patch_norm_max": _round(a.layer_norms.reshape(len(a.layer_norms), -1).max(axis=1)),
            "outlier_fraction": _round(
                [float((norms > cut).mean()) for norms, cut in zip(a.layer_norms, layer_thresholds)], 6
            ),
            "cls_norm": _round(a.layer_cls_norms),
            "register_norms": _round(a.layer_register_norms),
        },
    }


def emergence_hidden_state(analysis: ModelAnalysis) -> int | None:
    """The first hidden state (0: the embeddings, i: after block i - 1) where at least half of the final outliers are
    already high-norm."""
    final = np.concatenate([a.outlier_mask.ravel() for a in analysis.images])
    if not final.any():
        return None
    for state, cut in enumerate(analysis.layer_thresholds):
        norms = np.concatenate([a.layer_norms[state].ravel() for a in analysis.images])
        if (norms[final] > cut).mean() >= 0.5:
            return state
    return None


def summary(analysis: ModelAnalysis) -> dict:
    """Numbers over all images of one model."""
    images = analysis.images
    norms = np.concatenate([a.norms.ravel() for a in images])
    mask = np.concatenate([a.outlier_mask.ravel() for a in images])
    registers = np.concatenate([a.register_norms for a in images])
    return {
        "num_images": len(images),
        "threshold": analysis.threshold,
        "threshold_rule": analysis.threshold_rule,
        "outlier_fraction": float(mask.mean()),
        "images_with_outliers": sum(bool(a.outlier_mask.any()) for a in images),
        "patch_norm_median": float(np.median(norms)),
        "patch_norm_max": float(norms.max()),
        "outlier_norm_mean": float(norms[mask].mean()) if mask.any() else None,
        "normal_norm_mean": float(norms[~mask].mean()) if (~mask).any() else None,
        "cls_norm_mean": _mean([a.cls_norm for a in images]),
        "register_norm_mean": float(registers.mean()) if registers.size else None,
        "attention_on_outliers": _mean(
            [None if a.cls_attention is None else a.attention_on_outliers.mean() for a in images]
        ),
        "attention_on_registers": _mean(
            [None if a.attention_on_registers is None else a.attention_on_registers.mean() for a in images]
        ),
        "emergence_hidden_state": emergence_hidden_state(analysis),
        "layers": [  # per hidden state: 0 is the embeddings, i the output of block i - 1 (0-based)
            {"hidden_state": state, "threshold": cut, "outlier_fraction": fraction, "max_over_median": ratio}
            for state, (cut, fraction, ratio) in enumerate(
                zip(analysis.layer_thresholds, analysis.layer_outlier_fractions(), analysis.layer_norm_ratios())
            )
        ],
    }


def model_record(analysis: ModelAnalysis) -> dict:
    """A model's part of report.json: its name, per-image entries and summary."""
    return {
        "model": analysis.model,
        "num_register_tokens": analysis.num_register_tokens,
        "num_test_time_registers": analysis.num_test_time_registers,
        "patch_size": analysis.patch_size,
        "images": [image_record(a, analysis.layer_thresholds) for a in analysis.images],
        "summary": summary(analysis),
    }


SUMMARY_ROWS = (
    ("registers", "num_register_tokens"),
    ("test-time registers", "num_test_time_registers"),
    ("threshold", "threshold"),
    ("outlier fraction", "outlier_fraction"),
    ("images with outliers", "images_with_outliers"),
    ("median patch norm", "patch_norm_median"),
    ("mean outlier norm", "outlier_norm_mean"),
    ("mean CLS norm", "cls_norm_mean"),
    ("mean register norm", "register_norm_mean"),
    ("CLS attention on outliers", "attention_on_outliers"),
    ("CLS attention on registers", "attention_on_registers"),
    ("outliers emerge at hidden state (0: embeddings)", "emergence_hidden_state"),
)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def write_index(folder: Path, report: dict) -> None:
    """`index.html`: the summary table, a per-image table and every figure."""
    models = [report] + ([report["compare"]] if "compare" in report else [])
    head = "".join(f"<th>{html.escape(m['model'])}</th>" for m in models)
    rows = []
    for label, key in SUMMARY_ROWS:
        values = [m.get(key, m["summary"].get(key)) for m in models]
        rows.append(f"<tr><td>{label}</td>{''.join(f'<td>{_cell(v)}</td>' for v in values)}</tr>")
    per_image = []
    for index, record in enumerate(report["images"]):
        cells = [html.escape(record["image"]), "×".join(map(str, record["grid"]))]
        for m in models:
            other = m["images"][index]
            cells += [
                f"{other['outlier_fraction']:.4f}",
                _cell(other["cls_norm"]),
                _cell(other["attention_on_outliers"]),
            ]
        per_image.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    image_head = "".join(
        f"<th>{html.escape(m['model'])}: {k}</th>"
        for m in models
        for k in ("outlier fraction", "CLS norm", "CLS attention on outliers")
    )
    lost = ""
    if "lost" in report:
        columns = ("model", "CorLoc", "images", "split", "resolution", "features", "k")
        lost = "<h2>LOST object discovery</h2><table><tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"
        for run in report["lost"]:
            cells = [run["model"], f"CorLoc {run['corloc']:.4f}", f"{run['num_images']} images", run["split"]]
            cells += [run["resolution"], run["features"], run["k"]]
            lost += "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
        lost += "</table>"
    figures = "".join(f'<p><img src="{html.escape(path)}" alt="{html.escape(path)}"></p>' for path in report["figures"])
    if report.get("image_figures_omitted"):
        figures = f"<p>Figures of the first {len(report['images']) - report['image_figures_omitted']} images only "
        figures += f"(--max-figures); {report['image_figures_omitted']} more are in report.json.</p>" + figures
    skipped = ""
    if report.get("skipped"):
        items = "".join(f"<li>{html.escape(name)}: {html.escape(reason)}</li>" for name, reason in report["skipped"])
        skipped = f"<h2>Skipped (unreadable)</h2><ul>{items}</ul>"
    rule = "a fixed" if report["summary"]["threshold_rule"] == "fixed" else "an automatic"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ViTReg artifact analysis</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}} img{{max-width:100%}}
</style></head><body>
<h1>High-norm artifact tokens</h1>
<p>Output-token norms (after the final norm); outliers are patch tokens above the threshold
({rule} threshold per model). Attention: the CLS token's, in the last layer.</p>
<h2>Summary</h2><table><tr><th></th>{head}</tr>{"".join(rows)}</table>
{lost}
<h2>Per image</h2><table><tr><th>image</th><th>grid</th>{image_head}</tr>{"".join(per_image)}</table>
{skipped}
<h2>Figures</h2>{figures}
</body></html>
"""
    (folder / "index.html").write_text(page)


def source_name(source: ModelSource) -> str:
    """How the report names a model: the path or id it was given, the name of a `(model, processor, name)`, or the
    loaded model's own."""
    if isinstance(source, tuple):
        return str(source[2]) if len(source) > 2 else model_name(source[0])
    return str(source)


def write_report(
    folder: Path,
    analyses: Sequence[ModelAnalysis],
    lost_runs: Sequence[dict],
    header: dict,
    *,
    max_figures: int | None = None,
    progress: bool = True,
) -> dict:
    """Write report.json (`header` first), figures/ and index.html of analyses and LOST runs; return the report.

    `max_figures`: draw the per-image figures of the first N images only (default: every image).
    """
    report = dict(header)
    drawings: list[tuple[str, Callable[[str], str]]] = []  # (file name, what draws it)
    (folder / "figures").mkdir(exist_ok=True)
    if analyses:
        report.update(model_record(analyses[0]))
        if len(analyses) > 1:
            report["compare"] = model_record(analyses[1])
        per_image = list(zip(*(a.images for a in analyses)))
        shown = per_image if max_figures is None else per_image[:max_figures]
        for index, per_model in enumerate(shown):
            name = f"figures/image_{index:03d}_{Path(per_model[0].image).stem}.png"
            drawings.append((name, lambda name, per_model=per_model: image_figure(folder, name, per_model, analyses)))
        report["image_figures_omitted"] = len(per_image) - len(shown)
        drawings.append(("figures/norm_histogram.png", lambda name: histogram_figure(folder, name, analyses)))
        drawings.append(("figures/layer_outliers.png", lambda name: layer_figure(folder, name, analyses)))
    if lost_runs:
        report["lost"] = list(lost_runs)
        drawings.append(("figures/lost.png", lambda name: lost_figure(folder, name, lost_runs)))
    bar = tqdm(drawings, desc="figures", unit="figure", disable=not progress)
    report["figures"] = [draw(name) for name, draw in bar]
    report.setdefault("images", [])
    report.setdefault("summary", {"threshold_rule": "none"})
    report["skipped"] = analyses[0].skipped if analyses else []
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    write_index(folder, report)
    return report


def run_analysis(
    model: ModelSource,
    images: Sequence[str | Path | Image.Image],
    out: str | Path,
    *,
    image_size: int | None = None,
    threshold: float | None = None,
    compare: ModelSource | None = None,
    lost_root: str | Path | None = None,
    lost_split: str = DEFAULT_SPLIT,
    lost_patches: int = LOST_PATCHES,
    crop: bool = True,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    revision: str | None = None,
    max_figures: int | None = None,
) -> dict:
    """Analyse a model (and `compare`) on images (files, folders or PIL images), write `out/`; return report.json.

    A model is opened by `vitreg.core.opening.open_model`: a ViTReg folder or Hub repo, any source `vitreg convert`
    reads (converted in memory), or a loaded `(model, processor)` or `(model, processor, name)`; `revision` applies
    to `model`. Folders are searched recursively; unreadable images are skipped and listed in the report's `skipped`.
    `image_size` is the side of the square the model sees (`vitreg.core.images.size_options`); `max_figures` limits
    the per-image figures to the first N images.

    With `lost_root`, also LOST's CorLoc over that VOC folder's `lost_split` (ImageSets/Main/<split>.txt; "all":
    every annotation), at each image's own resolution as LOST runs; `image_size` and `crop` do not apply to it.
    """
    check_threshold(threshold)  # before any model loads
    if max_figures is not None and max_figures < 0:
        raise UserError(f"--max-figures must be 0 or more, got {max_figures}")
    expanded: list[str | Path | Image.Image] = []
    for item in images:  # a folder expands, in place, into its sorted image files
        expanded.extend([item] if isinstance(item, Image.Image) else collect_images([item]))
    if not expanded and lost_root is None:
        raise UserError("nothing to analyse: give images or a VOC folder for LOST")
    if lost_root is not None:
        read_voc(lost_root, lost_split)  # a bad VOC folder fails before any model loads
    sources = [model] + ([compare] if compare is not None else [])
    inputs = [item for item in [*expanded, lost_root, *sources] if isinstance(item, (str, Path))]
    # Entered first: an unusable output location fails at once, and nothing appears unless the whole report does.
    with atomic_output_dir(Path(out), overwrite, inputs) as folder:
        loaded = []
        for index, source in enumerate(sources):
            opened = open_model(
                source[:2] if isinstance(source, tuple) else source,
                revision=revision if index == 0 else None,
                device=device,
                progress=progress,
            )
            loaded.append((opened.model, opened.processor, source_name(source)))
        analyses = [
            analyze(m, processor, expanded, image_size, threshold, name=name, progress=progress, crop=crop)
            for m, processor, name in (loaded if expanded else [])
        ]
        lost_runs = [
            {"model": name, **corloc(m, processor, lost_root, lost_split, lost_patches, progress)}
            for m, processor, name in (loaded if lost_root is not None else [])
        ]
        header = {"model": loaded[0][2], "image_size": image_size, "crop": crop}
        return write_report(folder, analyses, lost_runs, header, max_figures=max_figures, progress=progress)
