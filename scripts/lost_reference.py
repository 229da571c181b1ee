"""Run the official LOST code on fixed inputs; store its outputs, which tests/test_analysis_lost.py compares with ours.

    python scripts/lost_reference.py --lost-repo PATH --out tests/data/lost_reference.json [--commit SHA]

LOST (valeoai/LOST) cannot be installed (the PyPI package `lost` is an unrelated stub) and CI has no network, so
this script imports `object_discovery.py` and `datasets.py` from a checkout of it given on the command line: a git
work tree (`git -C LOST_GIT_DIR worktree add /tmp/lost-checkout HEAD`; its commit is read from it) or an export
(`mkdir /tmp/lost-checkout && git -C LOST_GIT_DIR archive HEAD -- '*.py' | tar -x -C /tmp/lost-checkout`, then pass
the commit with --commit). It writes only the outputs of its functions; no official code is copied into this
repository. The inputs are rebuilt from seeds by `case_keys` / `case_image` below, which the test imports, and their
SHA-256 is stored so the test can tell a changed generator from a changed result. What is recorded:

- `lost`: per key tensor, the official `lost()`'s box in pixels (with its padding clip) and seed; the patch order of
  `patch_scoring()` (its first k), the grid box of `detect_box()`, and the expanded set (the k lowest-degree patches
  that correlate positively with the seed), rebuilt from that order and checked against the vote map that `lost()`
  passes to `detect_box()`, which the script intercepts. Degenerate inputs record the official error.
- `iou`: `datasets.bbox_iou` and the CorLoc decision (IoU >= 0.5 with any box) on integer boxes, 0.5 ties included.
- `pixels`: `datasets.transform` (ToTensor + ImageNet normalisation) of a seeded non-square image, as a SHA-256.

The official modules import torch, scipy, numpy, torchvision, scikit-image, PIL and tqdm at top level; all are in the
project's test environment. Of these, scikit-image (`skimage.io`) and tqdm serve only datasets.py's dataset classes:
when one is missing it is replaced, in this process only, by a stub in `sys.modules` whose attributes raise when
called, and the JSON lists it under `stubbed`. torch, scipy, numpy, torchvision and PIL are needed for real.
The tie order among equal degrees is that of torch's unstable descending argsort, so the JSON records the torch
version it was made with.
"""

import argparse
import hashlib
import importlib
import importlib.machinery
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

OFFICIAL_FILES = ("object_discovery.py", "datasets.py")
# Imported at the top of datasets.py for its dataset classes only, which this script does not use: stubbed when
# missing. torch, scipy (detect_box's connected components) and torchvision (the image transform) are needed.
STUBBABLE = ("skimage", "skimage.io", "tqdm")

# (name, seed, kind, (rows, cols), dim, k, patch_size, (height, width) of the image before padding)
CASES = [
    ("scene-voc-like", 0, "scene", (27, 36), 32, 100, 14, (375, 500)),
    ("scene-portrait", 1, "scene", (23, 15), 16, 100, 16, (353, 229)),
    ("scene-small-k", 2, "scene", (12, 17), 8, 5, 8, (90, 131)),
    ("scene-k1", 3, "scene", (9, 13), 8, 1, 14, (120, 177)),
    ("scene-artifacts", 4, "artifacts", (20, 26), 24, 100, 14, (275, 360)),
    ("gaussian", 5, "gaussian", (19, 24), 64, 100, 14, (260, 330)),
    ("noise-ties", 6, "noise", (11, 14), 3, 100, 16, (170, 210)),
    ("noise-ties-small-k", 7, "noise", (16, 21), 2, 7, 14, (217, 290)),
    ("identical-keys", 8, "identical", (7, 9), 4, 100, 14, (92, 121)),
    ("two-objects", 9, "two-objects", (10, 16), 6, 100, 14, (137, 220)),
    ("diagonal-touch", 10, "diagonal", (8, 11), 4, 100, 14, (108, 150)),
    ("k-above-patches", 11, "scene", (3, 4), 4, 100, 14, (40, 56)),
    ("single-row", 12, "scene", (1, 9), 4, 100, 14, (10, 120)),
    ("zero-seed", 13, "zero-seed", (6, 8), 4, 100, 14, (80, 101)),
    ("all-zero", 14, "zeros", (5, 7), 4, 100, 14, (70, 95)),
]

# (predicted box, ground-truth boxes): integer pixel boxes as LOST has them, with IoU exactly 0.5 (small and large:
# LOST's 1e-7 epsilons in float32 decide those) and the usual cases.
IOU_CASES = [
    ([0, 0, 2, 1], [[0, 0, 1, 1]]),
    ([0, 0, 200, 100], [[0, 0, 100, 100]]),
    ([0, 0, 28, 14], [[0, 0, 14, 14]]),
    ([14, 28, 112, 98], [[14, 28, 63, 98], [0, 0, 10, 10]]),
    ([0, 0, 224, 224], [[0, 0, 224, 224]]),
    ([10, 10, 20, 20], [[30, 30, 40, 40]]),
    ([0, 0, 140, 84], [[20, 10, 130, 90], [100, 50, 300, 200]]),
    ([42, 0, 500, 375], [[0, 0, 499, 374], [150, 100, 151, 101]]),
    ([0, 0, 3, 3], [[1, 1, 4, 4], [0, 0, 2, 3]]),
]

PIXELS_CASE = (20, (37, 53))  # seed, (height, width) of a random image


def case_keys(seed: int, kind: str, grid: tuple[int, int], dim: int) -> torch.Tensor:
    """`[rows * cols, dim]` float32 keys, row-major over the grid; except `gaussian`, multiples of 1/4 (exact sums)."""
    rng = np.random.default_rng(seed)
    rows, cols = grid
    if kind == "gaussian":
        return torch.from_numpy(rng.standard_normal((rows * cols, dim), dtype=np.float32))
    if kind == "zeros":
        return torch.zeros(rows * cols, dim)
    if kind == "noise":  # few distinct, non-zero keys: many equal degrees
        return torch.from_numpy(rng.choice(np.array([-2, -1, 1, 2], dtype=np.float32), (rows * cols, dim)) / 4)
    if kind == "identical":
        return torch.from_numpy(np.tile(rng.integers(1, 4, dim).astype(np.float32) / 4, (rows * cols, 1)))
    background, foreground = rng.integers(-2, 3, dim), rng.integers(-2, 3, dim)
    while foreground @ background >= 0:  # the object correlates negatively with the background
        foreground = rng.integers(-2, 3, dim)
    labels = np.zeros(grid, dtype=bool)
    if kind == "two-objects":
        labels[1:4, 2:4] = labels[3:5, 2:7] = True  # an L
        labels[6:9, 10:14] = True  # the same direction elsewhere, not connected
    elif kind == "diagonal":
        labels[2:4, 2:4] = True
        labels[4:6, 4:7] = True  # touches the first only at a corner: another 4-connected component
    else:
        height, width = max(1, rows // 2), max(1, cols // 2)
        row, col = rng.integers(0, rows - height + 1), rng.integers(0, cols - width + 1)
        labels[row : row + height, col : col + width] = True
    keys = np.where(labels.reshape(-1, 1), foreground, background) + rng.integers(-1, 2, (rows * cols, dim))
    if kind == "artifacts":  # a few high-norm background tokens, as in large ViTs without registers
        chosen = rng.choice(np.flatnonzero(~labels.ravel()), size=max(1, rows * cols // 50), replace=False)
        keys[chosen] = 8 * background
    if kind == "zero-seed":
        keys[rng.integers(0, rows * cols)] = 0  # no positive similarity: the lowest degree, and no votes
    return torch.from_numpy(keys.astype(np.float32) / 4)


def case_image(seed: int, size: tuple[int, int]):
    """A random RGB `PIL.Image` of `(height, width)`."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's float32 bytes (contiguous, row-major)."""
    return hashlib.sha256(tensor.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()


def git_blob(path: Path) -> str:
    """The git blob id of a file: `git ls-tree COMMIT FILE` in the official repository shows the same id."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def stub(name: str) -> types.ModuleType:
    """A stand-in module for `name`: any attribute is a function that raises, so imports succeed and uses fail."""

    def unavailable(attribute: str):
        if attribute.startswith("__"):  # module protocol (__file__, __path__, ...): absent, as on a real module
            raise AttributeError(attribute)

        def call(*args, **kwargs):
            raise RuntimeError(f"{name}.{attribute} is a stub in scripts/lost_reference.py: install {name}")

        return call

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)  # torch looks specs up
    module.__path__ = []  # a package, so that `import skimage.io` finds the stub of the submodule
    module.__getattr__ = unavailable  # PEP 562: looked up for every attribute the module lacks
    return module


def import_official(repo: Path) -> tuple[types.ModuleType, types.ModuleType, list[str]]:
    """LOST's `object_discovery` and `datasets` modules from `repo`, and the names of any stubbed imports."""
    missing = [name for name in OFFICIAL_FILES if not (repo / name).is_file()]
    if missing:
        raise SystemExit(f"{repo} is not a LOST checkout: {', '.join(missing)} missing")
    stubbed = []
    for name in STUBBABLE:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = stub(name)
            stubbed.append(name)
    sys.modules.pop("datasets", None)  # LOST's datasets.py, not Hugging Face's `datasets`
    sys.path.insert(0, str(repo))
    datasets = importlib.import_module("datasets")
    discovery = importlib.import_module("object_discovery")
    for module in (datasets, discovery):
        if Path(module.__file__).resolve().parent != repo.resolve():
            raise SystemExit(f"imported {module.__name__} from {module.__file__}, not from {repo}")
    return discovery, datasets, stubbed


def run_lost(discovery: types.ModuleType, case: tuple) -> dict:
    """The official outputs on one case."""
    name, seed, kind, grid, dim, k, patch, size = case
    keys = case_keys(seed, kind, grid, dim)
    record = {
        "name": name,
        "seed": seed,
        "kind": kind,
        "grid": list(grid),
        "dim": dim,
        "k": k,
        "patch_size": patch,
        "image_size": list(size),
        "keys_sha256": sha256(keys),
    }
    seen = {}
    official_detect_box = discovery.detect_box

    def detect_box(votes, seed, dims, **kwargs):  # records what lost() passes on and gets back from the official one
        seen["votes"], seen["seed"] = votes.clone(), int(seed)
        seen["result"] = official_detect_box(votes, seed, dims, **kwargs)
        return seen["result"]

    feats = keys[None]  # [1, hw, D], as main_lost.py passes them
    discovery.detect_box = detect_box
    try:
        pred, similarity, _, seed_index = discovery.lost(feats, list(grid), [patch, patch], (3, *size), k_patches=k)
        record["error"] = None
    except ValueError as error:
        pred, similarity = None, (feats @ feats.transpose(1, 2)).squeeze()
        record["error"] = f"{type(error).__name__}: {error}"
        seed_index = seen["seed"]
    finally:
        discovery.detect_box = official_detect_box
    order = discovery.patch_scoring(similarity)[0]
    candidates = order[:k]
    expanded = candidates[similarity[seed_index, candidates] > 0.0]
    if not torch.equal(similarity[expanded, :].sum(dim=0), seen["votes"]):
        raise SystemExit(f"{name}: the rebuilt expanded set does not give the votes lost() used")
    rows, cols = grid
    record["order"] = candidates.tolist()
    record["seed_patch"] = [int(seed_index) // cols, int(seed_index) % cols]
    record["expanded"] = expanded.tolist()
    record["positive_votes"] = int((seen["votes"] > 0).sum())
    if pred is not None:
        record["grid_box"] = [int(v) for v in seen["result"][1]]  # [row0, col0, row1, col1], exclusive ends
        record["box"] = [int(v) for v in pred]  # [x0, y0, x1, y1] pixels, clipped to the image
    return record


def run_iou(datasets: types.ModuleType, box: list, gt_boxes: list) -> dict:
    """`bbox_iou` and main_lost.py's CorLoc decision for one prediction."""
    ious = datasets.bbox_iou(torch.from_numpy(np.asarray(box)), torch.from_numpy(np.asarray(gt_boxes)))
    return {"box": box, "gt_boxes": gt_boxes, "ious": ious.tolist(), "correct": bool(torch.any(ious >= 0.5))}


def run_pixels(datasets: types.ModuleType) -> dict:
    """The official transform of a seeded image, as a digest."""
    seed, size = PIXELS_CASE
    pixels = datasets.transform(case_image(seed, size))  # [3, H, W]
    return {"seed": seed, "image_size": list(size), "shape": list(pixels.shape), "sha256": sha256(pixels)}


def dumps(reference: dict) -> str:
    """Indented JSON with every list of numbers on one line."""
    text = json.dumps(reference, indent=1)
    return re.sub(r"\[\s+([-+0-9.e,\s]*?)\s+\]", lambda match: "[" + " ".join(match.group(1).split()) + "]", text)


def commit_of(repo: Path) -> str | None:
    """The checkout's commit, when it is the top of a git work tree (not a folder inside another repository)."""
    try:
        found = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    lines = found.stdout.split()
    if found.returncode or len(lines) != 2 or Path(lines[0]).resolve() != repo.resolve():
        return None
    return lines[1]


def main(argv: list[str] | None = None) -> int:
    """Write the reference JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lost-repo", required=True, type=Path, help="a checkout of github.com/valeoai/LOST")
    parser.add_argument("--out", required=True, type=Path, help="the JSON to write")
    parser.add_argument("--commit", help="the checkout's commit, when it is not a git work tree (e.g. git archive)")
    args = parser.parse_args(argv)
    discovery, datasets, stubbed = import_official(args.lost_repo)
    commit = args.commit or commit_of(args.lost_repo)
    if commit is None:
        raise SystemExit(f"{args.lost_repo} is not a git work tree: give its commit with --commit")
    import scipy

    reference = {
        "source": {
            "repository": "https://github.com/valeoai/LOST",
            "commit": commit,
            "blobs": {name: git_blob(args.lost_repo / name) for name in OFFICIAL_FILES},
        },
        "command": "python scripts/lost_reference.py --lost-repo PATH --out tests/data/lost_reference.json"
        + (f" --commit {args.commit}" if args.commit else ""),
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__},
        "stubbed": stubbed,
        "lost": [run_lost(discovery, case) for case in CASES],
        "iou": [run_iou(datasets, box, gt) for box, gt in IOU_CASES],
        "pixels": run_pixels(datasets),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(reference) + "\n")
    print(f"wrote {args.out}: {len(reference['lost'])} LOST cases, {len(reference['iou'])} IoU cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
