"""Applying register neurons: a model with test-time registers, in memory or as a Hub-ready folder with its card.

The shift itself lives in the model (`modeling_vitreg`, `ViTRegRegisterNeuronShift`, following upstream's
`activate_on_registers`), switched on by two config fields, so a folder written here loads anywhere, as remote code
too. Upstream appends one test-time register (`num_registers = 1` in register_neurons.ipynb and in its DINOv2 hub
model `dinov2_vitl14_tt_reg`).
"""

from collections.abc import Sequence
from pathlib import Path

from vitreg.analysis.loading import load_model
from vitreg.core.errors import UserError
from vitreg.core.provenance import NeuronShift, Provenance
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel

from .neurons import RegisterNeurons, architecture, describe

NUM_REGISTERS = 1  # upstream's number of test-time registers


def check_neurons(config: ViTRegConfig, pairs: Sequence[Sequence[int]], found_on: dict | None = None) -> None:
    """Refuse neurons found on another architecture, or indices the model does not have, in one line."""
    shape = architecture(config)
    if found_on is not None and found_on != shape:
        raise UserError(f"the neurons were found on a model of {describe(found_on)}; this one has {describe(shape)}")
    for layer, neuron in pairs:
        if not (0 <= layer < config.num_hidden_layers and 0 <= neuron < config.mlp_hidden_size):
            raise UserError(f"register neuron [{layer}, {neuron}] is outside this model's {describe(shape)}")
    if not pairs:
        raise UserError("no register neurons to apply")


def with_test_time_registers(
    model: ViTRegModel, pairs: Sequence[Sequence[int]], num_registers: int = NUM_REGISTERS
) -> ViTRegModel:
    """The same weights in a model whose config adds `num_registers` test-time registers for the `[layer, neuron]`s."""
    config = model.config
    if config.num_test_time_registers:
        raise UserError("the model already has test-time registers")
    if num_registers < 1:
        raise UserError(f"--num-registers must be at least 1, got {num_registers}")
    check_neurons(config, pairs)
    values = config.to_dict()
    neurons = [list(pair) for pair in sorted({(int(layer), int(neuron)) for layer, neuron in pairs})]
    values.update(num_test_time_registers=num_registers, register_neurons=neurons)
    # The config alone decides the module tree: a new model of the same class, the same (parameter-free) weights.
    shifted = type(model)(ViTRegConfig.from_dict(values))
    shifted.load_state_dict(model.state_dict())
    param = next(model.parameters())
    return shifted.to(device=param.device, dtype=param.dtype).eval()


def source_provenance(source: str | Path) -> Provenance:
    """The provenance of a local ViTReg folder, or a record naming the source as converted."""
    path = Path(source)
    provenance = Provenance.load(path) if path.is_dir() else None
    if provenance is not None:
        return provenance
    hub_id = not path.exists() and str(source).count("/") == 1
    return Provenance(kind="converted", source_file=str(source), base_model=str(source) if hub_id else None)


def apply_register_neurons(
    source: str | Path,
    neurons_file: str | Path,
    output_dir: str | Path,
    *,
    top_k: int | None = None,
    layers: Sequence[int] | None = None,
    num_registers: int = NUM_REGISTERS,
    revision: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, list[str]]:
    """Write `source` with test-time registers for the best `top_k` neurons of `neurons_file`; the folder and notes."""
    record = RegisterNeurons.load(neurons_file)
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    model, processor = load_model(source, revision)
    pairs = record.pairs(top_k, layers)
    check_neurons(model.config, pairs, record.architecture)
    notes = []
    if model.config.num_register_tokens:
        notes.append(
            f"{source} already has {model.config.num_register_tokens} trained registers; the test-time "
            f"register{'s' if num_registers > 1 else ''} follow them"
        )
    shifted = with_test_time_registers(model, pairs, num_registers)
    provenance = source_provenance(source)
    provenance.test_time_registers = NeuronShift(
        num_registers=num_registers,
        neurons=[list(pair) for pair in pairs],
        neurons_file=Path(neurons_file).name,
        source_model=record.model,
        images=record.images,
        images_with_outliers=record.images_with_outliers,
        detect_layer=record.detect_layer,
        threshold=record.threshold,
    )
    crop = processor.crop_size["height"] if getattr(processor, "crop_size", None) else 224
    folder = save_model_folder(shifted, output_dir, provenance, overwrite=overwrite, crop_size=crop)
    return folder, notes
