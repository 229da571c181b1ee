"""Converting a checkpoint file or folder into a Hub-ready ViTReg folder, in batch, and back to DINOv2's or DINOv3's
layout."""

import math
import re
from functools import partial
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

import vitreg
from vitreg.core.errors import UserError
from vitreg.core.folders import atomic_output_file, check_output_dir
from vitreg.core.opening import folder_processor
from vitreg.core.provenance import Parity, Provenance
from vitreg.model_cards import save_model_folder
from vitreg.model_cards.registry import DINOV3_LICENSE, identify_dinov3_file
from vitreg.modeling_vitreg import ViTRegConfig, ViTRegForImageClassification, ViTRegModel

from .architectures import HEAD_KINDS, OFFICIAL_ARCHITECTURES, match_official
from .checkpoints import load_checkpoint, load_tensors, read_folder_config, sha256
from .dinov3 import (
    convert_dinov3_hub,
    convert_dinov3_timm,
    convert_dinov3_transformers,
    dinov3_shapes,
    official_shapes,
    to_dinov3,
)
from .heads import imagenet_labels, load_official_head
from .layouts import (
    Conversion,
    check_interpolation,
    convert_transformers,
    convert_vit,
    sniff_format,
    split_prefix,
    to_dinov2,
    unchunk_blocks,
)
from .memory import cast_releasing
from .reference import (
    comparison_sizes,
    timm_architecture,
    timm_available,
    timm_dinov3_reference,
    timm_dinov3_unsupported,
    timm_folder_reference,
    timm_reference,
    timm_source_heads,
    token_differences,
    transformers_reference,
)
from .sources import resolve_source
from .streaming import Concat, write_safetensors_shards

logger = logging.get_logger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_SHARD_SIZE = "2GB"  # ViT-g (4.5 GB in float32) comes out in 3 shards
# --verify: the largest token difference allowed, relative to the largest token value (attention as sharp as a
# trained model's turns float rounding into absolute differences of 1e-4 between exact implementations; a wrong
# conversion differs by the order of the tokens themselves), per dtype the folder stores.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
OFFICIAL_FILE = re.compile(r"(dinov2_vit[sblg]14(?:_reg4)?)_pretrain\.pth")
EXPORT_SUFFIXES = (".pth", ".pt", ".safetensors")


def read_source(
    source: str | Path, num_heads: int | None = None, interpolation: str = "source"
) -> tuple[Conversion, dict[str, torch.Tensor]]:
    """Load and convert any supported checkpoint; also returns the prefix-free source weights (for references).

    `num_heads` overrides a head count the source does not record; `interpolation` (`source` or `dinov2`) chooses
    whose position interpolation a learned-position model gets: the source's own code's, or DINOv2's official one.
    """
    source = Path(source)
    check_interpolation(interpolation)
    tensors, wrappers = load_checkpoint(source)
    state_dict, prefix, outside = split_prefix(tensors)
    state_dict, chunked = unchunk_blocks(state_dict)
    source_format = sniff_format(state_dict, flattened=bool(wrappers or prefix or chunked))
    if source_format == "vitreg":
        raise UserError(f"{source}: already a ViTReg checkpoint")
    if source_format in ("timm", "dinov3-timm"):
        num_heads = _timm_folder_heads(source, num_heads, source_width(state_dict))
    if source_format == "dinov3-hub":
        conversion = convert_dinov3_hub(state_dict, num_heads)
    elif source_format == "dinov3-transformers":
        conversion = convert_dinov3_transformers(state_dict, read_folder_config(source), num_heads)
    elif source_format == "dinov3-timm":
        conversion = convert_dinov3_timm(state_dict, num_heads)
    elif source_format == "transformers":
        conversion = convert_transformers(state_dict, read_folder_config(source), num_heads, interpolation)
        if "classifier.weight" in outside and prefix:
            conversion = _with_transformers_classifier(conversion, tensors, read_folder_config(source) or {})
    else:
        conversion = convert_vit(state_dict, source_format, num_heads, interpolation)
        official_grid = (conversion.config.image_size, conversion.config.patch_size) == (518, 14)
        if source_format == "dinov2-hub" and not official_grid:
            conversion.source_format = "dinov2-train"  # a flat file at a training resolution or patch size
    dropped = [key for key in outside if not key.startswith("classifier.")] if prefix else []
    if dropped:
        conversion.notes.append(f"dropped {len(dropped)} tensors beside the backbone ({dropped[0].split('.')[0]}, ...)")
    return conversion, state_dict


def source_folder_config(source: Path) -> dict | None:
    """The `config.json` of a source folder (None for a file or a folder without one)."""
    return read_folder_config(source) if (source / "config.json").is_file() else None


def source_width(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The embedding width of a timm-layout state dict (None without a patch embedding)."""
    patch = state_dict.get("patch_embed.proj.weight")
    return None if patch is None else patch.shape[0]


def _timm_folder_heads(source: Path, num_heads: int | None, width: int | None) -> int | None:
    """The head count a timm folder's own architecture defines (timm's `config.json`), checked against `num_heads`;
    `num_heads` for a bare state dict, which records none."""
    folder_config = source_folder_config(source)
    heads = timm_source_heads(source, folder_config, width)
    if heads is None:
        return num_heads
    if num_heads is not None and num_heads != heads:
        architecture = timm_architecture(folder_config)
        raise UserError(f"--num-heads {num_heads} contradicts the source's timm architecture {architecture} ({heads})")
    return heads


def _with_transformers_classifier(conversion: Conversion, tensors: dict, folder_config: dict) -> Conversion:
    # Dinov2ForImageClassification: a linear head on cat(CLS, mean patch) of the last block, as DINOv2's.
    if "classifier.bias" not in tensors:
        raise UserError("the classifier has a weight but no bias")
    head = {"classifier.weight": tensors["classifier.weight"], "classifier.bias": tensors["classifier.bias"]}
    labels = {int(index): name for index, name in folder_config.get("id2label", {}).items()} or None
    return attach_head(conversion, head, num_layers=1, labels=labels)


def attach_head(
    conversion: Conversion, head: dict[str, torch.Tensor], num_layers: int, labels: dict | None
) -> Conversion:
    """The conversion with a linear classifier reading the CLS token of the last `num_layers` blocks + mean patch."""
    config = conversion.config
    config.classifier_num_layers = num_layers
    config.num_labels = head["classifier.weight"].shape[0]
    if labels:
        config.id2label = labels
        config.label2id = {name: index for index, name in labels.items()}
    try:
        config.validate_vitreg()
    except ValueError as error:
        raise UserError(f"this head does not fit the backbone: {error}") from None
    conversion.state_dict.update(head)
    return conversion


def build_model(
    conversion: Conversion, dtype: torch.dtype | None = None, source: Path | None = None
) -> PreTrainedModel:
    """A ViTReg model holding the converted tensors themselves (built on the meta device: no second copy)."""
    model, state_dict = meta_model(conversion)
    state_dict = {key: v.materialize() if isinstance(v, Concat) else v for key, v in state_dict.items()}
    if dtype is not None:
        state_dict = cast_releasing(state_dict, dtype, source)  # `source`: the mapped file whose pages can go
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def meta_model(conversion: Conversion) -> tuple[PreTrainedModel, dict[str, torch.Tensor | Concat]]:
    """The conversion's model on the meta device, and its tensors under the model's names in the model's order.

    Refuses tensors missing from the architecture the shapes describe, unknown to it or of another shape.
    """
    state_dict = conversion.state_dict
    classify = "classifier.weight" in state_dict
    if classify:
        state_dict = {
            key if key.startswith("classifier.") else f"vitreg.{key}": value for key, value in state_dict.items()
        }
    with torch.device("meta"):
        model = (ViTRegForImageClassification if classify else ViTRegModel)(conversion.config)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unknown = [key for key in state_dict if key not in expected]
    if missing or unknown:
        problem = f"missing keys {_short(missing)}" if missing else f"unknown keys {_short(unknown)}"
        raise UserError(f"the checkpoint does not match the architecture its shapes describe: {problem}")
    for key, tensor in expected.items():
        if state_dict[key].shape != tensor.shape:
            name = conversion.source_names.get(key.removeprefix("vitreg."), key)
            raise UserError(f"{name}: shape {list(state_dict[key].shape)}, expected {list(tensor.shape)}")
    return model, {key: state_dict[key] for key in expected}


def _short(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")


def provenance_of(
    source: Path, conversion: Conversion, head: Path | None, progress: bool, hash_files: bool = True
) -> Provenance:
    """The provenance record of a conversion, hashing the source file(s) unless `hash_files` is False."""
    provenance = Provenance(
        kind="converted",
        source_file=source.name,
        source_format=conversion.source_format,
        source_sha256=sha256(source, progress) if hash_files and source.is_file() else None,
        vitreg_version=vitreg.__version__,
    )
    official = match_official(conversion.config)
    if official and conversion.source_format == "dinov2-hub":
        provenance.official_name, provenance.base_model = official.name, official.base_model
    if conversion.source_format.startswith("dinov2") or conversion.source_format == "transformers":
        provenance.license, provenance.dinov2 = "apache-2.0", True
    if conversion.source_format.startswith("dinov3"):
        provenance.license = DINOV3_LICENSE  # the weights stay under Meta's DINOv3 License, whatever their layout
        row = identify_dinov3_file(source.name)
        if row is not None and dinov3_shapes(row.name) == official_shapes(conversion.config):
            provenance.official_name, provenance.base_model = row.name, row.base_model
    if head is not None:
        provenance.head_file, provenance.head_sha256 = head.name, sha256(head, progress) if hash_files else None
    return provenance


def source_reference(
    conversion: Conversion, source_state: dict[str, torch.Tensor], source: Path
) -> tuple[torch.nn.Module, str, str]:
    """The source's own implementation to compare a conversion with, its short name and what it was built from.

    transformers folders: transformers' model of the folder itself; timm folders: timm's model of the architecture
    their config.json names; bare state dicts, which record no head count, timm with the conversion's architecture.
    """
    config, source_format = conversion.config, conversion.source_format
    if source_format in ("transformers", "dinov3-transformers"):
        return transformers_reference(source), "transformers", "the source folder's own config.json"
    folder_config = source_folder_config(source)
    architecture = timm_architecture(folder_config)
    if timm_source_heads(source, folder_config, config.hidden_size) is not None:
        size = None if config.uses_rope else config.image_size
        try:
            reference = timm_folder_reference(source, source_state, size)
        except (RuntimeError, ValueError, TypeError, KeyError) as error:
            raise UserError(f"--verify: timm cannot build the source's {architecture}: {_first_line(error)}") from None
        return reference, "timm", f"timm's {architecture} as the source's config.json defines it"
    built = "the converted architecture (the checkpoint records no head count)"
    if conversion.guessed_heads:
        built += f": num_attention_heads={config.num_attention_heads} is the same guess there and goes unchecked"
    if source_format.startswith("dinov3"):
        return timm_dinov3_reference(source_state, source_format, config), "timm", built
    return timm_reference(source_state, source_format, config), "timm", built


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def verify_folder(folder: Path, conversion: Conversion, source_state: dict[str, torch.Tensor], source: Path) -> Parity:
    """Reload the written folder and compare every token with the source's own implementation at the native size and
    two others; UserError naming the worst size when the difference relative to the largest token value exceeds
    the tolerance of the stored dtype. Returns the parity at the worst size."""
    from transformers import AutoModel, AutoModelForImageClassification

    config = conversion.config
    reference, name, built = source_reference(conversion, source_state, source)
    # The references resize position embeddings without DINOv2's 0.1 offset: compare those models at the native size.
    sizes = comparison_sizes(config, native_only=bool(config.interpolate_offset))
    if "classifier.weight" in conversion.state_dict:
        model = AutoModelForImageClassification.from_pretrained(folder).vitreg  # the tokens come from the backbone
    else:
        model = AutoModel.from_pretrained(folder)
    tolerance = TOLERANCE[model.dtype]
    differences = token_differences(model.float().eval(), reference, sizes)
    relative = {size: difference / max(scale, 1e-12) for size, (difference, scale) in differences.items()}
    worst = max(relative, key=lambda size: math.inf if math.isnan(relative[size]) else relative[size])
    difference, listed = differences[worst][0], ", ".join(f"{h}x{w}" for h, w in sizes)
    logger.info(
        f"verify: max abs difference {difference:.3g} ({relative[worst]:.2g} of the largest token value) vs {name}, "
        f"built from {built}, over every token ({listed})"
    )
    if not relative[worst] <= tolerance:  # NaN fails too
        height, width = worst
        raise UserError(
            f"verification failed at {height}x{width}: the tokens differ from {name}'s by {difference:.3g}, "
            f"{relative[worst]:.2g} of the largest token value (tolerance {tolerance:g}); nothing was written"
        )
    return Parity(name, difference, worst)


def check_verifiable(conversion: Conversion, source: Path) -> None:
    """Refuse `--verify` up front when its reference implementation (timm) is not installed or lacks the model."""
    if conversion.source_format in ("transformers", "dinov3-transformers"):
        return  # compared with transformers' own model of the folder
    if not timm_available():
        raise UserError(
            "--verify compares every token with timm, which is not installed: pip install 'vitreg[convert]' "
            "(or convert without --verify)"
        )
    folder_config = source_folder_config(source)
    if timm_source_heads(source, folder_config, conversion.config.hidden_size) is not None:
        return  # timm's own model of the source's architecture
    problem = timm_dinov3_unsupported(conversion.config) if conversion.source_format.startswith("dinov3") else None
    if problem:
        raise UserError(f"--verify compares every token with timm, whose DINOv3 model has no {problem}")


def convert(
    source: str | Path,
    output_dir: str | Path,
    *,
    head: str | Path | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    num_heads: int | None = None,
    verify: bool = False,
    interpolation: str = "source",
    progress: bool = True,
) -> Path:
    """Convert a DINOv2 (hub or training), DINOv3, timm or transformers checkpoint into a Hub-ready ViTReg folder.

    `source`: a file or folder, an official DINOv2 name (`dinov2_vitl14_reg4`; `dinov2_vitl14_reg4_lc` with its
    linear4 head), fetched into torch's hub cache, or a Hub repo id at `revision`, fetched into the Hub cache.
    `head` adds an official `*_linear_head.pth` / `*_linear4_head.pth` classifier (ImageNet-1k labels);
    `dtype` ("float32", "float16", "bfloat16") casts the weights; `num_heads` gives a head count the source does not
    record (default: width / 64, as in DINOv2, and said so); `interpolation`: `source` keeps the source's own
    position interpolation (a transformers folder keeps its function at every size), `dinov2` takes DINOv2's
    official one. `verify` compares every token of the written folder with the source's own implementation (timm
    / transformers) before the folder appears, raising UserError beyond tolerance. The folder keeps the source's
    own `preprocessor_config.json`, if any. It appears only when complete (and verified); a non-empty `output_dir`
    needs `overwrite`.
    """
    output_dir = Path(output_dir)
    check_interpolation(interpolation)
    inputs = [Path(str(path)).expanduser() for path in (source, head) if path is not None]
    check_output_dir(output_dir, overwrite, inputs)  # refuse before any heavy work
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    resolved = resolve_source(source, revision=revision, progress=progress)
    if resolved.head is not None:
        if head is not None:
            raise UserError(f"{resolved.name} brings its own linear head: drop --head")
        head = resolved.head
    source = resolved.path
    conversion, source_state = read_source(source, num_heads, interpolation)
    if verify:
        check_verifiable(conversion, source)
    if head is not None:
        head = Path(head)
        weights, num_layers = load_official_head(head, conversion.config.hidden_size)
        labels = imagenet_labels(weights["classifier.weight"].shape[0])
        conversion = attach_head(conversion, weights, num_layers, labels)
    model, state_dict = meta_model(conversion)  # nothing materialised: the weights stream from the mapped source
    for note in conversion.notes:  # once the checkpoint is known to fit its architecture
        logger.info(f"note: {note}")
    if dtype is not None:
        model.to(dtype)  # on the meta device: sets the dtype config.json records
    provenance = provenance_of(source, conversion, head, progress)
    if resolved.kind == "hub":
        provenance.source_file = resolved.name + (f"@{resolved.revision}" if resolved.revision else "")
        provenance.base_model = provenance.base_model or resolved.name
    write_weights = partial(
        write_safetensors_shards,
        state_dict,
        max_shard_size=MAX_SHARD_SIZE,
        dtype=dtype,
        release_from=source,
        total_parameters=model.num_parameters(),
        progress=progress,
    )

    def write_and_verify(staging: Path) -> None:
        # In the staging folder, before it takes the output's place: a failed check leaves nothing behind.
        write_weights(staging)
        if verify:
            provenance.parity = verify_folder(staging, conversion, source_state, source)

    # The source's own preprocessing, if it has any (a transformers folder or Hub repo), else the default policy.
    processor = folder_processor(source if source.is_dir() else None, conversion.config, provenance)
    save_model_folder(
        model,
        output_dir,
        provenance,
        overwrite=overwrite,
        processor=processor,
        write_weights=write_and_verify,
        inputs=[*inputs, source, *([head] if head is not None else [])],
    )
    return output_dir


def official_files(source_dir: Path) -> list[tuple[str, Path, dict[str, Path]]]:
    """`(architecture, backbone file, {head kind: head file})` for every official backbone file in a folder."""
    found = []
    for path in sorted(source_dir.iterdir()):
        match = OFFICIAL_FILE.fullmatch(path.name)
        if match and match.group(1) in OFFICIAL_ARCHITECTURES:
            name = match.group(1)
            heads = {kind: source_dir / f"{name}_{kind}_head.pth" for kind in HEAD_KINDS}
            found.append((name, path, {kind: file for kind, file in heads.items() if file.is_file()}))
    return found


def convert_batch(source_dir: str | Path, output_dir: str | Path, *, overwrite: bool = False, **options) -> list[Path]:
    """Convert every official DINOv2 file in `source_dir` into `output_dir/<name>[-linear|-linear4]`.

    Folder names: `dinov2-vitb14-reg4` for `dinov2_vitb14_reg4_pretrain.pth`, `dinov2-vitb14-reg4-linear4` with
    `dinov2_vitb14_reg4_linear4_head.pth`; `options` are those of `convert`.
    """
    source_dir, output_dir = Path(source_dir), Path(output_dir)
    if not source_dir.is_dir():
        raise UserError(f"{source_dir}: not a folder")
    found = official_files(source_dir)
    if not found:
        raise UserError(f"{source_dir}: no official DINOv2 files (dinov2_vit{{s,b,l,g}}14[_reg4]_pretrain.pth)")
    jobs = []
    for name, backbone, heads in found:
        folder = OFFICIAL_ARCHITECTURES[name].repo_name
        jobs.append((backbone, output_dir / folder, None))
        jobs.extend((backbone, output_dir / f"{folder}-{kind}", head) for kind, head in heads.items())
    for _, target, _ in jobs:  # refuse before converting anything
        check_output_dir(target, overwrite, [source_dir])
    written = []
    for backbone, target, head in jobs:
        logger.info(f"{backbone.name}{' + ' + head.name if head else ''} -> {target}")
        written.append(convert(backbone, target, head=head, overwrite=overwrite, **options))
    return written


def export_dinov2(vitreg_dir: str | Path, output_file: str | Path, *, overwrite: bool = False) -> Path:
    """Write a ViTReg folder's backbone as an official DINOv2 state dict (`.pth`, or `.safetensors`)."""
    return export_official(vitreg_dir, output_file, layout="dinov2", overwrite=overwrite)


def export_official(
    vitreg_dir: str | Path, output_file: str | Path, *, layout: str | None = None, overwrite: bool = False
) -> Path:
    """Write a ViTReg folder's backbone as an official state dict (`.pth`, or `.safetensors`): DINOv3's layout for a
    RoPE model, DINOv2's otherwise; `layout` ("dinov2" / "dinov3"), when given, must be that one."""
    vitreg_dir, output_file = Path(vitreg_dir), Path(output_file)
    if output_file.suffix not in EXPORT_SUFFIXES:
        raise UserError(
            f"{output_file}: the official layout is a state dict: name the file .pth or .pt (torch.save, as the "
            "official checkpoints) or .safetensors"
        )
    folder_config = read_folder_config(vitreg_dir)
    if folder_config is None or folder_config.get("model_type") != ViTRegConfig.model_type:
        raise UserError(f"{vitreg_dir}: not a ViTReg folder (config.json with model_type 'vitreg')")
    config = ViTRegConfig.from_pretrained(vitreg_dir)
    family = "dinov3" if config.uses_rope else "dinov2"
    if layout is not None and layout != family:
        kind = "RoPE (DINOv3)" if config.uses_rope else "learned-position (DINOv2)"
        raise UserError(f"{vitreg_dir}: a {kind} model has no official {layout} layout: export with --to {family}")
    tensors = load_tensors(vitreg_dir)
    backbone = {
        key.removeprefix("vitreg."): value for key, value in tensors.items() if not key.startswith("classifier.")
    }
    exported = (to_dinov3 if config.uses_rope else to_dinov2)(backbone, config)
    with atomic_output_file(output_file, overwrite) as temporary:
        if output_file.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(exported, temporary)
        else:
            torch.save(exported, temporary)
    return output_file
