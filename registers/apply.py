"""Applying register neurons: a model with test-time registers, in memory or as a Hub-ready folder with its card.

The shift itself lives in the model (`modeling_vitreg`, `ViTRegRegisterNeuronShift`, following upstream's
`activate_on_registers`), switched on by two config fields, so a folder written here loads anywhere, as remote code
too; the config is also what validates the neurons. Upstream appends one test-time register (`num_registers = 1` in
register_neurons.ipynb and in its DINOv2 hub model `dinov2_vitl14_tt_reg`).
"""

from collections.abc import Sequence
from pathlib import Path

from vitreg.core.errors import UserError
from vitreg.core.folders import check_output_dir
from vitreg.core.opening import open_model
from vitreg.core.provenance import NeuronShift
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel

from .neurons import RegisterNeurons, architecture, describe

NUM_REGISTERS = 1  # upstream's number of test-time registers


def with_test_time_registers(
    model: ViTRegModel, pairs: Sequence[Sequence[int]], num_registers: int = NUM_REGISTERS
) -> ViTRegModel:
    """The same weights in a model whose config adds `num_registers` test-time registers for the `[layer, neuron]`s
    (blocks 0-based); neurons the model does not have are refused by the config, as a UserError."""
    config = model.config
    if config.num_test_time_registers:
        raise UserError("the model already has test-time registers")
    if num_registers < 1:
        raise UserError(f"--num-registers must be at least 1, got {num_registers}")
    if not pairs:
        raise UserError("no register neurons to apply")
    values = config.to_dict()
    neurons = [list(pair) for pair in sorted({(int(layer), int(neuron)) for layer, neuron in pairs})]
    values.update(num_test_time_registers=num_registers, register_neurons=neurons)
    try:
        shifted_config = ViTRegConfig.from_dict(values)  # ViTRegConfig.validate_test_time_registers: the one check
    except ValueError as error:
        raise UserError(str(error)) from None
    # The config alone decides the module tree: a new model of the same class, the same (parameter-free) weights.
    shifted = type(model)(shifted_config)
    shifted.load_state_dict(model.state_dict())
    param = next(model.parameters())
    return shifted.to(device=param.device, dtype=param.dtype).eval()


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
    progress: bool = True,
) -> tuple[Path, list[str]]:
    """Write `source` with test-time registers for the best `top_k` neurons of `neurons_file` (within the 0-based
    blocks `layers`); the folder and notes. The source is opened by `vitreg.core.opening.open_model`, and its
    provenance and image processor are kept."""
    record = RegisterNeurons.load(neurons_file)
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    inputs = [source, neurons_file]
    check_output_dir(output_dir, overwrite, inputs)  # before the model loads
    model, processor, provenance = open_model(source, revision=revision, progress=progress)
    shape = architecture(model.config)
    if record.architecture != shape:
        raise UserError(
            f"the neurons were found on a model of {describe(record.architecture)}; this one has {describe(shape)}"
        )
    pairs = record.pairs(top_k, layers)
    notes = []
    if model.config.num_register_tokens:
        notes.append(
            f"{source} already has {model.config.num_register_tokens} trained registers; the test-time "
            f"register{'s' if num_registers > 1 else ''} follow them"
        )
    shifted = with_test_time_registers(model, pairs, num_registers)
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
    folder = save_model_folder(shifted, output_dir, provenance, overwrite=overwrite, processor=processor, inputs=inputs)
    return folder, notes
