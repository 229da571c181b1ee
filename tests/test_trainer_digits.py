"""A short transformers.Trainer fine-tune that must learn something real: scikit-learn's handwritten digits."""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments, set_seed

from vitreg.modeling_vitreg import ViTRegConfig, ViTRegForImageClassification

IMAGE_SIZE = 28
PATCH_SIZE = 7  # 4 x 4 patches, each 2 x 2 of the original scan: cheap enough for a 2-core CPU
EPOCHS = 10


class DigitImages(Dataset):
    """8x8 digit scans upsampled to 3-channel 28x28 images in [-1, 1]."""

    def __init__(self, scans: np.ndarray, labels: np.ndarray):
        images = torch.from_numpy(scans).float().view(-1, 1, 8, 8) / 16.0  # [N, 1, 8, 8] in [0, 1]
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        self.pixel_values = (images.expand(-1, 3, -1, -1) - 0.5) / 0.5  # [N, 3, 28, 28]
        self.labels = torch.from_numpy(labels).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def digit_splits() -> tuple[DigitImages, DigitImages]:
    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    return DigitImages(train_x, train_y), DigitImages(test_x, test_y)


def test_trainer_learns_digits_from_scratch(tmp_path):
    set_seed(0)
    train, held_out = digit_splits()
    config = ViTRegConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_register_tokens=4,
        layerscale_value=None,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )
    model = ViTRegForImageClassification(config)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=16,  # many small steps: 850 in all
        per_device_eval_batch_size=256,
        learning_rate=2e-3,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train)
    # The matrices are tiny: one thread avoids synchronisation that costs 20x on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = trainer.train()
        predictions = trainer.predict(held_out)
    finally:
        torch.set_num_threads(threads)
    accuracy = (predictions.predictions.argmax(-1) == held_out.labels.numpy()).mean()
    print(f"held-out accuracy {accuracy:.3f} after {EPOCHS} epochs, {result.metrics['train_runtime']:.0f} s")
    assert len(held_out) == 450
    assert accuracy >= 0.90
    assert predictions.metrics["test_loss"] < 0.5
