"""`vitreg extract MODEL IMAGES_OR_DATASET --output-dir FEATURES`: features of every image, as an Arrow dataset."""

import argparse
import os
import shlex
import sys
from pathlib import Path

from vitreg.core.flags import add_common_flags, spellings

from .backends import BACKENDS
from .extractor import DTYPES, extract_features
from .features import WHAT
from .output import JOB_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vitreg extract`."""
    parser.description = (
        "Features of a folder of images (searched recursively) or a datasets dataset, written as a datasets Arrow "
        "dataset (datasets.load_from_disk) with the image ids and a dataset's other columns. A rerun of an "
        "interrupted extraction resumes."
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="ViTReg folder or Hub repo, or any source vitreg convert reads (DINOv2 / DINOv3 / timm / transformers "
        "checkpoint or Hub repo, official name such as dinov2_vitl14_reg4), converted in memory",
    )
    parser.add_argument(
        "images",
        metavar="IMAGES_OR_DATASET",
        help="folder of images, folder of a saved datasets dataset (save_to_disk) or Hub dataset id",
    )
    parser.add_argument(
        *spellings("--output-dir"), "--out", required=True, type=Path, help="output folder (the features dataset)"
    )
    add_common_flags(parser, "image_size")
    parser.add_argument(*spellings("--batch-size"), type=int, default=32, help="images per forward (default 32)")
    parser.add_argument(
        *spellings("--workers"),
        type=int,
        default=min(4, max(1, (os.cpu_count() or 2) // 2)),
        help="processes decoding and resizing while the model runs (default %(default)s; 0: in the main process)",
    )
    parser.add_argument(
        *spellings("--what"),
        default="cls,patch",
        help=f"comma-separated columns among {', '.join(WHAT)} (default %(default)s); registers are the trained "
        "then the test-time ones, never mixed into the patch tokens",
    )
    parser.add_argument(
        *spellings("--layers"),
        metavar="BLOCKS",
        help="0-based blocks whose tokens, normed as DINOv2's and DINOv3's intermediate layers, to keep instead of the "
        "final output, as a comma-separated list of numbers and ranges: 0,5,10-11 or -1 (the last); each column "
        "gets a leading layer axis",
    )
    parser.add_argument(
        *spellings("--dtype"),
        choices=sorted(DTYPES),
        default="float32",
        help="compute dtype; features are stored in float16 with float16, float32 otherwise",
    )
    parser.add_argument(*spellings("--split"), default="train", help="split of a dataset (default %(default)s)")
    parser.add_argument(*spellings("--image-column"), help="image column of a dataset (default: its image column)")
    parser.add_argument(
        *spellings("--shard-size"), type=int, default=1000, help="images per Arrow shard (default %(default)s)"
    )
    parser.add_argument(
        *spellings("--strict"), action="store_true", help="stop at an unreadable image instead of skipping it"
    )
    parser.add_argument(
        *spellings("--backend"),
        choices=sorted(BACKENDS),
        default="torch",
        help="what runs the model: torch (eager) or onnxruntime (the model exported to a dynamic ONNX graph, "
        "checked against PyTorch to 1e-4; final tokens, float32, CPU)",
    )
    add_common_flags(parser, "revision", "device", "overwrite", "no_progress")


def resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes this run: its arguments as given, without --overwrite (which starts again)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = ["vitreg", "extract"]
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings:
            words.append(str(value))
        elif action.dest not in ("help", "overwrite") and value is not None and value != action.default:
            words += [action.option_strings[0]] if action.nargs == 0 else [action.option_strings[0], str(value)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    """Extract, then print the rows written, the images skipped and the throughput."""
    try:
        summary = extract_features(
            args.model,
            args.images,
            args.output_dir,
            revision=args.revision,
            image_size=args.image_size,
            batch_size=args.batch_size,
            workers=args.workers,
            what=args.what,
            layers=args.layers,
            dtype=args.dtype,
            shard_size=args.shard_size,
            split=args.split,
            image_column=args.image_column,
            strict=args.strict,
            overwrite=args.overwrite,
            device=args.device,
            backend=args.backend,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        if (args.output_dir / JOB_FILE).is_file():
            print(
                f"finished shards are kept in {args.output_dir}; to resume, run: {resume_command(args)}",
                file=sys.stderr,
            )
        raise
    for image, reason in summary["skipped"]:
        print(f"skipped {image}: {reason}")
    print(
        f"{summary['rows']} images -> {args.output_dir} ({', '.join(summary['what'])}; grid "
        f"{'x'.join(map(str, summary['grid']))}); {len(summary['skipped'])} skipped; "
        f"{summary['images_this_run']} this run at {summary['images_per_second']:.2f} images/s"
    )
    return 0
