"""What `vitreg extract` reads: a folder of images or a `datasets` dataset, decoded and preprocessed in workers.

An unreadable image does not stop the run: the worker returns the reason instead of pixels, and the caller decides
(skip and list it, or stop with --strict). A dataset's other columns (a label, a caption) go to the output rows.
"""

import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vitreg.core.errors import UserError, require
from vitreg.core.images import IMAGE_SUFFIXES, decode_errors

from .features import WHAT

logger = logging.getLogger(__name__)
DATASET_FILES = ("state.json", "dataset_dict.json")  # what `save_to_disk` writes
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DECODE_ERRORS = decode_errors()  # the tools' one list of unreadable-image errors


@dataclass
class ImageList:
    """Images with stable ids (relative paths, or row numbers of a dataset); `read(i)` opens image `i`."""

    ids: list[str]
    files: list[Path] | None = None  # a folder of images
    dataset: object | None = None  # a `datasets.Dataset` whose one column holds the undecoded images
    others: object | None = None  # a `datasets.Dataset` of the source's other columns, row for row (None: none)

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, index: int) -> Image.Image:
        """Image `index` as RGB; raises one of DECODE_ERRORS for an unreadable one."""
        if self.files is not None:
            source = self.files[index]
        else:
            value = self.dataset[index]["image"]  # {"bytes": ..., "path": ...} (decode=False)
            if value is None:
                raise ValueError("empty image cell")
            source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with Image.open(source) as image:
            return image.convert("RGB")

    def other_features(self) -> dict:
        """The `datasets` features of the source's other columns, as the source declares them."""
        return dict(self.others.features) if self.others is not None else {}

    def other_values(self, indices: list[int]) -> dict[str, list]:
        """The source's other columns of rows `indices`: `{column: [value, ...]}`."""
        return self.others[indices] if self.others is not None else {}


def datasets_module():
    """`datasets`, or the one-line error naming the extra that installs it (it is imported only when needed)."""
    return require("datasets", extra="extract")


def list_images(source: str | Path, *, split: str = "train", image_column: str | None = None) -> ImageList:
    """A folder of images (searched recursively, sorted), a `save_to_disk` dataset folder, or a Hub dataset id."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir() and any((path / name).is_file() for name in DATASET_FILES):
        return _dataset_images(datasets_module().load_from_disk(str(path)), text, split, image_column)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{text} holds no images ({', '.join(IMAGE_SUFFIXES)}) and is not a saved dataset")
        return ImageList([p.relative_to(path).as_posix() for p in files], files=files)
    if path.exists():
        raise UserError(f"{text}: give a folder of images or a dataset, not a file")
    if not HUB_ID.fullmatch(text):
        raise UserError(f"{text} does not exist (a folder of images, a saved dataset or a Hub dataset id)")
    try:
        dataset = datasets_module().load_dataset(text, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        raise UserError(f"cannot load the dataset {text}: {str(error).splitlines()[0]}") from None
    return _dataset_images(dataset, text, split, image_column)


def _dataset_images(dataset, name: str, split: str, image_column: str | None) -> ImageList:
    from datasets import DatasetDict
    from datasets import Image as ImageFeature

    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UserError(f"{name} has no split {split!r} (splits: {', '.join(dataset)}); choose one with --split")
        dataset = dataset[split]
    images = [column for column, feature in dataset.features.items() if isinstance(feature, ImageFeature)]
    if image_column is None:
        if not images:
            raise UserError(f"{name} has no image column (columns: {', '.join(dataset.column_names)})")
        image_column = "image" if "image" in images else images[0]
    elif image_column not in images:
        raise UserError(f"{name}: {image_column!r} is not an image column (image columns: {images or 'none'})")
    others = _other_columns(dataset, name)
    dataset = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    return ImageList([str(index) for index in range(len(dataset))], dataset=dataset, others=others)


def _other_columns(dataset, name: str):
    """The columns to carry into the output rows: all but those holding media (images, audio), renamed
    `source_<name>` where they would collide with the output's own (`id`, the features)."""
    from datasets.features.features import require_decoding

    kept = [column for column, feature in dataset.features.items() if not require_decoding(feature)]
    if not kept:
        return None
    others = dataset.select_columns(kept)
    clashes = {column: f"source_{column}" for column in kept if column in ("id", *WHAT)}
    if clashes:
        logger.warning(f"{name}: columns {', '.join(clashes)} are written as {', '.join(clashes.values())}")
        others = others.rename_columns(clashes)
    return others


class Preprocessed(torch.utils.data.Dataset):
    """`(index, pixels [3, H, W] or None, reason or None)` for each image: decoding and resizing run in workers."""

    def __init__(self, images: ImageList, transform: Callable[[Image.Image], torch.Tensor]):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(self.images.read(index)), None
        except DECODE_ERRORS as error:
            return index, None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".strip()


def collate(items: list) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """A batch: indices of the readable images, their pixels `[B, 3, H, W]`, and `(index, reason)` of the others."""
    readable = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    failed = [(index, reason) for index, pixels, reason in items if pixels is None]
    pixels = torch.stack([p for _, p in readable]) if readable else None
    return [index for index, _ in readable], pixels, failed
