"""Reading the last block's fused qkv projection, which gives both CLS attention and LOST's key features."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel


@contextmanager
def capture_last_qkv(model: PreTrainedModel) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, `captured["qkv"]` holds the last block's fused qkv output `[B, N, 3D]` (rows q | k | v)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        captured["qkv"] = output.detach()

    handle = model.encoder.layer[-1].attention.qkv.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[B, N, 3D]` -> query, key, value, each `[B, heads, N, D / heads]`."""
    batch, tokens, width = qkv.shape
    qkv = qkv.float().view(batch, tokens, 3, num_heads, width // (3 * num_heads))
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return query, key, value


def cls_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`[B, heads, N]` attention of the CLS token (token 0) to every token, as the block computes it."""
    query, key, _ = split_heads(qkv, num_heads)  # [B, heads, N, d]
    scores = query[:, :, :1] @ key.transpose(-1, -2) * query.shape[-1] ** -0.5  # [B, heads, 1, N]
    return scores.softmax(dim=-1)[:, :, 0]
