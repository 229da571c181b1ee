"""Export a ViTReg model to ONNX, at one image size or at any, and check the file against PyTorch with ONNX Runtime.

The position interpolation is ordinary tensor arithmetic on the grid size (`bicubic_resampling_matrix`), so the
dynamic graph computes DINOv2's antialiased or 0.1-offset bicubic interpolation exactly at every size; DINOv3's
rotary positions (RoPE) are sines and cosines of the patch coordinates, arithmetic on the grid size as well.

Two options trade portability for ONNX Runtime's speed. `optimize` replaces each block's attention (the qkv
projection, scaled dot-product attention and the head merge) by ONNX Runtime's fused `com.microsoft.Attention`
kernel: the graph then runs in ONNX Runtime only. ONNX Runtime's own transformer optimizer
(`onnxruntime.transformers.optimizer`, model_type "vit") finds no attention in torch.export's graph; of its fusions
only SkipLayerNormalization applies that ONNX Runtime's session does not already do (BiasGelu), and its kernel is
slower than the separate Add and LayerNormalization here, so it is not used. `quantize="int8"` stores the weights
of every matrix product as int8 (ONNX Runtime's dynamic quantisation, per output channel; activations quantised at
run time), checked on real photos against float32 PyTorch and refused when it strays (see `INT8_MIN_COSINE`).
"""

import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vitreg.core.errors import UserError, require
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

HEADS = {"model": ViTRegModel, "classification": ViTRegForImageClassification, "backbone": ViTRegBackbone}
MODEL_OUTPUTS = ("last_hidden_state", "pooler_output", "register_tokens", "patch_tokens")
# torch.onnx's operator library is written for opset 18; torch 2.14 writes up to 23 (torch.onnx._constants).
MIN_OPSET, DEFAULT_OPSET, MAX_OPSET = 18, 20, 23
# A dynamic graph takes images of at least 2 patches a side: torch.export specialises sizes 0 and 1.
MIN_DYNAMIC_PATCHES = 2
# Protobuf files stop at 2 GiB: larger models keep their weights in OUT.onnx.data beside the graph.
EXTERNAL_DATA_BYTES = 1 << 30
PROTOBUF_BYTES = 1 << 31  # what one protobuf file can hold: an int8 graph keeps its weights inline
TOLERANCE = 1e-4  # fp32, every output, max abs
QUANTIZE = ("int8",)
# An int8 graph must keep every CLS and patch token (or feature-map position) of the sample photos at cosine
# similarity >= this to float32 PyTorch, and a classifier every top-1 label; otherwise nothing is written.
INT8_MIN_COSINE = 0.99


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
    fused_attention: int = 0  # blocks whose attention runs as ONNX Runtime's fused kernel (`optimize`)
    quantize: str | None = None
    int8_accuracy: dict[str, float] = field(default_factory=dict)  # see `int8_accuracy`

    def summary(self) -> str:
        """One line for the command's output."""
        height, width = self.image_size
        sizes = "batch, height and width dynamic" if self.dynamic else f"batch dynamic, {height}x{width} px"
        checks = ", ".join(f"{diff:.1e} at {size}" for size, diff in self.max_abs_diff.items())
        checked = f"; onnxruntime vs PyTorch max |diff| {checks}" if checks else ""
        fused = f"; attention fused in {self.fused_attention} blocks (ONNX Runtime only)" * bool(self.fused_attention)
        accuracy = ", ".join(f"{name} {value:.4g}" for name, value in self.int8_accuracy.items())
        quantized = f"; {self.quantize} weights, vs float32 PyTorch on the sample photos: {accuracy}" * bool(accuracy)
        return (
            f"wrote {self.path} ({self.bytes / 2**20:.1f} MiB, opset {self.opset}, {self.head}: "
            f"{', '.join(self.output_names)}; {sizes}) in {self.seconds:.1f} s{checked}{fused}{quantized}"
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


# torch.export's attention, per block: qkv = x @ W + b ([B, N, 3D]) -> Reshape [B, N, 3, H, d] -> Transpose
# [3, B, H, N, d] -> q, k, v by Slice + Squeeze (k further transposed by Reshape / Transpose), q and k each
# multiplied by a scalar (together the softmax scale) -> MatMul -> Softmax -> MatMul -> Reshape / Transpose back to
# [B, N, D]. Only these node types may lie between the qkv projection and the softmax's products.
VIEW_OPS = {"Reshape", "Transpose", "Squeeze", "Slice", "Mul"}


class GraphIndex:
    """Who produces and who consumes each tensor of an ONNX graph, and the value of small constants."""

    def __init__(self, proto, folder: Path):
        self.graph = proto.graph
        self.folder = folder
        self.initializers = {tensor.name: tensor for tensor in self.graph.initializer}
        self.producer = {name: node for node in self.graph.node for name in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, None for computed tensors."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name], base_dir=str(self.folder))
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def back_to_qkv(self, name: str, part: int) -> tuple[str, float] | None:
        """Follow q (part 0), k (1) or v (2) back through view ops to the qkv projection's output, with the scalar
        it was multiplied by; None if the path holds anything else (RoPE, a mask, another slice)."""
        scale, sliced = 1.0, False
        while (node := self.producer.get(name)) is not None and node.op_type in VIEW_OPS:
            if node.op_type == "Mul":
                factors = [self.constant(operand) for operand in node.input]
                known = [i for i, value in enumerate(factors) if value is not None and value.size == 1]
                if len(known) != 1:
                    return None
                scale *= float(factors[known[0]].reshape(()))
                name = node.input[1 - known[0]]
                continue
            if node.op_type == "Slice":
                starts = self.constant(node.input[1])
                if sliced or starts is None or starts.reshape(-1).tolist() != [part]:
                    return None
                sliced = True
            name = node.input[0]
        return (name, scale) if sliced and node is not None and node.op_type == "Add" else None

    def forward_to_merged(self, name: str) -> str | None:
        """Follow the attention output [B, H, N, d] forward through its only consumers, Reshape or Transpose, to the
        merged [B, N, D] tensor (the output of the last Reshape)."""
        merged = None
        while len(users := self.consumers.get(name, [])) == 1 and users[0].op_type in ("Reshape", "Transpose"):
            name = users[0].output[0]
            merged = name if users[0].op_type == "Reshape" else merged
        return merged


def fuse_attention(path: Path, num_heads: int) -> int:
    """Rewrite the graph at `path` in place so each block's attention (qkv projection, scaled dot-product attention,
    head merge) runs as ONNX Runtime's `com.microsoft.Attention`; returns how many were fused. A block whose
    attention does anything else between projection and softmax (RoPE, a masked key bias computed in the graph) is
    left as it is."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(path), load_external_data=False)
    index = GraphIndex(proto, path.parent)
    fused = 0
    for softmax in [node for node in index.graph.node if node.op_type == "Softmax"]:
        scores = index.producer.get(softmax.input[0])
        users = index.consumers.get(softmax.output[0], [])
        if scores is None or scores.op_type != "MatMul" or len(users) != 1 or users[0].op_type != "MatMul":
            continue
        weighted = users[0]  # softmax @ v
        found = [index.back_to_qkv(name, part) for part, name in enumerate((*scores.input, weighted.input[1]))]
        if None in found or len({name for name, _ in found}) != 1 or found[2][1] != 1.0:
            continue
        merged = index.forward_to_merged(weighted.output[0])
        add = index.producer[found[0][0]]
        bias = next((name for name in add.input if name in index.initializers), None)
        projection = index.producer.get(next((name for name in add.input if name != bias), ""))
        if merged is None or bias is None or projection is None or projection.op_type != "MatMul":
            continue
        weight = index.initializers.get(projection.input[1])  # [D, 3D]: q, k, v, each head after head
        dims = list(weight.dims) if weight is not None else []
        if len(dims) != 2 or dims[1] != 3 * dims[0] or dims[0] % num_heads:
            continue
        attention = helper.make_node(
            "Attention",
            [projection.input[0], projection.input[1], bias],
            [merged],
            name=f"fused_attention_{fused}",
            domain="com.microsoft",
            num_heads=num_heads,
            scale=found[0][1] * found[1][1],
        )
        index.producer[merged].CopyFrom(attention)  # in the merged tensor's place: the graph stays sorted
        fused += 1
    if fused:
        drop_unused(index.graph)
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        path.write_bytes(proto.SerializeToString())  # weights stay where they are (inline or in the .data file)
    return fused


def drop_unused(graph) -> None:
    """Remove the nodes and initializers no graph output depends on any more."""
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
    initializers = [clone(tensor) for tensor in graph.initializer if tensor.name in needed]
    kept = [clone(node) for node in reversed(kept)]  # copies: the repeated fields are cleared below
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def clone(message):
    """A detached copy of a protobuf message."""
    return type(message).FromString(message.SerializeToString())


def quantize_int8(source: Path, target: Path) -> None:
    """Write `source` to `target` with the weights of every matrix product (and fused attention) in int8, per
    output channel; activations are quantised at run time (ONNX Runtime's dynamic quantisation)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {tensor.name for tensor in graph.initializer if len(tensor.dims) == 2}  # [in, out] matrices
    # The linear layers only: the position-interpolation products (a 3-D table) stay float32 and exact.
    layers = [node.name for node in graph.node if node.op_type in ("MatMul", "Attention") and node.input[1] in weights]
    quantize_dynamic(
        source, target, weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=layers,
        op_types_to_quantize=["MatMul", "Attention"],
    )  # fmt: skip


def sample_pixels(processor, image_size: tuple[int, int]) -> torch.Tensor:
    """The sample photos as `processor` prepares them, at the square side `max(image_size)`, cut to `image_size`
    around the centre: `[photos, C, H, W]`."""
    from vitreg.core.images import sample_images, size_options

    height, width = image_size
    pixels = processor(sample_images(), return_tensors="pt", **size_options(processor, max(height, width)))
    pixels = pixels["pixel_values"]
    top, left = (pixels.shape[-2] - height) // 2, (pixels.shape[-1] - width) // 2
    return pixels[..., top : top + height, left : left + width].contiguous()


def cosine(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Cosine similarity along `axis`."""
    return (a * b).sum(axis) / np.maximum(np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis), 1e-12)


def int8_accuracy(path: Path, wrapper: ExportedViTReg, pixel_values: torch.Tensor) -> dict[str, float]:
    """How the int8 graph at `path` differs from float32 PyTorch on `pixel_values`: max and mean absolute error of
    the tokens (feature maps, logits), the lowest cosine similarity of a CLS and of a patch token (feature-map
    position), and for a classifier the share of photos whose top-1 label is kept."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = wrapper(pixel_values)[0].numpy()  # [B, P + HW, D] tokens, [B, D, h, w] maps or [B, labels]
    got = session.run(wrapper.output_names[:1], {"pixel_values": pixel_values.numpy()})[0]
    error = np.abs(got - expected)
    accuracy = {"max |error|": float(error.max()), "mean |error|": float(error.mean())}
    if wrapper.head == "classification":
        accuracy["top-1 kept"] = float((got.argmax(-1) == expected.argmax(-1)).mean())
    elif wrapper.head == "backbone":
        accuracy["min patch cosine"] = float(cosine(got, expected, axis=1).min())
    else:
        prefix = wrapper.model.config.num_prefix_tokens
        accuracy["min CLS cosine"] = float(cosine(got[:, 0], expected[:, 0]).min())
        accuracy["min patch cosine"] = float(cosine(got[:, prefix:], expected[:, prefix:]).min())
    return accuracy


def check_int8(accuracy: dict[str, float]) -> None:
    """Refuse an int8 graph that changes a top-1 label or a token's direction beyond `INT8_MIN_COSINE`."""
    if accuracy.get("top-1 kept", 1.0) < 1.0:
        raise UserError(
            f"the int8 graph changes the top-1 label of {1 - accuracy['top-1 kept']:.0%} of the sample photos; "
            "nothing written (export without --quantize)"
        )
    worst = min((value for name, value in accuracy.items() if "cosine" in name), default=1.0)
    if not worst >= INT8_MIN_COSINE:
        raise UserError(
            f"the int8 graph's tokens reach only cosine {worst:.4f} to float32 PyTorch on the sample photos "
            f"(< {INT8_MIN_COSINE}); nothing written (export without --quantize)"
        )


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
    optimize: bool = False,
    quantize: str | None = None,
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

    `optimize` fuses each block's attention into ONNX Runtime's `com.microsoft.Attention` (faster in ONNX Runtime,
    which alone can then run the graph; checked as above). `quantize="int8"` writes int8 weights (`quantize_int8`)
    after the float32 graph passed its check, and only if on the sample photos every CLS and patch token keeps
    cosine >= `INT8_MIN_COSINE` to float32 PyTorch and a classifier every top-1 label (`OnnxExport.int8_accuracy`).
    """
    require("onnx", "onnxscript", *(["onnxruntime"] if verify or quantize else []), extra="onnx")
    check_opset(opset)
    if quantize not in (None, *QUANTIZE):
        raise UserError(f"--quantize takes {', '.join(QUANTIZE)}, got {quantize!r}")
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
        float_bytes = sum(p.numel() * p.element_size() for p in wrapper.model.parameters())
        if quantize and float_bytes // 4 >= PROTOBUF_BYTES:
            raise UserError("--quantize int8 takes models under 2 GiB of int8 weights (one protobuf file)")
        external = not quantize and float_bytes >= EXTERNAL_DATA_BYTES
        # Entered last, so replaced first: the graph appears only once its weights are in place.
        weights = outputs.enter_context(atomic_output_file(weights_file, overwrite)) if external else None
        # An int8 export writes and checks the float32 graph in a scratch folder first, then quantises it to `graph`.
        scratch = Path(outputs.enter_context(tempfile.TemporaryDirectory(prefix="vitreg-onnx-"))) if quantize else None
        float_graph = scratch / "float32.onnx" if quantize else graph
        float_weights = weights
        if quantize and float_bytes >= EXTERNAL_DATA_BYTES:
            float_weights = scratch / "float32.onnx.data"
        fused, accuracy = 0, {}
        with tqdm(total=2 + verify + bool(quantize), desc="export onnx", unit="step", disable=not progress) as steps:
            write_graph(wrapper, float_graph, image_size, dynamic, opset, float_weights)
            fused = fuse_attention(float_graph, config.num_attention_heads) if optimize else 0
            steps.update()
            import onnx

            onnx.checker.check_model(str(float_graph), full_check=True)
            steps.update()
            sizes = verification_sizes(config.patch_size, image_size, dynamic)
            diffs = compare_with_pytorch(float_graph, wrapper, sizes) if verify else {}
            steps.update(verify)
            worst = max(diffs.values(), default=0.0)
            if not worst <= TOLERANCE:  # also catches NaN
                raise UserError(f"onnxruntime disagrees with PyTorch by {worst:.2e} (> {TOLERANCE:g}); nothing written")
            if quantize:
                quantize_int8(float_graph, graph)
                accuracy = int8_accuracy(graph, wrapper, sample_pixels(opened.processor, image_size))
                check_int8(accuracy)
                steps.update()
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
        fused_attention=fused,
        quantize=quantize,
        int8_accuracy=accuracy,
    )
