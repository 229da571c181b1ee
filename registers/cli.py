"""`vitreg registers find|apply`: test-time registers for a model trained without registers, without training.

    vitreg registers find MODEL IMAGE_OR_FOLDER... --output neurons.json [--layers 0-17] [--top-k 50]
    vitreg registers apply MODEL neurons.json OUT_DIR [--top-k N] [--num-registers 1]

`find` exits 1 without writing anything when the images show no high-norm outliers: it never invents neurons.
"""

import argparse
from pathlib import Path

from vitreg.analysis.loading import check_images, collect_images, load_model
from vitreg.core.errors import UserError
from vitreg.core.flags import spellings

from .apply import NUM_REGISTERS, apply_register_neurons
from .neurons import DETECT_LAYER, TOP_K, RegisterNeurons, find_register_neurons, parse_layers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vitreg registers`."""
    parser.add_argument(
        "action",
        choices=["find", "apply"],
        help="find: rank the register neurons of MODEL on images; apply: write MODEL with test-time registers",
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="ViTReg folder or Hub repo, or any source vitreg convert reads (converted in memory)",
    )
    parser.add_argument(
        "inputs",
        metavar="INPUT",
        nargs="+",
        help="find: images or folders of images; apply: NEURONS_JSON OUT_DIR",
    )
    parser.add_argument(
        *spellings("--output"), "--out", type=Path, help="find: the neurons file to write (e.g. neurons.json)"
    )
    parser.add_argument(
        *spellings("--top-k"),
        type=int,
        help=f"find: keep the K best neurons (default {TOP_K}, upstream's for DINOv2 ViT-L); apply: use the K best "
        "of the file (default all)",
    )
    parser.add_argument(
        *spellings("--layers"),
        help="blocks to search or apply, 0-based, e.g. 0-17 or 12,14-17 (find's default: up to the block where the "
        "outliers emerge)",
    )
    parser.add_argument(
        *spellings("--detect-layer"),
        type=int,
        default=DETECT_LAYER,
        help="find: the block output whose high-norm tokens are the outliers, 1-based or negative "
        "(default %(default)s, upstream's for DINOv2)",
    )
    parser.add_argument(
        *spellings("--threshold"), type=float, help="find: fixed outlier norm (default: the analysis tool's automatic)"
    )
    parser.add_argument(
        *spellings("--no-sparsity-filter"),
        action="store_true",
        help="find: also rank neurons that are active on most tokens (upstream's apply_sparsity_filter=False)",
    )
    parser.add_argument(*spellings("--image-size"), type=int, help="find: resize the short side to N and crop NxN")
    parser.add_argument(*spellings("--no-crop"), action="store_true", help="find: keep the whole image")
    parser.add_argument(
        *spellings("--num-registers"),
        type=int,
        default=NUM_REGISTERS,
        help="apply: test-time registers to add (default %(default)s, as upstream)",
    )
    parser.add_argument(*spellings("--revision"), help="branch, tag or commit of a Hub repo MODEL (default: main)")
    parser.add_argument(*spellings("--device"), help="find: torch device, e.g. cuda (default: cpu)")
    parser.add_argument(*spellings("--overwrite"), action="store_true", help="replace the output file or folder")


def run(args: argparse.Namespace) -> int:
    """Find or apply register neurons and say what was done."""
    return find(args) if args.action == "find" else apply(args)


def find(args: argparse.Namespace) -> int:
    """`vitreg registers find`: write the ranked neurons."""
    if args.output is None:
        raise UserError("find needs --output NEURONS_JSON")
    if args.output.exists() and not args.overwrite:
        raise UserError(f"{args.output} exists; pass --overwrite to replace it")
    images = collect_images(args.inputs)
    check_images(images)
    model, processor = load_model(args.model, args.revision)
    if args.device:
        model = model.to(args.device)
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
        top_k=TOP_K if args.top_k is None else args.top_k,
        sparsity_filter=not args.no_sparsity_filter,
        image_size=args.image_size,
        crop=not args.no_crop,
        name=str(args.model),
    )
    record.save(args.output, args.overwrite)
    per_layer: dict[int, int] = {}
    for neuron in record.neurons:
        per_layer[neuron["layer"]] = per_layer.get(neuron["layer"], 0) + 1
    print(
        f"{record.images_with_outliers}/{len(record.images)} images have outliers after block "
        f"{record.detect_layer - 1} ({record.outlier_fraction:.2%} of patch tokens above {record.threshold:.4g})"
    )
    print(
        f"{len(record.neurons)} register neurons in blocks {record.layers[0]}-{record.layers[-1]} "
        f"(per block: {', '.join(f'{layer}: {count}' for layer, count in sorted(per_layer.items()))}) -> {args.output}"
    )
    return 0


def apply(args: argparse.Namespace) -> int:
    """`vitreg registers apply`: write the model with test-time registers."""
    if len(args.inputs) != 2:
        raise UserError("apply takes MODEL NEURONS_JSON OUT_DIR")
    neurons_file, output_dir = map(Path, args.inputs)
    record = RegisterNeurons.load(neurons_file)
    layers = parse_layers(args.layers, record.architecture["num_hidden_layers"]) if args.layers else None
    folder, notes = apply_register_neurons(
        args.model,
        neurons_file,
        output_dir,
        top_k=args.top_k,
        layers=layers,
        num_registers=args.num_registers,
        revision=args.revision,
        overwrite=args.overwrite,
    )
    for note in notes:
        print(f"note: {note}")
    count = len(record.pairs(args.top_k, layers))
    print(f"{count} register neurons shifted to {args.num_registers} test-time register(s) -> {folder}")
    return 0
