"""Pretrain a ViT with registers: DINOv2 self-supervised or DeiT III supervised, from one CPU to many GPUs.

    python -m vitreg.training.pretrain --config smoke-dinov2 --data_dir photos/ --output_dir runs/smoke
    accelerate launch --multi_gpu --num_processes 8 -m vitreg.training.pretrain --config vitl14-reg4-dinov2-imagenet ...
    vitreg pretrain --config FILE --data_dir DIR --output_dir DIR --resume_from_checkpoint latest

The loop in `train` reads top to bottom: data -> model -> loss -> step -> log -> checkpoint, then the export.
"""

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from vitreg.modeling_vitreg import ViTRegConfig, ViTRegForImageClassification, ViTRegModel

from vitreg.core.errors import UserError

from . import checkpoint, data, schedules
from .augment import MultiCrop, ThreeAugment
from .config import FIELDS, TrainConfig, load_config, model_config_kwargs
from .flops import mfu, train_step_flops
from .objectives import DINOv2Objective, DINOv2Student, SupervisedObjective

COMMAND_FLAGS = ("config", "output_dir", "resume_from_checkpoint", "overwrite")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags: the run's own, then one override flag per config key."""
    parser.add_argument("--config", help="YAML config file, or a shipped config name (smoke-dinov2, ...)")
    parser.add_argument("--output_dir", required=True, help="run folder: run.json, metrics.jsonl, checkpoints/, model/")
    parser.add_argument("--resume_from_checkpoint", metavar="latest|PATH", help="continue a run from a checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in an output_dir that holds a run")
    overrides = parser.add_argument_group("config overrides (YAML values: --model '{num_register_tokens: 0}')")
    for name, spec in FIELDS.items():
        as_string = spec.type in (str, "str") or str(spec.type) in ("str | None", "<class 'str'>")
        overrides.add_argument(f"--{name}", type=str if as_string else parse_yaml_value, default=None, metavar="V")


def parse_yaml_value(text: str):
    """A flag value read as YAML (numbers, booleans, lists, mappings)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"not a YAML value: {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Resolve the config (file, then flags) and train."""
    overrides = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    config = load_config(args.config, overrides)
    return train(config, Path(args.output_dir), args.resume_from_checkpoint, args.overwrite, args.config)


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to mix a new run into the folder of another one."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file")
    if resume is None and not overwrite and (output_dir / "run.json").exists():
        raise UserError(f"{output_dir} already holds a run: pass --resume_from_checkpoint latest, or --overwrite")


def build_model(config: TrainConfig, images) -> tuple[torch.nn.Module, torch.nn.Module, ViTRegConfig, list]:
    """The student, its objective (teacher, centers), the backbone config and the last-layer parameters."""
    kwargs = model_config_kwargs(config)
    if config.objective == "supervised":
        names = data.class_names(images, config.label_column)
        kwargs.update(num_labels=len(names), id2label=dict(enumerate(names)), use_mask_token=False)
        kwargs["label2id"] = {name: i for i, name in enumerate(names)}
    try:
        model_config = ViTRegConfig(**kwargs)
    except (TypeError, ValueError) as error:
        raise UserError(f"config model: {error}") from None
    if config.objective == "supervised":
        student = ViTRegForImageClassification(model_config)
        backbone, objective = student.vitreg, SupervisedObjective(config)
    else:
        backbone = ViTRegModel(model_config)
        student = DINOv2Student(backbone, config)
        objective = DINOv2Objective(student, config)
    if config.gradient_checkpointing:
        backbone.gradient_checkpointing_enable()
    last_layer = [p for name, p in student.named_parameters() if ".last_layer." in name]
    return student, objective, model_config, last_layer


def build_data(config: TrainConfig, images, patch_size: int, rank: int, world_size: int, start_step: int):
    """The DataLoader of this process, starting at `start_step` of the run's data stream."""
    c = config
    if c.objective == "dinov2":
        transform = MultiCrop(
            c.global_crop_size, c.global_crops_scale, c.local_crops_number, c.local_crop_size, c.local_crops_scale
        )
        collate, label = data.DINOv2Collate(c, patch_size), None
    else:
        transform = ThreeAugment(c.global_crop_size, c.crop_scale, c.color_jitter, c.three_augment)
        collate = data.SupervisedCollate(c, len(data.class_names(images, c.label_column)))
        label = c.label_column
    if c.dataset is not None:
        dataset = data.streamed_images(images, c, transform, rank, world_size, start_step)
    else:
        dataset = data.AugmentedImages(images, transform, c.image_column, label)
    return data.make_loader(dataset, collate, c, rank, world_size, start_step)


def write_run_info(path: Path, config: TrainConfig, accelerator, model_config: ViTRegConfig, **extra) -> None:
    """run.json: the resolved configuration, the world size and the package versions."""
    import accelerate
    import datasets
    import transformers

    import vitreg

    info = {
        "config": config.to_dict(),
        "model_config": model_config.to_diff_dict(),
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "datasets": datasets.__version__,
            "vitreg": vitreg.__version__,
        },
        "argv": sys.argv,
        **extra,
    }
    path.write_text(json.dumps(info, indent=2, default=str) + "\n")


def restart_metrics(path: Path, start_step: int) -> None:
    """Keep only the logged steps a resumed run does not redo."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
    path.write_text("".join(line + "\n" for line in kept))


def train(
    config: TrainConfig,
    output_dir: Path,
    resume: str | None = None,
    overwrite: bool = False,
    config_file: str | None = None,
) -> int:
    """Run (or resume) a pretraining run into `output_dir`; returns 0 or raises UserError."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, resume, overwrite)
    # DDP: without the iBOT loss the mask token (and a separate iBOT head) take no part in the step.
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=config.objective == "dinov2" and not config.ibot_loss_weight
    )
    # `accelerate launch --multi_gpu` on a machine without accelerators: run the processes on CPU over gloo.
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(
        cpu=cpu_processes,
        mixed_precision=config.mixed_precision,
        log_with=config.report_to,
        project_dir=str(output_dir),
        kwargs_handlers=[ddp],
    )
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return train_loop(accelerator, config, output_dir, resume, overwrite, config_file)
    finally:
        accelerator.end_training()  # also tears down the process group
        torch.set_num_threads(threads)


def train_loop(accelerator, config, output_dir, resume, overwrite, config_file) -> int:
    """The run itself, on an Accelerator."""
    set_seed(config.seed, device_specific=True)
    main = accelerator.is_main_process
    with accelerator.main_process_first():  # one process builds the datasets cache
        images = data.load_images(config)
    student, objective, model_config, last_layer = build_model(config, images)
    optimizer = torch.optim.AdamW(
        schedules.param_groups(student, model_config.num_hidden_layers, config),
        lr=0.0,  # every group's lr and weight decay are set by the schedules before each step
        betas=(config.adam_beta1, config.adam_beta2),
    )
    student, optimizer = accelerator.prepare(student, optimizer)
    objective.to(accelerator.device)

    start_step, resumed_from = 0, None
    if resume is not None:
        resumed_from = checkpoint.find_checkpoint(output_dir, resume)
        if resumed_from is not None:
            start_step = checkpoint.load_checkpoint(accelerator, objective, resumed_from)
        elif main:
            print(f"pretrain: no checkpoint in {checkpoint.checkpoints_dir(output_dir)} yet, starting from step 0")
    if start_step >= config.max_steps:
        raise UserError(f"the checkpoint is at step {start_step}, not before max_steps={config.max_steps}")
    metrics_path = output_dir / "metrics.jsonl"
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resumed_from is None:
            metrics_path.unlink(missing_ok=True)
        if overwrite and resume is None:  # a fresh run must never resume from the old run's checkpoints
            shutil.rmtree(checkpoint.checkpoints_dir(output_dir), ignore_errors=True)
        restart_metrics(metrics_path, start_step)
        write_run_info(
            output_dir / "run.json",
            config,
            accelerator,
            model_config,
            config_file=config_file,
            resumed_from=str(resumed_from) if resumed_from else None,
            start_step=start_step,
        )
    if config.report_to:
        accelerator.init_trackers("vitreg-pretrain", config={k: str(v) for k, v in config.to_dict().items()})

    loader = build_data(
        config, images, model_config.patch_size, accelerator.process_index, accelerator.num_processes, start_step
    )
    batches = iter(loader)
    peak_lr = config.peak_lr(accelerator.num_processes)
    global_batch = config.global_batch_size(accelerator.num_processes)
    flops_per_step = train_step_flops(config, model_config)
    progress = tqdm(total=config.max_steps, initial=start_step, disable=not main, desc="pretrain", unit="step")
    window_start, window_steps, saved_at, record = time.perf_counter(), 0, None, {}
    student.train()
    objective.train()
    for step in range(start_step, config.max_steps):
        # data: a batch from the workers, already augmented and collated
        batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in next(batches).items()}
        values = schedules.values_at(step, config, peak_lr)
        schedules.apply(optimizer, values)

        # model and loss
        with accelerator.autocast():
            loss, parts = objective(student, batch, values)
        if accelerator.reduce((~torch.isfinite(loss.detach())).float().reshape(1), "sum").item() > 0:
            progress.close()
            last = checkpoint.list_checkpoints(output_dir)
            detail = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
            raise UserError(
                f"the loss is not finite at step {step + 1} ({detail}); stopped without saving, the last "
                f"good checkpoint is {last[-1] if last else 'none'}: lower the lr or check the data"
            )

        # step: backward, last-layer freeze, clipping, optimizer, EMA teacher
        accelerator.backward(loss)
        if values.freeze_last_layer:
            for param in last_layer:
                param.grad = None
        if config.clip_grad:
            accelerator.clip_grad_norm_(student.parameters(), config.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.update_teacher(accelerator.unwrap_model(student), values.momentum)
        window_steps += 1
        progress.update(1)

        # log: losses averaged over processes, throughput over the window since the last log
        done = step + 1
        if done % config.logging_steps == 0 or done == config.max_steps:
            names = ["loss", *parts]
            means = accelerator.reduce(torch.stack([loss.detach(), *parts.values()]).float(), "mean").tolist()
            seconds = (time.perf_counter() - window_start) / window_steps
            record = {"step": done, **dict(zip(names, means)), "lr": values.lr, "weight_decay": values.weight_decay}
            if config.objective == "dinov2":
                record.update(momentum=values.momentum, teacher_temp=values.teacher_temp)
            record.update(images_per_s=global_batch / seconds, step_time_s=seconds)
            if config.peak_tflops:
                record["mfu"] = mfu(flops_per_step, seconds, config.peak_tflops)
            if main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
            if config.report_to:
                accelerator.log(record, step=done)
            window_start, window_steps = time.perf_counter(), 0

        # checkpoint
        if done % config.checkpointing_steps == 0 or done == config.max_steps:
            saved_at = checkpoint.save_checkpoint(
                accelerator, objective, output_dir, done, config.checkpoints_total_limit
            )
            window_start = time.perf_counter()  # saving is not training time
    progress.close()

    # export: the teacher backbone (DINOv2) or the classifier (supervised), as a ViTReg folder
    accelerator.wait_for_everyone()
    if main:
        from vitreg.model_cards import save_model_folder

        model = objective.export_model() if config.objective == "dinov2" else accelerator.unwrap_model(student)
        provenance = {
            "kind": "trained",
            "objective": config.objective,
            "config_file": Path(config_file).name if config_file else None,
            "steps": config.max_steps,
            "final_loss": record.get("loss", math.nan),
            "dataset": config.dataset or (Path(config.data_dir).name if config.data_dir else None),
            "num_processes": accelerator.num_processes,
            "num_register_tokens": model_config.num_register_tokens,
            "description": f"Pretrained with `vitreg pretrain` ({config.objective}); last checkpoint {saved_at.name}.",
        }
        save_model_folder(
            model,
            output_dir / "model",
            {k: v for k, v in provenance.items() if v is not None},
            overwrite=True,
            crop_size=config.global_crop_size,
        )
        print(f"pretrain: done, {config.max_steps} steps; model in {output_dir / 'model'}")
    accelerator.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m vitreg.training.pretrain ...` (also under `accelerate launch -m vitreg.training.pretrain ...`)."""
    parser = argparse.ArgumentParser(prog="python -m vitreg.training.pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as error:
        print(f"pretrain: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
