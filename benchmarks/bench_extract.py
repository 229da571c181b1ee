"""`vitreg extract` end to end against `pipeline("image-feature-extraction", batch_size=B)`, interleaved in one run.

Both read the same folder of real photos (scikit-image's, copied to `--images` files) with the same model (ViT-S/14
with 4 registers, random weights, fp32, CPU) and the same preprocessing (DINOv2's: short side to 256/224 of the
crop, center crop): decode -> resize -> forward, then vitreg writes Arrow shards and the pipeline returns lists.
Each round times each once (in a new random order); the table gives the median per-round ratio pipeline / extract
(> 1: extract is faster) with its interquartile range, and the images/s of each, for `--backend torch` and
`--backend onnxruntime` (extract's times are its loop, decode -> forward -> write: the one-time ONNX export is left
out, as the pipeline's construction is). Two more timings per round split
the gain: the bare forward on preprocessed batches and the preprocessing alone; with decoding overlapped with the
forward, extract can at best reach the forward's speed, so `(pre + forward) / forward` bounds the gain of overlap.

    python benchmarks/bench_extract.py [--rounds 7] [--images 48] [--batch-size 8] [--sizes 224 518] [--workers 1]
"""

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import pipeline

from vitreg.core import Provenance, image_processor, sample_photos
from vitreg.core.images import SAMPLE_PHOTOS
from vitreg.export import ONNXRuntimeModel, export_onnx
from vitreg.extract import extract_features, load_features
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel

SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, num_register_tokens=4)


def photo_folder(folder: Path, count: int) -> list[Path]:
    """`count` JPEG photos: scikit-image's real photos, repeated under new names."""
    originals = sample_photos(folder / "originals", SAMPLE_PHOTOS)
    paths = []
    for index in range(count):
        path = folder / "photos" / f"{index:04d}_{originals[index % len(originals)].name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(originals[index % len(originals)], path)
        paths.append(path)
    shutil.rmtree(folder / "originals")
    return paths


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); a single value stands for all three."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def measure(size: int, paths: list[Path], work: Path, args: argparse.Namespace) -> dict:
    """Interleaved rounds at one crop size; returns the medians and the ratio's quartiles."""
    torch.manual_seed(0)
    model = ViTRegModel(ViTRegConfig(**SMALL, image_size=518, layerscale_value=1e-5, attn_implementation="sdpa"))
    folder = save_model_folder(model.eval(), work / f"model-{size}", Provenance(kind="random"), crop_size=size)
    processor = image_processor(size)
    extractor = pipeline("image-feature-extraction", model=str(folder), device="cpu")
    out = work / f"features-{size}"

    def run_extract(backend: str = "torch") -> float:
        """Seconds of the extraction loop (decode -> forward -> write); the one-time export of the onnxruntime
        backend is left out, as the pipeline's construction is."""
        summary = extract_features((model, processor), paths[0].parent, out, batch_size=args.batch_size,
                                   workers=args.workers, what="cls,patch", overwrite=True, progress=False,
                                   backend=backend)  # fmt: skip
        return summary["seconds"]

    def run_pipeline():
        return extractor([str(p) for p in paths], batch_size=args.batch_size)

    reference = np.asarray(extractor(Image.open(paths[0]))[0])
    difference = 0.0
    for backend in ("torch", "onnxruntime"):  # warm-up, and the same features as the pipeline's
        run_extract(backend)
        ours = load_features(out).with_format("numpy")[0]
        difference = max(
            difference, np.abs(ours["cls"] - reference[0]).max(), np.abs(ours["patch"] - reference[5:]).max()
        )
    if difference > 1e-4:
        raise SystemExit(f"extract and pipeline differ by {difference:.2e}: benchmark invalid")
    pixels = [processor(Image.open(p).convert("RGB"), return_tensors="pt")["pixel_values"] for p in paths]
    batches = [torch.cat(pixels[i : i + args.batch_size]) for i in range(0, len(paths), args.batch_size)]

    def run_forward():
        with torch.inference_mode():
            for batch in batches:
                model(batch)

    exported = export_onnx(model, work / f"model-{size}.onnx", dynamic=True, optimize=True, overwrite=True)
    runtime = ONNXRuntimeModel(exported.path)  # the graph and session extract's onnxruntime backend runs

    def run_forward_onnxruntime():
        for batch in batches:
            runtime(batch)

    def run_preprocess():
        for p in paths:
            processor(Image.open(p).convert("RGB"), return_tensors="pt")

    jobs = {"extract": run_extract, "extract onnxruntime": lambda: run_extract("onnxruntime"), "pipeline": run_pipeline}
    jobs.update({"forward only": run_forward, "forward only onnxruntime": run_forward_onnxruntime})
    jobs["preprocess only"] = run_preprocess
    times = {name: [] for name in jobs}
    for _ in range(args.rounds):
        order = list(jobs)
        random.shuffle(order)
        for name in order:
            start = time.perf_counter()
            seconds = jobs[name]()
            times[name].append(seconds if name.startswith("extract") else time.perf_counter() - start)
    q1, ratio, q3 = quartiles([p / e for p, e in zip(times["pipeline"], times["extract"])])
    ort_q1, ort_ratio, ort_q3 = quartiles([p / e for p, e in zip(times["pipeline"], times["extract onnxruntime"])])
    seconds = {name: statistics.median(values) for name, values in times.items()}
    return {
        "size": size, "batch": args.batch_size, "workers": args.workers, "images": len(paths),
        "max_abs_difference": float(difference), "ratio": ratio, "ratio_q1": q1, "ratio_q3": q3,
        "ort_ratio": ort_ratio, "ort_q1": ort_q1, "ort_q3": ort_q3,
        "images_per_s": {name: len(paths) / s for name, s in seconds.items()},
        "overlap_bound": (seconds["preprocess only"] + seconds["forward only"]) / seconds["forward only"],
        "overlap_bound_onnxruntime": (seconds["preprocess only"] + seconds["forward only onnxruntime"])
        / seconds["forward only onnxruntime"],
    }  # fmt: skip


def load(averages: tuple[float, float, float]) -> str:
    """The 1, 5 and 15-minute load averages, as `uptime` prints them."""
    return " / ".join(f"{value:.2f}" for value in averages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per size")
    parser.add_argument("--images", type=int, default=48, help="photos in the folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="vitreg extract's decoding processes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 518], help="crop sizes")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    random.seed(0)
    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "runs": []}
    # ONNX Runtime's and extract's figures move with other jobs on the machine: the load is stated with each table.
    results["load_before"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        paths = photo_folder(Path(work), args.images)
        for size in args.sizes:
            results["runs"].append(measure(size, paths, Path(work), args))
    results["load_after"] = os.getloadavg()

    print(f"\nViT-S/14 reg4, fp32, CPU ({results['threads']} threads), {args.images} photos, {args.rounds} interleaved "
          "rounds; ratio = median per-round time pipeline / extract [IQR] (> 1: extract faster); load average "
          f"(1/5/15 min) {load(results['load_before'])} before, {load(results['load_after'])} after (quiet: well "
          f"below the {os.cpu_count()} cores)\n")  # fmt: skip
    print("| size | batch | pipeline img/s | extract img/s | pipeline / extract [IQR] | extract onnxruntime img/s "
          "| pipeline / extract onnxruntime [IQR] | forward only img/s (torch / onnxruntime) | preprocess only img/s "
          "| overlap bound (torch / onnxruntime) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in results["runs"]:
        speed = run["images_per_s"]
        print(f"| {run['size']} | {run['batch']} | {speed['pipeline']:.2f} | {speed['extract']:.2f} | "
              f"{run['ratio']:.3f} [{run['ratio_q1']:.3f}, {run['ratio_q3']:.3f}] | "
              f"{speed['extract onnxruntime']:.2f} | "
              f"{run['ort_ratio']:.3f} [{run['ort_q1']:.3f}, {run['ort_q3']:.3f}] | {speed['forward only']:.2f} / "
              f"{speed['forward only onnxruntime']:.2f} | {speed['preprocess only']:.1f} | "
              f"{run['overlap_bound']:.3f} / {run['overlap_bound_onnxruntime']:.3f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
