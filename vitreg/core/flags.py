"""Command-line flags every ViTReg command shares, declared once so each name means one thing everywhere.

Every long flag of every command takes dashes or underscores (`--output-dir` or `--output_dir`).
"""

import argparse
from collections.abc import Sequence

from .errors import UserError

# The help of each common flag: the same words in every command that has it.
COMMON_FLAGS = {
    "revision": "branch, tag or commit of a Hub repository MODEL (default: main)",
    "device": "torch device to run the model on, e.g. cuda, cuda:1, mps (default: %(default)s)",
    "overwrite": "replace an output that vitreg wrote before (a folder holding other files is never replaced)",
    "no_progress": "no progress bars (also silences transformers', huggingface_hub's and datasets' own)",
    "image_size": "the side N of the square the model sees: N x N center crop of the short side resized by the "
    "model processor's resize/crop ratio (DINOv2: 256/224), or the whole image resized to N x N for processors that "
    "do not crop (DINOv3); a positive multiple of the patch size (default: the model processor's)",
    "layers": "0-based blocks, as a comma-separated list of numbers and ranges: 0,5,10-11 or -1 (the last); "
    "(default: %(default)s)",
}


def spellings(flag: str) -> list[str]:
    """`--output-dir` -> `["--output-dir", "--output_dir"]`, to unpack into `add_argument`."""
    return list(dict.fromkeys([flag, flag[:2] + flag[2:].replace("_", "-"), flag[:2] + flag[2:].replace("-", "_")]))


def add_common_flags(parser: argparse.ArgumentParser, *names: str, device_default: str = "cpu") -> None:
    """Declare the named common flags (`revision`, `device`, `overwrite`, `no_progress`, `image_size`) on `parser`."""
    for name in names:
        flag = "--" + name.replace("_", "-")
        if name in ("overwrite", "no_progress"):
            parser.add_argument(*spellings(flag), action="store_true", help=COMMON_FLAGS[name])
        elif name == "device":
            parser.add_argument(*spellings(flag), default=device_default, help=COMMON_FLAGS[name])
        elif name == "image_size":
            parser.add_argument(*spellings(flag), type=int, metavar="N", help=COMMON_FLAGS[name])
        elif name == "revision":
            parser.add_argument(*spellings(flag), metavar="REV", help=COMMON_FLAGS[name])
        else:
            raise ValueError(f"unknown common flag {name!r}; known: {', '.join(COMMON_FLAGS)}")


def apply_common_flags(args: argparse.Namespace) -> None:
    """Act on the common flags that change the process, not one call: `--no-progress` silences every library's bars."""
    if getattr(args, "no_progress", False):
        disable_progress_bars()


def disable_progress_bars() -> None:
    """Silence the progress bars of transformers, huggingface_hub and datasets (those installed)."""
    from huggingface_hub.utils import disable_progress_bars as hub_off
    from transformers.utils import logging as transformers_logging

    hub_off()
    transformers_logging.disable_progress_bar()
    try:
        from datasets.utils.logging import disable_progress_bar as datasets_off
    except ImportError:  # datasets is an extra
        return
    datasets_off()


def parse_layers(text: str | Sequence[int | str], depth: int, flag: str = "--layers") -> list[int]:
    """`"0,5,10-11"`, `"-1"` or `[0, 5]` -> sorted distinct 0-based blocks of a `depth`-block model (negatives count
    from the end), refusing anything else with the flag's name."""
    parts = [str(part) for part in text] if not isinstance(text, str) else text.replace(" ", ",").split(",")
    blocks: set[int] = set()
    for part in filter(None, (p.strip() for p in parts)):
        try:
            first, _, last = part.partition("-") if not part.startswith("-") else (part, "", "")
            start, stop = int(first), int(last or first)
        except ValueError:
            raise UserError(f"{flag} {text!r}: expected blocks such as 0,5,10-11 or -1") from None
        if start > stop:
            raise UserError(f"{flag} {text!r}: range {part} runs backwards")
        for block in range(start, stop + 1):
            if not -depth <= block < depth:
                raise UserError(f"{flag} {text!r}: the model has blocks 0-{depth - 1} (or -{depth}..-1)")
            blocks.add(block % depth)
    if not blocks:
        raise UserError(f"{flag} {text!r}: no blocks given")
    return sorted(blocks)
