"""transformers' common model test-suite run on ViTReg, wired as transformers wires its in-tree Dinov2WithRegisters.

The suite comes from the transformers sdist (`python scripts/fetch_transformers_tests.py`, run by `make test`'s
set-up); this module fails at collection, naming that command, when it is missing. `ModelTesterMixin`,
`BackboneTesterMixin` and `ConfigTester` run unmodified; `tests/transformers_suite/` holds the model tester.
"""

import unittest

import torch
from transformers_suite.vision_encoder import (
    BackboneTesterMixin,
    ModelTesterMixin,
    VisionEncoderBackboneTests,
    VisionEncoderFamily,
    VisionEncoderModelTests,
)

from modeling_vitreg import ViTRegBackbone, ViTRegConfig, ViTRegForImageClassification, ViTRegModel

VITREG = VisionEncoderFamily(
    model_type=ViTRegConfig.model_type,
    config_class=ViTRegConfig,
    model_class=ViTRegModel,
    classification_class=ViTRegForImageClassification,
    backbone_class=ViTRegBackbone,
    # ViTReg refuses a width the heads do not divide (37 is not a multiple of the default 12 heads).
    config_tester_kwargs={"hidden_size": 37, "num_attention_heads": 1},
)


class ViTRegModelTest(VisionEncoderModelTests, ModelTesterMixin, unittest.TestCase):
    family = VITREG
    all_model_classes = VITREG.all_model_classes
    # The opt-in for models whose `_init_weights` covers every weight (the suite dates models by a copyright line).
    test_can_init_all_missing_weights_before_2023 = True

    def test_masked_image_modelling_trains_every_parameter(self):
        """With a mask token and `bool_masked_pos`, every parameter (the mask token too) gets a gradient."""
        model = ViTRegModel(self.model_tester.get_config()).train()
        pixel_values = torch.randn(2, 3, self.model_tester.image_size, self.model_tester.image_size)
        bool_masked_pos = torch.zeros(2, self.model_tester.mask_length, dtype=torch.bool)
        bool_masked_pos[:, ::3] = True
        model.gradient_checkpointing_enable()
        model(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state.square().mean().backward()
        no_gradient = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
        self.assertEqual(no_gradient, [])


class ViTRegBackboneTest(VisionEncoderBackboneTests, BackboneTesterMixin, unittest.TestCase):
    family = VITREG
