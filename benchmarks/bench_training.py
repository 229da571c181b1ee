"""Training throughput (images/s) and the training loop's overhead over its bare step, interleaved.

Each round runs (a) the real loop, `vitreg.training.pretrain.train`, for `--steps` steps on an image folder of photos
and reads its steady-state step time from metrics.jsonl (the first logging window, with worker start-up, is
dropped; checkpoint saves are not timed), then (b) bare steps of the same model config on one batch held in memory:
the loop's own `training.step.train_step` (forward of student and teacher, losses, the non-finite check, backward,
per-module clipping, AdamW, EMA update). The loop adds data loading, the batch copy, logging and the progress bar.
Overhead = loop step / bare step - 1 (target <= 10%).

    python benchmarks/bench_training.py [--rounds 3] [--steps 15] [--objective dinov2|supervised] [--set KEY=YAML ...]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from vitreg.core.images import sample_photos
from vitreg.training import data, pretrain, schedules
from vitreg.training.config import load_config
from vitreg.training.step import build_optimizer, train_step

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "moon")
# A model big enough for compute to matter on a CPU, small enough for a few minutes on 2 cores.
BENCH = {
    "model": {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 3, "patch_size": 8},
    "global_crop_size": 64,
    "local_crop_size": 32,
    "batch_size_per_device": 16,
    "logging_steps": 5,
    "checkpointing_steps": 1000,
}


def loop_step_seconds(config, output_dir: Path) -> float:
    """Mean steady-state step time of the real training loop."""
    from accelerate.state import AcceleratorState

    pretrain.train(config, output_dir, overwrite=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    windows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return statistics.mean(w["step_time_s"] for w in windows)


def bare_step_seconds(config, steps: int) -> float:
    """Median time of the loop's `train_step` on one fixed batch held in memory."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    images = data.load_images(config)
    student, objective, model_config = pretrain.build_model(config, images)
    optimizer = build_optimizer(student, model_config.num_hidden_layers, config)
    loader = pretrain.build_data(config, images, model_config.patch_size, 0, 1, 0)
    batch = next(iter(loader))
    del loader
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    student, optimizer = accelerator.prepare(student, optimizer)
    objective.to(accelerator.device)
    batch = {key: value.to(accelerator.device) for key, value in batch.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads or threads)  # as the loop does
    values = schedules.values_at(config.warmup_steps, config, config.peak_lr(1))
    student.train()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        train_step(accelerator, student, objective, optimizer, batch, values, config.clip_grad)
        times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    return statistics.median(times[1:])


def main() -> None:
    """Interleave loop and bare rounds, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="loop steps per round (multiple of logging_steps)")
    parser.add_argument("--objective", choices=("dinov2", "supervised"), default="dinov2")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML", help="config overrides")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        sample_photos(photos, PHOTOS, max_side=160, by_colour=True)  # an imagefolder of two classes
        overrides = {**BENCH, "max_steps": args.steps, "data_dir": str(photos)}
        overrides.update({k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)})
        config = load_config(f"smoke-{args.objective}", overrides)
        loop, bare = [], []
        for round_index in range(args.rounds):
            loop.append(loop_step_seconds(config, Path(tmp) / "run"))
            bare.append(bare_step_seconds(config, args.steps - config.logging_steps))
            print(f"round {round_index}: loop {1000 * loop[-1]:.1f}, bare train_step {1000 * bare[-1]:.1f} ms/step")

    # Per-round ratios: the two kinds of step share each round's load, so their ratio is what stays comparable.
    q1, ratio, q3 = statistics.quantiles([a / b for a, b in zip(loop, bare)], n=4, method="inclusive")
    loop_s, bare_s = statistics.median(loop), statistics.median(bare)
    batch = config.batch_size_per_device
    m = config.model
    crops = (
        f"2x{config.global_crop_size} + {config.local_crops_number}x{config.local_crop_size} px"
        if args.objective == "dinov2"
        else f"{config.global_crop_size} px"
    )
    print(
        f"\n### Training loop overhead ({args.objective}, {config.num_threads or torch.get_num_threads()} intra-op "
        f"thread(s), {config.num_workers} loader workers, {args.rounds} interleaved rounds)\n"
    )
    print(
        "| model | crops | batch | loop step (ms, median) | bare step (ms, median) | loop images/s "
        "| loop / bare, median per round [IQR] |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| D={m['hidden_size']} L={m['num_hidden_layers']} p={m['patch_size']} R={m.get('num_register_tokens', 4)} "
        f"| {crops} | {batch} | {1000 * loop_s:.1f} | {1000 * bare_s:.1f} | {batch / loop_s:.1f} | "
        f"{ratio:.3f} [{q1:.3f}, {q3:.3f}] |"
    )


if __name__ == "__main__":
    main()
