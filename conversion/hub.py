"""Fetching sources by name: Hub repositories (only the files a converter reads) and official DINOv2 URLs.

Both go through their library's own cache (the Hub cache, torch's hub cache), so a second use is instant and
`HF_HUB_OFFLINE=1` works from what is there; what is missing is named in one line.
"""

import os
import urllib.error
from pathlib import Path

import torch
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from vitreg.core.errors import UserError

from .checkpoints import WEIGHT_FILES

META_FILES = ["config.json", "preprocessor_config.json"]
# Safetensors first; the pickled weights only for a repository that has no safetensors (e.g. old timm uploads).
WEIGHT_PATTERNS = (
    ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"],
    ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"],
)


def offline() -> bool:
    """Whether `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) forbids downloads."""
    return bool(constants.HF_HUB_OFFLINE)


def fetch_repo(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local snapshot of a Hub model repository holding its config and weights, downloaded if needed."""
    folder = None
    for patterns in WEIGHT_PATTERNS:
        folder = Path(_snapshot(repo_id, revision, cache_dir, META_FILES + patterns))
        if any((folder / name).is_file() for name in WEIGHT_FILES):
            return folder
    raise UserError(
        f"{repo_id}: no supported weights in the repository{' snapshot in the cache' if offline() else ''} "
        f"(expected one of {', '.join(WEIGHT_FILES)})"
    )


def _snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None, patterns: list[str]) -> str:
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except GatedRepoError:
        raise UserError(f"{where} is gated: accept its terms on the Hub, then log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{where}: no such model repository on the Hub (a private one needs a token: hf auth login)"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"{repo_id}: no revision {revision!r} on the Hub") from None
    except HFValidationError as error:
        raise UserError(f"{repo_id!r} is not a valid Hub repository id ({str(error).splitlines()[0]})") from None
    except LocalEntryNotFoundError as error:
        cache = cache_dir or constants.HF_HUB_CACHE
        if offline():
            message = f"{where} is not in the Hub cache ({cache}) and HF_HUB_OFFLINE=1 forbids the download"
            raise UserError(message) from None
        raise UserError(f"{where}: cannot reach the Hub and not in the cache ({type(error).__name__})") from None
    except HfHubHTTPError as error:
        raise UserError(f"{where}: the Hub answered {str(error).splitlines()[0]}") from None


def torch_hub_file(url: str) -> Path:
    """Where torch's hub keeps the download of `url` (`<TORCH_HOME>/hub/checkpoints/<file name>`)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def fetch_url(url: str, progress: bool = True) -> Path:
    """The file at `url` in torch's hub cache, downloaded there if missing (SHA-256 checked when named in the file)."""
    path = torch_hub_file(url)
    if path.is_file():
        return path
    if offline():
        raise UserError(f"{path.name} is not in the torch hub cache ({path.parent}) and HF_HUB_OFFLINE=1: get {url}")
    # torch.hub's convention: `name-<hex prefix of the SHA-256>.ext` (DINOv2's official names carry none).
    match = torch.hub.HASH_REGEX.search(path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # torch writes a temporary file and moves it in place: an interrupted download leaves nothing behind
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=progress)
    except (urllib.error.URLError, OSError) as error:
        raise UserError(f"cannot download {url}: {getattr(error, 'reason', error)}") from None
    except RuntimeError as error:  # a hash mismatch
        raise UserError(f"{url}: {str(error).splitlines()[0]}") from None
    return path
