"""ViTReg forward semantics: outputs, masking, errors, intermediate layers and DINOv2's linear heads."""

import json
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import images, make_timm, make_vitreg, max_diff, parity_config, randomize_, tiny_config

from vitreg.modeling_vitreg import ViTRegForImageClassification, ViTRegModel

TOL = 1e-5


def test_output_fields_and_token_order():
    config = parity_config()
    model = make_vitreg(config)
    pixels = images(32, 44)  # 8 x 11 patches
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True, output_attentions=True)
    batch, tokens, dim = 2, 1 + 4 + 8 * 11, 32
    assert out.last_hidden_state.shape == (batch, tokens, dim)
    assert out.pooler_output.shape == (batch, dim)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    assert torch.equal(out.register_tokens, out.last_hidden_state[:, 1:5])
    assert torch.equal(out.patch_tokens, out.last_hidden_state[:, 5:])
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert len(out.attentions) == config.num_hidden_layers
    assert out.attentions[0].shape == (batch, config.num_attention_heads, tokens, tokens)
    # hidden_states: the embeddings, then every block, un-normed; the last one normed is the output.
    assert max_diff(out.hidden_states[0], model.embeddings(pixels)) == 0.0
    assert max_diff(model.layernorm(out.hidden_states[-1]), out.last_hidden_state) <= TOL
    # Registers carry no position embedding: they enter the first block as the learned tokens themselves.
    assert torch.equal(out.hidden_states[0][:, 1:5], model.embeddings.register_tokens.expand(batch, -1, -1))
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(()), atol=1e-5)


def test_mean_pooling_excludes_registers():
    model = make_vitreg(parity_config(pooling="mean"))
    with torch.no_grad():
        out = model(images(32, 32))
    assert max_diff(out.pooler_output, out.patch_tokens.mean(1)) <= TOL
    with_registers = out.last_hidden_state[:, 1:].mean(1)
    assert max_diff(out.pooler_output, with_registers) > 1e-2  # the check above would notice registers


def test_deterministic_and_batch_independent():
    model = make_vitreg(parity_config())
    pixels = images(32, 44, batch=3)
    with torch.no_grad():
        first = model(pixels).last_hidden_state
        second = model(pixels).last_hidden_state
        single = torch.cat([model(pixels[i : i + 1]).last_hidden_state for i in range(3)])
    assert torch.equal(first, second)
    assert max_diff(first, single) <= TOL


def test_bool_masked_pos_replaces_exactly_the_masked_patches():
    model = make_vitreg(parity_config(use_mask_token=True))
    pixels = images(32, 44)
    mask = torch.zeros(2, 88, dtype=torch.bool)
    mask[0, [0, 5, 87]] = True
    mask[1, 10:30] = True
    with torch.no_grad():
        masked = model.embeddings(pixels, bool_masked_pos=mask)  # [B, 5 + 88, D]
        plain = model.embeddings(pixels)
        pos = model.embeddings.interpolate_pos_encoding(32, 44)[:, 1:]  # [1, 88, D]
    expected_masked = (model.embeddings.mask_token + pos[0]).detach()  # [88, D]
    patches, plain_patches = masked[:, 5:], plain[:, 5:]
    assert max_diff(patches[mask], expected_masked.expand(2, -1, -1)[mask]) <= 1e-6
    assert torch.equal(patches[~mask], plain_patches[~mask])
    assert torch.equal(masked[:, :5], plain[:, :5])  # CLS and registers untouched
    assert not torch.allclose(patches[mask], plain_patches[mask])


def test_bad_inputs_raise_clear_errors():
    model = ViTRegModel(tiny_config(use_mask_token=True)).eval()
    pixels = images(28, 42)  # 2 x 3 patches of 14 px
    with pytest.raises(ValueError, match=r"bool_masked_pos must have shape \[2, 6\]"):
        model(pixels, bool_masked_pos=torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bool_masked_pos must have shape"):
        model(pixels, bool_masked_pos=torch.zeros(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model(images(28, 40))
    with pytest.raises(ValueError, match="pixel_values of shape"):
        model(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="use_mask_token"):
        ViTRegModel(tiny_config(use_mask_token=False))(pixels, bool_masked_pos=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="blocks to take"):
        model.get_intermediate_layers(pixels, n=[0, 2])


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("n", [2, [0, 2]], ids=["last2", "list"])
def test_intermediate_layers_match_timm(n, norm):
    model = make_vitreg(parity_config())
    reference = make_timm(model)
    pixels = images(32, 44)  # 8 rows x 11 columns of patches
    with torch.no_grad():
        ours = model.get_intermediate_layers(pixels, n=n, reshape=True, return_class_token=True, norm=norm)
        theirs = reference.forward_intermediates(
            pixels, indices=n, norm=norm, output_fmt="NCHW", return_prefix_tokens=True, intermediates_only=True
        )
    assert len(ours) == len(theirs) == 2
    for (patches, cls_token), (timm_patches, timm_prefix) in zip(ours, theirs):
        assert patches.shape == (2, 32, 8, 11)  # [B, D, h, w], registers dropped
        assert max_diff(patches, timm_patches) <= TOL
        assert max_diff(cls_token, timm_prefix[:, 0]) <= TOL


def test_intermediate_layers_match_hidden_states():
    model = make_vitreg(parity_config())
    pixels = images(32, 44)
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True).hidden_states
        flat = model.get_intermediate_layers(pixels, n=[1], norm=True)
        maps = model.get_intermediate_layers(pixels, n=1, reshape=True, norm=False)
    # block 1 is hidden_states[2]; 5 prefix tokens (CLS + 4 registers) are dropped.
    assert max_diff(flat[0], model.layernorm(hidden[2])[:, 5:]) <= TOL
    last = hidden[-1][:, 5:]  # [B, 88, D]
    assert max_diff(maps[0][:, :, 2, 7], last[:, 2 * 11 + 7]) <= TOL  # row 2, column 7


def test_intermediate_layers_come_in_block_order_once_each():
    model = make_vitreg(parity_config())
    pixels = images(32, 32)
    with torch.no_grad():
        unordered = model.get_intermediate_layers(pixels, n=[1, 0, 1])
        ordered = model.get_intermediate_layers(pixels, n=[0, 1])
    # DINOv2 walks the blocks and keeps those in the list: block order, no repeats.
    assert len(unordered) == 2
    assert all(torch.equal(a, b) for a, b in zip(unordered, ordered))
    assert not torch.equal(ordered[0], ordered[1])


@pytest.mark.parametrize(
    "fields",
    [{}, {"num_test_time_registers": 1, "register_neurons": [[0, 3], [2, 5]]}, {"untie_cls_and_patch_norms": True}],
    ids=["registers", "test-time registers", "untied norms"],
)
def test_intermediate_layers_return_dinov3s_extra_tokens(fields):
    model = make_vitreg(parity_config(**fields))
    prefix = model.config.num_prefix_tokens  # CLS, 4 registers, and the test-time register if any
    pixels = images(32, 44)
    with torch.no_grad():
        hidden = model(pixels, output_hidden_states=True).hidden_states  # [embeddings, block 0, block 1, block 2]
        both = model.get_intermediate_layers(pixels, n=[0, 2], return_class_token=True, return_extra_tokens=True)
        extras = model.get_intermediate_layers(pixels, n=[0, 2], reshape=True, return_extra_tokens=True)
    for block, (patches, cls_token, registers), (patch_map, registers_again) in zip([0, 2], both, extras):
        tokens = hidden[block + 1]
        # DINOv3's `get_intermediate_layers(norm=True)`: `cls_norm` on CLS + registers when untied, else one norm.
        prefix_norm = model.cls_norm if fields.get("untie_cls_and_patch_norms") else model.layernorm
        normed = torch.cat((prefix_norm(tokens[:, :prefix]), model.layernorm(tokens[:, prefix:])), dim=1)
        assert registers.shape == (2, prefix - 1, 32)  # trained then test-time registers
        assert max_diff(cls_token, normed[:, 0]) <= TOL
        assert max_diff(registers, normed[:, 1:prefix]) <= TOL
        assert max_diff(patches, normed[:, prefix:]) <= TOL
        assert torch.equal(registers_again, registers)
        assert max_diff(patch_map.flatten(2).transpose(1, 2), patches) <= TOL  # (patches, extra): DINOv3's order


def test_gradients_flow_through_intermediate_layers():
    model = make_vitreg(parity_config()).train()
    pixels = images(32, 32)
    outputs = model.get_intermediate_layers(pixels, n=[0, 1], return_class_token=True, return_extra_tokens=True)
    sum(tensor.square().mean() for output in outputs for tensor in output).backward()
    for name in ("embeddings.patch_embeddings.projection.weight", "embeddings.register_tokens", "layernorm.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.encoder.layer[1].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.encoder.layer[2].mlp.fc1.weight.grad is None  # block 2 comes after the last block taken


def linear_head_features(model: ViTRegForImageClassification, pixels: torch.Tensor, layers: int, registers: bool):
    """DINOv2's linear / linear4 head input, by hand from hidden states (optionally with the registers' bug)."""
    hidden = model.vitreg(pixels, output_hidden_states=True).hidden_states
    normed = [model.vitreg.layernorm(h) for h in hidden[-layers:]]
    cls_tokens = [h[:, 0] for h in normed]
    patches = normed[-1][:, 1:] if registers else normed[-1][:, 5:]
    return torch.cat((*cls_tokens, patches.mean(1)), dim=-1)


@pytest.mark.parametrize("layers", [1, 4])
def test_classifier_is_dinov2_linear_head(layers):
    config = parity_config(num_hidden_layers=5, classifier_num_layers=layers, num_labels=7)
    model = randomize_(ViTRegForImageClassification(config))
    assert model.classifier.in_features == (layers + 1) * 32
    pixels = images(32, 44)
    with torch.no_grad():
        logits = model(pixels).logits
        expected = model.classifier(linear_head_features(model, pixels, layers, registers=False))
        wrong = model.classifier(linear_head_features(model, pixels, layers, registers=True))
    assert logits.shape == (2, 7)
    assert max_diff(logits, expected) <= TOL
    assert max_diff(logits, wrong) > 1e-3  # averaging the registers in would be caught


def test_classifier_loss_single_label_multi_label_regression():
    pixels = images(28, 28, batch=4)
    single = ViTRegForImageClassification(tiny_config(num_labels=3))
    labels = torch.tensor([0, 2, 1, 2])
    out = single(pixels, labels=labels)
    assert single.config.problem_type == "single_label_classification"
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))

    multi = ViTRegForImageClassification(tiny_config(num_labels=3, problem_type="multi_label_classification"))
    targets = torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    out = multi(pixels, labels=targets)
    assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(out.logits, targets))

    regression = ViTRegForImageClassification(tiny_config(num_labels=1))
    values = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = regression(pixels, labels=values)
    assert regression.config.problem_type == "regression"
    assert torch.allclose(out.loss, F.mse_loss(out.logits.squeeze(-1), values))
    out.loss.backward()
    assert regression.classifier.weight.grad is not None


def test_id2label_sets_the_head_and_survives_saving(tmp_path):
    id2label = {0: "cat", 1: "dog", 2: "bird"}
    model = ViTRegForImageClassification(tiny_config(id2label=id2label, label2id={v: k for k, v in id2label.items()}))
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    model.save_pretrained(tmp_path)
    loaded = ViTRegForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.id2label == id2label
    assert loaded.config.label2id["dog"] == 1


def test_classifier_pooling_cls_reads_the_cls_token_only():
    config = parity_config(num_labels=3, classifier_pooling="cls")
    classifier = randomize_(ViTRegForImageClassification(config)).eval()
    assert classifier.classifier.in_features == config.hidden_size  # DeiT III / ViT: no patch mean
    pixels = images(32, 44)
    with torch.no_grad():
        cls_token = classifier.vitreg(pixels).pooler_output
        expected = classifier.classifier(cls_token)
        assert max_diff(classifier(pixels).logits, expected) <= TOL
    with pytest.raises(ValueError, match="classifier_pooling"):
        parity_config(classifier_pooling="mean_of_everything")
    with pytest.raises(ValueError, match="use_cls_token"):
        parity_config(classifier_pooling="cls", use_cls_token=False, pooling="mean")


@pytest.mark.parametrize("use_mask_token", [True, False])
def test_the_config_alone_decides_the_mask_token(use_mask_token, tmp_path):
    from vitreg.modeling_vitreg import ViTRegBackbone

    config = parity_config(num_labels=2, use_mask_token=use_mask_token)
    for model_class in (ViTRegModel, ViTRegForImageClassification, ViTRegBackbone):
        model = model_class(config)
        names = [name for name in model.state_dict() if name.endswith("embeddings.mask_token")]
        assert len(names) == int(use_mask_token), model_class.__name__
        model.save_pretrained(tmp_path / model_class.__name__)
        reloaded, info = model_class.from_pretrained(tmp_path / model_class.__name__, output_loading_info=True)
        assert not any(info.values()), (model_class.__name__, info)  # saved config and module tree agree


def test_the_mask_token_is_off_by_default_and_old_folders_keep_theirs(tmp_path):
    assert ViTRegModel(tiny_config()).embeddings.mask_token is None
    # A folder saved while the default was True: its config.json names the field, as every saved config does.
    old = ViTRegModel(tiny_config(use_mask_token=True))
    with torch.no_grad():
        old.embeddings.mask_token.normal_()
    old.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["use_mask_token"] is True
    ViTRegModel(tiny_config()).config.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["use_mask_token"] is False
    loaded = ViTRegModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.embeddings.mask_token, old.embeddings.mask_token)


def test_classifier_and_backbone_keep_a_loaded_mask_token_frozen(tmp_path):
    """A converted classifier carries its source's mask token: loaded, used by `bool_masked_pos`, never trained."""
    from vitreg.modeling_vitreg import ViTRegBackbone

    base = make_vitreg(parity_config(use_mask_token=True))
    base.save_pretrained(tmp_path)
    pixels = images(32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    for model_class in (ViTRegForImageClassification, ViTRegBackbone):
        for model in (model_class(base.config), model_class.from_pretrained(tmp_path, num_labels=3)):
            embeddings = model.vitreg.embeddings if model_class is ViTRegForImageClassification else model.embeddings
            assert all(not name.endswith("mask_token") for name, _ in model.named_parameters())
            assert not embeddings.mask_token.requires_grad
        assert torch.equal(embeddings.mask_token, base.embeddings.mask_token)  # the checkpoint's, not re-initialised
        with torch.no_grad():
            masked, plain = embeddings(pixels, bool_masked_pos=mask), embeddings(pixels)
        assert not torch.allclose(masked, plain)
    # The bare model (masked pretraining) trains it.
    assert dict(ViTRegModel.from_pretrained(tmp_path).named_parameters())["embeddings.mask_token"].requires_grad


def dinov3_linear_k_masked_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """DINOv3's `LinearKMaskedBias.forward` (facebookresearch/dinov3, dinov3/layers/attention.py) with the mask its
    `init_weights` fills and its released checkpoints hold: ones, zeros over the key third."""
    out = bias.shape[0]
    bias_mask = torch.ones_like(bias)
    bias_mask[out // 3 : 2 * out // 3] = 0
    return F.linear(x, weight, bias * bias_mask.to(bias.dtype))


def test_masked_key_bias_is_the_qkv_module_and_equals_dinov3s():
    model = make_vitreg(parity_config(mask_k_bias=True))
    attention = model.encoder.layer[0].attention
    assert isinstance(attention.qkv, torch.nn.Linear)
    assert {"encoder.layer.0.attention.qkv.weight", "encoder.layer.0.attention.qkv.bias"} <= set(model.state_dict())
    assert not any("mask" in name for name in model.state_dict())  # no new persistent buffer
    tokens = torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = dinov3_linear_k_masked_bias(tokens, attention.qkv.weight, attention.qkv.bias)
        assert torch.equal(attention.qkv(tokens), expected)
    # Attention calls the module, so hooks (analysis), adapters and quantisers that replace it take effect.
    seen = []
    attention.qkv.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        model(images(32, 32))
    assert seen == [(2, 1 + 4 + 64, 96)]


def test_test_time_register_neurons_are_a_buffer_not_rebuilt_per_forward(tmp_path):
    config = parity_config(num_test_time_registers=1, register_neurons=[[0, 3], [0, 7], [2, 5]])
    model = make_vitreg(config)
    shift = model.encoder.layer[0].mlp.register_shift
    assert torch.equal(shift.neuron_index, torch.tensor([3, 7]))
    assert not any("neuron" in name for name in model.state_dict())  # derived from the config: not saved
    pixels = images(32, 32)
    with mock.patch("torch.tensor", wraps=torch.tensor) as tensor, torch.no_grad():
        expected = model(pixels).last_hidden_state
    assert tensor.call_count == 0  # no host tensor built in the forward
    model.save_pretrained(tmp_path)
    loaded = ViTRegModel.from_pretrained(tmp_path)  # built on the meta device: the buffer is refilled after loading
    assert torch.equal(loaded.encoder.layer[2].mlp.register_shift.neuron_index, torch.tensor([5]))
    with torch.no_grad():
        assert torch.equal(loaded(pixels).last_hidden_state, expected)
