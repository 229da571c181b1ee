"""ViTReg: Vision Transformers with registers for the Hugging Face ecosystem."""

__version__ = "0.1.0"
