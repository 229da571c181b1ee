"""`vitreg` console command: one entry point, one subcommand per job, each implemented in its own package.

The command is the top layer: it imports the tools, nothing imports it.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from . import __version__
from .core.errors import UserError, missing_extra
from .core.flags import apply_common_flags
from .core.logs import show_library_logs


class Subcommand(NamedTuple):
    """A `vitreg` subcommand: the module implementing it, the extra installing its dependencies, one-line help.

    The module defines `add_arguments(parser: argparse.ArgumentParser) -> None` and
    `run(args: argparse.Namespace) -> int`. It is imported only when its subcommand runs, so `vitreg --help` is instant.
    """

    module: str
    extra: str
    help: str


SUBCOMMANDS = {
    "convert": Subcommand(
        "vitreg.conversion.cli", "convert", "convert DINOv2 / timm / transformers checkpoints into ViTReg folders"
    ),
    "pretrain": Subcommand(
        "vitreg.training.pretrain", "train", "pretrain a ViT with registers (DINOv2 self-supervised or supervised)"
    ),
    "publish": Subcommand(
        "vitreg.model_cards.publish", "publish", "validate a ViTReg folder and publish it to the Hugging Face Hub"
    ),
    "export": Subcommand(
        "vitreg.export.cli", "onnx", "export a model to ONNX, exact at any image size (vitreg export onnx MODEL OUT)"
    ),
    "analyze": Subcommand(
        "vitreg.analysis.cli", "analysis", "measure high-norm artifact tokens and attention maps of a model"
    ),
    "extract": Subcommand(
        "vitreg.extract.cli", "extract", "features of a folder of images or a dataset, as a resumable Arrow dataset"
    ),
    "registers": Subcommand(
        "vitreg.registers.cli", "analysis", "test-time registers for a model trained without: find / apply neurons"
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: lists subcommands without importing them."""
    parser = argparse.ArgumentParser(
        prog="vitreg",
        description="Vision Transformers with registers: convert, pretrain, publish and analyse. Every flag is "
        "accepted with dashes or underscores (--output-dir or --output_dir).",
    )
    parser.add_argument("--version", action="version", version=f"vitreg {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, subcommand in SUBCOMMANDS.items():
        commands.add_parser(name, help=subcommand.help, add_help=False)
    return parser


def import_subcommand(name: str):
    """The module of subcommand `name`; a missing optional dependency names the extra that installs it."""
    subcommand = SUBCOMMANDS[name]
    try:
        return importlib.import_module(subcommand.module)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == "vitreg":
            raise
        raise missing_extra(error.name, subcommand.extra) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run `vitreg ...`; expected errors print one line and return a non-zero status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # --help, --version, or an error naming the valid commands
        parser.print_help()
        return 2
    name = argv[0]
    try:
        module = import_subcommand(name)
    except UserError as error:
        print(f"vitreg {name}: error: {error}", file=sys.stderr)
        return 1
    sub = argparse.ArgumentParser(prog=f"vitreg {name}", description=SUBCOMMANDS[name].help)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    show_library_logs()
    apply_common_flags(args)
    try:
        return int(module.run(args) or 0)
    except UserError as error:
        print(f"vitreg {name}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vitreg {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
