"""`make demo`: ViTReg end to end on real photos, offline, on the CPU, in a few minutes.

1. build a small ViTReg, save it as a Hub-ready folder, extract features through `pipeline(...)`;
2. convert an official-layout DINOv2 checkpoint and verify it against timm;
3. pretrain a tiny ViT with registers DINOv2-style on the photos and export the teacher;
4. write its model card and dry-run a publish;
5. analyse the trained model's token norms and attention maps on the same photos.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry")


def banner(text: str) -> None:
    """Print a section header."""
    print(f"\n=== {text} ===", flush=True)


def write_photos(folder: Path) -> list[Path]:
    """Save the real photographs scikit-image ships as JPEG files in `folder`."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = folder / f"{name}.jpg"
        Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").save(path, quality=95)
        paths.append(path)
    return paths


def feature_extraction(workdir: Path, photos: list[Path]) -> None:
    """Build a small ViTReg, save it, and extract features from the photos through the pipeline."""
    from transformers import pipeline

    from modeling_vitreg import ViTRegConfig, ViTRegModel
    from vitreg.hub import save_model_folder

    banner("1. a small ViTReg through pipeline('image-feature-extraction')")
    torch.manual_seed(0)
    config = ViTRegConfig(
        hidden_size=192, num_hidden_layers=6, num_attention_heads=3, patch_size=14, image_size=224,
        num_register_tokens=4, layerscale_value=1e-5,
    )  # fmt: skip
    folder = save_model_folder(
        ViTRegModel(config), workdir / "vitreg-small-random", {"kind": "random"}, overwrite=True
    )
    print(f"saved {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    extractor = pipeline("image-feature-extraction", model=str(folder))
    images = [Image.open(path) for path in photos]
    start = time.perf_counter()
    tokens = extractor(images)
    pooled = extractor(images, pool=True)
    seconds = time.perf_counter() - start
    shape = np.asarray(tokens[0]).shape
    print(f"tokens per image: {shape} = [1, 1 CLS + {config.num_register_tokens} registers + 16x16 patches, D]")
    print(f"pooled (CLS) per image: {np.asarray(pooled[0]).shape}")
    print(f"{2 * len(images)} pipeline calls in {seconds:.2f} s ({seconds / (2 * len(images)) * 1e3:.0f} ms/image)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitreg.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-output"))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    photos = write_photos(args.workdir / "photos")
    print(f"{len(photos)} photos from scikit-image in {args.workdir / 'photos'}")
    feature_extraction(args.workdir, photos)
    return 0


if __name__ == "__main__":
    sys.exit(main())
