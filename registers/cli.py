"""`vitreg registers find|apply`: test-time registers for a model trained without registers, without training.

    vitreg registers find MODEL IMAGE_OR_FOLDER... --output neurons.json [--layers 0-17] [--top-k 50]
    vitreg registers apply MODEL neurons.json OUTPUT_DIR [--top-k N] [--num-registers 1]

Every block number is 0-based, as in `--layers` everywhere (negatives count from the end). `find` exits 1 without
writing anything when the images show no high-norm outliers: it never invents neurons.
"""

import argparse
from pathlib import Path

from vitreg.analysis.loading import collect_images
from vitreg.analysis.threshold import check_threshold
from vitreg.core.flags import COMMON_FLAGS, add_common_flags, parse_layers, spellings
from vitreg.core.folders import atomic_output_file
from vitreg.core.opening import open_model

from .apply import NUM_REGISTERS, apply_register_neurons
from .neurons import DETECT_LAYER, TOP_K, RegisterNeurons, find_register_neurons

MODEL_HELP = "ViTReg folder or Hub repo, or any source vitreg convert reads (converted in memory)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vitreg registers`: one subcommand each for `find` and `apply`, each with only its own flags."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    find_parser = actions.add_parser(
        "find",
        help="rank the register neurons of MODEL on images (writes a neurons file)",
        description="Rank the MLP units of MODEL by their activation at its high-norm outlier tokens on the images "
        "(the paper's rule); write them best first as a neurons file for `vitreg registers apply`.",
    )
    add_find_arguments(find_parser)
    apply_parser = actions.add_parser(
        "apply",
        help="write MODEL with test-time registers for the neurons of a neurons file",
        description="Write MODEL as a ViTReg folder whose config adds test-time registers for the register neurons "
        "of NEURONS_JSON (found by `vitreg registers find`).",
    )
    add_apply_arguments(apply_parser)


def add_find_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vitreg registers find`."""
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument(
        "images", metavar="IMAGE_OR_FOLDER", nargs="+", help="images, or folders of images (searched recursively)"
    )
    parser.add_argument(
        *spellings("--output"),
        "--out",
        metavar="NEURONS_JSON",
        type=Path,
        required=True,
        help="the neurons file to write, e.g. neurons.json",
    )
    parser.add_argument(
        *spellings("--top-k"),
        metavar="K",
        type=int,
        default=TOP_K,
        help="keep the K best neurons (default %(default)s, upstream's for DINOv2 ViT-L)",
    )
    parser.add_argument(
        *spellings("--layers"),
        metavar="BLOCKS",
        help="the blocks to search; " + COMMON_FLAGS["layers"] % {"default": "up to where the outliers emerge"},
    )
    parser.add_argument(
        *spellings("--detect-layer"),
        type=int,
        default=DETECT_LAYER,
        metavar="BLOCK",
        help="the block whose output's high-norm patch tokens are the outliers, 0-based like --layers (-1: the "
        "last) (default %(default)s: the second to last, upstream's for DINOv2)",
    )
    parser.add_argument(
        *spellings("--threshold"),
        metavar="NORM",
        type=float,
        help="fixed outlier norm, positive (default: the analysis tool's automatic threshold)",
    )
    parser.add_argument(
        *spellings("--no-sparsity-filter"),
        action="store_true",
        help="also rank neurons that are active on most tokens (upstream's apply_sparsity_filter=False)",
    )
    add_common_flags(parser, "image_size")
    parser.add_argument(
        *spellings("--no-crop"),
        action="store_true",
        help="keep the whole image: its short side resized to --image-size (default: the processor's), no crop",
    )
    add_common_flags(parser, "revision", "device", "overwrite", "no_progress")


def add_apply_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vitreg registers apply`."""
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP + "; the model the neurons were found on")
    parser.add_argument("neurons", metavar="NEURONS_JSON", type=Path, help="a neurons file of `vitreg registers find`")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", type=Path, help="the ViTReg folder to write")
    parser.add_argument(
        *spellings("--top-k"), metavar="K", type=int, help="use the K best neurons of the file (default: all)"
    )
    parser.add_argument(
        *spellings("--layers"),
        metavar="BLOCKS",
        help="use only the neurons of these blocks; " + COMMON_FLAGS["layers"] % {"default": "all"},
    )
    parser.add_argument(
        *spellings("--num-registers"),
        metavar="N",
        type=int,
        default=NUM_REGISTERS,
        help="test-time registers to add (default %(default)s, as upstream)",
    )
    add_common_flags(parser, "revision", "overwrite", "no_progress")


def run(args: argparse.Namespace) -> int:
    """Find or apply register neurons and say what was done."""
    return find(args) if args.action == "find" else apply(args)


def find(args: argparse.Namespace) -> int:
    """`vitreg registers find`: write the ranked neurons."""
    check_threshold(args.threshold)
    images = collect_images(args.images)
    # Entered first: an unusable output fails before the model loads, and no file appears unless neurons are found.
    with atomic_output_file(args.output, args.overwrite) as staging:
        model, processor, _ = open_model(
            args.model, revision=args.revision, device=args.device, progress=not args.no_progress
        )
        if model.config.num_register_tokens:
            registers = model.config.num_register_tokens
            print(f"note: {args.model} has {registers} trained registers; looking for outliers all the same")
        layers = parse_layers(args.layers, model.config.num_hidden_layers) if args.layers else None
        record = find_register_neurons(
            model,
            processor,
            images,
            detect_layer=args.detect_layer,
            threshold=args.threshold,
            layers=layers,
            top_k=args.top_k,
            sparsity_filter=not args.no_sparsity_filter,
            image_size=args.image_size,
            crop=not args.no_crop,
            name=str(args.model),
            progress=not args.no_progress,
        )
        record.write(staging)
    per_layer: dict[int, int] = {}
    for neuron in record.neurons:
        per_layer[neuron["layer"]] = per_layer.get(neuron["layer"], 0) + 1
    for image, reason in record.skipped:
        print(f"skipped {image}: {reason}")
    print(
        f"{record.images_with_outliers}/{len(record.images)} images have outliers after block "
        f"{record.detect_layer} ({record.outlier_fraction:.2%} of patch tokens above {record.threshold:.4g})"
        + (f"; {len(record.skipped)} unreadable images skipped" if record.skipped else "")
    )
    print(
        f"{len(record.neurons)} register neurons in blocks {record.layers[0]}-{record.layers[-1]} "
        f"(per block: {', '.join(f'{layer}: {count}' for layer, count in sorted(per_layer.items()))}) -> {args.output}"
    )
    return 0


def apply(args: argparse.Namespace) -> int:
    """`vitreg registers apply`: write the model with test-time registers."""
    record = RegisterNeurons.load(args.neurons)
    layers = parse_layers(args.layers, record.architecture["num_hidden_layers"]) if args.layers else None
    folder, notes = apply_register_neurons(
        args.model,
        args.neurons,
        args.output_dir,
        top_k=args.top_k,
        layers=layers,
        num_registers=args.num_registers,
        revision=args.revision,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    for note in notes:
        print(f"note: {note}")
    count = len(record.pairs(args.top_k, layers))
    print(f"{count} register neurons shifted to {args.num_registers} test-time register(s) -> {folder}")
    return 0
