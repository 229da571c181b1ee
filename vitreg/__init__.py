"""ViTReg: Vision Transformers with registers for the Hugging Face ecosystem.

One installed package, `vitreg`, whose subpackages are the repository's top-level folders:
`vitreg.modeling_vitreg` (the model), `vitreg.core` (errors, folders, provenance), `vitreg.model_cards`,
`vitreg.conversion`, `vitreg.training`, `vitreg.analysis`, and `vitreg.cli` (the `vitreg` command).
Importing `vitreg` imports nothing else.
"""

__version__ = "0.2.0"
