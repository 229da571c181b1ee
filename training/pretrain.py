"""Pretrain a ViT with registers: DINOv2 self-supervised or DeiT III supervised, from one CPU to many GPUs.

    python -m vitreg.training.pretrain --config smoke-dinov2 --data_dir photos/ --output_dir runs/smoke
    accelerate launch --multi_gpu --num_processes 8 -m vitreg.training.pretrain --config vitl14-reg4-dinov2-imagenet ...
    vitreg pretrain --config FILE --data_dir DIR --output_dir DIR --resume_from_checkpoint latest
    accelerate launch --config_file "$(vitreg pretrain --accelerate-config-path fsdp)" -m vitreg.training.pretrain ...

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
from transformers.utils import logging

import vitreg
from vitreg.core.errors import UserError
from vitreg.core.flags import add_common_flags, apply_common_flags, spellings
from vitreg.core.folders import writable_parent
from vitreg.core.logs import show_library_logs
from vitreg.core.provenance import Provenance
from vitreg.modeling_vitreg import ViTRegConfig

from . import checkpoint, data, schedules
from .config import (
    CONFIG_DIR,
    FIELDS,
    TrainConfig,
    base_type,
    choices,
    field_default,
    load_config,
    model_config_kwargs,
)
from .flops import mfu, train_step_flops
from .objectives import OBJECTIVES
from .step import NonFiniteLoss, build_optimizer, train_step

logger = logging.get_logger(__name__)

ACCELERATE_CONFIG_DIR = CONFIG_DIR / "accelerate"  # package data: installed with vitreg[train]


class PrintAccelerateConfig(argparse.Action):
    """`--accelerate-config-path NAME`: print the installed file's path and exit, as `--version` does (so no
    other flag is required)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(ACCELERATE_CONFIG_DIR / f"{values}.yaml")
        parser.exit()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags: the run's own, then one override flag per config key, each with its help and default.

    Every flag is accepted with underscores or dashes (`--output_dir` / `--output-dir`), as transformers'
    HfArgumentParser does."""

    parser.add_argument(
        *spellings("--config"), help="YAML config file, or a shipped config name (smoke-dinov2, ...) (default: none)"
    )
    parser.add_argument(
        *spellings("--output_dir"),
        required=True,
        help="run folder: run.json, metrics.jsonl, checkpoints/, model/ (required, no default)",
    )
    parser.add_argument(
        *spellings("--resume_from_checkpoint"),
        metavar="latest|PATH",
        help="continue a run from a checkpoint (default: none, a fresh run)",
    )
    add_common_flags(parser, "overwrite", "no_progress")
    parser.add_argument(
        *spellings("--accelerate_config_path"),
        action=PrintAccelerateConfig,
        choices=sorted(path.stem for path in ACCELERATE_CONFIG_DIR.glob("*.yaml")),
        help="print the path of a shipped accelerate config and exit, for `accelerate launch --config_file "
        '"$(vitreg pretrain --accelerate-config-path fsdp)" -m vitreg.training.pretrain ...` (copy it to edit it)',
    )
    overrides = parser.add_argument_group(
        "config overrides",
        "Each key of the YAML config; the value is read as YAML (--model '{num_register_tokens: 0}', "
        "--global-crops-scale '[0.4, 1]'). The default shown is the key's default when the config file omits it.",
    )
    for name, spec in FIELDS.items():
        allowed = choices(name)
        as_string = allowed is not None or base_type(name) is str
        overrides.add_argument(
            *spellings(f"--{name}"),
            dest=name,
            type=str if as_string else parse_yaml_value,
            default=None,
            metavar="{" + ",".join(allowed) + "}" if allowed else "V",
            help=f"{spec.metadata['help']} (default: {shown_default(field_default(name))})".replace("%", "%%"),
        )


def shown_default(value) -> str:
    """A default as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown_default(v)}" for k, v in value.items()) + "}"
    return str(value)


def parse_yaml_value(text: str):
    """A flag value read as YAML (numbers, booleans, lists, mappings)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"not a YAML value: {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Resolve the config (file, then flags) and train."""
    apply_common_flags(args)  # --no-progress: also the bars of datasets and transformers
    overrides = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    config = load_config(args.config, overrides)
    output_dir, progress = Path(args.output_dir), not args.no_progress
    return train(config, output_dir, args.resume_from_checkpoint, args.overwrite, args.config, progress=progress)


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to mix a new run into the folder of another one, and to write into a folder of other files
    (`--overwrite` replaces the run's checkpoints and model, which could be the user's own there)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file")
    try:
        names = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    except OSError as error:
        raise UserError(f"cannot read --output_dir {output_dir}: {error.strerror or error}") from None
    if not names:
        return
    if "run.json" not in names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(f"--output_dir {output_dir} holds files of no pretraining run ({shown}): name a new folder")
    if resume is None and not overwrite:
        raise UserError(f"{output_dir} already holds a run: pass --resume_from_checkpoint latest, or --overwrite")


def build_model(config: TrainConfig, images) -> tuple[torch.nn.Module, torch.nn.Module, ViTRegConfig]:
    """The student, its objective (teacher, centers) and the backbone config."""
    objective_class = OBJECTIVES[config.objective]
    kwargs = {**model_config_kwargs(config), **objective_class.model_config_kwargs(config, images)}
    try:
        model_config = ViTRegConfig(**kwargs)
    except (TypeError, ValueError) as error:
        raise UserError(f"config model: {error}") from None
    student = objective_class.build_student(model_config, config)
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    return student, objective_class(student, config), model_config


def build_data(config: TrainConfig, images, patch_size: int, rank: int, world_size: int, start_step: int):
    """The DataLoader of this process, starting at `start_step` of the run's data stream."""
    transform, collate, label = OBJECTIVES[config.objective].data_pipeline(config, patch_size, images)
    if config.dataset is not None:
        # a resumed stream restores its position through the loader's state (checkpoint.load_data_state)
        dataset = data.StreamedImages(images, transform, config, rank, world_size)
    else:
        dataset = data.AugmentedImages(images, transform, config.image_column, label)
    return data.make_loader(dataset, data.ReportUnreadable(collate), config, rank, world_size, start_step)


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


def run_provenance(config: TrainConfig, config_file: str | None, final_loss: float, num_processes: int) -> Provenance:
    """The provenance of a finished run: recipe, length, loss, and the data (a Hub dataset id or a local folder)."""
    source = config.data_dir or config.dataset
    local = source is not None and Path(source).exists()
    return Provenance(
        kind="trained",
        description=f"Pretrained with `vitreg pretrain` ({config.objective}).",
        datasets=[config.dataset] if config.dataset and not local else [],
        local_data=Path(source).name if local else None,
        vitreg_version=vitreg.__version__,
        objective=config.objective,
        config_file=Path(config_file).name if config_file else None,
        steps=config.max_steps,
        final_loss=final_loss,
        num_processes=num_processes,
    )


def train(
    config: TrainConfig,
    output_dir: Path,
    resume: str | None = None,
    overwrite: bool = False,
    config_file: str | None = None,
    progress: bool = True,
) -> int:
    """Run (or resume) a pretraining run into `output_dir`; returns 0 or raises UserError. A run that stops before
    its first checkpoint leaves nothing behind, so the same command can start it again."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, resume, overwrite)
    # DDP must look for parameters a step leaves out of the graph (a separate iBOT head without the iBOT loss).
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=OBJECTIVES[config.objective].leaves_parameters_unused(config)
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
    created = not output_dir.exists()
    started_empty = created or not any(output_dir.iterdir())  # (else a run folder: check_output_dir)
    try:
        if accelerator.is_main_process:  # an unwritable location fails now, in one line, not after the data loads
            writable_parent(output_dir / "run.json")
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        return train_loop(accelerator, config, output_dir, resume, overwrite, config_file, progress)
    except BaseException as error:
        if accelerator.is_main_process:
            after_stop(output_dir, created, started_empty, config, interrupted=isinstance(error, KeyboardInterrupt))
        raise
    finally:
        accelerator.end_training()  # also tears down the process group
        torch.set_num_threads(threads)


def after_stop(output_dir: Path, created: bool, started_empty: bool, config: TrainConfig, interrupted: bool) -> None:
    """After a run stopped early: if it started in an empty folder and saved no checkpoint, remove what it wrote
    (nothing can resume from it, and its run.json would make the same command refuse the folder); after an
    interrupt, say how to go on. (A run started with --overwrite in an old run's folder keeps its run.json: the same
    command, --overwrite included, starts it again.)"""
    if not output_dir.is_dir():  # it could not be created
        return
    saved = checkpoint.list_checkpoints(output_dir)
    if not saved and started_empty:
        for name in ("run.json", "metrics.jsonl"):
            (output_dir / name).unlink(missing_ok=True)
        for folder in (checkpoint.checkpoints_dir(output_dir), output_dir if created else None):
            if folder is not None and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    if not interrupted:
        return
    if saved:
        logger.warning(
            f"pretrain: interrupted; the last checkpoint is {saved[-1]}: the same command with "
            "--resume_from_checkpoint latest continues from it"
        )
    else:
        logger.warning(
            f"pretrain: interrupted before the first checkpoint (checkpointing_steps {config.checkpointing_steps}); "
            "nothing was kept: the same command starts the run again"
        )


def train_loop(accelerator, config, output_dir, resume, overwrite, config_file, progress=True) -> int:
    """The run itself, on an Accelerator."""
    main = accelerator.is_main_process
    with accelerator.main_process_first():  # one process builds the datasets cache
        images = data.load_images(config)
    # One initialisation on every process: the EMA teacher is copied from the student before DDP broadcasts rank 0's
    # weights, and FSDP2 shards what each process built. Then a seed per process for drop path and the like.
    set_seed(config.seed)
    student, objective, model_config = build_model(config, images)
    set_seed(config.seed, device_specific=True)
    optimizer = build_optimizer(student, model_config.num_hidden_layers, config)
    student, optimizer = accelerator.prepare(student, optimizer)
    objective.to(accelerator.device)

    start_step, resumed_from = 0, None
    if resume is not None:
        resumed_from = checkpoint.find_checkpoint(output_dir, resume)
        if resumed_from is not None:
            start_step = checkpoint.load_checkpoint(accelerator, objective, resumed_from)
        elif main:
            logger.info(f"pretrain: no checkpoint in {checkpoint.checkpoints_dir(output_dir)} yet, starting at step 0")
    if start_step >= config.max_steps:
        raise UserError(f"the checkpoint is at step {start_step}, not before max_steps={config.max_steps}")
    metrics_path = output_dir / "metrics.jsonl"
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resumed_from is None:
            metrics_path.unlink(missing_ok=True)
        if overwrite and resume is None:  # a fresh run must never resume from the old run's checkpoints
            shutil.rmtree(checkpoint.checkpoints_dir(output_dir), ignore_errors=True)
            shutil.rmtree(output_dir / "model", ignore_errors=True)  # nor leave its model beside the new run
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
    if resumed_from is not None:  # a stream continues where it was saved (an image folder: from start_step)
        checkpoint.load_data_state(loader, resumed_from, accelerator.process_index, accelerator.num_processes)
    batches = iter(loader)
    peak_lr = config.peak_lr(accelerator.num_processes)
    global_batch = config.global_batch_size(accelerator.num_processes)
    flops_per_step = train_step_flops(config, model_config)
    shown = main and progress  # --no-progress hides the bar, not the log lines
    bar = tqdm(total=config.max_steps, initial=start_step, disable=not shown, desc="pretrain", unit="step")
    window_start, window_steps, saved_at, record = time.perf_counter(), 0, None, {}
    student.train()
    objective.train()
    for step in range(start_step, config.max_steps):
        # data: a batch from the workers, already augmented and collated
        batch = next(batches)
        if "unreadable" in batch:  # an image the workers could not decode (data.ReportUnreadable)
            bar.close()
            raise data.unreadable_error(batch["unreadable"])
        batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
        values = schedules.values_at(step, config, peak_lr)

        # model, loss and step: forward, backward, per-module clipping, AdamW, EMA teacher (training/step.py)
        try:
            loss, parts = train_step(accelerator, student, objective, optimizer, batch, values, config.clip_grad)
        except NonFiniteLoss as error:
            bar.close()
            last = checkpoint.list_checkpoints(output_dir)
            raise UserError(
                f"the loss is not finite at step {step + 1} ({error}); stopped without saving, the last "
                f"good checkpoint is {last[-1] if last else 'none'}: lower the lr or check the data"
            ) from None
        window_steps += 1
        bar.update(1)

        # log: losses averaged over processes, throughput over the window since the last log
        done = step + 1
        if done % config.logging_steps == 0 or done == config.max_steps:
            names = ["loss", *parts]
            means = accelerator.reduce(torch.stack([loss, *parts.values()]).float(), "mean").tolist()
            seconds = (time.perf_counter() - window_start) / window_steps
            record = {"step": done, **dict(zip(names, means)), "lr": values.lr, "weight_decay": values.weight_decay}
            record.update(objective.values_to_log(values))
            record.update(images_per_s=global_batch / seconds, step_time_s=seconds)
            if config.peak_tflops:
                record["mfu"] = mfu(flops_per_step, seconds, config.peak_tflops)
            if main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
            if config.report_to:
                accelerator.log(record, step=done)
            window_start, window_steps = time.perf_counter(), 0

        # checkpoint
        if done % config.checkpointing_steps == 0 or done == config.max_steps:
            saved_at = checkpoint.save_checkpoint(
                accelerator, objective, output_dir, done, config.checkpoints_total_limit, loader
            )
            window_start = time.perf_counter()  # saving is not training time
    bar.close()

    # export: the teacher backbone (DINOv2) or the classifier (supervised), as a ViTReg folder
    accelerator.wait_for_everyone()
    if main:
        from vitreg.model_cards import save_model_folder

        model = objective.export_model(accelerator.unwrap_model(student))
        provenance = run_provenance(config, config_file, record.get("loss", math.nan), accelerator.num_processes)
        provenance.description += f" Last checkpoint {saved_at.name}."
        save_model_folder(model, output_dir / "model", provenance, overwrite=True, crop_size=config.global_crop_size)
        logger.info(f"pretrain: done, {config.max_steps} steps; model in {output_dir / 'model'}")
    accelerator.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m vitreg.training.pretrain ...` (also under `accelerate launch -m vitreg.training.pretrain ...`)."""
    parser = argparse.ArgumentParser(prog="python -m vitreg.training.pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    show_library_logs()
    try:
        return run(args)
    except UserError as error:
        print(f"pretrain: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pretrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
