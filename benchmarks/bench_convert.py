"""Time and peak memory of converting full-size official-format checkpoints (DINOv2 ViT-L/14 and ViT-g/14, DINOv3
ViT-H+/16 and 7B/16), against a plain copy of the same file in the same run.

    .venv/bin/python benchmarks/bench_convert.py [--models dinov2_vitl14_reg4 dinov3_vith16plus ...] [--workdir DIR]

Each step runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own; "over imports" subtracts the peak
after the imports and, for a conversion, after converting a tiny checkpoint first (which imports what a conversion
imports lazily). DINOv2 checkpoints hold random values; DINOv3 ones a cheap pattern (and the real RoPE periods and
key-bias masks), written through a shared memory map so that even the 27 GB 7B/16 needs no memory to write. A model is
skipped when the disk has less than 2.1x its checkpoint free (checkpoint, then its copy or converted folder); the
checkpoints are deleted at the end.
"""

import argparse
import json
import math
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

STEP = r"""
import json, resource, shutil, sys, tempfile, time
step, source, target, dtype = sys.argv[1:5]
import torch
from vitreg import conversion
if step != "copy":
    with tempfile.TemporaryDirectory() as work:  # imports count towards the baseline, not the step
        tiny = conversion.write_random_checkpoint(f"{work}/tiny.pth", hidden_size=64, num_hidden_layers=1)
        conversion.convert(tiny, f"{work}/tiny", progress=False)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
if step == "copy":
    shutil.copyfile(source, target)
else:
    conversion.convert(source, target, progress=False, dtype=dtype or None)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_rss": peak, "baseline_rss": baseline}))
"""


WRITE = (
    "import sys; sys.path.insert(0, sys.argv[1]); import bench_convert; bench_convert.write_checkpoint(*sys.argv[2:])"
)


def run_step(step: str, source: Path, target: Path, dtype: str = "") -> dict:
    """Run one step in a fresh interpreter and return its time and memory."""
    output = subprocess.run(
        [sys.executable, "-c", STEP, step, str(source), str(target), dtype],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if output.returncode:
        raise RuntimeError(f"{step} {source.name} failed ({output.returncode}):\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def checkpoint_bytes(name: str) -> int:
    """The size of a float32 checkpoint of the official backbone `name`, from its shapes."""
    from vitreg.conversion import OFFICIAL_ARCHITECTURES, dinov3_shapes, official_config
    from vitreg.modeling_vitreg import ViTRegModel

    if name.startswith("dinov3"):
        return 4 * sum(math.prod(shape) for shape in dinov3_shapes(name).values())
    with torch.device("meta"):
        return 4 * ViTRegModel(official_config(OFFICIAL_ARCHITECTURES[name])).num_parameters()


def write_patterned_dinov3(path: Path, name: str) -> None:
    """A full-size DINOv3 hub checkpoint whose tensors are filled in place, a chunk at a time, through a shared map."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vitreg.conversion.dinov3 import bias_mask, dinov3_config, dinov3_shapes
    from vitreg.conversion.memory import mapped_ranges, release_pages
    from vitreg.modeling_vitreg.modeling_vitreg import rope_periods

    shapes = dinov3_shapes(name)
    with FakeTensorMode():
        layout = {key: torch.empty(shape) for key, shape in shapes.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(layout, path)  # the pickle and the zip records, with holes where the bytes go
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        tensors = torch.load(path, mmap=True, weights_only=True)
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    ranges = mapped_ranges(path)
    for key, tensor in tensors.items():
        if key == "rope_embed.periods":
            tensor.copy_(rope_periods(dinov3_config(name)))
        elif key.endswith("bias_mask"):
            tensor.copy_(bias_mask(tensor.shape[0]))
        else:
            for chunk in tensor.view(-1).split(2**24):  # 0, 0.001, ..., 0.25, 0, ...: exact in float32
                torch.arange(chunk.numel(), out=chunk).remainder_(251).mul_(1e-3)
        release_pages(tensor, ranges)  # the dirty pages stay in the page cache, out of this process
    del tensors


def write_checkpoint(path: str | Path, name: str) -> None:
    """A full-size official-layout checkpoint of `name` at `path`."""
    if name.startswith("dinov3"):
        write_patterned_dinov3(Path(path), name)
    else:
        from vitreg.conversion import write_random_checkpoint

        write_random_checkpoint(path, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["dinov2_vitl14_reg4", "dinov2_vitg14_reg4", "dinov3_vith16plus"]
    )
    parser.add_argument("--dtype", default="", help="also convert with this --dtype (e.g. float16)")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    args = parser.parse_args()
    gib = 2**30
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        for name in args.models:
            needed, free = 2.1 * checkpoint_bytes(name), shutil.disk_usage(workdir).free
            if free < needed:
                print(f"skipping {name}: {free / gib:.1f} GiB free, {needed / gib:.1f} GiB needed", file=sys.stderr)
                continue
            source = workdir / f"{name}_pretrain.pth"
            subprocess.run([sys.executable, "-c", WRITE, str(Path(__file__).parent), str(source), name], check=True)
            size = source.stat().st_size
            copy = run_step("copy", source, workdir / "copy.pth")
            (workdir / "copy.pth").unlink()
            converted = run_step("convert", source, workdir / name.replace("_", "-"))
            shutil.rmtree(workdir / name.replace("_", "-"))
            steps = [("plain copy", copy), ("vitreg convert", converted)]
            if args.dtype:
                steps.append(
                    (f"vitreg convert --dtype {args.dtype}", run_step("convert", source, workdir / "cast", args.dtype))
                )
                shutil.rmtree(workdir / "cast")
            for step, result in steps:
                extra = result["peak_rss"] - result["baseline_rss"]
                rows.append(
                    f"| {name} | {size / gib:.2f} | {step} | {result['seconds']:.1f} | {result['peak_rss'] / gib:.2f} "
                    f"| {extra / gib:.2f} | {extra / size:.3f}x |"
                )
                print(rows[-1], file=sys.stderr)
            source.unlink()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("| checkpoint | size GiB | step | seconds | peak RSS GiB | peak over imports GiB | over / size |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
