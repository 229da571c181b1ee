"""The model card of every folder ViTReg writes: metadata through ModelCardData, body from a Jinja template."""

import json
import math
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

from vitreg import __version__  # the package root holds only the version
from vitreg.core.images import IMAGENET_MEAN, IMAGENET_STD, SATELLITE_MEAN, SATELLITE_STD
from vitreg.core.provenance import PROVENANCE_FILE, NeuronShift, Parity, Provenance

from . import registry

TEMPLATE_PATH = Path(__file__).parent / "templates" / "modelcard.md"
EXAMPLE_IMAGE_URL = "http://images.cocodataset.org/val2017/000000039769.jpg"  # the usage snippets' one image
UNPUBLISHED_REPO_ID = "ORG/NAME"  # stands in the snippets until `vitreg publish` writes the real repo id
RESAMPLING = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as transformers' image processors store `resample`

REGISTERS_BIBTEX = """@inproceedings{darcet2024registers,
  title     = {Vision Transformers Need Registers},
  author    = {Darcet, Timoth{\\'e}e and Oquab, Maxime and Mairal, Julien and Bojanowski, Piotr},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2309.16588},
  archivePrefix = {arXiv}
}"""

DINOV2_BIBTEX = """@article{oquab2023dinov2,
  title   = {{DINOv2}: Learning Robust Visual Features without Supervision},
  author  = {Oquab, Maxime and Darcet, Timoth{\\'e}e and Moutakanni, Th{\\'e}o and Vo, Huy V. and Szafraniec, Marc
             and Khalidov, Vasil and Fernandez, Pierre and Haziza, Daniel and Massa, Francisco and El-Nouby, Alaaeldin
             and Assran, Mahmoud and Ballas, Nicolas and Galuba, Wojciech and Howes, Russell and Huang, Po-Yao
             and Li, Shang-Wen and Misra, Ishan and Rabbat, Michael and Sharma, Vasu and Synnaeve, Gabriel
             and Xu, Hu and Jegou, Herv{\\'e} and Mairal, Julien and Labatut, Patrick and Joulin, Armand
             and Bojanowski, Piotr},
  journal = {Transactions on Machine Learning Research (TMLR)},
  year    = {2023},
  eprint  = {2304.07193},
  archivePrefix = {arXiv}
}"""

DINOV3_BIBTEX = """@misc{simeoni2025dinov3,
  title   = {{DINOv3}},
  author  = {Sim{\\'e}oni, Oriane and Vo, Huy V. and Seitzer, Maximilian and Baldassarre, Federico and Oquab, Maxime
             and Jose, Cijo and Khalidov, Vasil and Szafraniec, Marc and Yi, Seungeun and Ramamonjisoa, Micha{\\"e}l
             and Massa, Francisco and Haziza, Daniel and Wehrstedt, Luca and Wang, Jianyuan and Darcet, Timoth{\\'e}e
             and Moutakanni, Th{\\'e}o and Sentana, Leonel and Roberts, Claire and Vedaldi, Andrea and Tolan, Jamie
             and Brandt, John and Couprie, Camille and Mairal, Julien and J{\\'e}gou, Herv{\\'e} and Labatut, Patrick
             and Bojanowski, Piotr},
  year    = {2025},
  eprint  = {2508.10104},
  archivePrefix = {arXiv}
}"""

SOURCE_FORMATS = {
    "dinov2-hub": "an official DINOv2 `torch.hub` checkpoint",
    "dinov2-train": "a checkpoint of DINOv2's own trainer (teacher backbone)",
    "dinov3-hub": "an official DINOv3 `torch.hub` checkpoint",
    "dinov3-transformers": "a transformers DINOv3ViT checkpoint",
    "dinov3-timm": "a timm DINOv3 (`vit_*_patch16_dinov3*`) checkpoint",
    "timm": "a timm checkpoint",
    "transformers": "a transformers Dinov2 / Dinov2WithRegisters checkpoint",
}
OBJECTIVES = {
    "dinov2": "DINOv2 self-supervised recipe (DINO and iBOT losses, KoLeo, EMA teacher, multi-crop)",
    "supervised": "supervised image-classification recipe",
}


TEST_TIME_REGISTERS_BIBTEX = """@inproceedings{jiang2025testtime,
  title     = {Vision Transformers Don't Need Trained Registers},
  author    = {Jiang, Nick and Dravid, Amil and Efros, Alexei A. and Gandelsman, Yossi},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2025},
  eprint    = {2506.08010},
  archivePrefix = {arXiv}
}"""


def read_json(path: Path) -> dict:
    """A JSON file as a dict ({} when the file is absent)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def count_parameters(folder: Path) -> int | None:
    """Number of weights in the folder's safetensors files, read from their headers (None without any)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():
                total += math.prod(weights.get_slice(name).get_shape())
    return total


Row = registry.OfficialBackbone | registry.Dinov3Backbone


def official_model(provenance: Provenance) -> tuple[Row | None, str | None]:
    """The registry row of an official DINOv2 or DINOv3 source and its head kind ("linear", "linear4" or None)."""
    name = provenance.official_name
    if not name:
        return None, None
    backbone = registry.official_row(name)
    head_file = provenance.head_file
    return backbone, registry.head_kind_of_file(head_file) if head_file else None


def uses_dinov3(provenance: Provenance) -> bool:
    """Whether the weights are DINOv3's (its licence, tag and citation apply)."""
    return (
        provenance.license == registry.DINOV3_LICENSE
        or (provenance.official_name or "").startswith("dinov3")
        or (provenance.source_format or "").startswith("dinov3")
    )


def uses_dinov2(provenance: Provenance) -> bool:
    """Whether the weights are DINOv2's or come from the DINOv2 recipe (tag and citation apply)."""
    return bool(
        provenance.dinov2  # set by converters that know the weights are DINOv2's
        or (provenance.official_name or "").startswith("dinov2")
        or (provenance.source_format or "").startswith("dinov2")
        or provenance.objective == "dinov2"
    )


def weights_license(provenance: Provenance) -> str:
    """The licence of the weights: DINOv3's for anything converted from DINOv3 (its terms bind derivatives), else
    the provenance's."""
    return registry.DINOV3_LICENSE if uses_dinov3(provenance) else provenance.license


def card_data(config: dict, provenance: Provenance, repo_id: str | None = None) -> ModelCardData:
    """The card's YAML metadata: license, library, pipeline tag, tags, datasets, base model, model-index."""
    is_classifier = _is_classifier(config)
    backbone, head = official_model(provenance)
    datasets = provenance.datasets or ([registry.IMAGENET_DATASET] if backbone and head else None)
    source_name, source_url = (
        ("DINOv3 model card (not re-measured by ViTReg)", f"{registry.DINOV3_REPO_URL}/blob/main/MODEL_CARD.md")
        if backbone and backbone.family == "dinov3"
        else ("DINOv2 model table (not re-measured by ViTReg)", registry.DINOV2_REPO_URL)
    )
    eval_results = [
        EvalResult(
            task_type=result.task_type,
            task_name=result.task_type.replace("-", " ").capitalize(),
            dataset_type=result.dataset_type,
            dataset_name=result.dataset_name,
            dataset_split="validation",
            metric_type=result.metric_type,
            metric_name=f"{result.benchmark} (published by {backbone.family.replace('dinov', 'DINOv')})",
            metric_value=result.value,
            source_name=source_name,
            source_url=source_url,
        )
        for result in (backbone.results if backbone else ())
        if result.task_type  # numbers without a Hub dataset and metric stay in the card's text only
    ] or None
    license = weights_license(provenance)
    license_name, license_link = registry.OTHER_LICENSES.get(license, (None, None))
    return ModelCardData(
        license="other" if license_name else license,
        license_name=license if license_name else None,
        license_link=license_link,
        library_name="transformers",
        pipeline_tag="image-classification" if is_classifier else "image-feature-extraction",
        tags=["vitreg", "vision", "registers"]
        + (["dinov2"] if uses_dinov2(provenance) else [])
        + (["dinov3"] if uses_dinov3(provenance) else [])
        + (["rope"] if uses_rope(config) else []),
        datasets=datasets,
        base_model=provenance.base_model or (backbone.base_model if backbone else None),
        model_name=title(provenance, repo_id) if eval_results else None,
        eval_results=eval_results,
    )


def title(provenance: Provenance, repo_id: str | None) -> str:
    """The card's heading: the repo name, else the official repo name, else the provenance's name."""
    if repo_id:
        return repo_id.split("/")[-1]
    backbone, head = official_model(provenance)
    if backbone:
        return backbone.head_repo_name(head) if head else backbone.repo_name
    return provenance.name or "ViTReg model"


def _is_classifier(config: dict) -> bool:
    architectures = config.get("architectures") or ["ViTRegModel"]
    return architectures[0].endswith("ForImageClassification")


def summary(config: dict, provenance: Provenance) -> str:
    """The opening paragraph: what the model is."""
    backbone, head = official_model(provenance)
    registers = config.get("num_register_tokens", 0)
    if backbone:
        text = backbone.description
        if head:
            text += f" This repository adds DINOv2's {registry.HEADS[head].description}."
    else:
        text = (
            f"A Vision Transformer with {registers} register tokens, patch size {config.get('patch_size')} and width "
            f"{config.get('hidden_size')}, {_kind_sentence(provenance)}"
        )
    if config.get("num_test_time_registers") and not backbone:
        text += f" It carries {config['num_test_time_registers']} test-time register(s), added without training."
    if provenance.description:
        text += f"\n\n{provenance.description}"
    return text


def _kind_sentence(provenance: Provenance) -> str:
    kind = provenance.kind
    if kind == "converted":
        return f"converted from {SOURCE_FORMATS.get(provenance.source_format, 'another checkpoint format')}."
    if kind == "trained":
        return f"trained with ViTReg's {OBJECTIVES.get(provenance.objective, 'training recipe')}."
    return "with random weights (a test or demo artifact)."


def details(config: dict, preprocessor: dict, num_parameters: int | None) -> list[tuple[str, str]]:
    """Rows of the "Model details" table, read from config.json and preprocessor_config.json."""
    grid = config.get("image_size", 0) // max(config.get("patch_size", 1), 1)
    offset = config.get("interpolate_offset") or 0
    interpolation = "bicubic" + (", antialiased" if config.get("interpolate_antialias") else "")
    interpolation += f", DINOv2's +{offset} scale offset" if offset else ""
    rows = [
        ("Model class", f"`{(config.get('architectures') or ['ViTRegModel'])[0]}`"),
        (
            "Architecture",
            f"ViT, {config.get('num_hidden_layers')} blocks, width {config.get('hidden_size')}, "
            f"{config.get('num_attention_heads')} heads, {'SwiGLU' if config.get('use_swiglu_ffn') else 'GELU'} MLP",
        ),
        ("Parameters", f"{num_parameters / 1e6:.2f}M" if num_parameters else "unknown"),
        ("Register tokens", str(config.get("num_register_tokens", 0))),
    ]
    if config.get("num_test_time_registers"):
        neurons = config.get("register_neurons") or []
        rows.append(
            (
                "Test-time registers",
                f"{config['num_test_time_registers']}, untrained, after the registers; {len(neurons)} register "
                f"neurons in blocks {', '.join(map(str, sorted({layer for layer, _ in neurons})))} shifted into them",
            )
        )
    positions = f"{config.get('image_size')} px ({grid}x{grid} patches), interpolated {interpolation}"
    rows += [
        ("Patch size", f"{config.get('patch_size')} px"),
        ("Position embeddings", rope_text(config) if uses_rope(config) else positions),
        ("Pooling", "CLS token" if config.get("pooling", "cls") == "cls" else "mean of the patch tokens"),
    ]
    if preprocessor:
        rows.append(("Preprocessing", preprocessing_text(preprocessor)))
    if _is_classifier(config):
        rows.append(("Classes", str(len(config.get("id2label") or {}) or config.get("num_labels", "?"))))
    return rows


def preprocessing_text(preprocessor: dict) -> str:
    """The "Preprocessing" cell: what the folder's own `preprocessor_config.json` does, step by step."""
    size = preprocessor.get("size") or {}
    resample = RESAMPLING.get(preprocessor.get("resample"), "resampled")
    if "shortest_edge" in size:
        steps = [f"resize shortest edge to {size['shortest_edge']} px ({resample})"]
    else:
        steps = [f"resize the whole image to {size.get('height', '?')}x{size.get('width', '?')} px ({resample})"]
    crop = preprocessor.get("crop_size") or {}
    if preprocessor.get("do_center_crop") and crop:
        steps.append(f"center crop {crop.get('height', '?')}x{crop.get('width', '?')}")
    elif "shortest_edge" not in size:
        steps.append("no crop")
    mean, std = preprocessor.get("image_mean"), preprocessor.get("image_std")
    statistics = {(IMAGENET_MEAN, IMAGENET_STD): "ImageNet", (SATELLITE_MEAN, SATELLITE_STD): "SAT-493M (satellite)"}
    named = statistics.get((rounded(mean), rounded(std))) if mean and std else None
    if not preprocessor.get("do_normalize", True):
        steps.append("no normalisation")
    elif named:
        steps.append(f"{named} mean / std")
    else:
        steps.append(f"mean {list(mean or [])}, std {list(std or [])}")
    return ", ".join(steps)


def rounded(values: list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """Statistics to 3 decimals, as DINOv2's and DINOv3's READMEs give them."""
    return tuple(round(float(value), 3) for value in values)


def uses_rope(config: dict) -> bool:
    """Whether the model has rotary positions (DINOv3) instead of learned, interpolated ones."""
    return config.get("position_embedding_type") == "rope"


def rope_text(config: dict) -> str:
    """The "Position embeddings" cell of a RoPE model: what rotates, its periods and coordinates, its train-time
    augmentations."""
    periods = (
        f"base {config.get('rope_theta'):g}"
        if config.get("rope_theta") is not None
        else f"periods {config.get('rope_min_period'):g} to {config.get('rope_max_period'):g}"
    )
    normalize = {"separate": "each side by its own length", "min": "by the shorter side", "max": "by the longer side"}
    augmentations = [
        f"{name} {config[f'rope_{name}_coords']:g}"
        for name in ("shift", "jitter", "rescale")
        if config.get(f"rope_{name}_coords") is not None
    ]
    text = (
        f"none learned: 2-D axial rotary embeddings (RoPE) of the patch queries and keys, {periods}, patch-centre "
        f"coordinates normalised {normalize.get(config.get('rope_normalize_coords'), '?')}; any size works, "
        f"trained at {config.get('image_size')} px"
    )
    if augmentations:
        text += f"; train-time coordinate augmentation ({', '.join(augmentations)}), off at inference"
    return text


def provenance_lines(provenance: Provenance) -> list[str]:
    """Bullet points saying how the folder was produced: source and checksum, converter and parity, or recipe."""
    kind = provenance.kind
    backbone, head = official_model(provenance)
    lines = []
    if kind == "converted":
        source = SOURCE_FORMATS.get(provenance.source_format, "a checkpoint")
        lines.append(
            f"Converted from `{provenance.source_file or '?'}` ({source}), "
            f"sha256 `{provenance.source_sha256 or 'not recorded'}`."
        )
        if backbone and backbone.family == "dinov3":
            lines.append(
                f"The source is the official DINOv3 model `{backbone.hub_name}` with its "
                f"{registry.DINOV3_WEIGHT_SETS[backbone.weights]} weights, file `{backbone.pretrain_file}` "
                f"({registry.DINOV3_REPO_URL}); the same weights are on the Hub as `{backbone.base_model}`."
            )
        elif backbone:
            lines.append(
                f"The source is the official DINOv2 model `{backbone.name}` ({registry.DINOV2_REPO_URL}); "
                f"the same weights are on the Hub as `{backbone.base_model}`."
            )
        if provenance.head_file:
            head_sha = provenance.head_sha256 or "not recorded"
            what = f": {registry.HEADS[head].description}." if head else "."
            lines.append(f"Linear head from `{provenance.head_file}`, sha256 `{head_sha}`{what}")
        lines.append(f"Converter: vitreg {provenance.vitreg_version or 'version not recorded'}.")
        lines.append(_parity_line(provenance.parity))
    elif kind == "trained":
        objective = OBJECTIVES.get(provenance.objective, f"`{provenance.objective or '?'}`")
        lines.append(f"Trained from scratch with ViTReg's {objective}.")
        lines.append(
            f"Recipe `{provenance.config_file or 'not recorded'}`, {provenance.steps or '?'} steps on "
            f"{provenance.num_processes or 1} process(es), dataset {_datasets_text(provenance)}."
        )
        final_loss = provenance.final_loss
        lines.append("Final loss not recorded." if final_loss is None else f"Final training loss: {final_loss:.4f}.")
    else:
        lines.append("Randomly initialised weights: a test or demo artifact that has learned nothing.")
    if provenance.test_time_registers:
        lines.append(_test_time_line(provenance.test_time_registers))
    if provenance.base_model and not backbone:
        lines.append(f"Base model: `{provenance.base_model}`.")
    lines.append(f"Folder and card written by vitreg {__version__}; the same facts are in `{PROVENANCE_FILE}`.")
    return lines


def _test_time_line(shift: NeuronShift) -> str:
    images = shift.images
    shown = ", ".join(f"`{Path(name).name}`" for name in images[:5])
    shown += f" and {len(images) - 5} more" if len(images) > 5 else ""
    per_layer: dict[int, list[int]] = {}
    for layer, neuron in shift.neurons:
        per_layer.setdefault(layer, []).append(neuron)
    neurons = "; ".join(f"block {layer}: {', '.join(map(str, sorted(n)))}" for layer, n in sorted(per_layer.items()))
    found = f" in `{shift.source_model}`" if shift.source_model else ""
    where = f" on {len(images)} image(s) ({shown})" if images else ""
    outliers = f", {shift.images_with_outliers} of them with outliers" if shift.images_with_outliers is not None else ""
    return (
        f"Test-time registers added without training by `vitreg registers apply` (Jiang et al. 2025): "
        f"{len(shift.neurons)} register neurons ({neurons}), found{found}{where}{outliers} by `vitreg registers find`"
        f"{f' (`{shift.neurons_file}`)' if shift.neurons_file else ''}, move their activations from the patch "
        f"tokens to {shift.num_registers} extra token(s)."
    )


def _parity_line(parity: Parity | None) -> str:
    if parity is None:
        return "Parity against a reference implementation was not measured for this folder."
    height, width = parity.image_size
    return (
        f"Parity measured at conversion: max |difference| = {parity.max_abs_diff:.2e} between this model's "
        f"outputs and the {parity.reference} implementation's on a {height}x{width} input."
    )


def _datasets_text(provenance: Provenance) -> str:
    names = [f"`{name}`" for name in provenance.datasets]
    if provenance.local_data:
        names.append(f"the local folder `{provenance.local_data}`")
    return ", ".join(names) or "not recorded"


def results(provenance: Provenance) -> list[dict]:
    """Rows of the "Results" table: published numbers of official models (none otherwise)."""
    backbone, _ = official_model(provenance)
    return [
        {"name": result.benchmark, "value": f"{result.value:.1f}{f' {result.unit}' if result.unit else ''}",
         "source": result.source}
        for result in (backbone.results if backbone else ())
    ]  # fmt: skip


def limitations(config: dict, provenance: Provenance) -> list[str]:
    """Bullet points on what the model is not good for."""
    backbone, head = official_model(provenance)
    lines = []
    if provenance.kind == "random":
        lines.append("The weights are random: outputs carry no meaning. Use this folder only to test plumbing.")
    if provenance.kind == "trained":
        lines.append(
            "Trained with the budget recorded above; expect far weaker features than published backbones such as "
            "DINOv2's, trained on 142M images for hundreds of thousands of steps."
        )
    if provenance.kind == "converted" and not provenance.parity:
        lines.append("No numerical parity with the source implementation was measured for this conversion.")
    if not config.get("num_register_tokens") and not config.get("num_test_time_registers"):
        lines.append("Without registers, expect high-norm artifact tokens in background patches of large models.")
    if config.get("num_test_time_registers"):
        lines.append(
            "Test-time registers remove the outliers their register neurons cause; how well depends on the images the "
            "neurons were found on. `vitreg analyze MODEL IMAGES --compare THIS_FOLDER` shows before and after."
        )
    if uses_rope(config):
        lines.append(
            f"Rotary positions need no interpolation, so every size that is a multiple of {config.get('patch_size')} "
            f"px runs; features still change with resolution away from the {config.get('image_size')} px the config "
            "records."
        )
    else:
        lines.append(
            f"Position embeddings were trained at {config.get('image_size')} px; other sizes interpolate them, "
            "which works well for moderate changes but is not what the model was trained on."
        )
    if _is_classifier(config):
        classes = "ImageNet-1k's 1000 classes" if head else f"its {len(config.get('id2label') or {})} training classes"
        lines.append(f"The classifier knows only {classes}.")
    if backbone and backbone.family == "dinov3":
        lines.append(
            f"DINOv3 learned from {registry.DINOV3_WEIGHT_SETS[backbone.weights]}; Meta's model card reports a "
            "performance drop in the low-income bucket of its geographical fairness evaluation and recommends the "
            "frozen features over fine-tuning, which can increase biases. The published numbers above are Meta's, "
            "not re-measured here."
        )
    elif backbone:
        lines.append(
            "DINOv2 learned from LVD-142M, web images curated by similarity to public datasets; the DINOv2 paper "
            "reports its fairness and bias evaluations. The published numbers above are Meta's, not re-measured here."
        )
    return lines


def license_notes(provenance: Provenance) -> list[str]:
    """Bullet points on the licenses that apply to this folder."""
    backbone, head = official_model(provenance)
    license = weights_license(provenance)
    name, link = registry.OTHER_LICENSES.get(license, (None, None))
    lines = [f"Card license field: `other` ({name}, {link})." if name else f"Card license field: `{license}`."]
    if uses_dinov3(provenance):
        lines.append(
            f"The weights are DINOv3's, released by Meta under the [{registry.DINOV3_LICENSE_TITLE}]"
            f"({registry.DINOV3_LICENSE_URL}), not an open-source licence: these converted weights are a derivative "
            "of the DINO Materials, so using or redistributing them is subject to its terms (redistribute only under "
            "them and with a copy of the agreement; acknowledge DINOv3 in publications; its trade-control and "
            "use restrictions apply)."
        )
    if uses_dinov2(provenance) and provenance.kind == "converted":
        lines.append("DINOv2 code and weights are released by Meta under the Apache License 2.0.")
    if head or (provenance.datasets and registry.IMAGENET_DATASET in provenance.datasets):
        lines.append("ImageNet-1k, on which the head was trained, is available under its own research terms.")
    if provenance.kind == "trained":
        lines.append(
            f"The weights were trained on {_datasets_text(provenance)}: check its license before redistributing them."
        )
    lines.append("The model code (the folder's `.py` files) is ViTReg's, Apache License 2.0.")
    return lines


def test_time_paragraph(config: dict) -> str:
    """What the test-time registers of the model do ("" without them)."""
    count = config.get("num_test_time_registers", 0)
    if not count:
        return ""
    trained = config.get("num_register_tokens", 0)
    return (
        f"This model also appends **{count} test-time register{'s' if count > 1 else ''}** "
        f'("Vision Transformers Don\'t Need Trained Registers", Jiang et al., NeurIPS 2025): untrained, all-zero '
        "tokens without position embedding. In every forward pass, a few MLP units (the *register neurons*, listed in "
        "`config.register_neurons`) that write the high-norm outlier tokens have their activation moved from the "
        "patch tokens to the test-time register, so the outliers form there instead of on background patches. "
        + ("They come after the trained registers" if trained else "They come back in `register_tokens`")
        + "; no pooling, head or patch map reads them."
    )


def build_card(folder: str | Path, provenance: Provenance, repo_id: str | None = None) -> ModelCard:
    """The card of the ViTReg folder `folder` (which holds config.json), given how it was produced."""
    folder = Path(folder)
    config = read_json(folder / "config.json")
    if not config:
        raise ValueError(f"{folder} has no config.json: save the model before writing its card")
    is_classifier = _is_classifier(config)
    registers = config.get("num_register_tokens", 0)
    test_time = config.get("num_test_time_registers", 0)
    pooler = "the CLS token" if config.get("pooling", "cls") == "cls" else "the mean of the patch tokens"
    has_cls = config.get("use_cls_token", True)
    prefix = ["CLS"] * has_cls + ["registers"] * bool(registers) + ["test-time registers"] * bool(test_time)
    token_order = "[" + ", ".join(prefix + ["patches"]) + "]"
    return ModelCard.from_template(
        card_data(config, provenance, repo_id),
        template_path=str(TEMPLATE_PATH),
        title=title(provenance, repo_id),
        summary=summary(config, provenance),
        num_register_tokens=registers,
        num_register_outputs=registers + test_time,
        test_time_registers=test_time_paragraph(config),
        num_prefix_tokens=int(has_cls) + registers + test_time,
        token_order=token_order,
        token_norm="un-normed (only the pooled mean is normed)" if config.get("use_fc_norm") else "normed",
        hidden_size=config.get("hidden_size"),
        patch_size=config.get("patch_size"),
        num_labels=len(config.get("id2label") or {}) or config.get("num_labels"),
        details=details(config, read_json(folder / "preprocessor_config.json"), count_parameters(folder)),
        is_classifier=is_classifier,
        auto_class="AutoModelForImageClassification" if is_classifier else "AutoModel",
        pooler_description=f"{pooler} (the image embedding)",
        repo_id=repo_id or UNPUBLISHED_REPO_ID,
        on_hub=repo_id is not None,
        example_image_url=EXAMPLE_IMAGE_URL,
        provenance_lines=provenance_lines(provenance),
        results=results(provenance),
        limitations=limitations(config, provenance),
        license_notes=license_notes(provenance),
        position_note=(
            "rotary position embeddings need no interpolation"
            if uses_rope(config)
            else "position embeddings are interpolated"
        ),
        citations=[REGISTERS_BIBTEX]
        + ([TEST_TIME_REGISTERS_BIBTEX] if test_time else [])
        + ([DINOV2_BIBTEX] if uses_dinov2(provenance) else [])
        + ([DINOV3_BIBTEX] if uses_dinov3(provenance) else []),
    )


def write_card(folder: str | Path, provenance: Provenance, repo_id: str | None = None) -> ModelCard:
    """Write `README.md` and `provenance.json` into `folder` and return the card."""
    card = build_card(folder, provenance, repo_id)
    card.save(Path(folder) / "README.md")
    provenance.save(folder)
    return card


def read_provenance(folder: str | Path) -> Provenance | None:
    """The provenance `write_card` stored in `folder` (None when there is none)."""
    return Provenance.load(folder)
