"""transformers' Trainer fine-tunes a classifier that carries a mask token (as every converted classifier does) over
DDP on two CPU processes (gloo; conftest.spawn_launcher) with gradient checkpointing, where Trainer asks DDP for
`find_unused_parameters=False`: DDP then refuses a trainable parameter that gets no gradient, which the mask token
was until the classifier held it frozen."""

import json
from pathlib import Path

import pytest
import torch
from conftest import spawn_launcher, tiny_config
from torch.utils.data import Dataset

from vitreg.modeling_vitreg import ViTRegForImageClassification

pytestmark = pytest.mark.slow

STEPS = 3


class RandomImages(Dataset):
    """Eight fixed random 28 x 42 images with labels in {0, 1, 2}."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.pixel_values = torch.randn(8, 3, 28, 42, generator=generator)
        self.labels = torch.arange(8) % 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def fine_tune_process(folder: str, output_dir: str) -> None:
    """One process: open the saved classifier, fine-tune it with Trainer over DDP, report what ran."""
    from torch.nn.parallel import DistributedDataParallel
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(1)
    model = ViTRegForImageClassification.from_pretrained(folder)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-3,
        gradient_checkpointing=True, use_cpu=True, ddp_backend="gloo", logging_steps=1, save_strategy="no",
        report_to="none", dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages())
    trainer.train()
    wrapped = trainer.model_wrapped
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    report = {
        "world_size": args.world_size,
        "ddp": isinstance(wrapped, DistributedDataParallel),
        "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
        "checkpointing": model.is_gradient_checkpointing,
        "steps": trainer.state.global_step,
        "losses": losses,
    }
    (Path(output_dir) / f"rank{args.process_index}.json").write_text(json.dumps(report))


def test_ddp_fine_tuning_with_gradient_checkpointing_and_a_mask_token(tmp_path):
    classifier = ViTRegForImageClassification(tiny_config(num_labels=3, use_mask_token=True))
    classifier.save_pretrained(tmp_path / "classifier")
    spawn_launcher(fine_tune_process, args=(str(tmp_path / "classifier"), str(tmp_path)), num_processes=2)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        assert report["world_size"] == 2 and report["ddp"] and report["checkpointing"]
        assert report["find_unused_parameters"] is False  # what Trainer picks with gradient checkpointing
        assert report["steps"] == STEPS and len(report["losses"]) == STEPS
        assert all(loss == loss for loss in report["losses"])  # finite, not NaN
