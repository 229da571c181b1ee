"""Training throughput (images/s) and the training loop's overhead over a bare forward/backward/step, interleaved.

Each round runs (a) the real loop, `vitreg.training.pretrain.train`, for `--steps` steps on an image folder of photos
and reads its steady-state step time from metrics.jsonl (the first logging window, with worker start-up, is
dropped; checkpoint saves are not timed), then (b) bare steps of the same model config on one batch held in memory:
the objective's forward (student, teacher, losses), backward and AdamW step. The loop adds data loading, schedules,
the non-finite check, clipping, the EMA update and logging. Overhead = loop step / bare step - 1 (target <= 10%).

    python benchmarks/bench_training.py [--rounds 3] [--steps 15] [--objective dinov2|supervised] [--set KEY=YAML ...]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from vitreg.training import data, pretrain, schedules
from vitreg.training.config import load_config

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


def write_photos(root: Path, size: int = 160) -> Path:
    """An imagefolder of scikit-image photos in two classes."""
    from skimage import data as skdata

    for name in PHOTOS:
        array = np.asarray(getattr(skdata, name)())
        array = array.astype(np.uint8) * 255 if array.dtype == bool else array
        image = Image.fromarray(array).convert("RGB")
        image.thumbnail((size, size))
        folder = root / ("gray" if array.ndim == 2 else "color")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{name}.png")
    return root


def loop_step_seconds(config, output_dir: Path) -> float:
    """Mean steady-state step time of the real training loop."""
    from accelerate.state import AcceleratorState

    pretrain.train(config, output_dir, overwrite=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    windows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return statistics.mean(w["step_time_s"] for w in windows)


def bare_step_seconds(config, steps: int) -> tuple[float, float]:
    """Median times of (forward + loss + backward + AdamW step) and of the same plus clipping and the EMA update,
    alternating on one fixed batch."""
    images = data.load_images(config)
    student, objective, model_config, _ = pretrain.build_model(config, images)
    optimizer = torch.optim.AdamW(schedules.param_groups(student, model_config.num_hidden_layers, config))
    loader = pretrain.build_data(config, images, model_config.patch_size, 0, 1, 0)
    batch = next(iter(loader))
    del loader
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads or threads)  # as the loop does
    values = schedules.values_at(config.warmup_steps, config, config.peak_lr(1))
    schedules.apply(optimizer, values)
    student.train()
    times = {False: [], True: []}
    for i in range(2 * steps + 2):
        full = bool(i % 2)
        start = time.perf_counter()
        loss, _ = objective(student, batch, values)
        loss.backward()
        if full:
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if full:
            objective.update_teacher(student, values.momentum)
        times[full].append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return statistics.median(times[False][1:]), statistics.median(times[True][1:])


def main() -> None:
    """Interleave loop and bare rounds, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="loop steps per round (multiple of logging_steps)")
    parser.add_argument("--objective", choices=("dinov2", "supervised"), default="dinov2")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML", help="config overrides")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {**BENCH, "max_steps": args.steps, "data_dir": str(write_photos(Path(tmp) / "photos"))}
        overrides.update({k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)})
        config = load_config(f"smoke-{args.objective}", overrides)
        loop, bare, full = [], [], []
        for round_index in range(args.rounds):
            loop.append(loop_step_seconds(config, Path(tmp) / "run"))
            plain, with_ema = bare_step_seconds(config, args.steps - config.logging_steps)
            bare.append(plain)
            full.append(with_ema)
            print(
                f"round {round_index}: loop {1000 * loop[-1]:.1f}, bare {1000 * plain:.1f}, "
                f"bare + clip + EMA {1000 * with_ema:.1f} ms/step"
            )

    # The least-disturbed round of each kind: on a shared machine, other work only ever adds time.
    loop_s, bare_s, full_s = min(loop), min(bare), min(full)
    batch = config.batch_size_per_device
    m = config.model
    crops = (
        f"2x{config.global_crop_size} + {config.local_crops_number}x{config.local_crop_size} px"
        if args.objective == "dinov2"
        else f"{config.global_crop_size} px"
    )
    print(
        f"\n### Training loop overhead ({args.objective}, {config.num_threads or torch.get_num_threads()} intra-op "
        f"thread(s), {config.num_workers} loader workers, best of {args.rounds} interleaved rounds)\n"
    )
    print(
        "| model | crops | batch | loop step (ms) | bare step (ms) | bare + clip + EMA (ms) | loop images/s "
        "| bare images/s | loop overhead over bare | over bare + clip + EMA |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| D={m['hidden_size']} L={m['num_hidden_layers']} p={m['patch_size']} R={m.get('num_register_tokens', 4)} "
        f"| {crops} | {batch} | {1000 * loop_s:.1f} | {1000 * bare_s:.1f} | {1000 * full_s:.1f} | "
        f"{batch / loop_s:.1f} | {batch / bare_s:.1f} | {100 * (loop_s / bare_s - 1):+.1f}% | "
        f"{100 * (loop_s / full_s - 1):+.1f}% |"
    )


if __name__ == "__main__":
    main()
