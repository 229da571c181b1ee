"""How a batch of pixels becomes tokens: one small function per backend, all returning the same `Tokens`.

A backend is `make(model, layers, dtype, device) -> run`, where `run(pixel_values [B, 3, H, W])` returns `Tokens`.
Which token is what (CLS, registers, patches) is the model's call: `split_tokens` on the final output, and
`get_intermediate_layers` (DINOv3's `return_class_token` / `return_extra_tokens`) for `layers`.
"""

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from vitreg.core.errors import UserError, require
from vitreg.core.opening import to_device
from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel, split_tokens

logger = logging.getLogger(__name__)


class Tokens(NamedTuple):
    """A batch's tokens, one entry per layer (the final output, or each of `layers`, normed), and the pooled output."""

    cls: list[torch.Tensor | None]  # [B, D] each; None without a CLS token
    registers: list[torch.Tensor]  # [B, R + T, D] each: the trained registers, then the test-time ones
    patches: list[torch.Tensor]  # [B, HW, D] each
    pooled: torch.Tensor | None  # [B, D]; None with `layers`

    @classmethod
    def final(cls, config: ViTRegConfig, last_hidden_state: torch.Tensor, pooled: torch.Tensor) -> "Tokens":
        """The final output `[B, P + HW, D]`, cut by the model's one notion of prefix tokens."""
        cls_token, registers, patches = split_tokens(config, last_hidden_state)
        return cls([cls_token], [registers], [patches], pooled)


Backend = Callable[[torch.Tensor], Tokens]


def torch_backend(model: ViTRegModel, layers: list[int] | None, dtype: torch.dtype, device: str) -> Backend:
    """The model itself, in eager PyTorch (sdpa attention) under `inference_mode`."""
    model = to_device(model, device).to(dtype=dtype).eval()

    @torch.inference_mode()
    def run(pixel_values: torch.Tensor) -> Tokens:
        pixel_values = pixel_values.to(device=device, dtype=dtype)
        if layers is None:
            out = model(pixel_values)
            return Tokens.final(model.config, out.last_hidden_state, out.pooler_output)
        # DINOv2's and DINOv3's intermediate layers, normed (with untied norms, the prefix by `cls_norm`):
        # one (patches [B, HW, D], cls [B, D], registers [B, R + T, D]) per block.
        per_block = model.get_intermediate_layers(
            pixel_values, n=layers, return_class_token=True, return_extra_tokens=True, norm=True
        )
        patches, cls_tokens, registers = zip(*per_block)
        return Tokens(list(cls_tokens), list(registers), list(patches), None)

    return run


def onnxruntime_backend(model: ViTRegModel, layers: list[int] | None, dtype: torch.dtype, device: str) -> Backend:
    """The model exported to a dynamic ONNX graph with ONNX Runtime's fused attention (checked against PyTorch to
    1e-4) and run by ONNX Runtime (CPU, `ONNXRuntimeModel`'s measured session settings)."""
    require("onnx", "onnxscript", "onnxruntime", extra="onnx")  # the exporter and the runtime
    from vitreg.export import ONNXRuntimeModel, export_onnx

    if layers is not None or dtype != torch.float32 or device != "cpu":
        raise UserError("--backend onnxruntime runs the final tokens in float32 on the CPU: drop --layers, --dtype, "
                        "--device or use --backend torch")  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="vitreg-extract-onnx-"))
    try:
        exported = export_onnx(model.cpu(), folder / "model.onnx", dynamic=True, optimize=True, progress=False)
        logger.info(exported.summary())
        runtime = ONNXRuntimeModel(exported.path)  # the session holds the graph in memory
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def run(pixel_values: torch.Tensor) -> Tokens:
        outputs = runtime(pixel_values)
        last = torch.from_numpy(outputs["last_hidden_state"])  # [B, P + HW, D]
        return Tokens.final(model.config, last, torch.from_numpy(outputs["pooler_output"]))

    return run


# `--backend NAME`: one function of the same signature each.
BACKENDS: dict[str, Callable[..., Backend]] = {"torch": torch_backend, "onnxruntime": onnxruntime_backend}
