"""`vitreg analyze MODEL IMAGE_OR_FOLDER... --output-dir DIR`: artifact tokens, CLS attention and LOST, as a report."""

import argparse
from pathlib import Path

from vitreg.core.errors import UserError
from vitreg.core.flags import add_common_flags, spellings

from .lost import ALL_ANNOTATIONS, DEFAULT_SPLIT, FEATURES, LOST_PATCHES
from .report import run_analysis


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vitreg analyze`."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="ViTReg folder or Hub repo, or any source vitreg convert reads (a DINOv2 / timm / transformers checkpoint "
        "or Hub repo such as facebook/dinov2-base, an official name such as dinov2_vitl14_reg4), converted in memory",
    )
    parser.add_argument(
        "images", metavar="IMAGE_OR_FOLDER", nargs="*", help="images, or folders of images (searched recursively)"
    )
    parser.add_argument(
        *spellings("--output-dir"),
        "--out",
        required=True,
        type=Path,
        help="output folder: report.json, figures/, index.html",
    )
    add_common_flags(parser, "image_size")  # 518 at patch 14: the paper's 37x37 grid
    parser.add_argument(
        *spellings("--no-crop"),
        action="store_true",
        help="keep the whole image: its short side resized to --image-size (default: the processor's), no square "
        "crop, sides trimmed to patch multiples",
    )
    parser.add_argument(
        *spellings("--threshold"), type=float, help="fixed outlier norm (default: an automatic robust threshold)"
    )
    parser.add_argument(*spellings("--compare"), metavar="OTHER_MODEL", help="a second model analysed side by side")
    parser.add_argument(
        *spellings("--lost"),
        metavar="VOC_ROOT",
        type=Path,
        help="LOST object discovery and its CorLoc over a VOC folder (e.g. VOCdevkit/VOC2007), as the official code: "
        f"each image at its own resolution, zero-padded to whole patches, {FEATURES}; --image-size and --no-crop "
        "do not apply to it",
    )
    parser.add_argument(
        *spellings("--split"),
        *spellings("--lost-split"),
        dest="split",
        metavar="NAME",
        default=DEFAULT_SPLIT,
        help="the VOC images of ImageSets/Main/NAME.txt for --lost (default: %(default)s, the split the LOST and "
        f"registers papers report for VOC07 and VOC12; {ALL_ANNOTATIONS!r}: every file in Annotations/)",
    )
    parser.add_argument(
        *spellings("--lost-patches"),
        metavar="K",
        type=int,
        default=LOST_PATCHES,
        help="LOST's k: the seed is expanded among the K lowest-degree patches (default %(default)s)",
    )
    parser.add_argument(
        *spellings("--max-figures"),
        metavar="N",
        type=int,
        help="draw the per-image figures of the first N images only (default: every image; all are in report.json)",
    )
    add_common_flags(parser, "revision", "device", "overwrite", "no_progress")


def run(args: argparse.Namespace) -> int:
    """Analyse, write the report and print where it is."""
    if not args.images and args.lost is None:
        raise UserError("give at least one image or folder, or --lost VOC_ROOT")
    if args.lost_patches < 1:
        raise UserError(f"--lost-patches must be at least 1, got {args.lost_patches}")
    report = run_analysis(
        args.model,
        args.images,
        args.output_dir,
        image_size=args.image_size,
        threshold=args.threshold,
        compare=args.compare,
        lost_root=args.lost,
        lost_split=args.split,
        lost_patches=args.lost_patches,
        crop=not args.no_crop,
        device=args.device,
        revision=args.revision,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        max_figures=args.max_figures,
    )
    for record in [report] + ([report["compare"]] if "compare" in report else []):
        if record.get("images"):
            s = record["summary"]
            attention = s["attention_on_outliers"]
            print(
                f"{record['model']}: {s['outlier_fraction']:.2%} high-norm patch tokens "
                f"(threshold {s['threshold']:.4g}, {s['images_with_outliers']}/{s['num_images']} images)"
                + ("" if attention is None else f", CLS attention on them {attention:.2%}")
            )
    for run in report.get("lost", []):
        print(
            f"{run['model']}: LOST CorLoc {run['corloc']:.4f} over {run['num_images']} images "
            f"(split {run['split']}, {run['resolution']}, {run['features']}, k={run['k']})"
        )
    lost_skipped = report["lost"][0]["skipped"] if report.get("lost") else []
    for image, reason in report["skipped"] + lost_skipped:
        print(f"skipped {image}: {reason}")
    if report["skipped"] or lost_skipped:
        print(f"{len(report['skipped']) + len(lost_skipped)} unreadable images skipped")
    print(f"report: {args.output_dir / 'report.json'}  figures: {args.output_dir / 'index.html'}")
    return 0
