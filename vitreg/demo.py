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

from vitreg.core.images import sample_photos
from vitreg.core.logs import show_library_logs


def banner(text: str) -> None:
    """Print a section header."""
    print(f"\n=== {text} ===", flush=True)


def feature_extraction(workdir: Path, photos: list[Path]) -> None:
    """Build a small ViTReg, save it, and extract features from the photos through the pipeline."""
    from transformers import pipeline

    from vitreg.core.provenance import Provenance
    from vitreg.model_cards import save_model_folder
    from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel

    banner("1. a small ViTReg through pipeline('image-feature-extraction')")
    torch.manual_seed(0)
    config = ViTRegConfig(
        hidden_size=192, num_hidden_layers=6, num_attention_heads=3, patch_size=14, image_size=224,
        num_register_tokens=4, layerscale_value=1e-5,
    )  # fmt: skip
    folder = save_model_folder(
        ViTRegModel(config), workdir / "vitreg-small-random", Provenance(kind="random"), overwrite=True
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


def conversion(workdir: Path) -> Path:
    """Write a ViT-S/14 reg4 checkpoint in the official layout (random values), convert it and verify every token."""
    from vitreg.conversion import convert, write_random_checkpoint

    banner("2. converting an official-layout DINOv2 checkpoint (dinov2_vits14_reg4, random values)")
    source = write_random_checkpoint(workdir / "official" / "dinov2_vits14_reg4_pretrain.pth", "dinov2_vits14_reg4")
    print(f"wrote {source} ({source.stat().st_size / 2**20:.0f} MiB, the official key names and shapes)")
    start = time.perf_counter()
    folder = convert(source, workdir / "dinov2-vits14-reg4", overwrite=True, verify=True)
    print(f"converted into {folder} in {time.perf_counter() - start:.1f} s")
    return folder


def pretraining(workdir: Path, photos: list[Path]) -> Path:
    """Pretrain a tiny ViT with 4 registers DINOv2-style on the photos; extract features with the exported teacher."""
    from transformers import pipeline

    from vitreg.cli import main as vitreg

    banner("3. DINOv2-style pretraining of a tiny ViT with registers on the photos (configs/smoke-dinov2.yaml)")
    run_dir = workdir / "pretrain-smoke"
    command = ["pretrain", "--config", "smoke-dinov2", "--data_dir", str(photos[0].parent), "--output_dir",
               str(run_dir), "--overwrite"]  # fmt: skip
    print("vitreg " + " ".join(command))
    if vitreg(command) != 0:
        raise SystemExit("demo: pretraining failed")
    model_dir = run_dir / "model"
    extractor = pipeline("image-feature-extraction", model=str(model_dir))
    features = np.asarray(extractor(Image.open(photos[0]), pool=True))
    print(f"the exported teacher loads with pipeline(): CLS feature of {photos[0].name} has shape {features.shape}")
    return model_dir


def publishing(model_dir: Path) -> None:
    """Rewrite the trained model's card and dry-run its publication (no network, no token)."""
    from vitreg import model_cards
    from vitreg.model_cards.publish import publish_folder, report

    banner("4. model card and a dry-run publish")
    card = model_cards.write_card(model_dir, model_cards.read_provenance(model_dir), repo_id="vitreg-demo/tiny-reg4")
    print(f"card metadata: {card.data.to_dict()}")
    report(publish_folder(model_dir, "vitreg-demo/tiny-reg4", dry_run=True), dry_run=True)


def analysis(workdir: Path, model_dir: Path, photos: list[Path]) -> None:
    """Measure token norms, outliers and CLS attention of the trained model on the photos."""
    from vitreg.analysis import run_analysis

    banner("5. artifact analysis of the trained model on the same photos")
    out = workdir / "analysis"
    report = run_analysis(model_dir, photos, out, image_size=224, overwrite=True)
    summary = report["summary"]
    print(f"high-norm patch tokens: {summary['outlier_fraction']:.2%} of patches")
    print(f"report: {out / 'report.json'}\nfigures and summary: {out / 'index.html'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitreg.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-output"))
    args = parser.parse_args(argv)
    show_library_logs()  # the conversion's verification, the run's progress notes
    args.workdir.mkdir(parents=True, exist_ok=True)
    photos = sample_photos(args.workdir / "photos")
    print(f"{len(photos)} photos from scikit-image in {args.workdir / 'photos'}")
    feature_extraction(args.workdir, photos)
    conversion(args.workdir)
    model_dir = pretraining(args.workdir, photos)
    publishing(model_dir)
    analysis(args.workdir, model_dir, photos)
    banner(f"done: everything is in {args.workdir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
