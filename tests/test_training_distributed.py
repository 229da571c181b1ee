"""Training at scale on two CPU processes (gloo; conftest.spawn_launcher): the shipped FSDP config shards the
student and trains it, the EMA teacher follows the sharded student, and a checkpoint is renamed only once every
process has written its part.

accelerate runs FSDP only on accelerators: `accelerate launch --config_file fsdp.yaml --cpu` falls back to one plain
process, and on a machine without GPUs `Accelerator` picks MULTI_CPU (DDP over gloo), which ignores
ACCELERATE_USE_FSDP. torch's FSDP2 itself runs on CPU, so the FSDP test applies the shipped config's wrapping policy
with `fully_shard` (what accelerate's FSDP2 preparation does on GPUs) and runs the real training step on it.
"""

import copy
import random
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import spawn_launcher

from vitreg.training import checkpoint, pretrain, schedules
from vitreg.training.config import CONFIG_DIR, load_config
from vitreg.training.masking import sample_masks
from vitreg.training.step import build_optimizer, train_step

pytestmark = pytest.mark.slow


def fake_batch(config, step: int, patch_size: int) -> dict[str, torch.Tensor]:
    """The same DINOv2 batch on every process (so the sharded run and the single-copy reference see one batch)."""
    generator = torch.Generator().manual_seed(step)
    b, g, local = config.batch_size_per_device, config.global_crop_size, config.local_crop_size
    grid = g // patch_size
    masks = sample_masks(2 * b, grid, grid, 0.5, config.mask_ratio_min_max, random.Random(step), 2)
    return {
        "global_crops": torch.randn(2 * b, 3, g, g, generator=generator),
        "local_crops": torch.randn(config.local_crops_number * b, 3, local, local, generator=generator),
        "masks": masks,
    }


def comparable(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` without the key third of a qkv bias. Softmax is blind to a key bias, so its gradient is rounding noise
    of any sign, which AdamW scales up to learning-rate-sized steps: two reduction orders move it apart."""
    if not name.endswith("attention.qkv.bias"):
        return tensor
    query, _, value = tensor.chunk(3)
    return torch.cat((query, value))


def fsdp_training_steps(out_dir: str) -> None:
    """One process of the FSDP test: shard a copy of the student as fsdp.yaml says, train it and an unsharded copy
    on the same batches, and compare the student, the EMA teacher and the losses."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    world = accelerator.num_processes
    fsdp = yaml.safe_load((CONFIG_DIR / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    config = load_config("smoke-dinov2", {"model": {"drop_path_rate": 0.0}, "batch_size_per_device": 2})
    torch.manual_seed(0)
    student, objective, model_config = pretrain.build_model(config, None)
    reference, reference_objective = copy.deepcopy(student), copy.deepcopy(objective)
    initial_teacher = {name: param.clone() for name, param in objective.teacher.named_parameters()}

    mesh = init_device_mesh("cpu", (world,))
    blocks = [m for m in student.modules() if type(m).__name__ == fsdp["fsdp_transformer_layer_cls_to_wrap"]]
    assert len(blocks) == model_config.num_hidden_layers
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=fsdp["fsdp_reshard_after_forward"])
    fully_shard(student, mesh=mesh, reshard_after_forward=fsdp["fsdp_reshard_after_forward"])
    sharded = [p for p in student.parameters() if isinstance(p, DTensor)]
    assert len(sharded) == len(list(student.parameters()))
    assert any(p.to_local().numel() < p.numel() for p in sharded)  # really split between the processes

    optimizer = build_optimizer(student, model_config.num_hidden_layers, config)
    reference_optimizer = build_optimizer(reference, model_config.num_hidden_layers, config)
    peak_lr = config.peak_lr(world)
    for step in range(config.warmup_steps, config.warmup_steps + 3):  # after the warmup: lr > 0, prototypes learn
        batch = fake_batch(config, step, model_config.patch_size)
        values = schedules.values_at(step, config, peak_lr)
        loss, _ = train_step(accelerator, student, objective, optimizer, batch, values, config.clip_grad)
        expected, _ = train_step(
            accelerator, reference, reference_objective, reference_optimizer, batch, values, config.clip_grad
        )
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    trained = dict(reference.named_parameters())
    for name, param in student.named_parameters():
        theirs, ours = comparable(name, param.full_tensor()), comparable(name, trained[name].detach())
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-6)
    teacher = dict(reference_objective.teacher.named_parameters())
    moved = 0
    for name, param in objective.teacher.named_parameters():
        assert not isinstance(param, DTensor)  # the teacher stays whole on every process
        torch.testing.assert_close(comparable(name, param), comparable(name, teacher[name]), rtol=1e-4, atol=1e-6)
        moved += not torch.equal(param, initial_teacher[name])
    assert moved > len(teacher) // 2  # the EMA really pulled the teacher towards the sharded student
    (Path(out_dir) / f"done_{accelerator.process_index}").write_text(str(moved))


def test_the_fsdp_config_shards_the_student_and_the_ema_teacher_follows_it(tmp_path):
    spawn_launcher(fsdp_training_steps, args=(str(tmp_path),), num_processes=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done_0", "done_1"]


class FakeLoader:
    """A loader with a stream position, as a streamed dataset's StatefulDataLoader has."""

    def __init__(self, rank: int):
        self.rank = rank

    def state_dict(self) -> dict:
        return {"rank": self.rank, "examples": 12}


def slow_checkpointing_process(output_dir: str) -> None:
    """Process 1 writes its part of the checkpoint a second late; rank 0 must wait for it before renaming."""
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    objective = torch.nn.Module()
    if accelerator.process_index == 1:
        save_state = accelerator.save_state

        def late_save_state(folder):
            time.sleep(1.0)
            return save_state(folder)

        accelerator.save_state = late_save_state
    final = checkpoint.save_checkpoint(
        accelerator, objective, Path(output_dir), 3, 2, FakeLoader(accelerator.process_index)
    )
    assert final.name == "step_00000003" and model is not None


def test_a_checkpoint_is_renamed_after_every_process_wrote_its_part(tmp_path):
    spawn_launcher(slow_checkpointing_process, args=(str(tmp_path),), num_processes=2)
    folder = checkpoint.checkpoints_dir(tmp_path)
    assert [p.name for p in folder.iterdir()] == ["step_00000003"]  # no staging folder left behind
    final = folder / "step_00000003"
    for rank in range(2):
        assert (final / f"random_states_{rank}.pkl").is_file()
        assert torch.load(final / checkpoint.data_state_file(rank), weights_only=True) == {"rank": rank, "examples": 12}
    assert checkpoint.list_checkpoints(tmp_path) == [final]
