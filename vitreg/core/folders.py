"""Writing outputs atomically: a folder or file appears complete or not at all, and nothing is overwritten unasked."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless `overwrite`; refuse a file in its place."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UserError(f"{output_dir} is not empty; pass --overwrite to replace it")


@contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `output_dir` that replaces it only if the block succeeds."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield staging
        check_output_dir(output_dir, overwrite)  # nobody wrote there meanwhile
        if output_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            output_dir.rename(retired / "old")
            staging.rename(output_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_output_file(output_file: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `output_file` that replaces it only if the block succeeds."""
    output_file = Path(output_file)
    if output_file.is_dir():
        raise UserError(f"{output_file} is a folder, not a file")
    if output_file.exists() and not overwrite:
        raise UserError(f"{output_file} exists; pass --overwrite to replace it")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{output_file.name}.tmp-", dir=output_file.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, output_file)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
