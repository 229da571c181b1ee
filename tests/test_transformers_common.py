"""transformers' common model test-suite run on ViTReg, wired as transformers wires its in-tree Dinov2WithRegisters.

The suite comes from the transformers sdist (`python scripts/fetch_transformers_tests.py`, run by `make test`'s
set-up); this module fails at collection, naming that command, when it is missing. `ModelTesterMixin`,
`BackboneTesterMixin` and `ConfigTester` run unmodified; `tests/transformers_suite/` holds the model tester.
`PipelineTesterMixin` is not wired: it downloads tiny Hub checkpoints and its pipeline tests are not in the sdist
(the pipelines have their own offline tests). The same suite on transformers' Dinov2WithRegisters, for comparison:
`python -m pytest tests/transformers_suite/dinov2_with_registers_suite.py`.
"""

import dataclasses
import unittest

import torch
from transformers_suite.vision_encoder import (
    BackboneTesterMixin,
    ModelTesterMixin,
    VisionEncoderBackboneTests,
    VisionEncoderFamily,
    VisionEncoderModelTests,
)

from vitreg.modeling_vitreg import ViTRegBackbone, ViTRegConfig, ViTRegForImageClassification, ViTRegModel


def vitreg_family(**config_kwargs) -> VisionEncoderFamily:
    """The ViTReg classes with a config whose fields are `config_kwargs` on top of the suite's small defaults."""
    return VisionEncoderFamily(
        model_type=ViTRegConfig.model_type,
        config_class=ViTRegConfig,
        model_class=ViTRegModel,
        classification_class=ViTRegForImageClassification,
        backbone_class=ViTRegBackbone,
        config_kwargs=config_kwargs,
        # ViTReg refuses a width the heads do not divide (37 is not a multiple of the default 12 heads).
        config_tester_kwargs={"hidden_size": 37, "num_attention_heads": 1},
    )


# DINOv2's layout as its converted checkpoints have it, mask token included (which the classifier and the backbone
# hold frozen, so the suite's training checks run unmodified).
VITREG = vitreg_family(use_mask_token=True)
# timm's register ViTs without CLS token (`vit_*_reg4_gap_256`), with DINOv2 ViT-g's SwiGLU, no LayerScale and no
# qkv bias: every switch off its DINOv2 default, through the same suite.
VITREG_GAP = vitreg_family(
    use_cls_token=False, pooling="mean", use_fc_norm=True, use_swiglu_ffn=True, layerscale_value=None,
    qkv_bias=False,
)  # fmt: skip
# Test-time registers ("Vision Transformers Don't Need Trained Registers"): one untrained token after the 2 trained
# registers, with register neurons shifted into it in both blocks, through the same suite.
VITREG_TEST_TIME = vitreg_family(num_test_time_registers=1, register_neurons=[[0, 3], [1, 0], [1, 36]])
# DINOv3's layout: 2-D axial RoPE instead of learned positions (with its train-time coordinate augmentations),
# 4 registers, masked key bias, untied CLS/patch norms, the local-crop CLS norm that ViTReg keeps for the round trip
# (buffers no forward reads), SwiGLU and the mask token, through the same suite. The config tester's width needs a
# head dimension RoPE can rotate (a multiple of 4).
VITREG_ROPE = dataclasses.replace(
    vitreg_family(
        position_embedding_type="rope", rope_rescale_coords=2.0, rope_shift_coords=0.1, rope_jitter_coords=1.2,
        num_register_tokens=4, mask_k_bias=True, untie_cls_and_patch_norms=True, use_swiglu_ffn=True,
        layer_norm_eps=1e-5, use_mask_token=True, untie_global_and_local_cls_norm=True,
    ),
    config_tester_kwargs={"hidden_size": 36, "num_attention_heads": 1},
)  # fmt: skip


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

    def test_every_attention_implementation_matches_eager(self):
        """eager, sdpa and flex attention give the same tokens, and attention weights whichever is set."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = ViTRegModel(config).eval()
        model.set_attn_implementation("eager")
        with torch.no_grad():
            expected = model(**inputs, output_attentions=True)
            for implementation in ("sdpa", "flex_attention"):
                model.set_attn_implementation(implementation)
                outputs = model(**inputs)
                torch.testing.assert_close(outputs.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
                # Attention weights exist only in eager attention: asking for them runs that, whatever is set.
                attentions = model(**inputs, output_attentions=True).attentions
                self.assertEqual(len(attentions), config.num_hidden_layers)
                for got, want in zip(attentions, expected.attentions):
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
                self.assertEqual(model.config._attn_implementation, implementation)

    def test_torch_compile_fullgraph(self):
        """The classifier compiles as one graph with inductor (`_can_compile_fullgraph`) and matches eager."""
        self.addCleanup(torch._dynamo.reset)
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = ViTRegForImageClassification(config).eval()
        with torch.no_grad():
            expected = model(**inputs).logits
            compiled = torch.compile(model, fullgraph=True)(**inputs).logits
        torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)

    def test_torch_compile_for_training(self):
        """The suite's compiled-training check (accelerator-only there, and written for text models), on CPU.

        `aot_eager` traces forward and backward through AOTAutograd as inductor does, without the C++ code
        generation that takes a minute on CPU.
        """
        self.addCleanup(torch._dynamo.reset)
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.drop_path_rate = 0.0
        model = ViTRegForImageClassification(config).train()
        inputs = self._prepare_for_class(inputs, ViTRegForImageClassification, return_labels=True)
        inputs["labels"] = torch.arange(self.model_tester.batch_size) % config.num_labels
        model(**inputs).loss.backward()
        expected = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs).loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-4, msg=name)


class ViTRegGapModelTest(VisionEncoderModelTests, ModelTesterMixin, unittest.TestCase):
    family = VITREG_GAP
    all_model_classes = VITREG_GAP.all_model_classes
    test_can_init_all_missing_weights_before_2023 = True


class ViTRegTestTimeRegistersModelTest(VisionEncoderModelTests, ModelTesterMixin, unittest.TestCase):
    family = VITREG_TEST_TIME
    all_model_classes = VITREG_TEST_TIME.all_model_classes
    test_can_init_all_missing_weights_before_2023 = True


class ViTRegRopeModelTest(VisionEncoderModelTests, ModelTesterMixin, unittest.TestCase):
    family = VITREG_ROPE
    all_model_classes = VITREG_ROPE.all_model_classes
    test_can_init_all_missing_weights_before_2023 = True


class ViTRegBackboneTest(VisionEncoderBackboneTests, BackboneTesterMixin, unittest.TestCase):
    family = VITREG
