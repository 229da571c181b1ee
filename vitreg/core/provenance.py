"""How a ViTReg folder came to be: one typed record, written to and read from `provenance.json` in one place.

Conversion and training fill it; the model card and `vitreg publish` read it.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import UserError

PROVENANCE_FILE = "provenance.json"  # beside README.md, so the card can be rebuilt (e.g. with the repo id)
Kind = Literal["converted", "trained", "random"]
KINDS: tuple[str, ...] = Kind.__args__


@dataclass
class Parity:
    """The largest difference measured between this model's tokens and a reference implementation's."""

    reference: str  # "timm" or "transformers"
    max_abs_diff: float
    image_size: tuple[int, int]  # the input size where the difference was largest


@dataclass
class NeuronShift:
    """Test-time registers added without training: the register neurons moved into them and where they were found."""

    num_registers: int
    neurons: list[list[int]]  # [layer, neuron] pairs (0-based block, MLP unit)
    neurons_file: str | None = None
    source_model: str | None = None  # the model the neurons were found on
    images: list[str] = field(default_factory=list)  # the images they were found on
    images_with_outliers: int | None = None
    detect_layer: int | None = None  # block (0-based) whose output's high-norm tokens were the outliers
    threshold: float | None = None


@dataclass
class Provenance:
    """Where the weights come from (`kind`), with the facts of a conversion or of a training run."""

    kind: Kind
    name: str | None = None
    description: str | None = None
    license: str = "apache-2.0"  # a Hub licence id, or "dinov3-license" (the card says `other` with name and link)
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids: the card's `datasets:` metadata
    local_data: str | None = None  # a local folder trained on, by name (named in the card's text only)
    vitreg_version: str | None = None
    # kind == "converted"
    source_file: str | None = None
    source_format: str | None = None  # dinov2-hub | dinov2-train | dinov3-hub | dinov3-transformers | dinov3-timm | ...
    source_sha256: str | None = None
    official_name: str | None = None  # a registry row, e.g. "dinov2_vitb14_reg4", "dinov3_vitb16_lvd1689m"
    head_file: str | None = None
    head_sha256: str | None = None
    dinov2: bool = False  # the weights are DINOv2's (tag and citation apply)
    parity: Parity | None = None
    # kind == "trained"
    objective: str | None = None
    config_file: str | None = None
    steps: int | None = None
    final_loss: float | None = None
    num_processes: int | None = None
    # any kind: register neurons shifted to test-time registers (`vitreg registers apply`)
    test_time_registers: NeuronShift | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"provenance kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.parity, dict):
            self.parity = Parity(**{**self.parity, "image_size": tuple(self.parity["image_size"])})
        if isinstance(self.test_time_registers, dict):
            self.test_time_registers = NeuronShift(**self.test_time_registers)

    def to_dict(self) -> dict:
        """The set fields as plain JSON values (None and empty lists left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != [] and v is not False}

    @classmethod
    def from_dict(cls, values: dict) -> "Provenance":
        """A record from `provenance.json` values; refuses unknown keys."""
        values = dict(values)
        if "dataset" in values:  # written by vitreg 0.1's pretrain
            legacy = values.pop("dataset")
            values.setdefault("datasets", [legacy] if legacy else [])
        if "converter_version" in values:  # vitreg 0.1's name for the version that wrote the folder
            values.setdefault("vitreg_version", values.pop("converter_version"))
        values.pop("num_register_tokens", None)  # vitreg 0.1 copied it from config.json
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown provenance field(s): {', '.join(unknown)}")
        return cls(**values)

    def save(self, folder: str | Path) -> Path:
        """Write `folder/provenance.json`."""
        path = Path(folder) / PROVENANCE_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Provenance | None":
        """The record saved in `folder`, None when there is none; a corrupt file is a UserError."""
        path = Path(folder) / PROVENANCE_FILE
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as error:
            raise UserError(f"{path} is not a valid provenance record ({error})") from None
