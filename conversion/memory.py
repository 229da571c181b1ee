"""Keeping a conversion's peak memory far below the checkpoint's size: map files that exceed memory, release
memory-mapped pages already consumed."""

import ctypes
import mmap
import sys
import warnings
from pathlib import Path

import torch

MADV_DONTNEED = 4  # Linux


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges at which the files of `path` (a file or a folder) are memory-mapped in this process."""
    maps = Path("/proc/self/maps")
    if not sys.platform.startswith("linux") or not maps.is_file():
        return []
    path = path.resolve()
    files = {str(p.resolve()) for p in path.iterdir()} if path.is_dir() else {str(path)}
    ranges = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in files:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Let the kernel drop the whole pages of `tensor` that lie in a mapped checkpoint file.

    The mappings are private and never written, so a dropped page is read from the file again if touched; memory
    outside `ranges` (ordinary allocations) is never touched.
    """
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    page = mmap.PAGESIZE
    for low, high in ranges:
        first = -(-max(start, low) // page) * page  # whole pages only: neighbours keep theirs
        last = min(end, high) // page * page
        if last > first:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def cast_releasing(
    state_dict: dict[str, torch.Tensor], dtype: torch.dtype, source: Path | None
) -> dict[str, torch.Tensor]:
    """Cast the floating-point tensors to `dtype` one by one, releasing each mapped source tensor once copied.

    Without the release, a cast holds the whole mapped source plus the cast copy (1.5x an fp32 file in fp16).
    """
    ranges = mapped_ranges(source) if source is not None else []
    cast = {}
    for key, value in state_dict.items():
        if value.is_floating_point() and value.dtype != dtype:
            cast[key] = value.to(dtype)
            if ranges:
                release_pages(value, ranges)
        else:
            cast[key] = value
    return cast


def map_read_only(path: Path) -> torch.Tensor:
    """The bytes of a file as a uint8 tensor over a private read-only map (not charged against the commit limit)."""
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the given buffer is not writable": read-only is the point
        return torch.frombuffer(mapped, dtype=torch.uint8)


def load_read_only(path: Path) -> object:
    """`torch.load(path, mmap=True)` for a file larger than memory + swap: the tensors view a read-only private map.

    `torch.load` maps the file private and writable, which the kernel charges in full against its commit limit and
    refuses beyond memory + swap; a read-only map is not charged. Writing to these tensors faults instead of copying.
    """
    layout = torch.load(path, map_location="meta", weights_only=True)  # each storage keeps its offset in the file
    data = map_read_only(path)

    def rebuild(value: object) -> object:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            start = storage._checkpoint_offset
            raw = data[start : start + storage.nbytes()].view(value.dtype)
            return raw.as_strided(value.shape, value.stride(), raw.storage_offset() + value.storage_offset())
        if isinstance(value, dict):
            return {key: rebuild(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(rebuild(item) for item in value)
        return value

    return rebuild(layout)
