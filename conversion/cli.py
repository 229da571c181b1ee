"""`vitreg convert`: checkpoints -> ViTReg folders (one file, a folder of official files, or back to DINOv2/DINOv3)."""

import argparse

from vitreg.core.errors import UserError
from vitreg.core.flags import add_common_flags, spellings

from .architectures import INTERPOLATIONS
from .converter import DTYPES, convert, convert_batch, export_official


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vitreg convert`."""
    parser.description = (
        "Convert an official DINOv2 or DINOv3 file, a DINOv2 training checkpoint, a timm checkpoint (DINOv2 or "
        "*_dinov3) or a transformers Dinov2 / Dinov2WithRegisters / DINOv3ViT folder into a Hub-ready ViTReg folder. "
        "The layout and architecture are read from the keys and shapes."
    )
    parser.add_argument(
        "source",
        help="checkpoint file or folder, official DINOv2 name (dinov2_vitl14_reg4, dinov2_vitl14_reg4_lc: with its "
        "linear4 head) or Hub repo id (facebook/dinov2-with-registers-small); with --batch: a folder of official files",
    )
    parser.add_argument("output", help="output folder (with --to: the .pth, .pt or .safetensors file to write)")
    parser.add_argument(
        *spellings("--head"), help="official linear head (*_linear_head.pth / *_linear4_head.pth) to add"
    )
    add_common_flags(parser, "revision", "overwrite")
    parser.add_argument(
        *spellings("--dtype"), choices=sorted(DTYPES), help="cast the weights (default: keep the source's)"
    )
    parser.add_argument(
        *spellings("--num-heads"),
        type=int,
        help="attention heads, for a source that does not record them (a bare DINOv2 or timm state dict: default "
        "width / 64, as in DINOv2, said when guessed); transformers and timm folders and DINOv3 files record theirs",
    )
    parser.add_argument(
        *spellings("--interpolation"),
        choices=INTERPOLATIONS,
        default="source",
        help="position interpolation at sizes other than the native one: source (the source's own code's: "
        "transformers' for a transformers folder, DINOv2's for DINOv2 files) or dinov2 (DINOv2's official, with its "
        "0.1 offset for models without registers) (default: %(default)s)",
    )
    parser.add_argument(
        *spellings("--verify"),
        action="store_true",
        help="compare every token of the written folder with the source's own implementation (timm, or "
        "transformers for a transformers folder) at three sizes before it appears; a failure leaves no folder",
    )
    parser.add_argument(
        *spellings("--batch"),
        action="store_true",
        help="SOURCE is a folder of official files: convert every dinov2_vit*14[_reg4]_pretrain.pth in it (and its "
        "heads) into OUTPUT/dinov2-vit*",
    )
    parser.add_argument(
        *spellings("--to"),
        choices=["official", "dinov2", "dinov3"],
        help="export a ViTReg folder to its official layout (official: DINOv3's for a RoPE model, else DINOv2's)",
    )
    add_common_flags(parser, "no_progress")


def run(args: argparse.Namespace) -> int:
    """Run the conversion the arguments ask for; prints where the result went."""
    if args.to:
        others = args.head or args.batch or args.dtype or args.num_heads or args.verify or args.revision
        if others or args.interpolation != "source":
            raise UserError(f"--to {args.to} takes only SOURCE (a ViTReg folder), OUTPUT (a file) and --overwrite")
        layout = None if args.to == "official" else args.to
        print(f"wrote {export_official(args.source, args.output, layout=layout, overwrite=args.overwrite)}")
        return 0
    options = dict(
        overwrite=args.overwrite,
        dtype=args.dtype,
        num_heads=args.num_heads,
        verify=args.verify,
        interpolation=args.interpolation,
        progress=not args.no_progress,
    )
    if args.batch:
        if args.head or args.revision:
            raise UserError("--batch reads a local folder and finds the heads itself: drop --head and --revision")
        for folder in convert_batch(args.source, args.output, **options):
            print(f"wrote {folder}")
        return 0
    print(f"wrote {convert(args.source, args.output, head=args.head, revision=args.revision, **options)}")
    return 0
