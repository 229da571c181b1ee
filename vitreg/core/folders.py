"""Writing outputs atomically: a folder or file appears complete or not at all, and nothing is overwritten unasked.

Every folder a tool writes carries a marker file, so `--overwrite` replaces what vitreg wrote and never a folder of
the user's own (a thesis beside a stray output is not deleted). Outputs get the user's umask, like any file they make.
"""

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

MARKER = ".vitreg"  # in every folder vitreg writes: what may be replaced with --overwrite
# Folders written before the marker existed are recognised by the manifest a tool writes into them.
MANIFESTS = ("provenance.json", "extract.json", "job.json", "report.json", "run.json")


def umask() -> int:
    """The process umask (read without changing it for longer than a moment)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask_allows(folder: Path) -> None:
    """Give `folder` and everything in it the permissions the user's umask allows: temporary folders are private and
    safetensors writes its files 0600 whatever the umask, so a teammate could not read the output."""
    mask = umask()
    for path in [folder, *folder.rglob("*")]:
        mode = (0o777 if path.is_dir() else 0o666) & ~mask
        if not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def written_by_vitreg(folder: Path) -> bool:
    """Whether `folder` is an output of a vitreg tool (its marker, or the manifest of an older vitreg)."""
    return any((folder / name).is_file() for name in (MARKER, *MANIFESTS))


def check_output_dir(output_dir: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse a non-empty output folder unless `overwrite`, a folder vitreg did not write even then, a file in its
    place, the working folder or one above it, and a folder holding one of the `inputs`."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir} exists and is not a folder")
    resolved = output_dir.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise UserError(f"{output_dir} is the working folder (or holds it): name a new folder for the output")
    for source in inputs:
        source = Path(source).expanduser()
        if source.exists() and (source.resolve() == resolved or resolved in source.resolve().parents):
            raise UserError(f"{output_dir} holds the input {source}: name a folder outside it for the output")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise UserError(f"{output_dir} is not empty; pass --overwrite to replace it")
    if not written_by_vitreg(output_dir):
        names = sorted(path.name for path in output_dir.iterdir())
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(
            f"{output_dir} holds files vitreg did not write ({shown}); --overwrite replaces only vitreg's outputs: "
            "move them or choose another folder"
        )


def writable_parent(path: Path) -> None:
    """Create `path`'s parent folder, or a UserError saying why it cannot be written there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {path.parent}: {error.strerror or error}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in {path.parent}: permission denied")


@contextmanager
def atomic_output_dir(
    output_dir: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary folder beside `output_dir` that replaces it only if the block succeeds."""
    output_dir = Path(output_dir)
    inputs = list(inputs)
    check_output_dir(output_dir, overwrite, inputs)
    writable_parent(output_dir)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    except OSError as error:
        raise UserError(f"cannot write in {output_dir.parent}: {error.strerror or error}") from None
    try:
        (staging / MARKER).write_text("written by vitreg; `--overwrite` may replace this folder\n")
        yield staging
        share_as_umask_allows(staging)
        check_output_dir(output_dir, overwrite, inputs)  # nobody wrote there meanwhile
        if output_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            try:
                output_dir.rename(retired / "old")
                staging.rename(output_dir)
            finally:
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
    writable_parent(output_file)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{output_file.name}.tmp-", dir=output_file.parent)
    except OSError as error:
        raise UserError(f"cannot write in {output_file.parent}: {error.strerror or error}") from None
    os.close(handle)
    try:
        os.chmod(temporary, 0o666 & ~umask())  # mkstemp makes it private
        yield Path(temporary)
        os.replace(temporary, output_file)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
