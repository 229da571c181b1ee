"""A model tester and the per-model tests transformers writes for DINOv2-like encoders, for any such family.

transformers' `tests/models/<model>/test_modeling_<model>.py` pairs its mixins with a `ModelTester` (a tiny config
and random pixels) and a few model-specific tests. `VisionEncoderFamily` names what differs between families, so
ViTReg and transformers' own `Dinov2WithRegisters` run through exactly the same wiring.
"""

import copy
import unittest
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from unittest import mock

from torch import nn
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

from . import add_suite_to_path

add_suite_to_path()

from tests.test_backbone_common import BackboneTesterMixin  # noqa: E402
from tests.test_configuration_common import ConfigTester  # noqa: E402
from tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor  # noqa: E402

__all__ = [
    "BackboneTesterMixin",
    "ModelTesterMixin",
    "VisionEncoderBackboneTests",
    "VisionEncoderFamily",
    "VisionEncoderModelTester",
    "VisionEncoderModelTests",
]


@dataclass
class VisionEncoderFamily:
    """What the common tests need to know about one DINOv2-like model family."""

    model_type: str
    config_class: type
    model_class: type
    classification_class: type
    backbone_class: type
    # Config fields beyond the shared tiny architecture below.
    config_kwargs: dict = field(default_factory=dict)
    # Non-default fields `ConfigTester` round-trips (transformers uses `hidden_size=37`).
    config_tester_kwargs: dict = field(default_factory=lambda: {"hidden_size": 37})

    @property
    def all_model_classes(self) -> tuple[type, ...]:
        return (self.model_class, self.classification_class, self.backbone_class)


# The Auto-class name tables the common tests consult to decide which models train, get labels, are backbones.
IN_TREE_TABLES = {
    "MODEL_MAPPING_NAMES": "model_class",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": "classification_class",
    "MODEL_FOR_BACKBONE_MAPPING_NAMES": "backbone_class",
}


@contextmanager
def listed_as_in_tree(family: VisionEncoderFamily) -> Iterator[None]:
    """List the family in transformers' Auto name tables for the duration, as an in-tree model is."""
    with ExitStack() as stack:
        for table, attribute in IN_TREE_TABLES.items():
            names = getattr(modeling_auto, table)
            stack.enter_context(mock.patch.dict(names, {family.model_type: getattr(family, attribute).__name__}))
        yield


class VisionEncoderModelTester:
    """transformers' DINOv2-with-registers model tester: 13 random 30 px images, 2 px patches, 2 blocks of width 32."""

    def __init__(
        self,
        parent: unittest.TestCase,
        family: VisionEncoderFamily,
        batch_size: int = 13,
        image_size: int = 30,
        patch_size: int = 2,
        num_channels: int = 3,
        is_training: bool = True,
        use_labels: bool = True,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 37,
        hidden_act: str = "gelu",
        type_sequence_label_size: int = 10,
        initializer_range: float = 0.02,
        num_register_tokens: int = 2,
        mask_ratio: float = 0.5,
    ):
        self.parent = parent
        self.family = family
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.is_training = is_training
        self.use_labels = use_labels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.type_sequence_label_size = type_sequence_label_size
        self.initializer_range = initializer_range
        # A family may ask for its own register count (DINOv3's 4); the others keep the tester's 2.
        num_register_tokens = family.config_kwargs.get("num_register_tokens", num_register_tokens)
        self.num_register_tokens = num_register_tokens
        num_patches = (image_size // patch_size) ** 2
        # [CLS, registers, patches]; ViTReg describing timm's "gap" models has no CLS token; test-time registers
        # (ViTReg's `num_test_time_registers`) follow the trained ones.
        num_prefix_tokens = int(family.config_kwargs.get("use_cls_token", True)) + num_register_tokens
        num_prefix_tokens += family.config_kwargs.get("num_test_time_registers", 0)
        self.seq_length = num_prefix_tokens + num_patches
        self.mask_length = num_patches  # bool_masked_pos covers the patches only
        self.num_masks = int(mask_ratio * self.seq_length)

    def get_config(self):
        """The tiny config of the family."""
        fields = dict(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            initializer_range=self.initializer_range,
            num_register_tokens=self.num_register_tokens,
        )
        return self.family.config_class(**{**fields, **self.family.config_kwargs})

    def prepare_config_and_inputs(self):
        """Config, `[B, C, H, W]` random pixels and `[B]` random labels."""
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.type_sequence_label_size) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        """Config and the inputs dict the mixins feed to every model class."""
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def create_and_check_model(self, config, pixel_values, labels):
        model = self.family.model_class(config).to(torch_device).eval()
        result = model(pixel_values)
        expected = (self.batch_size, self.seq_length, self.hidden_size)
        self.parent.assertEqual(result.last_hidden_state.shape, expected)

    def create_and_check_backbone(self, config, pixel_values, labels):
        backbone_class = self.family.backbone_class
        grid = self.image_size // config.patch_size
        model = backbone_class(config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), len(config.out_features))
        self.parent.assertEqual(len(model.channels), len(config.out_features))
        self.parent.assertListEqual(
            list(result.feature_maps[0].shape), [self.batch_size, model.channels[0], grid, grid]
        )

        # out_features=None: the last stage only.
        config.out_features = None
        model = backbone_class(config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), 1)
        self.parent.assertEqual(len(model.channels), 1)
        self.parent.assertListEqual(
            list(result.feature_maps[0].shape), [self.batch_size, model.channels[0], grid, grid]
        )

        # Neither normed nor reshaped: the whole token sequence.
        config.apply_layernorm = False
        config.reshape_hidden_states = False
        model = backbone_class(config).to(torch_device).eval()
        result = model(pixel_values)
        self.parent.assertListEqual(
            list(result.feature_maps[0].shape), [self.batch_size, self.seq_length, self.hidden_size]
        )

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        classification_class = self.family.classification_class
        config.num_labels = self.type_sequence_label_size
        model = classification_class(config).to(torch_device).eval()
        result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))
        self.parent.assertEqual(result.loss.ndim, 0)

        # Greyscale images.
        config.num_channels = 1
        model = classification_class(config).to(torch_device).eval()
        pixel_values = floats_tensor([self.batch_size, 1, self.image_size, self.image_size])
        result = model(pixel_values)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))


class VisionEncoderModelTests:
    """The model-specific tests transformers adds to `ModelTesterMixin` for DINOv2-like models.

    A subclass sets `family` and inherits from `ModelTesterMixin` and `unittest.TestCase`.
    """

    family: VisionEncoderFamily
    test_resize_embeddings = False
    test_torch_exportable = True

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.enterClassContext(listed_as_in_tree(cls.family))

    def setUp(self):
        self.model_tester = VisionEncoderModelTester(self, self.family)
        self.config_tester = ConfigTester(
            self, config_class=self.family.config_class, has_text_modality=False, **self.family.config_tester_kwargs
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_get_set_embeddings(self):
        # Vision models embed patches with a convolution, not an `nn.Embedding` as the generic test expects.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(config))
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, nn.Linear))

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_backbone(self):
        self.model_tester.create_and_check_backbone(*self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(*self.model_tester.prepare_config_and_inputs())


class VisionEncoderBackboneTests:
    """Wiring of `BackboneTesterMixin`; a subclass sets `family` and inherits the mixin and `unittest.TestCase`."""

    family: VisionEncoderFamily
    has_attentions = False

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.all_model_classes = (cls.family.backbone_class,)
        cls.config_class = cls.family.config_class
        cls.enterClassContext(listed_as_in_tree(cls.family))

    def setUp(self):
        self.model_tester = VisionEncoderModelTester(self, self.family)
