"""A model named on the command line, whatever it is: a local file or folder, an official DINOv2 name, a Hub repo.

    resolve_source("facebook/dinov2-with-registers-small")   # -> Source(path=<Hub cache snapshot>, kind="hub")
    resolve_source("dinov2_vitl14_reg4_lc")                  # -> the official backbone and its linear4 head

Every tool that reads a model (convert, analyze, extract) takes any of these; `loading.load_backbone` turns one
into a ViTReg model in memory.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from vitreg.core.errors import UserError
from vitreg.model_cards.registry import OFFICIAL_BACKBONES, OfficialBackbone

from .hub import fetch_repo, fetch_url

# Registry names (dinov2_vitl14_reg4) and DINOv2's hubconf entry points (dinov2_vitl14_reg); `_lc`: with the
# ImageNet linear head the hubconf's `_lc` models load by default (the 4-layer one).
OFFICIAL_NAME = re.compile(r"(dinov2_vit[sblg]14)(_reg4?)?(_lc)?")
LC_HEAD = "linear4"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Source:
    """A model or checkpoint as named, resolved to local files."""

    name: str  # as given: a path, "dinov2_vitl14_reg4_lc", "facebook/dinov2-base"
    path: Path  # the checkpoint file or model folder to read
    kind: str  # "local" | "official" | "hub"
    revision: str | None = None
    head: Path | None = None  # an official `_lc` name's linear head
    official: OfficialBackbone | None = None


def official_name(name: str) -> tuple[OfficialBackbone, bool] | None:
    """(registry row, with the linear head?) for an official DINOv2 name, None for any other string."""
    match = OFFICIAL_NAME.fullmatch(name)
    if match is None:
        return None
    base, registers, head = match.groups()
    return OFFICIAL_BACKBONES[base + ("_reg4" if registers else "")], head is not None


def resolve_source(
    source: str | Path, *, revision: str | None = None, head: bool = True, progress: bool = True
) -> Source:
    """Local files, or fetch the named model into its cache: Hub repo ids (`revision`: a branch, tag or commit) and
    official DINOv2 names (torch's hub cache). `head=False` skips an `_lc` name's linear head."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise UserError(f"--revision applies to Hub repositories, not to the local {text}")
        return Source(text, path, "local")
    official = official_name(text)
    if official is not None:
        if revision is not None:
            raise UserError(f"--revision applies to Hub repositories, not to the official {text}")
        arch, with_head = official
        head_file = fetch_url(arch.head_url(LC_HEAD), progress) if with_head and head else None
        return Source(text, fetch_url(arch.pretrain_url, progress), "official", head=head_file, official=arch)
    if REPO_ID.fullmatch(text) and not text.startswith((".", "~")):
        try:
            return Source(text, fetch_repo(text, revision), "hub", revision=revision)
        except UserError as error:  # `org/name` may have been meant as a local path: say that none exists either
            raise UserError(f"no local file or folder {text}, and as a Hub repository: {error}") from None
    raise UserError(
        f"{text} does not exist: no such file or folder, official DINOv2 name (e.g. dinov2_vitl14_reg4, "
        "dinov2_vitl14_reg4_lc) or Hub repository id (org/name)"
    )
