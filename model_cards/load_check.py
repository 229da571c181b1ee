"""Load ViTReg folders the way a Hub user would: as remote code, in a fresh interpreter without the vitreg package.

`vitreg publish` runs this file with `python -I load_check.py FOLDER...`. It prints one JSON line per folder that
loads, one `FOLDER: reason` line on stderr per folder that does not, and exits 1 if any folder failed.
Only the standard library, torch, transformers and pillow may be imported here.
"""

import importlib.abc
import json
import sys
from pathlib import Path

# The project's own packages: a Hub user has none of them, so the folder's shipped code must do all the work.
HIDDEN_PACKAGES = ("vitreg", "modeling_vitreg")  # the package, and the name its model had before vitreg 0.2


class HidePackages(importlib.abc.MetaPathFinder):
    """Make the project's packages unimportable, even where an (editable) install puts them on the path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in HIDDEN_PACKAGES:
            raise ModuleNotFoundError(f"{fullname} is hidden from the load check", name=fullname)
        return None


def check_folder(folder: Path) -> dict:
    """Load `folder` with the Auto class its config names, run one image through it, and check the outputs."""
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    is_classifier = (config.architectures or [""])[0].endswith("ForImageClassification")
    auto_class = AutoModelForImageClassification if is_classifier else AutoModel
    # Mismatches are reported through `info` instead of raised, so the reason can name the tensors.
    # float32: bf16 / fp16 matmuls are very slow on CPUs, and this forward pass only checks that the model works.
    model, info = auto_class.from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32
    )
    problems = [f"{len(v)} {k.replace('_', ' ')} (e.g. {sorted(map(str, v))[0]})" for k, v in info.items() if v]
    if problems:
        raise ValueError(f"weights do not match the model: {', '.join(problems)}")
    if type(model).__module__.split(".")[0] != "transformers_modules":
        raise ValueError(f"{type(model).__name__} did not come from the folder's remote code")
    processor = AutoImageProcessor.from_pretrained(folder)
    inputs = processor(images=Image.new("RGB", (64, 48), (120, 90, 60)), return_tensors="pt")
    with torch.no_grad():
        outputs = model.eval()(**inputs)
        tokens = model.vitreg(**inputs) if is_classifier else outputs
    registers = tuple(tokens.register_tokens.shape)  # [1, R, D]
    expected = config.num_register_tokens + getattr(config, "num_test_time_registers", 0)  # trained + test-time
    if registers[1] != expected:
        raise ValueError(f"{registers[1]} register tokens out, config says {expected}")
    main_output = outputs.logits if is_classifier else outputs.pooler_output
    if not torch.isfinite(main_output).all() or not torch.isfinite(tokens.patch_tokens).all():
        raise ValueError("the forward pass produced non-finite values")
    return {
        "folder": str(folder),
        "class": type(model).__name__,
        "output": list(main_output.shape),
        "register_tokens": list(registers),
        "patch_tokens": list(tokens.patch_tokens.shape),
    }


def main(folders: list[str]) -> int:
    """Check every folder; report each failure as one line."""
    sys.meta_path.insert(0, HidePackages())
    failed = False
    for folder in folders:
        try:
            print(json.dumps(check_folder(Path(folder))), flush=True)
        except Exception as error:  # any failure is the folder's: report it in one line
            reason = (str(error).strip().splitlines() or [""])[0]
            print(f"FAILED {folder}: {type(error).__name__}: {reason}", file=sys.stderr, flush=True)
            failed = True
    return int(failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
