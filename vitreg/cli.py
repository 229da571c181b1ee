"""`vitreg` console command: one entry point, one subcommand per job, each implemented in its own package."""

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .core.errors import UserError

# name -> (module implementing it, one-line help). Each module defines
# `add_arguments(parser: argparse.ArgumentParser) -> None` and `run(args: argparse.Namespace) -> int`.
# Modules are imported only when their subcommand runs, so `vitreg --help` stays instant.
SUBCOMMANDS = {
    "convert": ("vitreg.conversion.cli", "convert DINOv2 / timm / transformers checkpoints into ViTReg folders"),
    "pretrain": ("vitreg.training.pretrain", "pretrain a ViT with registers (DINOv2 self-supervised or supervised)"),
    "publish": ("vitreg.model_cards.publish", "validate a ViTReg folder and publish it to the Hugging Face Hub"),
    "analyze": ("vitreg.analysis.cli", "measure high-norm artifact tokens and attention maps of a model"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: lists subcommands without importing them."""
    parser = argparse.ArgumentParser(
        prog="vitreg",
        description="Vision Transformers with registers: convert, pretrain, publish and analyse.",
    )
    parser.add_argument("--version", action="version", version=f"vitreg {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `vitreg ...`; expected errors print one line and return a non-zero status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # --help, --version, or an error naming the valid commands
        parser.print_help()
        return 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"vitreg {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
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
