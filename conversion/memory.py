"""Keeping a conversion's peak memory near the checkpoint's size: release memory-mapped pages already consumed."""

import ctypes
import mmap
import sys
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
