"""The features folder: Arrow shards that appear whole or not at all, and a manifest that makes the folder a dataset.

    FEATURES/job.json            the settings, written first: a rerun with the same settings resumes
    FEATURES/.vitreg             the marker of every folder vitreg writes (what --overwrite may replace)
    FEATURES/shards/00000.arrow  one shard per `shard_size` images, renamed into place once complete
    FEATURES/shards/00000.json   its row count and the images it skipped
    FEATURES/extract.json        the summary (settings, rows, skipped images, images/s)
    FEATURES/dataset_info.json   the `datasets` features
    FEATURES/state.json          written last: only then does `datasets.load_from_disk(FEATURES)` open the folder

A killed run leaves finished shards and at most one `.partial` file, which the next run discards.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from vitreg.core.errors import UserError
from vitreg.core.folders import MARKER, atomic_output_file, check_output_dir, writable_parent

JOB_FILE, SUMMARY_FILE, STATE_FILE = "job.json", "extract.json", "state.json"
SHARDS = "shards"


def write_json(path: Path, value: dict) -> None:
    """Write JSON atomically, replacing an older version (the project's atomic file write)."""
    with atomic_output_file(path, overwrite=True) as staging:
        staging.write_text(json.dumps(value, indent=1) + "\n")


def refuse_finished(folder: Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work, a folder of finished features (unless `overwrite`), a folder vitreg did not write
    (even then), and the places no output may go; an unfinished extraction is let through to be resumed."""
    if (folder / STATE_FILE).is_file() and not overwrite:
        raise UserError(f"{folder} holds finished features; pass --overwrite to replace them")
    resuming = (folder / JOB_FILE).is_file() and not overwrite
    check_output_dir(folder, overwrite or resuming, inputs)


# How each setting of job.json is named when a rerun differs: the flag that sets it, or what it is derived from.
SETTING_NAMES = {
    "model": "MODEL",
    "revision": "--revision",
    "images": "IMAGES_OR_DATASET",
    "split": "--split",
    "image_column": "--image-column",
    "columns": "the dataset's other columns",
    "num_images": "the number of images",
    "ids_sha256": "the list of images",
    "image_size": "--image-size",
    "grid": "the patch grid",
    "num_register_tokens": "the model's registers (trained + test-time)",
    "what": "--what",
    "layers": "--layers",
    "dtype": "--dtype",
    "shard_size": "--shard-size",
    "vitreg_version": "the vitreg version",
}


def changes(before: dict, after: dict) -> list[str]:
    """What differs between two jobs, in the words of their flags: `--what was cls, now cls,patch`."""

    def shown(key: str, value) -> str:
        if isinstance(value, list):
            return ("x" if key in ("image_size", "grid") else ",").join(map(str, value)) or "none"
        return "unset" if value is None else str(value)

    keys = list(dict.fromkeys([*after, *before]))
    return [
        f"{SETTING_NAMES.get(key, key)} was {shown(key, before.get(key))}, now {shown(key, after.get(key))}"
        for key in keys
        if before.get(key) != after.get(key)
    ]


class ShardWriter:
    """One shard being written: rows go to a `.partial` file that `commit` renames into place."""

    def __init__(self, path: Path, features):
        from datasets.arrow_writer import ArrowWriter

        self.path, self.partial = path, path.with_name(f".{path.name}.partial")
        self.writer = ArrowWriter(features=features, path=str(self.partial))
        self.rows, self.skipped = 0, []

    def write(self, batch: dict) -> None:
        """Append rows: `{"id": [...], column: array [B, ...]}`."""
        self.writer.write_batch(batch)
        self.rows += len(batch["id"])

    def commit(self) -> None:
        """Close the shard and put it in place (its row count and skipped images beside it)."""
        self.writer.finalize()
        self.writer.close()
        write_json(self.path.with_suffix(".json"), {"rows": self.rows, "skipped": self.skipped})
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        """Drop the unfinished shard."""
        self.writer.close()
        self.partial.unlink(missing_ok=True)


class FeatureFolder:
    """The output folder of one extraction, new or resumed."""

    def __init__(
        self,
        folder: str | Path,
        job: dict,
        features,
        num_shards: int,
        overwrite: bool = False,
        inputs: Iterable[str | Path] = (),
    ):
        self.folder, self.features, self.num_shards = Path(folder), features, num_shards
        self.job = json.loads(json.dumps(job))  # as it reads back from job.json
        refuse_finished(self.folder, overwrite, inputs)
        previous = self.folder / JOB_FILE
        if previous.is_file() and not overwrite:
            changed = changes(json.loads(previous.read_text()), self.job)
            if changed:
                raise UserError(
                    f"{self.folder} holds an unfinished extraction with other settings ({'; '.join(changed)}): "
                    "rerun it as it was to resume, or pass --overwrite to start again"
                )
        if overwrite and self.folder.exists():
            shutil.rmtree(self.folder)  # refuse_finished made sure vitreg wrote it
        writable_parent(previous)  # creates the folder, or says in one line why it cannot
        (self.folder / SHARDS).mkdir(exist_ok=True)
        (self.folder / MARKER).write_text("written by vitreg extract; `--overwrite` may replace this folder\n")
        for partial in (self.folder / SHARDS).glob(".*.partial"):  # a shard a killed run was writing
            partial.unlink()
        write_json(previous, self.job)

    def shard_path(self, shard: int) -> Path:
        """Where shard `shard` lives once complete."""
        return self.folder / SHARDS / f"{shard:05d}.arrow"

    def finished(self) -> set[int]:
        """The shards already complete (a resumed run skips them)."""
        return {shard for shard in range(self.num_shards) if self.shard_path(shard).is_file()}

    def writer(self, shard: int) -> ShardWriter:
        """A writer for shard `shard`."""
        return ShardWriter(self.shard_path(shard), self.features)

    def finish(self, summary: dict) -> dict:
        """Write the manifest (state.json last) once every shard is complete; return the summary written."""
        from datasets import DatasetInfo

        missing = sorted(set(range(self.num_shards)) - self.finished())
        if missing:
            raise UserError(f"{self.folder}: shards {missing[:5]} are missing; run the extraction again to finish")
        shards = [json.loads(self.shard_path(i).with_suffix(".json").read_text()) for i in range(self.num_shards)]
        summary = {
            **self.job,
            **summary,
            "rows": sum(shard["rows"] for shard in shards),
            "skipped": [entry for shard in shards for entry in shard["skipped"]],
        }
        DatasetInfo(description="vitreg extract features", features=self.features).write_to_directory(self.folder)
        write_json(self.folder / SUMMARY_FILE, summary)
        fingerprint = hashlib.sha256(json.dumps(self.job, sort_keys=True).encode()).hexdigest()[:16]
        state = {
            "_data_files": [{"filename": f"{SHARDS}/{shard:05d}.arrow"} for shard in range(self.num_shards)],
            "_fingerprint": fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        write_json(self.folder / STATE_FILE, state)  # last: the folder is a dataset from here on
        return summary


def load_features(folder: str | Path):
    """The features `vitreg extract` wrote, as a memory-mapped `datasets.Dataset`; refuses an unfinished run."""
    from datasets import load_from_disk

    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        if (folder / JOB_FILE).is_file():
            raise UserError(f"{folder}: an unfinished extraction; run the same command again to finish it")
        raise UserError(f"{folder}: not a features folder written by vitreg extract")
    return load_from_disk(str(folder))
