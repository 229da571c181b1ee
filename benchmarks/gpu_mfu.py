"""MFU of bf16 DINOv2 pretraining steps with registers (ViT-S/14 and ViT-L/14), for a session lent a GPU.

One step is the training loop's own `training.step.train_step`: student forward on 2 global + 8 local crops with iBOT
masks, teacher forward, DINO + iBOT + KoLeo losses under bf16 autocast, the non-finite check, backward, per-module
clipping, AdamW, EMA teacher update.
Batches are synthetic tensors already on the device (data loading is measured by bench_training.py). FLOPs per
step are analytic (training/flops.py, matmuls only), MFU = FLOPs / step time / peak, as nanoGPT reports it.

    python benchmarks/gpu_mfu.py                        # ViT-S/14 and ViT-L/14, H100/H200 bf16 peak 989 TFLOP/s
    python benchmarks/gpu_mfu.py --write BENCHMARKS.md  # also append the table there
    python benchmarks/gpu_mfu.py --tiny                 # a seconds-long CPU check that the script works
"""

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from vitreg.training import pretrain, schedules
from vitreg.training.config import load_config
from vitreg.training.flops import train_step_flops
from vitreg.training.masking import sample_masks
from vitreg.training.step import build_optimizer, train_step

MODELS = {  # name -> (recipe, per-device batch)
    "ViT-S/14 reg4": ("vits14-reg4-dinov2-imagenet", 64),
    "ViT-L/14 reg4": ("vitl14-reg4-dinov2-imagenet", 32),
}
TINY = {  # a 2-block model on 32 px crops: checks the script end to end on CPU
    "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8},
    "global_crop_size": 32,
    "local_crop_size": 16,
    "local_crops_number": 2,
    "head_n_prototypes": 256,
    "head_hidden_dim": 128,
    "head_bottleneck_dim": 64,
}


def synthetic_batch(config, patch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random crops and DINOv2 masks of one per-device batch."""
    b, g, loc = config.batch_size_per_device, config.global_crop_size, config.local_crop_size
    grid = g // patch_size
    masks = sample_masks(
        2 * b,
        grid,
        grid,
        config.mask_sample_probability,
        config.mask_ratio_min_max,
        random.Random(0),
        config.mask_min_patches,
    )
    return {
        "global_crops": torch.randn(2 * b, 3, g, g, device=device),
        "local_crops": torch.randn(config.local_crops_number * b, 3, loc, loc, device=device),
        "masks": masks.to(device),
    }


def measure(recipe: str, batch: int, steps: int, warmup: int, device: torch.device, dtype, overrides: dict) -> dict:
    """Median seconds per training step and the step's FLOPs."""
    config = load_config(recipe, {"batch_size_per_device": batch, **overrides})
    student, objective, model_config = pretrain.build_model(config, images=None)
    optimizer = build_optimizer(student, model_config.num_hidden_layers, config)
    precision = {torch.float32: "no", torch.bfloat16: "bf16"}[dtype]
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    student, optimizer = accelerator.prepare(student, optimizer)
    student.train()
    objective.to(device).train()
    values = schedules.values_at(config.warmup_steps, config, config.peak_lr(1))
    batch_tensors = synthetic_batch(config, model_config.patch_size, device)

    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(accelerator, student, objective, optimizer, batch_tensors, values, config.clip_grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    AcceleratorState._reset_state(reset_partial_state=True)  # the next model may ask for another precision
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "seconds": statistics.median(times),
        "flops": train_step_flops(config, model_config),
        "batch": batch,
        "images_per_s": batch / statistics.median(times),
        "memory_gib": memory,
    }


def main() -> None:
    """Measure every model and print (and optionally append) a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of one device")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU in fp32: checks the script only")
    parser.add_argument("--write", type=Path, help="append the table to this markdown file")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    steps, warmup = (2, 1) if args.tiny else (args.steps, args.warmup)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [
        f"### DINOv2 pretraining MFU ({name}, {str(dtype).removeprefix('torch.')}, peak {args.peak_tflops:g} TFLOP/s)",
        "",
        "| model | batch / device | step (ms) | images/s | TFLOP/step | MFU | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in args.models:
        recipe, batch = MODELS[label]
        result = measure(recipe, 2 if args.tiny else batch, steps, warmup, device, dtype, TINY if args.tiny else {})
        mfu = result["flops"] / result["seconds"] / (args.peak_tflops * 1e12)
        lines.append(
            f"| {label}{' (tiny)' if args.tiny else ''} | {result['batch']} | {1000 * result['seconds']:.1f} | "
            f"{result['images_per_s']:.1f} | {result['flops'] / 1e12:.3f} | {100 * mfu:.1f}% | "
            f"{result['memory_gib']:.1f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        with args.write.open("a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
