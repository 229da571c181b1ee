"""Model cards for every folder ViTReg writes, built on huggingface_hub's ModelCard."""

from .card import build_card, read_provenance, write_card

__all__ = ["build_card", "read_provenance", "write_card"]
