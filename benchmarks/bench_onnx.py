"""ONNX export of ViT-S/14 reg4: exactness at any size, export cost, and ONNX Runtime's speed against PyTorch peers.

One dynamic graph per model (exported at 224 x 224) is compared with PyTorch on every output at 224², 518², 224x308
and 392x182 (a size the export never saw), for a register model (antialiased interpolation) and a no-register one
(0.1 offset). Speed: ONNX Runtime (CPU, all graph optimisations) against ViTReg eager, timm and transformers holding
the same weights, at batch 8 / 224 px and batch 1 / 518 px, interleaved in a new random order each round. The
figure is the median over rounds of the per-round ratio ORT time / the fastest PyTorch peer's time in that round,
with its interquartile range; the goal is <= 0.85.

    python benchmarks/bench_onnx.py [--rounds 10] [--workloads 8x224 1x518] [--json out.json]
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_inference import SMALL, build_vitreg, quartiles, time_call, to_timm, to_transformers, workload

from vitreg.export import ONNXRuntimeModel, export_onnx
from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel

PARITY_SIZES = [(224, 224), (518, 518), (224, 308), (392, 182)]


def no_register_model() -> ViTRegModel:
    """ViT-S/14 without registers, DINOv2's 0.1-offset interpolation."""
    config = dict(SMALL, num_register_tokens=0)
    config = ViTRegConfig(**config, image_size=518, interpolate_antialias=False, interpolate_offset=0.1)
    return ViTRegModel(config).eval()


def with_trained_looking_positions(model: ViTRegModel) -> ViTRegModel:
    """Position embeddings of unit scale, as trained ones are, so interpolation errors would show."""
    with torch.no_grad():
        torch.nn.init.trunc_normal_(model.embeddings.position_embeddings, std=0.5, a=-1.0, b=1.0)
    return model


def parity(model: ViTRegModel, path: Path) -> dict[str, float]:
    """Worst |ORT - PyTorch| over every output at each size."""
    runtime = ONNXRuntimeModel(path, threads=torch.get_num_threads())
    diffs = {}
    for height, width in PARITY_SIZES:
        pixel_values = torch.randn(2, 3, height, width)
        with torch.inference_mode():
            expected = model(pixel_values)
        got = runtime(pixel_values)
        diffs[f"{height}x{width}"] = max(
            float(np.abs(got[name] - expected[name].numpy()).max(initial=0.0)) for name in runtime.output_names
        )
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds per workload")
    parser.add_argument("--repeats", type=int, default=3, help="forward passes per timing")
    parser.add_argument("--workloads", type=workload, nargs="+", default=[(8, 224), (1, 518)])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    results = {"threads": torch.get_num_threads(), "exports": [], "speed": []}
    workdir = Path(tempfile.mkdtemp(prefix="bench-onnx-"))

    models = {
        "ViT-S/14 reg4 (antialiased)": with_trained_looking_positions(build_vitreg()),
        "ViT-S/14, no registers (0.1 offset)": with_trained_looking_positions(no_register_model()),
    }
    graphs = {}
    for index, (name, model) in enumerate(models.items()):
        report = export_onnx(model, workdir / f"model{index}.onnx", dynamic=True, image_size=(224, 224))
        graphs[name] = report.path
        row = {
            "model": name,
            "export_s": report.seconds,
            "mib": report.bytes / 2**20,
            "max_abs_diff": parity(model, report.path),
        }
        results["exports"].append(row)
        print(f"{name}: exported in {row['export_s']:.1f} s, {row['mib']:.1f} MiB; max |ORT - PyTorch| "
              + ", ".join(f"{size} {diff:.1e}" for size, diff in row["max_abs_diff"].items()))  # fmt: skip

    vitreg = next(iter(models.values()))
    runtime = ONNXRuntimeModel(graphs["ViT-S/14 reg4 (antialiased)"], threads=torch.get_num_threads())
    timm_model, transformers_model = to_timm(vitreg), to_transformers(vitreg)
    runners = {
        "onnxruntime": lambda x: runtime(x.numpy())["last_hidden_state"],
        "vitreg eager": lambda x: vitreg(x).last_hidden_state,
        "timm": lambda x: timm_model.forward_features(x),
        "transformers": lambda x: transformers_model(pixel_values=x).last_hidden_state,
    }
    pytorch = [name for name in runners if name != "onnxruntime"]
    for batch, size in args.workloads:
        x = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            reference = runners["vitreg eager"](x)
            for name, run in runners.items():
                diff = float((torch.as_tensor(np.asarray(run(x))) - reference).abs().max())
                if diff > 1e-4:
                    raise SystemExit(f"{name} computes something else (max diff {diff:.1e}): benchmark invalid")
            times = {name: [] for name in runners}
            for _ in range(args.rounds):
                order = list(runners)
                random.shuffle(order)
                for name in order:
                    times[name].append(time_call(lambda n=name, x=x: runners[n](x), args.repeats))
        fastest = [min(times[name][r] for name in pytorch) for r in range(args.rounds)]
        for name in runners:
            q1, ratio, q3 = quartiles([t / f for t, f in zip(times[name], fastest)])
            results["speed"].append({
                "batch": batch, "size": size, "runtime": name, "ms": statistics.median(times[name]) * 1e3,
                "ratio_to_fastest_pytorch": ratio, "q1": q1, "q3": q3,
            })  # fmt: skip

    print(f"\nViT-S/14 reg4, fp32, CPU ({results['threads']} threads), {args.rounds} interleaved rounds; ratio = "
          "median per-round time / the fastest PyTorch peer's time in that round [IQR]\n")  # fmt: skip
    print("| batch x size | runtime | ms / batch (median) | vs fastest PyTorch [IQR] |")
    print("|---|---|---|---|")
    for run in results["speed"]:
        print(f"| {run['batch']} x {run['size']} | {run['runtime']} | {run['ms']:.1f} | "
              f"{run['ratio_to_fastest_pytorch']:.3f} [{run['q1']:.3f}, {run['q3']:.3f}] |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - start:.0f} s)")
