"""A correct minimal model card; the model-cards issue grows it into the full generator."""

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


def build_card(folder: str | Path, provenance: dict, repo_id: str | None = None) -> ModelCard:
    """The card of the ViTReg folder `folder` (which holds config.json), given how it was produced."""
    config = json.loads((Path(folder) / "config.json").read_text())
    architectures = config.get("architectures") or ["ViTRegModel"]
    is_classifier = architectures[0].endswith("ForImageClassification")
    data = ModelCardData(
        license=provenance.get("license", "apache-2.0"),
        library_name="transformers",
        pipeline_tag="image-classification" if is_classifier else "image-feature-extraction",
        tags=["vitreg", "vision", "registers"] + (["dinov2"] if provenance.get("dinov2") else []),
    )
    name = repo_id or provenance.get("name") or Path(folder).name
    lines = "\n".join(f"- {key}: {value}" for key, value in provenance.items())
    content = (
        f"---\n{data.to_yaml()}\n---\n\n# {name}\n\n"
        f"A ViTReg model: a Vision Transformer with {config.get('num_register_tokens', 0)} register tokens.\n\n"
        f"## How this folder was produced\n\n{lines}\n"
    )
    return ModelCard(content)


def write_card(folder: str | Path, provenance: dict, repo_id: str | None = None) -> ModelCard:
    """Write `README.md` into `folder` and return the card."""
    card = build_card(folder, provenance, repo_id)
    card.save(Path(folder) / "README.md")
    return card
