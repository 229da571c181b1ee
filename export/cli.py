"""`vitreg export onnx MODEL OUT.onnx`: an ONNX graph of a ViTReg model or any source, checked against PyTorch."""

import argparse
from pathlib import Path

from vitreg.core.flags import spellings

from .onnx_export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, export_onnx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vitreg export`."""
    parser.add_argument("format", choices=["onnx"], help="the format to write (onnx)")
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a ViTReg folder or Hub repo, or any source vitreg convert reads (a DINOv2 / timm / transformers "
        "checkpoint or Hub repo, an official name such as dinov2_vits14_reg4), converted in memory",
    )
    parser.add_argument("output", metavar="OUT.onnx", type=Path, help="the graph to write")
    parser.add_argument(
        *spellings("--dynamic"),
        action="store_true",
        help="any batch, height and width (multiples of the patch size, at least 2 patches a side), with DINOv2's "
        "exact position interpolation (or DINOv3's RoPE) in the graph; otherwise --image-size is fixed and only the "
        "batch is free",
    )
    parser.add_argument(
        *spellings("--image-size"),
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="the fixed size, or the example size of a --dynamic export (default: the config's image_size)",
    )
    parser.add_argument(
        *spellings("--opset"),
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: %(default)s)",
    )
    parser.add_argument(
        *spellings("--head"),
        nargs="?",
        const="classification",
        default="model",
        choices=["model", "classification", "backbone"],
        help="what to export: the bare model (default: last_hidden_state, pooler_output, register_tokens, "
        "patch_tokens), the classifier (--head alone: logits) or the backbone's feature maps (--head backbone)",
    )
    parser.add_argument(
        *spellings("--no-verify"),
        action="store_true",
        help="skip running the graph with onnxruntime against PyTorch (by default every output must match to 1e-4)",
    )
    parser.add_argument(*spellings("--revision"), help="branch, tag or commit of a Hub repo MODEL (default: main)")
    parser.add_argument(*spellings("--overwrite"), action="store_true", help="replace OUT.onnx if it exists")
    parser.add_argument(*spellings("--no-progress"), action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Export, check and report in one line."""
    exported = export_onnx(
        args.model,
        args.output,
        head=args.head,
        dynamic=args.dynamic,
        image_size=tuple(args.image_size) if args.image_size else None,
        opset=args.opset,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        revision=args.revision,
        progress=not args.no_progress,
    )
    print(exported.summary())
    return 0
