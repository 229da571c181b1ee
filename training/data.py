"""Data: Hugging Face `datasets` (an imagefolder read whole, or a streamed local folder or Hub dataset), a sharded
endless sampler that resumes at any step (with DeiT's repeated augmentation), a stream that resumes from its
`state_dict`, decoding and augmentation in DataLoader workers seeded per sample, and the collate functions.

An image that cannot be decoded (a truncated JPEG, a file that is no image) stops the run with one line naming the
file: skipping it would shorten a batch or shift every later sample of the stream, and so change what a resumed run
sees. The workers decode the images themselves (the image column is read undecoded) to know the file's name, and
hand the failure to the training loop as a batch `{"unreadable": [...]}` rather than raising it: an exception
raised in a worker reaches the main process wrapped in the worker's traceback."""

import random
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from torchvision.transforms import v2 as T

from vitreg.core.errors import UserError

from .config import TrainConfig
from .masking import sample_masks


def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of the sample at `position` of the run's global data stream."""
    return (seed * 1_000_003 + position) % (2**63)


def stream_sample_seed(seed: int, reader: int, epoch: int, count: int) -> int:
    """The augmentation seed of the `count`-th example that stream reader `reader` yields in its `epoch`."""
    return int(np.random.SeedSequence([seed, reader, epoch, count]).generate_state(1, np.uint64)[0]) % (2**63)


def load_images(config: TrainConfig):
    """The training split: `datasets.Dataset` for `data_dir`; a streaming `IterableDataset` for `dataset`, a local
    folder (imagefolder or parquet files, read offline) or a Hub dataset name."""
    import datasets

    if config.data_dir is None and config.dataset is None:
        raise UserError("no data: pass --data_dir DIR (an image folder) or --dataset FOLDER|NAME (streamed)")
    if config.data_dir is not None:
        if not Path(config.data_dir).is_dir():
            raise UserError(f"--data_dir {config.data_dir} is not a folder")
        try:
            images = datasets.load_dataset("imagefolder", data_dir=config.data_dir, split=config.dataset_split)
        except Exception as error:  # datasets raises many types for empty or unreadable folders
            raise UserError(f"cannot read images from {config.data_dir}: {str(error).splitlines()[0]}") from None
    else:
        local = Path(config.dataset).is_dir()
        if not local and datasets.config.HF_HUB_OFFLINE:
            raise UserError(
                f"--dataset {config.dataset} is no local folder, and the Hugging Face Hub is offline "
                "(HF_HUB_OFFLINE=1); pass a local folder (imagefolder or parquet files) or --data_dir"
            )
        try:  # a local folder: datasets picks imagefolder or parquet from the files
            images = datasets.load_dataset(config.dataset, split=config.dataset_split, streaming=True)
        except Exception as error:  # file, network and Hub errors come in many types
            raise UserError(f"cannot stream --dataset {config.dataset}: {str(error).splitlines()[0]}") from None
    columns = images.column_names or []
    if columns and config.image_column not in columns:
        raise UserError(f"the dataset has no image column {config.image_column!r} (columns: {columns})")
    if config.objective == "supervised" and columns and config.label_column not in columns:
        raise UserError(
            f"supervised training needs labels: the dataset has no {config.label_column!r} column "
            "(an imagefolder gets one from class subfolders)"
        )
    feature = (images.features or {}).get(config.image_column)
    if isinstance(feature, datasets.Image) and feature.decode:  # the workers decode it, naming unreadable files
        images = images.cast_column(config.image_column, datasets.Image(decode=False))
    return images


def decode_image(value) -> PIL.Image.Image:
    """An RGB image from a `datasets` image value (`{"path", "bytes"}`, or an image already decoded)."""
    import datasets

    if not isinstance(value, PIL.Image.Image):
        value = datasets.Image().decode_example(value)  # datasets' own decoding: EXIF rotation, Hub paths
    return value.convert("RGB")  # loads the pixels: a truncated file fails here if not before


def image_name(value, fallback: str) -> str:
    """The file an image value came from, else `fallback` (images stored as bytes may have no file name)."""
    path = value.get("path") if isinstance(value, dict) else getattr(value, "filename", None)
    return str(path) if path else fallback


def unreadable_error(names: list[str]) -> UserError:
    """The one-line error of a batch holding images that cannot be decoded."""
    names = list(dict.fromkeys(names))  # a small stream repeats its images within a batch
    more = f" (and {len(names) - 1} more in the same batch)" if len(names) > 1 else ""
    return UserError(f"cannot read the training image {names[0]}{more}: replace or remove it and run again")


def class_names(images, label_column: str) -> list[str]:
    """The class names of a labelled dataset (ClassLabel names, else the sorted distinct labels)."""
    feature = (images.features or {}).get(label_column)
    if hasattr(feature, "names"):
        return list(feature.names)
    if not isinstance(images, Dataset):
        raise UserError(f"a streamed dataset needs a ClassLabel column {label_column!r} to name its classes")
    return [str(label) for label in sorted(set(images[label_column]))]


class ShardedEndlessBatches(Sampler):
    """This process's batches of `(index, seed)`: an endless stream of epoch-seeded permutations cut into global
    batches, starting at `start_step` (so resuming needs only the step).

    Global stream position `q` of step `s` goes to rank `q % world_size`, slot `(q - s * global_batch) //
    world_size`, as torch's DistributedSampler deals indices. With `repeats` n > 1 (DeiT's RASampler) each
    permuted index takes n consecutive positions, so its copies land on n different ranks (when n <= world_size),
    each with its own augmentation seed. Like DeiT, one process ignores `repeats`: its copies would only share
    batches. Unlike RASampler, which ends each epoch after len(dataset) samples and so uses only the first 1/n of
    every permutation, the stream runs through the whole repeated permutation: every image is seen exactly n times
    per n x len(dataset) samples. An "epoch" of the recipes stays len(dataset) samples, as in DeiT."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_step: int = 0,
        repeats: int = 1,
    ):
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.seed, self.start_step = seed, start_step
        self.repeats = repeats if world_size > 1 else 1
        self._epoch, self._order = -1, None

    def position_index(self, position: int) -> int:
        """Dataset index at a global stream position."""
        epoch, offset = divmod(position, self.num_samples * self.repeats)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 10_007 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_samples, generator=generator)
        return int(self._order[offset // self.repeats])

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        step = self.start_step
        while True:
            positions = range(step * global_batch + self.rank, (step + 1) * global_batch, self.world_size)
            yield [(self.position_index(p), sample_seed(self.seed, p)) for p in positions]
            step += 1


class AugmentedImages(Dataset):
    """Map-style view of the images: item `(index, seed)` -> the augmented sample, reproducible from the seed."""

    def __init__(self, images, transform, image_column: str, label_column: str | None = None):
        self.images, self.transform = images, transform
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        row = self.images[index]
        sample = augment(self.transform, row[self.image_column], seed, f"row {index}")
        if self.label_column is not None and "unreadable" not in sample:
            sample["label"] = int(row[self.label_column])
        return sample


def augment(transform, image, seed: int, where: str) -> dict:
    """Decode `image` and apply a random transform with the torch RNG seeded by `seed`, leaving the caller's RNG
    untouched; an image that cannot be decoded gives `{"unreadable": "FILE (reason)"}` (`where` names one without
    a file)."""
    try:
        decoded = decode_image(image)
    except Exception as error:  # PIL and datasets raise OSError, ValueError, SyntaxError, ... for corrupt files
        return {"unreadable": f"{image_name(image, where)} ({error})"}
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        sample = transform(decoded)
    sample["seed"] = seed
    return sample


class ReportUnreadable:
    """Collate a batch, or pass on the names of its unreadable images as `{"unreadable": [...]}` for the training
    loop to report (a class, not a closure: DataLoader workers started with spawn pickle it)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples: list[dict]) -> dict:
        unreadable = [sample["unreadable"] for sample in samples if "unreadable" in sample]
        return {"unreadable": unreadable} if unreadable else self.collate(samples)


class StreamedImages(IterableDataset):
    """An endless, augmented stream of a `datasets.IterableDataset`, split between every (process, worker) reader.

    Reader `rank * num_workers + worker` of `world_size * num_workers` reads its own shards (files) when there are
    at least as many shards as readers, else every n-th example (datasets' `split_dataset_by_node`). Each epoch
    reshuffles the shard order and a `shuffle_buffer_size` buffer (seed + epoch). An example's augmentation seed
    comes from (seed, reader, epoch, count), so no two readers share one. `state_dict` is the reader's position:
    torchdata's StatefulDataLoader gathers it from every worker for the checkpoint and hands it back on resume,
    where datasets restarts the stream there (the examples in the shuffle buffer at save time are dropped)."""

    def __init__(self, images, transform, config: TrainConfig, rank: int, world_size: int):
        self.images, self.transform, self.rank, self.world_size = images, transform, rank, world_size
        self.seed, self.buffer_size = config.seed, config.shuffle_buffer_size
        self.image_column = config.image_column
        self.label_column = config.label_column if config.objective == "supervised" else None
        self.epoch, self.count, self.stream, self.resume = 0, 0, None, None

    def reader_stream(self):
        """(this reader's stream, its index): its part of the dataset, shuffled with the run's seed."""
        from datasets.distributed import split_dataset_by_node

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        if self.images.num_shards >= readers:
            stream = self.images.shard(num_shards=readers, index=reader, contiguous=False)
        else:
            stream = split_dataset_by_node(self.images, rank=reader, world_size=readers)
        if self.buffer_size:  # the same seed on every reader: split_dataset_by_node needs one shuffled order
            stream = stream.shuffle(seed=self.seed, buffer_size=self.buffer_size)
        return stream, reader

    def __iter__(self):
        stream, reader = self.reader_stream()
        if self.resume is not None:
            self.epoch, self.count = self.resume["epoch"], self.resume["count"]
            stream.set_epoch(self.epoch)
            stream.load_state_dict(self.resume["stream"])
            self.resume = None
        else:
            self.epoch, self.count = 0, 0
        self.stream = stream
        while True:
            stream.set_epoch(self.epoch)
            # `.iter` rather than `iter(stream)`: in a DataLoader worker datasets would split the shards again.
            for batch in stream.iter(batch_size=1):
                row = {key: values[0] for key, values in batch.items()}
                sample = augment(
                    self.transform,
                    row[self.image_column],
                    stream_sample_seed(self.seed, reader, self.epoch, self.count),
                    f"example {self.count} of epoch {self.epoch} of stream reader {reader}",
                )
                if self.label_column is not None and "unreadable" not in sample:
                    sample["label"] = int(row[self.label_column])
                self.count += 1
                yield sample
            if self.count == 0:  # (a resumed epoch counts the examples yielded before the checkpoint)
                raise UserError(f"stream reader {reader} of the dataset got no example: use fewer num_workers")
            self.epoch, self.count = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """The reader's position: epoch, examples yielded in it, and the datasets stream state."""
        if self.stream is None:
            return self.resume or {"epoch": 0, "count": 0, "stream": None}
        return {"epoch": self.epoch, "count": self.count, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` at the next `iter`."""
        self.resume = state if state.get("stream") is not None else None


class DINOv2Collate:
    """Stack multi-crop samples crop-major and draw the iBOT masks of the global crops."""

    def __init__(self, config: TrainConfig, patch_size: int):
        self.rows = self.cols = config.global_crop_size // patch_size
        self.config = config

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        global_crops = torch.stack([s["global_crops"] for s in samples], dim=1).flatten(0, 1)  # [2B, 3, G, G]
        local_crops = torch.stack([s["local_crops"] for s in samples], dim=1).flatten(0, 1)  # [nB, 3, L, L]
        rng = random.Random(samples[0]["seed"])
        c = self.config
        masks = sample_masks(
            global_crops.shape[0],
            self.rows,
            self.cols,
            c.mask_sample_probability,
            c.mask_ratio_min_max,
            rng,
            c.mask_min_patches,
        )  # [2B, HW]
        return {"global_crops": global_crops, "local_crops": local_crops, "masks": masks}


class SupervisedCollate:
    """Stack images, turn labels into soft targets `[B, C]`, optionally mixing batches with MixUp / CutMix."""

    def __init__(self, config: TrainConfig, num_classes: int):
        self.num_classes = num_classes
        mixers = [T.MixUp(alpha=config.mixup_alpha, num_classes=num_classes)] if config.mixup_alpha else []
        mixers += [T.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes)] if config.cutmix_alpha else []
        self.mix = T.RandomChoice(mixers) if mixers else None

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([s["pixel_values"] for s in samples])  # [B, 3, S, S]
        labels = torch.tensor([s["label"] for s in samples])
        if self.mix is None or len(samples) < 2:
            return {"pixel_values": pixel_values, "targets": F.one_hot(labels, self.num_classes).float()}
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(samples[0]["seed"])
            pixel_values, targets = self.mix(pixel_values, labels)  # targets [B, C]
        return {"pixel_values": pixel_values, "targets": targets}


def make_loader(dataset, collate, config: TrainConfig, rank: int, world_size: int, start_step: int) -> DataLoader:
    """The DataLoader of one process; augmentation and collation run in `num_workers` worker processes.

    A streamed dataset gets torchdata's StatefulDataLoader, whose `state_dict` holds every worker's stream
    position; the map-style path needs none (the sampler resumes from the step)."""
    common = dict(
        collate_fn=collate,
        num_workers=config.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=config.num_workers > 0,
        # A private generator: creating the loader must not consume the global RNG that a checkpoint restores.
        generator=torch.Generator().manual_seed(config.seed),
    )
    if isinstance(dataset, IterableDataset):
        try:
            from torchdata.stateful_dataloader import StatefulDataLoader
        except ModuleNotFoundError:
            raise UserError(
                "--dataset streams through torchdata's StatefulDataLoader: pip install 'vitreg[train]' (torchdata)"
            ) from None
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, which torch now deprecates
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            return StatefulDataLoader(dataset, batch_size=config.batch_size_per_device, drop_last=True, **common)
    sampler = ShardedEndlessBatches(
        len(dataset),
        config.batch_size_per_device,
        rank,
        world_size,
        config.seed,
        start_step,
        config.repeated_augmentations,
    )
    return DataLoader(dataset, batch_sampler=sampler, **common)
