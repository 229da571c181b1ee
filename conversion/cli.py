"""`vitreg convert`: checkpoints -> ViTReg folders (one file, a folder of official files, or back to DINOv2/DINOv3)."""

import argparse

from vitreg.core.errors import UserError
from vitreg.core.flags import spellings

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
    parser.add_argument("output", help="output folder (with --to: the .pth or .safetensors file to write)")
    parser.add_argument(
        *spellings("--head"), help="official linear head (*_linear_head.pth / *_linear4_head.pth) to add"
    )
    parser.add_argument(*spellings("--revision"), help="branch, tag or commit of a Hub repo SOURCE (default: main)")
    parser.add_argument(*spellings("--overwrite"), action="store_true", help="replace a non-empty output")
    parser.add_argument(
        *spellings("--dtype"), choices=sorted(DTYPES), help="cast the weights (default: keep the source's)"
    )
    parser.add_argument(
        *spellings("--num-heads"),
        type=int,
        help="attention heads (default: width / 64, as in DINOv2; DINOv3: from its RoPE periods or config.json)",
    )
    parser.add_argument(
        *spellings("--verify"),
        action="store_true",
        help="reload the result and compare every token with timm (transformers for a transformers folder)",
    )
    parser.add_argument(
        *spellings("--batch"),
        action="store_true",
        help="convert every dinov2_vit*14[_reg4]_pretrain.pth in SOURCE (and its heads) into OUTPUT/dinov2-vit*",
    )
    parser.add_argument(
        *spellings("--to"),
        choices=["official", "dinov2", "dinov3"],
        help="export a ViTReg folder to its official layout (official: DINOv3's for a RoPE model, else DINOv2's)",
    )
    parser.add_argument(*spellings("--no-progress"), action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the conversion the arguments ask for; prints where the result went."""
    if args.to:
        if args.head or args.batch or args.dtype or args.num_heads or args.verify or args.revision:
            raise UserError(f"--to {args.to} takes only SOURCE (a ViTReg folder), OUTPUT (a file) and --overwrite")
        layout = None if args.to == "official" else args.to
        print(f"wrote {export_official(args.source, args.output, layout=layout, overwrite=args.overwrite)}")
        return 0
    options = dict(
        overwrite=args.overwrite,
        dtype=args.dtype,
        num_heads=args.num_heads,
        verify=args.verify,
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
