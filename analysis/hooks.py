"""Reading the last block's fused qkv projection, which gives both CLS attention and LOST's key features."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from vitreg.modeling_vitreg.modeling_vitreg import apply_rope


@contextmanager
def capture_last_qkv(model: PreTrainedModel) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, `captured["qkv"]` holds the last block's fused qkv projection `[B, N, 3D]` (rows q | k | v):
    the output of its `qkv` module, as its attention computes it (DINOv3's masked key bias included, positions not yet
    rotated); and `captured["rope"]` the `(sin, cos)` that attention rotates the patch queries and keys by (None
    without RoPE)."""
    captured: dict[str, torch.Tensor] = {}
    attention = model.encoder.layer[-1].attention

    def keep_rope(module, args, kwargs):
        captured["rope"] = kwargs.get("rope")

    def keep_qkv(module, args, output):
        captured["qkv"] = output.detach()

    handles = [
        attention.register_forward_pre_hook(keep_rope, with_kwargs=True),
        attention.qkv.register_forward_hook(keep_qkv),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[B, N, 3D]` -> query, key, value, each `[B, heads, N, D / heads]`."""
    batch, tokens, width = qkv.shape
    qkv = qkv.float().view(batch, tokens, 3, num_heads, width // (3 * num_heads))
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return query, key, value


def cls_attention(
    qkv: torch.Tensor, num_heads: int, rope: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """`[B, heads, N]` attention of the CLS token (token 0) to every token, as the block computes it (`rope`: the
    rotation of a RoPE model's patch queries and keys, `captured["rope"]`)."""
    query, key, _ = split_heads(qkv, num_heads)  # [B, heads, N, d]
    if rope is not None:
        query, key = apply_rope(query, rope), apply_rope(key, rope)
    scores = query[:, :, :1] @ key.transpose(-1, -2) * query.shape[-1] ** -0.5  # [B, heads, 1, N]
    return scores.softmax(dim=-1)[:, :, 0]
