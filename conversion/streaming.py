"""Writing safetensors weights one tensor at a time, sharded as `save_pretrained` shards them, so that converting a
checkpoint holds one tensor in memory: DINOv3 7B (27 GB in fp32) converts on a machine with less memory than that.

    weights = {"embeddings.cls_token": mapped, "encoder.layer.0.attention.qkv.weight": Concat([q, k, v]), ...}
    write_safetensors_shards(weights, folder, "2GB", release_from=checkpoint_path)
"""

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from huggingface_hub import constants, split_state_dict_into_shards_factory
from tqdm.auto import tqdm

from .memory import map_read_only, mapped_ranges, release_pages

# safetensors' dtype names in the order of its `Dtype` enum: a file holds its tensors by dtype, last first, then name.
SAFETENSORS_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES)}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class Concat:
    """Tensors concatenated along dim 0 without the copy (a fused qkv, a packed SwiGLU): written part after part."""

    def __init__(self, parts: Iterable[torch.Tensor]):
        self.parts = tuple(parts)
        first = self.parts[0]
        if any(p.ndim == 0 or p.shape[1:] != first.shape[1:] or p.dtype != first.dtype for p in self.parts):
            listed = " + ".join(f"{list(p.shape)} {str(p.dtype).removeprefix('torch.')}" for p in self.parts)
            raise ValueError(f"parts {listed} do not concatenate along the rows")
        self.dtype = first.dtype
        self.shape = torch.Size([sum(p.shape[0] for p in self.parts), *first.shape[1:]])
        self.ndim = len(self.shape)

    def materialize(self) -> torch.Tensor:
        """The concatenation as one new tensor."""
        return torch.cat(self.parts)


def write_safetensors_shards(
    tensors: Mapping[str, torch.Tensor | Concat],
    folder: str | Path,
    max_shard_size: int | str = "5GB",
    *,
    dtype: torch.dtype | None = None,
    release_from: Path | None = None,
    total_parameters: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write `tensors` into `folder` as `save_pretrained` would: `model.safetensors`, or `model-0000k-of-0000n` shards
    split by `max_shard_size` in the mapping's order plus `model.safetensors.index.json`. Returns the weight files.

    `dtype` casts the floating-point tensors; the pages of each tensor memory-mapped from `release_from` (a file or
    folder) are released once written, so memory holds about one tensor at a time. `total_parameters` goes into
    the index as transformers records it.
    """
    folder = Path(folder)
    cast = dtype is not None
    dtypes = {key: dtype if cast and value.dtype.is_floating_point else value.dtype for key, value in tensors.items()}
    sizes = {key: value.shape.numel() * dtypes[key].itemsize for key, value in tensors.items()}
    split = split_state_dict_into_shards_factory(
        sizes,
        get_storage_size=lambda size: size,
        filename_pattern=constants.SAFETENSORS_WEIGHTS_FILE_PATTERN,
        max_shard_size=max_shard_size,
    )
    ranges = mapped_ranges(release_from) if release_from is not None else []
    total = sum(sizes.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress or total < 2**28) as bar:
        for filename, keys in split.filename_to_tensors.items():
            _write_file(folder / filename, {key: tensors[key] for key in keys}, dtypes, ranges, bar)
    if split.is_sharded:
        metadata = {"total_parameters": total_parameters} if total_parameters is not None else {}
        index = {"metadata": {**metadata, **split.metadata}, "weight_map": split.tensor_to_filename}
        (folder / constants.SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [folder / filename for filename in split.filename_to_tensors]


def _write_file(
    path: Path, tensors: dict[str, torch.Tensor | Concat], dtypes: dict, ranges: list[tuple[int, int]], bar: tqdm
) -> None:
    """One safetensors file, laid out byte for byte as `safetensors.torch.save_file` lays it out."""
    order = sorted(tensors, key=lambda key: (-DTYPE_RANK[dtypes[key]], key))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in order:
        size = tensors[key].shape.numel() * dtypes[key].itemsize
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[dtypes[key]],
            "shape": list(tensors[key].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for key in order:
            value = tensors[key]
            for part in value.parts if isinstance(value, Concat) else (value,):
                file.write(part.to(dtypes[key]).reshape(-1).view(torch.uint8).numpy())  # a copy only to cast
                release_pages(part, ranges)
                bar.update(part.numel() * dtypes[key].itemsize)


def load_safetensors_read_only(path: Path) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file` for a file larger than memory + swap: tensors over a read-only map of it."""
    data = map_read_only(path)
    size = int.from_bytes(data[:8].numpy().tobytes(), "little")
    header = json.loads(data[8 : 8 + size].numpy().tobytes())
    header.pop("__metadata__", None)
    start = 8 + size
    return {
        key: data[start + begin : start + end].view(TORCH_DTYPES[info["dtype"]]).reshape(info["shape"])
        for key, info in header.items()
        for begin, end in [info["data_offsets"]]
    }
