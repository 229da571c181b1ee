"""How a batch of pixels becomes tokens: one small function per backend, all returning the same `Tokens`.

A backend is `make(model, layers, dtype, device) -> run`, where `run(pixel_values [B, 3, H, W])` returns `Tokens`.
Which token is what (CLS, registers, patches) is decided once, in `features.py`, for every backend.
"""

import importlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from vitreg.core.errors import UserError
from vitreg.modeling_vitreg import ViTRegModel

logger = logging.getLogger(__name__)


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
        # Normed as DINOv2's and DINOv3's intermediate layers: with untied norms, the prefix by `cls_norm`.
        return Tokens([model.normalize(hidden) for hidden in kept], None)

    return run


def onnxruntime_backend(model: ViTRegModel, layers: list[int] | None, dtype: torch.dtype, device: str) -> Backend:
    """The model exported to a dynamic ONNX graph (checked against PyTorch to 1e-4) and run by ONNX Runtime (CPU)."""
    try:
        for module in ("onnx", "onnxscript", "onnxruntime"):  # the exporter and the runtime
            importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise UserError(f"--backend onnxruntime needs {error.name!r}: pip install 'vitreg[onnx]'") from None
    from vitreg.export import ONNXRuntimeModel, export_onnx

    if layers is not None or dtype != torch.float32 or device != "cpu":
        raise UserError("--backend onnxruntime runs the final tokens in float32 on the CPU: drop --layers, --dtype, "
                        "--device or use --backend torch")  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="vitreg-extract-onnx-"))
    try:
        exported = export_onnx(model, folder / "model.onnx", dynamic=True, progress=False)
        logger.info(exported.summary())
        runtime = ONNXRuntimeModel(exported.path)  # the session holds the graph in memory
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def run(pixel_values: torch.Tensor) -> Tokens:
        outputs = runtime(pixel_values)
        return Tokens([torch.from_numpy(outputs["last_hidden_state"])], torch.from_numpy(outputs["pooler_output"]))

    return run


# `--backend NAME`: one function of the same signature each.
BACKENDS: dict[str, Callable[..., Backend]] = {"torch": torch_backend, "onnxruntime": onnxruntime_backend}
