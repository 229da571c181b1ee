"""Run an exported ViTReg graph with ONNX Runtime, refusing inputs the graph was not exported for in one line."""

from pathlib import Path

import numpy as np

from vitreg.core.errors import UserError, require


class ONNXRuntimeModel:
    """An exported ViTReg `.onnx` file: `model(pixel_values)` returns its outputs by name as NumPy arrays.

    `threads`: intra-op threads (default: ONNX Runtime's, one per physical core); `spinning`: whether idle threads
    spin between operators (default on, see below). Sizes are checked before ONNX Runtime sees them: height and
    width must be multiples of the patch size (and, for a graph exported at one size, that size), which ONNX Runtime
    itself would report as a shape error deep in the graph.
    """

    def __init__(
        self,
        path: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        spinning: bool = True,
    ):
        require("onnxruntime", extra="onnx")
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        if threads is not None and threads < 1:
            raise UserError(f"threads must be at least 1, got {threads}")
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Sequential execution, the memory arena and memory patterns are ONNX Runtime's defaults and measured best
        # (parallel execution and no arena were slower); the thread count defaults to the physical cores.
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            options.intra_op_num_threads = threads
        # Spinning threads (ONNX Runtime's default) were ~7% faster on a quiet machine and ~20% slower when other
        # work shared the cores (ViT-S/14, batch 8, 224 px, 2 cores): pass spinning=False on a shared machine.
        # benchmarks/bench_onnx.py times both.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as error:  # ONNX Runtime raises its own error types for any unreadable file
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(f"{path} is not a graph ONNX Runtime can run: {reason}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "vitreg.patch_size" not in meta:
            raise UserError(f"{path} was not written by vitreg export (no vitreg metadata)")
        self.patch_size = int(meta["vitreg.patch_size"])
        self.head = meta["vitreg.head"]
        self.dynamic = meta["vitreg.dynamic"] == "true"
        self.image_size = tuple(int(side) for side in meta["vitreg.image_size"].split("x"))
        self.output_names = [output.name for output in self.session.get_outputs()]

    def check(self, pixel_values: np.ndarray) -> None:
        """Refuse a batch the graph cannot take, saying why."""
        if pixel_values.ndim != 4:
            raise UserError(f"expected pixel_values [batch, channels, height, width], got {pixel_values.shape}")
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise UserError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        if not self.dynamic and (height, width) != self.image_size:
            raise UserError(
                "this graph was exported for {}x{} images, got {}x{}; export with --dynamic for any size".format(
                    *self.image_size, height, width
                )
            )
        if self.dynamic and min(height, width) < 2 * self.patch_size:
            raise UserError(f"a dynamic graph takes at least 2 patches a side, got {height}x{width}")

    def __call__(self, pixel_values) -> dict[str, np.ndarray]:
        """Outputs by name for `pixel_values` (`[B, C, H, W]`, NumPy or torch, converted to float32)."""
        if hasattr(pixel_values, "detach"):
            pixel_values = pixel_values.detach().cpu().numpy()
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        self.check(pixel_values)
        return dict(zip(self.output_names, self.session.run(self.output_names, {"pixel_values": pixel_values})))
