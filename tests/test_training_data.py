"""Data: the resumable sampler with DeiT's repeated augmentation, and the streamed dataset read from a local folder
(imagefolder or parquet files, offline), split between processes and DataLoader workers, resumed from its state."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitreg.core.errors import UserError
from vitreg.training import checkpoint, data
from vitreg.training.config import TrainConfig

NUM_IMAGES = 24


def take(sampler, steps: int) -> list[list[tuple[int, int]]]:
    return [batch for _, batch in zip(range(steps), sampler)]


def global_stream(per_rank: list[list[list]], world_size: int) -> list[tuple[int, int]]:
    """The samples of all ranks in stream order: position q of a step sits on rank q % world_size."""
    steps, batch = len(per_rank[0]), len(per_rank[0][0])
    return [per_rank[q % world_size][s][q // world_size] for s in range(steps) for q in range(batch * world_size)]


@pytest.mark.parametrize("world_size, repeats", [(2, 2), (4, 3), (3, 3), (8, 3)])
def test_repeated_augmentation_puts_the_copies_of_an_image_on_different_ranks(world_size, repeats):
    num_samples, batch = 10, 3
    samplers = [
        data.ShardedEndlessBatches(num_samples, batch, r, world_size, 7, repeats=repeats) for r in range(world_size)
    ]
    steps = 2 * num_samples * repeats // (batch * world_size) + 1  # two epochs of the repeated stream
    stream = global_stream([take(sampler, steps) for sampler in samplers], world_size)
    for start in range(0, len(stream) - repeats + 1, repeats):
        copies = stream[start : start + repeats]
        assert len({index for index, _ in copies}) == 1  # n consecutive positions hold one image ...
        assert len({(start + k) % world_size for k in range(repeats)}) == repeats  # ... on n different ranks
    epoch = [index for index, _ in stream[: num_samples * repeats]]
    assert Counter(epoch) == {i: repeats for i in range(num_samples)}  # every image n times per n x N samples
    seeds = [seed for _, seed in stream]
    assert len(set(seeds)) == len(seeds)  # each copy with its own augmentation


def test_every_rank_gets_distinct_batches():
    samplers = [data.ShardedEndlessBatches(16, 4, r, 4, 0, repeats=3) for r in range(4)]
    per_rank = [take(sampler, 10) for sampler in samplers]
    for step in range(10):
        batches = [per_rank[r][step] for r in range(4)]
        assert len({tuple(b) for b in batches}) == 4
        positions = [seed for b in batches for _, seed in b]
        assert len(set(positions)) == 16  # no sample (position, augmentation) twice in a global batch


@pytest.mark.parametrize("repeats", [1, 3])
def test_resuming_at_step_k_continues_the_uninterrupted_stream(repeats):
    for rank in range(2):
        whole = take(data.ShardedEndlessBatches(10, 4, rank, 2, 5, repeats=repeats), 12)
        for k in (0, 1, 4, 7, 11):
            resumed = take(data.ShardedEndlessBatches(10, 4, rank, 2, 5, start_step=k, repeats=repeats), 12 - k)
            assert resumed == whole[k:]


def test_one_process_ignores_repeats_as_deit_does():
    plain = take(data.ShardedEndlessBatches(10, 5, 0, 1, 3), 2)
    repeated = take(data.ShardedEndlessBatches(10, 5, 0, 1, 3, repeats=3), 2)
    assert repeated == plain and sorted(i for b in plain for i, _ in b) == list(range(10))


def test_the_loader_passes_repeated_augmentations_to_the_sampler():
    config = TrainConfig(batch_size_per_device=2, num_workers=0, repeated_augmentations=3)
    loader = data.make_loader(list(range(6)), None, config, rank=1, world_size=2, start_step=4)
    sampler = loader.batch_sampler
    assert (sampler.repeats, sampler.rank, sampler.world_size, sampler.start_step) == (3, 1, 2, 4)


# --- streamed datasets from local folders ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """An imagefolder of 24 solid-colour images; the red channel / 10 is the image's id (one shard when streamed)."""
    root = tmp_path_factory.mktemp("imagefolder")
    for i in range(NUM_IMAGES):
        folder = root / ("odd" if i % 2 else "even")
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def parquet_folder(image_folder, tmp_path_factory) -> Path:
    """The same images as 4 parquet files (4 shards)."""
    import datasets

    root = tmp_path_factory.mktemp("parquet")
    images = datasets.load_dataset("imagefolder", data_dir=str(image_folder), split="train")
    for k in range(4):
        images.shard(4, k).to_parquet(str(root / f"train-{k:05d}-of-00004.parquet"))
    return root


def image_id(image) -> dict:
    """A 'transform' that keeps only the image's id."""
    return {"id": torch.tensor(image.getpixel((0, 0))[0] // 10)}


def collate(samples: list[dict]) -> dict:
    return {"id": torch.stack([s["id"] for s in samples]), "seed": torch.tensor([s["seed"] for s in samples])}


def stream_loader(folder: Path, rank: int, world_size: int, **overrides):
    fields = dict(dataset=str(folder), num_workers=2, batch_size_per_device=2, shuffle_buffer_size=0, seed=3)
    config = TrainConfig(**{**fields, **overrides})
    images = data.load_images(config)  # offline (conftest): a local folder must not need the Hub
    dataset = data.StreamedImages(images, image_id, config, rank, world_size)
    return data.make_loader(dataset, collate, config, rank, world_size, 0)


def ids_and_seeds(batches: list[dict]) -> tuple[list[int], list[int]]:
    return [i for b in batches for i in b["id"].tolist()], [s for b in batches for s in b["seed"].tolist()]


@pytest.mark.parametrize("layout", ["imagefolder", "parquet"])
def test_a_local_stream_gives_every_rank_and_worker_its_own_examples_and_seeds(layout, image_folder, parquet_folder):
    folder = image_folder if layout == "imagefolder" else parquet_folder
    seen_ids, seen_seeds = [], []
    for rank in range(2):
        # 2 ranks x 2 workers = 4 readers of 6 images: 3 batches of 2 per reader, 6 per rank, in one epoch
        batches = [batch for _, batch in zip(range(6), stream_loader(folder, rank, 2))]
        ids, seeds = ids_and_seeds(batches)
        # consecutive batches come from alternate workers: the two workers read different examples
        worker_ids = [ids_and_seeds(batches[w::2])[0] for w in range(2)]
        assert not set(worker_ids[0]) & set(worker_ids[1])
        seen_ids += ids
        seen_seeds += seeds
    assert sorted(seen_ids) == list(range(NUM_IMAGES))  # together they read each image once
    assert len(set(seen_seeds)) == NUM_IMAGES  # and augment each with its own seed


@pytest.mark.parametrize("num_workers, saved_at", [(0, 4), (2, 4), (2, 6)])  # 6: every reader at an epoch end
def test_a_stream_resumes_from_its_state_dict(num_workers, saved_at, parquet_folder, tmp_path):
    loader = stream_loader(parquet_folder, 1, 2, num_workers=num_workers)
    whole = [batch for _, batch in zip(range(10), loader)]  # runs past the end of an epoch (3 batches per reader)

    loader = stream_loader(parquet_folder, 1, 2, num_workers=num_workers)
    batches = iter(loader)
    first = [next(batches) for _ in range(saved_at)]
    path = tmp_path / "step"
    path.mkdir()
    torch.save(loader.state_dict(), path / checkpoint.data_state_file(1))  # as save_checkpoint writes it
    layout = {"num_processes": 2, "num_workers": num_workers}
    (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": saved_at, **layout}))

    resumed = stream_loader(parquet_folder, 1, 2, num_workers=num_workers)
    checkpoint.load_data_state(resumed, path, rank=1, num_processes=2)
    rest = [batch for _, batch in zip(range(10 - saved_at), resumed)]
    assert ids_and_seeds(first + rest) == ids_and_seeds(whole)
    with pytest.raises(UserError, match="data_state_0.pt"):
        checkpoint.load_data_state(resumed, path, rank=0, num_processes=2)


def test_stream_positions_fit_only_the_layout_that_saved_them(parquet_folder, tmp_path):
    """Each (process, worker) pair reads its own part of a stream: positions saved by 2 workers of 2 processes are
    refused, in one line saying what to pass, by another number of workers (torchdata would stop on a bare
    AssertionError) or of processes."""
    path = tmp_path / "step"
    path.mkdir()
    (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": 2, "num_processes": 2, "num_workers": 2}))
    for rank in range(2):
        torch.save({}, path / checkpoint.data_state_file(rank))
    with pytest.raises(
        UserError, match="2 DataLoader workers per process, this run has --num_workers 1: resume with --num_workers 2"
    ):
        checkpoint.load_data_state(stream_loader(parquet_folder, 1, 2, num_workers=1), path, 1, num_processes=2)
    with pytest.raises(UserError, match="2 processes, this run has 1: resume with accelerate launch --num_processes 2"):
        checkpoint.load_data_state(stream_loader(parquet_folder, 0, 1), path, 0, num_processes=1)


def test_a_hub_name_offline_is_refused_but_a_local_folder_is_not(image_folder):
    with pytest.raises(UserError, match="offline"):
        data.load_images(TrainConfig(dataset="someone/images"))
    images = data.load_images(TrainConfig(dataset=str(image_folder), objective="supervised"))
    assert data.class_names(images, "label") == ["even", "odd"]
