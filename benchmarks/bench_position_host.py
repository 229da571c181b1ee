"""Host time spent on position interpolation per forward: at the native grid and at another size, first call vs later.

A ViT-S/14 with 4 registers trained at 518 px (a 37 x 37 position grid, DINOv2's) interpolates its position table
for every image size. The host time of `interpolate_pos_encoding` (wall clock without device synchronisation: the
time the Python thread spends before the device can run on) is measured on a fresh model for its first call at a
size and for the later calls, at the native 518 x 518 and at `--size`; the resampling-matrix builds are counted by
the model's cache. The last row rebuilds the matrices on every call, as ViTReg did before they were cached (and
still does at the native grid in the old code): the work a forward no longer does.

    python benchmarks/bench_position_host.py [--device cpu] [--calls 200] [--size 448 672]
"""

import argparse
import statistics
import time

import torch

from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel
from vitreg.modeling_vitreg.position_interpolation import resampling_matrices

SMALL = dict(hidden_size=384, num_hidden_layers=1, num_attention_heads=6, patch_size=14, num_register_tokens=4)


def host_ms(function, device: torch.device) -> float:
    """Milliseconds the host spends in `function()`, after the device has finished earlier work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) * 1e3


def measure(size: tuple[int, int], calls: int, device: torch.device) -> list[tuple[str, int, float]]:
    """(call, matrix builds, host ms) of a fresh model's first call at `size` and the median of its later calls."""
    model = ViTRegModel(ViTRegConfig(**SMALL, image_size=518)).to(device).eval()
    embeddings = model.embeddings
    with torch.no_grad():
        first = host_ms(lambda: embeddings.interpolate_pos_encoding(*size), device)
        builds = embeddings.resampling.builds
        later = [host_ms(lambda: embeddings.interpolate_pos_encoding(*size), device) for _ in range(calls)]
    return [("first", builds, first), ("later", embeddings.resampling.builds - builds, statistics.median(later))]


def build_ms(size: tuple[int, int], calls: int, device: torch.device) -> float:
    """Median host ms of building the resampling matrices of `size` once more: what a cached call no longer does."""
    config = ViTRegConfig(**SMALL, image_size=518)
    grid, patch = config.image_size // config.patch_size, config.patch_size
    rows, cols = size[0] // patch, size[1] // patch
    offset, antialias = config.interpolate_offset, config.interpolate_antialias
    resampling_matrices(grid, rows, cols, offset, antialias, device)
    times = [
        host_ms(lambda: resampling_matrices(grid, rows, cols, offset, antialias, device), device) for _ in range(calls)
    ]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--calls", type=int, default=200, help="later calls timed per size (default: 200)")
    parser.add_argument("--size", type=int, nargs=2, default=(448, 672), metavar=("H", "W"), help="the other size")
    args = parser.parse_args()
    device = torch.device(args.device)
    other = tuple(args.size)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, {args.calls} later calls")
    print(f"{'size':>18} | {'call':>22} | {'matrix builds':>13} | {'host ms':>8}")
    print("-" * 72)
    for label, size in (("518x518 (native)", (518, 518)), (f"{other[0]}x{other[1]}", other)):
        for call, builds, ms in measure(size, args.calls, device):
            print(f"{label:>18} | {call:>22} | {builds:>13} | {ms:8.3f}")
    ms = build_ms(other, args.calls, device)
    print(f"{f'{other[0]}x{other[1]}':>18} | {'the build alone':>22} | {'1 per call':>13} | {ms:8.3f}")
    print("(before the cache, every call at a size other than the native one paid the build, and the native one too)")


if __name__ == "__main__":
    main()
