"""Export a ViTReg model to ONNX, at one image size or at any, and check the file against PyTorch with ONNX Runtime.

The position interpolation is ordinary tensor arithmetic on the grid size (`bicubic_resampling_matrix`), so the
dynamic graph computes DINOv2's antialiased or 0.1-offset bicubic interpolation exactly at every size; DINOv3's
rotary positions (RoPE) are sines and cosines of the patch coordinates, arithmetic on the grid size as well.
"""

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vitreg.conversion.loading import folder_config, load_backbone
from vitreg.conversion.sources import resolve_source
from vitreg.core.errors import UserError
from vitreg.modeling_vitreg import (
    ViTRegBackbone,
    ViTRegConfig,
    ViTRegForImageClassification,
    ViTRegModel,
    ViTRegPreTrainedModel,
)

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
        self.head = next(name for name, cls in HEADS.items() if type(model) is cls)
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


def read_config(model_dir: str | Path, head: str = "model") -> ViTRegConfig:
    """The config of a ViTReg folder, refusing folders that are not ViTReg or lack the asked-for head."""
    model_dir = Path(model_dir)
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if not is_vitreg_folder(model_dir):
        raise UserError(f"{model_dir} is not a ViTReg folder; convert it first with vitreg convert")
    try:
        config = ViTRegConfig.from_pretrained(model_dir)
    except (ValueError, OSError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{model_dir} is not a ViTReg folder: {reason}") from None
    if head == "classification" and not any("ForImageClassification" in name for name in config.architectures or []):
        raise UserError(f"{model_dir} has no classification head (its config names {config.architectures})")
    return config


def load_model(model_dir: str | Path, head: str = "model") -> ViTRegPreTrainedModel:
    """A ViTReg folder as the `head` class (`model`, `classification`, `backbone`), fp32, eval, SDPA attention."""
    read_config(model_dir, head)
    model, info = HEADS[head].from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True
    )
    missing = [key for key in info["missing_keys"] if head != "backbone" or "classifier" not in key]
    if missing:
        raise UserError(f"{model_dir} lacks weights the {head} needs, e.g. {sorted(missing)[0]}")
    return model.eval()


def open_source(
    model: str | Path | ViTRegPreTrainedModel, head: str, revision: str | None = None
) -> tuple[ViTRegConfig, Callable[[], ViTRegPreTrainedModel]]:
    """The config of what will be exported, and how to load it (deferred, so refusals cost no loading).

    A loaded model; a ViTReg folder or Hub repo, as `head`; or any source `vitreg convert` reads (a DINOv2, timm or
    transformers checkpoint or Hub repo, an official DINOv2 name), converted in memory to the bare model.
    """
    if isinstance(model, ViTRegPreTrainedModel):
        return model.config, lambda: model
    path = resolve_source(model, revision=revision, head=False).path
    if is_vitreg_folder(path):
        return read_config(path, head), lambda: load_model(path, head)
    if head != "model":
        raise UserError(f"--head {head} needs a ViTReg folder; {model} is not one (convert it with vitreg convert)")
    backbone, _ = load_backbone(path)
    return backbone.config, lambda: backbone


def is_vitreg_folder(path: Path) -> bool:
    """Whether `path` is a folder whose config.json names a ViTReg model (unreadable JSON: a UserError)."""
    return path.is_dir() and (folder_config(path) or {}).get("model_type") == ViTRegConfig.model_type


def check_opset(opset: int) -> None:
    """Refuse opsets torch's exporter cannot write, naming the usable range."""
    if opset < MIN_OPSET:
        raise UserError(
            f"opset {opset} is too old: torch.onnx writes opset {MIN_OPSET} or newer (its operator library, "
            "LayerNormalization included, is written for opset 18)"
        )
    if opset > MAX_OPSET:
        raise UserError(f"opset {opset} is newer than torch {torch.__version__} can write (at most {MAX_OPSET})")


def check_image_size(config: ViTRegConfig, image_size: tuple[int, int], dynamic: bool) -> None:
    """Refuse an example size the patch size does not divide, or too small for a dynamic graph."""
    height, width = image_size
    patch = config.patch_size
    if height <= 0 or width <= 0 or height % patch or width % patch:
        raise UserError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    if dynamic and min(height, width) < MIN_DYNAMIC_PATCHES * patch:
        raise UserError(f"a dynamic export needs an example of at least {MIN_DYNAMIC_PATCHES * patch} px a side")


def dynamic_shapes(patch_size: int) -> dict:
    """Batch, height and width free; height and width whole multiples of the patch size."""
    batch = torch.export.Dim("batch", min=1)
    rows = torch.export.Dim("patch_rows", min=MIN_DYNAMIC_PATCHES)
    cols = torch.export.Dim("patch_cols", min=MIN_DYNAMIC_PATCHES)
    return {"pixel_values": {0: batch, 2: patch_size * rows, 3: patch_size * cols}}


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse a folder in the output's place, or an existing file without `overwrite`."""
    if output.is_dir():
        raise UserError(f"{output} is a folder, not a file")
    if output.exists() and not overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it")


@contextmanager
def staged_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """A path in a staging folder beside `output`; its files (graph and weights) replace the outputs on success."""
    check_output(output, overwrite)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    except OSError as error:
        raise UserError(f"cannot write {output}: {error.strerror or error}") from None
    try:
        yield staging / output.name
        data = output.with_name(output.name + ".data")
        staged_data = staging / data.name
        if staged_data.exists():
            os.replace(staged_data, data)
        elif data.exists():
            data.unlink()  # an older export's weights, which the new graph does not read
        os.replace(staging / output.name, output)  # last: the graph appears only when its weights are there
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verification_sizes(config: ViTRegConfig, image_size: tuple[int, int], dynamic: bool) -> list[tuple[int, int]]:
    """The export size and, for a dynamic graph, a non-square size the export never saw."""
    sizes = [image_size]
    if dynamic:
        patch = config.patch_size
        rows, cols = image_size[0] // patch, image_size[1] // patch
        sizes.append(((rows + 3) * patch, max(cols - 2, MIN_DYNAMIC_PATCHES) * patch))
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


def write_graph(wrapper: ExportedViTReg, path: Path, image_size: tuple[int, int], dynamic: bool, opset: int) -> None:
    """Trace `wrapper` with torch.export, translate it to ONNX at `opset` and save it (weights beside it if large)."""
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
    weights = sum(p.numel() * p.element_size() for p in wrapper.model.parameters())
    program.save(str(path), external_data=weights >= EXTERNAL_DATA_BYTES)


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

    `model`: a loaded ViTReg model, a ViTReg folder or Hub repo (exported as `head`: "model", "classification" or
    "backbone"), or any source `vitreg convert` reads — a DINOv2 / timm / transformers checkpoint or Hub repo (at
    `revision`), an official DINOv2 name — converted in memory and exported as the bare model.

    `dynamic` leaves batch, height and width free (any multiple of the patch size, at least 2 patches a side);
    otherwise the graph takes `image_size` (default: the config's) and any batch. With `verify`, ONNX Runtime runs
    the file at the export size (and, if dynamic, at a size the export never saw) and every output must match
    PyTorch to 1e-4; nothing is written if it does not.
    """
    import onnx

    check_opset(opset)
    output = Path(output)
    check_output(output, overwrite)
    config, load = open_source(model, head, revision)
    image_size = tuple(image_size or (config.image_size, config.image_size))
    check_image_size(config, image_size, dynamic)
    start = time.perf_counter()
    # Every check that needs no weights came first: a refused export costs no loading.
    bar = {"total": 3 + verify, "desc": "export onnx", "unit": "step", "disable": not progress}
    with staged_output(output, overwrite) as staged, tqdm(**bar) as steps:
        wrapper = ExportedViTReg(load().eval()).eval()
        steps.update()
        write_graph(wrapper, staged, image_size, dynamic, opset)
        steps.update()
        onnx.checker.check_model(str(staged), full_check=True)
        steps.update()
        diffs = compare_with_pytorch(staged, wrapper, verification_sizes(config, image_size, dynamic)) if verify else {}
        steps.update(verify)
        worst = max(diffs.values(), default=0.0)
        if not worst <= TOLERANCE:  # also catches NaN
            raise UserError(f"onnxruntime disagrees with PyTorch by {worst:.2e} (> {TOLERANCE:g}); nothing written")
        size = sum(path.stat().st_size for path in staged.parent.iterdir())
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
