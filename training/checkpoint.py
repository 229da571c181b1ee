"""Checkpoints under `OUTPUT_DIR/checkpoints/step_XXXXXXXX`: accelerate's `save_state` (student, optimizer, RNG of
every process) plus the objective's state (EMA teacher, loss centers) in safetensors, the step (which is the data
position of an image folder) and, for a streamed dataset, each process's stream position (`data_state_R.pt`).

A checkpoint is written to a hidden temporary folder and renamed when complete, so a run killed while saving
leaves the previous checkpoints intact and `latest` never points at half a checkpoint: every process finishes
writing its files (FSDP shards, RNG states, stream position) before rank 0 renames the folder.
"""

import json
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from vitreg.core.errors import UserError
from vitreg.core.folders import share_as_umask_allows

PATTERN = re.compile(r"^step_(\d{8})$")
OBJECTIVE_FILE = "objective.safetensors"
STATE_FILE = "trainer_state.json"


def data_state_file(rank: int) -> str:
    """The file of one process's data-loader state."""
    return f"data_state_{rank}.pt"


def checkpoints_dir(output_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if PATTERN.match(path.name) and (path / STATE_FILE).is_file()]
    return sorted(found, key=lambda path: path.name)


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint (None when there is none yet); otherwise the given folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume_from_checkpoint {resume} is not a checkpoint folder (no {STATE_FILE})")
    return path


def save_checkpoint(
    accelerator: Accelerator, objective: nn.Module, output_dir: Path, step: int, keep: int, loader=None
) -> Path:
    """Save the full training state after `step` optimizer steps, keeping the newest `keep` checkpoints; a
    `loader` with a `state_dict` (a streamed dataset) saves its position too."""
    folder = checkpoints_dir(output_dir)
    final, staging = folder / f"step_{step:08d}", folder / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if hasattr(loader, "state_dict"):
        torch.save(loader.state_dict(), staging / data_state_file(accelerator.process_index))
    accelerator.wait_for_everyone()  # every process's files are in staging before rank 0 renames it
    if accelerator.is_main_process:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in objective.state_dict().items()}
        if state:
            save_file(state, staging / OBJECTIVE_FILE)
        # the data-loader layout a stream's positions belong to (load_data_state checks it on resume)
        layout = {"num_processes": accelerator.num_processes, "num_workers": getattr(loader, "num_workers", 0)}
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **layout}))
        share_as_umask_allows(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, objective: nn.Module, path: Path) -> int:
    """Restore the training state saved in `path`; returns the number of steps already done."""
    accelerator.load_state(str(path))
    if (path / OBJECTIVE_FILE).is_file():
        # read on CPU: safetensors refuses device names such as "cpu:0" (multi-process CPU runs); load_state_dict
        # copies each tensor onto the device of the objective's own
        objective.load_state_dict(load_file(path / OBJECTIVE_FILE, device="cpu"))
    return int(json.loads((path / STATE_FILE).read_text())["step"])


def load_data_state(loader, path: Path, rank: int, num_processes: int) -> None:
    """Put a streamed dataset's `loader` back where checkpoint `path` left this process (no-op for a loader
    without state: the image-folder sampler resumes from the step). Each (process, worker) pair reads its own part
    of the stream, so the positions fit only the layout that saved them."""
    if not hasattr(loader, "load_state_dict"):
        return
    path = Path(path)
    saved = json.loads((path / STATE_FILE).read_text()) if (path / STATE_FILE).is_file() else {}
    # (checkpoints of older versions do not record the layout)
    if saved.get("num_processes", num_processes) != num_processes:
        raise UserError(
            f"checkpoint {path} holds the stream positions of {saved['num_processes']} processes, this run has "
            f"{num_processes}: resume with accelerate launch --num_processes {saved['num_processes']}"
        )
    if saved.get("num_workers", loader.num_workers) != loader.num_workers:
        raise UserError(
            f"checkpoint {path} holds the stream positions of {saved['num_workers']} DataLoader workers per process, "
            f"this run has --num_workers {loader.num_workers}: resume with --num_workers {saved['num_workers']}"
        )
    file = path / data_state_file(rank)
    if not file.is_file():
        raise UserError(
            f"checkpoint {path} has no stream position for process {rank} ({file.name}): resume a streamed run "
            "with the number of processes that saved it"
        )
    loader.load_state_dict(torch.load(file, weights_only=True))
