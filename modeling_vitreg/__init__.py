"""ViTReg for transformers: importing this package registers it with the Auto classes."""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
)

from .configuration_vitreg import ViTRegConfig
from .modeling_vitreg import (
    ViTRegBackbone,
    ViTRegForImageClassification,
    ViTRegModel,
    ViTRegModelOutput,
    ViTRegPreTrainedModel,
    split_tokens,
    to_feature_map,
)

AutoConfig.register(ViTRegConfig.model_type, ViTRegConfig, exist_ok=True)
AutoModel.register(ViTRegConfig, ViTRegModel, exist_ok=True)
AutoModelForImageClassification.register(ViTRegConfig, ViTRegForImageClassification, exist_ok=True)
AutoBackbone.register(ViTRegConfig, ViTRegBackbone, exist_ok=True)

# Saved models carry `auto_map` and a copy of this package's two modules, so they load as remote code.
ViTRegConfig.register_for_auto_class()
ViTRegModel.register_for_auto_class("AutoModel")
ViTRegForImageClassification.register_for_auto_class("AutoModelForImageClassification")
ViTRegBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "ViTRegConfig",
    "ViTRegModel",
    "ViTRegModelOutput",
    "ViTRegForImageClassification",
    "ViTRegBackbone",
    "ViTRegPreTrainedModel",
    "split_tokens",
    "to_feature_map",
]
