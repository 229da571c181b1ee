"""LoRA from the real `peft` package on the fused `qkv` projection, for DINOv2's and DINOv3's layouts: the adapter
changes the output and trains, and with DINOv3's masked key bias the adapted projection is DINOv3's plus LoRA's."""

import pytest
import torch
import torch.nn.functional as F
from conftest import images, randomize_, tiny_config

from vitreg.modeling_vitreg import ViTRegForImageClassification

peft = pytest.importorskip("peft")

LAYOUTS = {
    "dinov2": dict(),
    "dinov3": dict(position_embedding_type="rope", mask_k_bias=True, untie_cls_and_patch_norms=True),
}


def dinov3_qkv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """DINOv3's `LinearKMaskedBias.forward` (facebookresearch/dinov3, dinov3/layers/attention.py),
    `F.linear(x, W, b * bias_mask)`, with the mask its released checkpoints hold: zeros over the key third."""
    bias_mask = torch.ones_like(bias)
    bias_mask[bias.shape[0] // 3 : 2 * bias.shape[0] // 3] = 0
    return F.linear(x, weight, bias * bias_mask)


def lora_model(layout: str, init_lora_weights: bool = True):
    """A randomised 2-block classifier of the layout with rank-4 LoRA adapters on every `qkv`."""
    model = randomize_(ViTRegForImageClassification(tiny_config(num_labels=3, **LAYOUTS[layout])))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], init_lora_weights=init_lora_weights)
    return model, peft.get_peft_model(model, config)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_on_qkv_changes_the_output(layout):
    torch.manual_seed(0)
    base = randomize_(ViTRegForImageClassification(tiny_config(num_labels=3, **LAYOUTS[layout])))
    pixels = images(28, 42)
    with torch.no_grad():
        before = base(pixels).logits
    _, adapted = lora_model(layout, init_lora_weights=False)  # random A and B: the adapter acts from the start
    adapted.eval()
    layers = adapted.base_model.model.vitreg.encoder.layer
    assert all(isinstance(layer.attention.qkv, peft.tuners.lora.Linear) for layer in layers)
    with torch.no_grad():
        after = adapted(pixels).logits
        assert (after - before).abs().max() > 1e-3
        # The adapted projection: the base layer's (DINOv3's masked key bias included) plus LoRA's scaled update.
        qkv = layers[0].attention.qkv
        tokens = torch.randn(2, 9, 32)
        if LAYOUTS[layout].get("mask_k_bias"):
            base_output = dinov3_qkv(tokens, qkv.base_layer.weight, qkv.base_layer.bias)
        else:
            base_output = F.linear(tokens, qkv.base_layer.weight, qkv.base_layer.bias)
        update = qkv.lora_B["default"](qkv.lora_A["default"](tokens)) * qkv.scaling["default"]
        torch.testing.assert_close(qkv(tokens), base_output + update, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lora_on_qkv_trains_and_changes_nothing_else(layout):
    torch.manual_seed(0)
    _, adapted = lora_model(layout)
    adapted.train()
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in adapted.named_parameters()}
    pixels, labels = images(28, 42, batch=6), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = adapted(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    changed = {name for name, p in adapted.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in trainable if "lora_B" in name or "lora_A" in name}
