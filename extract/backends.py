"""How a batch of pixels becomes tokens: one small function per backend, all returning the same `Tokens`.

A backend is `make(model, layers, dtype, device) -> run`, where `run(pixel_values [B, 3, H, W])` returns `Tokens`.
Which token is what (CLS, registers, patches) is decided once, in `features.py`, for every backend.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch

from vitreg.core.errors import UserError
from vitreg.modeling_vitreg import ViTRegModel


class Tokens(NamedTuple):
    """Every token of the requested layers, and the model's pooled output (None with `layers`)."""

    hidden: list[torch.Tensor]  # one `[B, P + HW, D]` per layer (the final output, or each of `layers`, normed)
    pooled: torch.Tensor | None  # `[B, D]`


Backend = Callable[[torch.Tensor], Tokens]


def torch_backend(model: ViTRegModel, layers: list[int] | None, dtype: torch.dtype, device: str) -> Backend:
    """The model itself, in eager PyTorch (sdpa attention) under `inference_mode`."""
    try:
        model = model.to(device=device, dtype=dtype).eval()
    except (RuntimeError, AssertionError) as error:  # torch asserts on a CUDA device it was not built with
        raise UserError(f"cannot use device {device!r}: {str(error).splitlines()[0]}") from None

    @torch.inference_mode()
    def run(pixel_values: torch.Tensor) -> Tokens:
        pixel_values = pixel_values.to(device=device, dtype=dtype)
        if layers is None:
            out = model(pixel_values)
            return Tokens([out.last_hidden_state], out.pooler_output)
        _, kept = model.forward_blocks(pixel_values, keep=[block + 1 for block in layers])  # 0 = the embeddings
        return Tokens([model.layernorm(hidden) for hidden in kept], None)  # normed as DINOv2's intermediate layers

    return run


# `--backend NAME`: an ONNX Runtime backend is one more function of the same signature.
BACKENDS: dict[str, Callable[..., Backend]] = {"torch": torch_backend}
