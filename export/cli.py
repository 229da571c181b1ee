"""`vitreg export onnx MODEL OUT.onnx`: an ONNX graph of a ViTReg model or any source, checked against PyTorch."""

import argparse
from pathlib import Path

from vitreg.core.errors import UserError
from vitreg.core.flags import add_common_flags, spellings

from .onnx_export import DEFAULT_OPSET, INT8_MIN_COSINE, MAX_OPSET, MIN_OPSET, QUANTIZE, export_onnx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vitreg export`."""
    parser.add_argument("format", choices=["onnx"], help="the format to write (onnx)")
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a ViTReg folder or Hub repo, or any source vitreg convert reads (a DINOv2 / DINOv3 / timm / "
        "transformers checkpoint or Hub repo, an official name such as dinov2_vits14_reg4), converted in memory",
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
        nargs="+",
        type=int,
        metavar="N",
        help="the size of the images the graph takes, N (N x N) or H W, multiples of the patch size; the fixed size, "
        "or the example size of a --dynamic export (default: the config's image_size)",
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
    parser.add_argument(
        *spellings("--optimize"),
        action="store_true",
        help="fuse each block's attention into ONNX Runtime's Attention kernel: faster in ONNX Runtime, which alone "
        "can then run the graph (checked against PyTorch as the plain graph is)",
    )
    parser.add_argument(
        *spellings("--quantize"),
        choices=QUANTIZE,
        help="store the weights of the linear layers in int8 (ONNX Runtime's dynamic quantisation, per channel): "
        "faster and smaller, not exact; written only if every CLS and patch token of the sample photos keeps cosine "
        f">= {INT8_MIN_COSINE} to float32 PyTorch and a classifier every top-1 label (the errors are printed)",
    )
    add_common_flags(parser, "revision", "overwrite", "no_progress")


def image_size(values: list[int] | None) -> tuple[int, int] | None:
    """`--image-size N` or `--image-size H W` as (H, W)."""
    if values is None:
        return None
    if len(values) > 2:
        raise UserError(f"--image-size takes N or H W, got {len(values)} numbers")
    return values[0], values[-1]


def run(args: argparse.Namespace) -> int:
    """Export, check and report in one line."""
    exported = export_onnx(
        args.model,
        args.output,
        head=args.head,
        dynamic=args.dynamic,
        image_size=image_size(args.image_size),
        opset=args.opset,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        optimize=args.optimize,
        quantize=args.quantize,
        revision=args.revision,
        progress=not args.no_progress,
    )
    print(exported.summary())
    return 0
