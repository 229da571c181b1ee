"""Export a ViTReg model to ONNX, at one image size or at any, and check the file against PyTorch with ONNX Runtime.

The position interpolation is ordinary tensor arithmetic on the grid size (`bicubic_resampling_matrix`), so the
dynamic graph computes DINOv2's antialiased or 0.1-offset bicubic interpolation exactly at every size; DINOv3's
rotary positions (RoPE) are sines and cosines of the patch coordinates, arithmetic on the grid size as well.
"""

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vitreg.core.errors import UserError
from vitreg.core.folders import atomic_output_file
from vitreg.core.images import check_image_size
from vitreg.core.opening import first_line, is_vitreg_folder, open_model
from vitreg.modeling_vitreg import (
    ViTRegBackbone,
    ViTRegConfig,
    ViTRegForImageClassification,
    ViTRegModel,
    ViTRegPreTrainedModel,
)

from .extra import require

HEADS = {"model": ViTRegModel, "classification": ViTRegForImageClassification, "backbone": ViTRegBackbone}
MODEL_OUTPUTS = ("last_hidden_state", "pooler_output", "register_tokens", "patch_tokens")
# torch.onnx's operator library is written for opset 18; torch 2.14 writes up to 23 (torch.onnx._constants).
MIN_OPSET, DEFAULT_OPSET, MAX_OPSET = 18, 20, 23
# A dynamic graph takes images of at least 2 patches a side: torch.export specialises sizes 0 and 1.
MIN_DYNAMIC_PATCHES = 2
# Protobuf files stop at 2 GiB: larger models keep their weights in OUT.onnx.data beside the graph.
EXTERNAL_DATA_BYTES = 1 << 30
TOLERANCE = 1e-4  # fp32, every output, max abs


@dataclass
class OnnxExport:
    """What `export_onnx` wrote and measured."""

    path: Path
    head: str
    opset: int
    dynamic: bool
    image_size: tuple[int, int]
    output_names: list[str]
    seconds: float
    bytes: int
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # "HxW" -> worst output difference vs PyTorch

    def summary(self) -> str:
        """One line for the command's output."""
        height, width = self.image_size
        sizes = "batch, height and width dynamic" if self.dynamic else f"batch dynamic, {height}x{width} px"
        checks = ", ".join(f"{diff:.1e} at {size}" for size, diff in self.max_abs_diff.items())
        checked = f"; onnxruntime vs PyTorch max |diff| {checks}" if checks else ""
        return (
            f"wrote {self.path} ({self.bytes / 2**20:.1f} MiB, opset {self.opset}, {self.head}: "
            f"{', '.join(self.output_names)}; {sizes}) in {self.seconds:.1f} s{checked}"
        )


class ExportedViTReg(nn.Module):
    """A ViTReg model as a function of `pixel_values` returning a flat tuple of tensors, the form an ONNX graph has."""

    def __init__(self, model: ViTRegPreTrainedModel):
        super().__init__()
        self.model = model
        self.head = next(name for name, cls in HEADS.items() if isinstance(model, cls))
        self.output_names = output_names(model)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values=pixel_values)
        if isinstance(self.model, ViTRegForImageClassification):
            return (outputs.logits,)
        if isinstance(self.model, ViTRegBackbone):
            return tuple(outputs.feature_maps)
        return tuple(outputs[name] for name in MODEL_OUTPUTS)


def output_names(model: ViTRegPreTrainedModel) -> list[str]:
    """Names of the graph's outputs: the output fields, or the backbone's stage names."""
    if isinstance(model, ViTRegForImageClassification):
        return ["logits"]
    if isinstance(model, ViTRegBackbone):
        return list(model.out_features)
    return list(MODEL_OUTPUTS)


def check_opset(opset: int) -> None:
    """Refuse opsets torch's exporter cannot write, naming the usable range."""
    if opset < MIN_OPSET:
        raise UserError(
            f"opset {opset} is too old: torch.onnx writes opset {MIN_OPSET} or newer (its operator library, "
            "LayerNormalization included, is written for opset 18)"
        )
    if opset > MAX_OPSET:
        raise UserError(f"opset {opset} is newer than torch {torch.__version__} can write (at most {MAX_OPSET})")


def folder_config_before_loading(model: object, head: str) -> ViTRegConfig | None:
    """The config of a local ViTReg folder, refusing a missing classification head before any weights load (None for
    every other source: only opening it tells its config)."""
    if isinstance(model, nn.Module) or not is_vitreg_folder(Path(str(model)).expanduser()):
        return None
    try:
        config = ViTRegConfig.from_pretrained(Path(str(model)).expanduser())
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"{model} is not a valid ViTReg folder: {first_line(error)}") from None
    if head == "classification" and not any("ForImageClassification" in a for a in config.architectures or []):
        raise UserError(f"{model} has no classification head (its config names {config.architectures})")
    return config


def export_size(config: ViTRegConfig, image_size: tuple[int, int] | None, dynamic: bool) -> tuple[int, int]:
    """The size to export at (default: the config's), refusing one the patch size does not tile or, for a dynamic
    graph, one too small to trace."""
    height, width = image_size or (config.image_size, config.image_size)
    for side in (height, width):
        check_image_size(side, config.patch_size)
    if dynamic and min(height, width) < MIN_DYNAMIC_PATCHES * config.patch_size:
        raise UserError(
            f"a dynamic export needs an example of at least {MIN_DYNAMIC_PATCHES * config.patch_size} px a side"
        )
    return height, width


def dynamic_shapes(patch_size: int) -> dict:
    """Batch, height and width free; height and width whole multiples of the patch size."""
    batch = torch.export.Dim("batch", min=1)
    rows = torch.export.Dim("patch_rows", min=MIN_DYNAMIC_PATCHES)
    cols = torch.export.Dim("patch_cols", min=MIN_DYNAMIC_PATCHES)
    return {"pixel_values": {0: batch, 2: patch_size * rows, 3: patch_size * cols}}


def verification_sizes(patch_size: int, image_size: tuple[int, int], dynamic: bool) -> list[tuple[int, int]]:
    """The export size and, for a dynamic graph, a non-square size the export never saw."""
    sizes = [image_size]
    if dynamic:
        rows, cols = image_size[0] // patch_size, image_size[1] // patch_size
        sizes.append(((rows + 3) * patch_size, max(cols - 2, MIN_DYNAMIC_PATCHES) * patch_size))
    return sizes


def compare_with_pytorch(
    path: Path, wrapper: ExportedViTReg, sizes: list[tuple[int, int]], batch_size: int = 2
) -> dict[str, float]:
    """Worst absolute difference between ONNX Runtime and PyTorch over every output, at each size."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    diffs = {}
    for height, width in sizes:
        pixel_values = torch.randn(batch_size, wrapper.model.config.num_channels, height, width, generator=generator)
        with torch.inference_mode():
            expected = wrapper(pixel_values)
        got = session.run(wrapper.output_names, {"pixel_values": pixel_values.numpy()})
        diffs[f"{height}x{width}"] = max(float(np.abs(a - b.numpy()).max(initial=0.0)) for a, b in zip(got, expected))
    return diffs


def write_graph(
    wrapper: ExportedViTReg,
    path: Path,
    image_size: tuple[int, int],
    dynamic: bool,
    opset: int,
    weights: Path | None = None,
) -> None:
    """Trace `wrapper` with torch.export, translate it to ONNX at `opset` and save it at `path`, its weights in the
    file `weights` beside it when given (protobuf stops at 2 GiB)."""
    import onnx_ir  # torch.onnx's own model format and writer, installed with onnxscript

    config = wrapper.model.config
    example = torch.zeros(2, config.num_channels, *image_size)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["pixel_values"],
            output_names=wrapper.output_names,
            dynamic_shapes=dynamic_shapes(config.patch_size) if dynamic else {"pixel_values": {0: "batch"}},
            verbose=False,
        )
    program.model.metadata_props.update(
        {
            "vitreg.head": wrapper.head,
            "vitreg.patch_size": str(config.patch_size),
            "vitreg.num_prefix_tokens": str(config.num_prefix_tokens),
            "vitreg.dynamic": str(dynamic).lower(),
            "vitreg.image_size": "{}x{}".format(*image_size),
        }
    )
    # `external_data` is a file name relative to the graph's folder; the graph names it, ONNX Runtime reads it.
    onnx_ir.save(program.model, path, external_data=weights.name if weights else None)


def point_weights_at(graph: Path, name: str) -> None:
    """Make the graph at `graph` read its external weights from the file `name` beside it (their final name)."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = name
    graph.write_bytes(proto.SerializeToString())


def export_onnx(
    model: str | Path | ViTRegPreTrainedModel,
    output: str | Path,
    *,
    head: str = "model",
    dynamic: bool = False,
    image_size: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    verify: bool = True,
    revision: str | None = None,
    progress: bool = True,
) -> OnnxExport:
    """Export a model to `output`, checked with `onnx.checker` and against PyTorch.

    `model`: anything `vitreg.core.opening.open_model` opens, as `head` ("model", "classification" or "backbone"): a
    ViTReg folder or Hub repo, any source `vitreg convert` reads (a DINOv2 / DINOv3 / timm / transformers checkpoint
    or Hub repo at `revision`, an official name), converted in memory, or a loaded ViTReg model (exported as the
    class it is, on the CPU).

    `dynamic` leaves batch, height and width free (any multiple of the patch size, at least 2 patches a side);
    otherwise the graph takes `image_size` (default: the config's) and any batch. With `verify`, ONNX Runtime runs
    the file at the export size (and, if dynamic, at a size the export never saw) and every output must match
    PyTorch to 1e-4; nothing is written if it does not. Models of 1 GiB of weights or more keep them in
    `OUT.onnx.data` beside the graph, written with it.
    """
    require("onnx", "onnxscript", *(["onnxruntime"] if verify else []))
    check_opset(opset)
    output = Path(output)
    weights_file = Path(f"{output}.data")  # beside the graph, named after it
    config = folder_config_before_loading(model, head)
    if config is not None:
        export_size(config, image_size, dynamic)
    start = time.perf_counter()
    # Every check that needs no weights comes before loading, the output's included: a refused export costs nothing.
    with ExitStack() as outputs:
        graph = outputs.enter_context(atomic_output_file(output, overwrite))
        opened = open_model(model, revision=revision, head=head, device="cpu", progress=progress)
        wrapper = ExportedViTReg(opened.model.eval()).eval()
        config = wrapper.model.config
        image_size = export_size(config, image_size, dynamic)
        external = sum(p.numel() * p.element_size() for p in wrapper.model.parameters()) >= EXTERNAL_DATA_BYTES
        # Entered last, so replaced first: the graph appears only once its weights are in place.
        weights = outputs.enter_context(atomic_output_file(weights_file, overwrite)) if external else None
        with tqdm(total=2 + verify, desc="export onnx", unit="step", disable=not progress) as steps:
            write_graph(wrapper, graph, image_size, dynamic, opset, weights)
            steps.update()
            import onnx

            onnx.checker.check_model(str(graph), full_check=True)
            steps.update()
            sizes = verification_sizes(config.patch_size, image_size, dynamic)
            diffs = compare_with_pytorch(graph, wrapper, sizes) if verify else {}
            steps.update(verify)
        worst = max(diffs.values(), default=0.0)
        if not worst <= TOLERANCE:  # also catches NaN
            raise UserError(f"onnxruntime disagrees with PyTorch by {worst:.2e} (> {TOLERANCE:g}); nothing written")
        if weights:
            point_weights_at(graph, weights_file.name)
        size = graph.stat().st_size + (weights.stat().st_size if weights else 0)
    if not external and overwrite and weights_file.is_file():
        weights_file.unlink()  # an older export's weights, which the new graph does not read
    return OnnxExport(
        path=output,
        head=wrapper.head,
        opset=opset,
        dynamic=dynamic,
        image_size=image_size,
        output_names=wrapper.output_names,
        seconds=time.perf_counter() - start,
        bytes=size,
        max_abs_diff=diffs,
    )
