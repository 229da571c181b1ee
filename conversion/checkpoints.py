"""Reading checkpoints safely (never running pickled code, memory-mapped) and writing random official-layout ones."""

import hashlib
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from vitreg.core.errors import UserError

from .architectures import OFFICIAL_ARCHITECTURES, OFFICIAL_IMAGE_SIZE, OFFICIAL_PATCH_SIZE
from .memory import load_read_only
from .streaming import load_safetensors_read_only

# Containers that wrap a state dict: DINOv2's trainer, Lightning, DDP.
WRAPPER_KEYS = ("teacher", "model", "student", "state_dict", "module")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def sha256(path: Path, progress: bool = True) -> str:
    """SHA-256 of a file, read in 16 MiB blocks with a progress bar for large files."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as file,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"hashing {path.name}", disable=not progress or size < 2**28
        ) as bar,
    ):
        while block := file.read(2**24):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _looks_like_text(path: Path) -> bool:
    head = path.open("rb").read(4096)
    if not head or head.startswith((b"PK", b"\x80")):
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(char.isprintable() or char in "\n\r\t" for char in text)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)  # memory-mapped
    except RuntimeError as error:
        if "Cannot allocate memory" not in str(error):
            raise
        return load_safetensors_read_only(path)  # a private map beyond memory + swap: map it read-only
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path.name}: not a readable safetensors file ({str(error).splitlines()[0]})") from None


def _load_pickle(path: Path) -> object:
    """`torch.load` with `weights_only=True` (code in the pickle is refused), memory-mapped when the format allows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "Cannot allocate memory" in str(error):  # a private map beyond memory + swap: map it read-only
                    return load_read_only(path)
                if "mmap can only be used" not in str(error):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
        except pickle.UnpicklingError as error:
            if "Weights only load failed" in str(error):
                raise UserError(
                    f"{path.name}: refused: the pickle holds objects other than tensors and plain containers "
                    "(loading it would run code)"
                ) from None
            raise UserError(f"{path.name}: not a PyTorch checkpoint ({str(error).splitlines()[0]})") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
            reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            raise UserError(f"{path.name}: truncated or corrupt checkpoint ({reason})") from None


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise UserError(f"{folder}: a folder without model weights (expected one of {', '.join(WEIGHT_FILES)})")
    name = present[0]
    if not name.endswith(".index.json"):
        return load_tensors(folder / name)
    try:
        weight_map = json.loads((folder / name).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{folder / name}: not a valid shard index") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_tensors(folder / shard))
    return tensors


def _unwrap(obj: object, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Descend through training containers (`{"teacher": ...}`, `{"model": ...}`) to the tensors."""
    wrappers = []
    while isinstance(obj, dict) and not any(isinstance(value, torch.Tensor) for value in obj.values()):
        wrapper = next((key for key in WRAPPER_KEYS if isinstance(obj.get(key), dict)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
        wrappers.append(wrapper)
    if not isinstance(obj, dict):
        raise UserError(f"{name}: holds a {type(obj).__name__}, not a state dict")
    tensors = {key: value for key, value in obj.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise UserError(f"{name}: holds no tensors (keys: {', '.join(map(str, list(obj)[:5]))})")
    return tensors, wrappers


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file (`.pth`/`.pt`/`.bin`/`.safetensors`) or transformers folder, memory-mapped."""
    return load_checkpoint(path)[0]


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Like `load_tensors`, also naming the containers the tensors sat in (e.g. `["teacher"]`)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path), []
    if not path.is_file():
        raise UserError(f"{path}: no such file or folder")
    if path.stat().st_size == 0:
        raise UserError(f"{path.name}: empty file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path), []
    if _looks_like_text(path):
        raise UserError(f"{path.name}: a text file, not a checkpoint")
    return _unwrap(_load_pickle(path), path.name)


def read_folder_config(path: Path) -> dict | None:
    """The `config.json` of a transformers folder, or None for a file."""
    config_file = path / "config.json"
    if not path.is_dir():
        return None
    if not config_file.is_file():
        raise UserError(f"{path}: a folder without config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config_file}: not valid JSON ({error})") from None


def random_official_state_dict(
    name: str = "dinov2_vits14_reg4",
    *,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    image_size: int = OFFICIAL_IMAGE_SIZE,
    patch_size: int = OFFICIAL_PATCH_SIZE,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random weights in the official DINOv2 hub layout of `name` (key names, order, shapes), optionally shrunk."""
    if name not in OFFICIAL_ARCHITECTURES:
        raise UserError(f"unknown architecture {name!r}; known: {', '.join(OFFICIAL_ARCHITECTURES)}")
    arch = OFFICIAL_ARCHITECTURES[name]
    dim = hidden_size or arch.hidden_size
    depth = num_hidden_layers or arch.num_hidden_layers
    swiglu = arch.ffn == "swiglu"
    # DINOv2's rule: 4x the width; SwiGLU keeps two thirds of it, rounded up to a multiple of 8 (ViT-g: 4096).
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    grid = image_size // patch_size
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale + shift

    def linear(prefix: str, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        # Unit-variance outputs keep every block relevant to the result.
        return {
            f"{prefix}.weight": rand(out_features, in_features, scale=in_features**-0.5),
            f"{prefix}.bias": rand(out_features, scale=0.1),
        }

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": rand(dim, scale=0.1, shift=1.0), f"{prefix}.bias": rand(dim, scale=0.1)}

    state = {"cls_token": rand(1, 1, dim), "pos_embed": rand(1, 1 + grid * grid, dim)}
    if arch.num_register_tokens:
        state["register_tokens"] = rand(1, arch.num_register_tokens, dim)
    state["mask_token"] = rand(1, dim, scale=0.1)
    state["patch_embed.proj.weight"] = rand(dim, 3, patch_size, patch_size, scale=(3 * patch_size**2) ** -0.5)
    state["patch_embed.proj.bias"] = rand(dim, scale=0.1)
    for block in range(depth):
        prefix = f"blocks.{block}"
        state.update(norm(f"{prefix}.norm1"))
        state.update(linear(f"{prefix}.attn.qkv", 3 * dim, dim))
        state.update(linear(f"{prefix}.attn.proj", dim, dim))
        state[f"{prefix}.ls1.gamma"] = rand(dim, scale=0.1, shift=0.5)
        state.update(norm(f"{prefix}.norm2"))
        if swiglu:
            state.update(linear(f"{prefix}.mlp.w12", 2 * hidden, dim))
            state.update(linear(f"{prefix}.mlp.w3", dim, hidden))
        else:
            state.update(linear(f"{prefix}.mlp.fc1", hidden, dim))
            state.update(linear(f"{prefix}.mlp.fc2", dim, hidden))
        state[f"{prefix}.ls2.gamma"] = rand(dim, scale=0.1, shift=0.5)
    state.update(norm("norm"))
    return state


def random_head_state_dict(
    hidden_size: int, num_layers: int = 1, num_classes: int = 1000, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random weights of an official linear head: `{"weight": [classes, (1 + num_layers) * D], "bias": [classes]}`."""
    generator = torch.Generator().manual_seed(seed)
    in_features = (1 + num_layers) * hidden_size
    return {
        "weight": torch.randn(num_classes, in_features, generator=generator) * in_features**-0.5,
        "bias": torch.randn(num_classes, generator=generator) * 0.1,
    }


def write_random_checkpoint(path: str | Path, name: str = "dinov2_vits14_reg4", **overrides) -> Path:
    """Write a random official-layout backbone checkpoint (`.pth`), e.g. for tests, demos and benchmarks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_official_state_dict(name, **overrides), path)
    return path
