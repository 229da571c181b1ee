"""Time and peak memory of converting full-size official-format ViT-L/14 and ViT-g/14 checkpoints (random values),
against a plain copy of the same file in the same run.

    .venv/bin/python benchmarks/bench_convert.py [--models dinov2_vitl14_reg4 dinov2_vitg14_reg4] [--workdir DIR]

Each step runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own; the checkpoints are deleted at the
end. Needs about 3x the checkpoint size of free disk (checkpoint, copy, converted folder).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STEP = r"""
import json, resource, shutil, sys, time
step, source, target, dtype = sys.argv[1:5]
import torch, conversion  # imports count towards the baseline, not the step
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


def run_step(step: str, source: Path, target: Path, dtype: str = "") -> dict:
    """Run one step in a fresh interpreter and return its time and memory."""
    output = subprocess.run(
        [sys.executable, "-c", STEP, step, str(source), str(target), dtype],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["dinov2_vitl14_reg4", "dinov2_vitg14_reg4"])
    parser.add_argument("--dtype", default="", help="also convert with this --dtype (e.g. float16)")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    args = parser.parse_args()
    gib = 2**30
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        for name in args.models:
            source = workdir / f"{name}_pretrain.pth"
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys, conversion; conversion.write_random_checkpoint(sys.argv[1], sys.argv[2])",
                    str(source),
                    name,
                ],
                check=True,
            )
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
                    f"| {extra / gib:.2f} | {extra / size:.2f}x |"
                )
            source.unlink()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("| checkpoint | size GiB | step | seconds | peak RSS GiB | peak over imports GiB | over / size |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
