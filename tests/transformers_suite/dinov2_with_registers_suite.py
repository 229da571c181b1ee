"""The same common test-suite on transformers' in-tree Dinov2WithRegisters, for comparison with ViTReg.

Not collected by `make test` (the file name does not start with `test_`); run it explicitly:

    python -m pytest tests/transformers_suite/dinov2_with_registers_suite.py -q

The wiring is ViTReg's (`tests/test_transformers_common.py`) with the tester config transformers uses for
Dinov2WithRegisters (dropout 0.1), and without the skips of transformers' own test file, so the two models answer
the very same tests.
"""

import unittest

from transformers import (
    Dinov2WithRegistersBackbone,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
)

from .vision_encoder import (
    BackboneTesterMixin,
    ModelTesterMixin,
    VisionEncoderBackboneTests,
    VisionEncoderFamily,
    VisionEncoderModelTests,
)

DINOV2_WITH_REGISTERS = VisionEncoderFamily(
    model_type=Dinov2WithRegistersConfig.model_type,
    config_class=Dinov2WithRegistersConfig,
    model_class=Dinov2WithRegistersModel,
    classification_class=Dinov2WithRegistersForImageClassification,
    backbone_class=Dinov2WithRegistersBackbone,
    config_kwargs={"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "is_decoder": False},
)


class Dinov2WithRegistersModelTest(VisionEncoderModelTests, ModelTesterMixin, unittest.TestCase):
    family = DINOV2_WITH_REGISTERS
    all_model_classes = DINOV2_WITH_REGISTERS.all_model_classes


class Dinov2WithRegistersBackboneTest(VisionEncoderBackboneTests, BackboneTesterMixin, unittest.TestCase):
    family = DINOV2_WITH_REGISTERS
