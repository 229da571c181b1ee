"""Data: Hugging Face `datasets` (a local imagefolder or a streamed Hub dataset), a sharded endless sampler that
resumes at any step, augmentation in DataLoader workers seeded per sample, and the collate functions."""

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2 as T

from vitreg.core.errors import UserError

from .config import TrainConfig
from .masking import sample_masks


def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of the sample at `position` of the run's global data stream."""
    return (seed * 1_000_003 + position) % (2**63)


def load_images(config: TrainConfig):
    """The training split: `datasets.Dataset` for `data_dir`, a streaming `IterableDataset` for a Hub `dataset`."""
    import datasets

    if config.data_dir is None and config.dataset is None:
        raise UserError("no data: pass --data_dir DIR (an image folder) or --dataset NAME (a Hub dataset)")
    if config.data_dir is not None:
        if not Path(config.data_dir).is_dir():
            raise UserError(f"--data_dir {config.data_dir} is not a folder")
        try:
            images = datasets.load_dataset("imagefolder", data_dir=config.data_dir, split=config.dataset_split)
        except Exception as error:  # datasets raises many types for empty or unreadable folders
            raise UserError(f"cannot read images from {config.data_dir}: {str(error).splitlines()[0]}") from None
    else:
        if datasets.config.HF_HUB_OFFLINE:
            raise UserError(
                f"--dataset {config.dataset} streams from the Hugging Face Hub, which is offline "
                "(HF_HUB_OFFLINE=1); use --data_dir with a local image folder"
            )
        try:
            images = datasets.load_dataset(config.dataset, split=config.dataset_split, streaming=True)
        except Exception as error:  # network and Hub errors come in many types
            raise UserError(f"cannot stream --dataset {config.dataset}: {str(error).splitlines()[0]}") from None
    columns = images.column_names or []
    if columns and config.image_column not in columns:
        raise UserError(f"the dataset has no image column {config.image_column!r} (columns: {columns})")
    if config.objective == "supervised" and columns and config.label_column not in columns:
        raise UserError(
            f"supervised training needs labels: the dataset has no {config.label_column!r} column "
            "(an imagefolder gets one from class subfolders)"
        )
    return images


def class_names(images, label_column: str) -> list[str]:
    """The class names of a labelled dataset (ClassLabel names, else the sorted distinct labels)."""
    feature = images.features[label_column]
    if hasattr(feature, "names"):
        return list(feature.names)
    return [str(label) for label in sorted(set(images[label_column]))]


class ShardedEndlessBatches(Sampler):
    """This process's batches of `(index, seed)`: an endless stream of epoch-seeded permutations cut into global
    batches, each split by rank, starting at `start_step` (so resuming needs only the step)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, start_step: int = 0):
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.seed, self.start_step = seed, start_step
        self._epoch, self._order = -1, None

    def position_index(self, position: int) -> int:
        """Dataset index at a global stream position."""
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 10_007 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_samples, generator=generator)
        return int(self._order[offset])

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        position = self.start_step * global_batch + self.rank * self.batch_size
        while True:
            yield [
                (self.position_index(p), sample_seed(self.seed, p)) for p in range(position, position + self.batch_size)
            ]
            position += global_batch


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
        sample = augment(self.transform, row[self.image_column], seed)
        if self.label_column is not None:
            sample["label"] = int(row[self.label_column])
        return sample


def augment(transform, image, seed: int) -> dict:
    """Apply a random transform with the torch RNG seeded by `seed`, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        sample = transform(image.convert("RGB"))
    sample["seed"] = seed
    return sample


def streamed_images(images, config: TrainConfig, transform, rank: int, world_size: int, start_step: int):
    """A Hub stream split by rank, shuffled, advanced to `start_step`, augmented per sample."""
    from datasets.distributed import split_dataset_by_node

    stream = split_dataset_by_node(images, rank=rank, world_size=world_size).shuffle(
        seed=config.seed, buffer_size=10_000
    )
    skipped = start_step * config.batch_size_per_device
    stream = stream.skip(skipped)
    label = config.label_column if config.objective == "supervised" else None

    def apply(row: dict, index: int) -> dict:
        sample = augment(transform, row[config.image_column], sample_seed(config.seed + rank, skipped + index))
        if label is not None:
            sample["label"] = int(row[label])
        return sample

    return stream.map(apply, with_indices=True, remove_columns=stream.column_names)


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
    """The DataLoader of one process; augmentation and collation run in `num_workers` worker processes."""
    common = dict(
        collate_fn=collate,
        num_workers=config.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=config.num_workers > 0,
        # A private generator: creating the loader must not consume the global RNG that a checkpoint restores.
        generator=torch.Generator().manual_seed(config.seed),
    )
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return DataLoader(dataset, batch_size=config.batch_size_per_device, drop_last=True, **common)
    sampler = ShardedEndlessBatches(
        len(dataset), config.batch_size_per_device, rank, world_size, config.seed, start_step
    )
    return DataLoader(dataset, batch_sampler=sampler, **common)
