# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Training HeadCLIP on an auxiliary labelled data set with `accelerate`, and the `headclip train` entry point.

The loop trains only the HeadCLIP parameters (prompts, deep prompts, head weights; plus LoRA weights when asked) of a
frozen CLIP, with AnomalyCLIP's protocol as defaults (Adam, lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, 518 px,
seed 111). The same code runs on one CPU, one GPU, or several GPUs / nodes under `accelerate launch` (the training
data is sharded by accelerate, the evaluation metrics are gathered across processes).

Checkpoints (`<output_dir>/checkpoints/step_<N>`) hold the trainable parameters, the optimizer, the RNG states and the
position in the data (epoch and batch), written at the end of every epoch and every `save_steps` steps; a run resumed
with `resume_from_checkpoint` (a path or "latest") continues at the next batch and ends with the same parameters as a
run that was never interrupted. Checkpoints and the final adapter are written to a temporary name and moved into
place, so an interrupted run never leaves a half-written one under its final name.

The result is an adapter (`<output_dir>/adapter`): a HeadCLIP adapter (see `headclip_hf.adapters`), or, with LoRA, a
PEFT adapter whose `modules_to_save` carry the HeadCLIP parameters.
"""

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .adapters import (
    HEADCLIP_MODULES,
    PEFT_ADAPTER_OUTPUT,
    PEFT_HEADCLIP_CONFIG_NAME,
    save_headclip_adapter,
    state_dict_mismatches,
)
from .configuration_headclip import DEFAULT_CLIP_CHECKPOINT, DEFAULT_IMAGE_SIZE
from .data import AnomalyCollator
from .evaluation import check_working_size, evaluate_model
from .files import output_folder, replace_directory
from .modeling_headclip import HeadCLIPModel
from .processing_headclip import HeadCLIPProcessor
from .reporting import results_to_markdown, save_results

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
DEFAULT_LORA_TARGETS = r"vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"


@dataclass
class ModelArguments:
    """Which CLIP (or HeadCLIP) to start from."""

    model_name_or_path: str = field(
        default=DEFAULT_CLIP_CHECKPOINT,
        metadata={
            "help": "CLIP or HeadCLIP checkpoint (a Hub id or a local folder; HF_HUB_OFFLINE=1 is honoured), or an "
            "adapter folder to continue training from."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": f"Working input size in pixels, a multiple of the patch size (default: the model's, "
            f"{DEFAULT_IMAGE_SIZE} for ViT-L/14 as in AnomalyCLIP)."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "HeadCLIP config fields to override, as 'field=value,field=value' (JSON values), e.g. "
            "'joint_alpha=1.0,use_head_weights=false' for ablations."
        },
    )


@dataclass
class DataArguments:
    """The auxiliary training set and optional held-out sets."""

    train_data: str = field(metadata={"help": "Training data set folder (MVTec AD, VisA, meta.json or generic)."})
    train_layout: str = field(default="auto", metadata={"help": "Layout of train_data (see load_anomaly_dataset)."})
    eval_data: list[str] = field(
        default_factory=list, metadata={"help": "Held-out data set folders, evaluated at the end of every epoch."}
    )
    eval_layout: str = field(default="auto", metadata={"help": "Layout of the eval_data folders."})


@dataclass
class HeadCLIPTrainingArguments:
    """How to train (defaults: AnomalyCLIP's protocol)."""

    output_dir: str = field(metadata={"help": "Where checkpoints, logs and the final adapter go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start afresh in an output_dir that holds a previous run (deletes it)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' for the newest in output_dir."}
    )
    num_train_epochs: int = field(default=15, metadata={"help": "Passes over the training data."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: no limit)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Images per batch and process."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Images per evaluation batch and process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate."})
    adam_beta1: float = field(default=0.5, metadata={"help": "Adam beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2."})
    seed: int = field(default=111, metadata={"help": "Seed of every random number generator and the data order."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'fp16' or 'bf16' (autocast)."})
    use_cpu: bool = field(
        default=False,
        metadata={
            "help": "Train on the CPU even with a GPU present. Several CPU processes: `accelerate launch --multi_gpu "
            "--num_processes 2 examples/train_headclip.py --use_cpu ...` (or torchrun) on a machine without GPUs."
        },
    )
    report_to: str = field(default="none", metadata={"help": "Tracker for the logs: 'none' or 'tensorboard'."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every this many optimizer steps."})
    save_steps: int = field(default=0, metadata={"help": "Also checkpoint every this many steps (0: epochs only)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    allow_image_labels_only: bool = field(
        default=False,
        metadata={"help": "Train on a data set without pixel masks (image cross-entropy only; no pixel losses)."},
    )
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the vision attention projections (0: off)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default=DEFAULT_LORA_TARGETS, metadata={"help": "Regex of LoRA target modules."})


class TrainingProgress:
    """Where the run is: saved in every checkpoint (`accelerator.register_for_checkpointing`)."""

    def __init__(self):
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        # The batch layout the position in the epoch counts in: a mid-epoch resume needs the same one.
        self.num_processes = 1
        self.per_device_train_batch_size = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def add_lora(model: HeadCLIPModel, args: HeadCLIPTrainingArguments) -> PeftModel:
    """
    Wrap `model` with LoRA on the modules matching `args.lora_target_modules` (the vision attention projections by
    default); the HeadCLIP modules train alongside as PEFT `modules_to_save`, so PEFT saves and reloads them too.
    """
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        modules_to_save=list(HEADCLIP_MODULES),
    )
    return get_peft_model(model, config)


def _latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = [p for p in (output_dir / CHECKPOINTS_DIR).glob("step_*") if re.fullmatch(r"step_\d+", p.name)]
    return max(checkpoints, key=lambda p: int(p.name.removeprefix("step_")), default=None)


def _prepare_output_dir(args: HeadCLIPTrainingArguments, accelerator: Accelerator) -> Path | None:
    """Refuse to mix runs; return the checkpoint to resume from (or None)."""
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint:
        checkpoint = (
            _latest_checkpoint(output_dir)
            if args.resume_from_checkpoint == "latest"
            else Path(args.resume_from_checkpoint)
        )
        if checkpoint is None or not checkpoint.is_dir():
            raise FileNotFoundError(
                f"No checkpoint to resume from: {args.resume_from_checkpoint!r} "
                f"(checkpoints are looked for in {output_dir / CHECKPOINTS_DIR})."
            )
        return checkpoint
    previous = [output_dir / name for name in (CHECKPOINTS_DIR, ADAPTER_DIR) if (output_dir / name).exists()]
    if previous:
        if not args.overwrite_output_dir:
            raise FileExistsError(
                f"{output_dir} holds a previous run ({', '.join(p.name for p in previous)}): pass "
                "--overwrite_output_dir to start afresh or --resume_from_checkpoint latest to continue it."
            )
        if accelerator.is_main_process:
            for path in previous:
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return None


def _register_checkpoint_hooks(accelerator: Accelerator) -> None:
    """
    Checkpoints hold the trainable parameters only (not the frozen CLIP), named as in the unwrapped model (so a run
    resumes on any number of processes), and a model of another shape is refused with the mismatches named.
    """

    def save_trainable(models, weights, output_dir):
        for index, model in enumerate(models):
            unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
            weights[index] = {name: p.detach() for name, p in unwrapped.named_parameters() if p.requires_grad}

    def load_trainable(models, input_dir):
        for index, model in enumerate(models):
            unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
            weights_file = Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
            saved = load_file(weights_file)
            expected = {name: p for name, p in unwrapped.named_parameters() if p.requires_grad}
            problems = state_dict_mismatches(saved, expected)
            if problems:
                raise ValueError(
                    f"The checkpoint {input_dir} comes from a model of another shape: " + "; ".join(problems) + "."
                )
            unwrapped.load_state_dict(saved, strict=False)
        models.clear()  # loaded here: accelerate must not load them again

    accelerator.register_save_state_pre_hook(save_trainable)
    accelerator.register_load_state_pre_hook(load_trainable)


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int) -> None:
    """`accelerator.save_state` into a staging folder (every process writes its RNG state there), then moved."""
    final = output_dir / CHECKPOINTS_DIR / f"step_{step}"
    staging = final.with_name(f".{final.name}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_directory(staging, final)
    accelerator.wait_for_everyone()


def _save_adapter(model, output_dir: Path, base_model_name_or_path: str) -> Path:
    """
    The final adapter: a HeadCLIP adapter; with LoRA a PEFT adapter, plus the HeadCLIP config fields the model was
    trained with (so `load_headclip_model` rebuilds that model). Both are written atomically.
    """
    target = output_dir / ADAPTER_DIR
    if not isinstance(model, PeftModel):
        return save_headclip_adapter(model, target, base_model_name_or_path)
    with output_folder(target, PEFT_ADAPTER_OUTPUT) as staging:
        model.save_pretrained(staging)
        fields = {"headclip_config": model.get_base_model().config.headclip_fields()}
        (staging / PEFT_HEADCLIP_CONFIG_NAME).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    return target


def _check_training_data(dataset: datasets.Dataset, args: HeadCLIPTrainingArguments) -> None:
    if len(dataset) == 0:
        raise ValueError("The training data set is empty.")
    if not any(dataset["mask_valid"]) and not args.allow_image_labels_only:
        raise ValueError(
            "Training needs pixel masks, and this training set has none (no row has a known mask). Use a data set "
            "with ground-truth masks, or pass --allow_image_labels_only to train on image labels only (the image "
            "cross-entropy; the pixel losses are left out)."
        )


def train(
    model: HeadCLIPModel,
    processor: HeadCLIPProcessor,
    train_dataset: datasets.Dataset,
    args: HeadCLIPTrainingArguments,
    eval_datasets: dict[str, datasets.Dataset] | None = None,
    on_step_end: Callable[[int, float], None] | None = None,
) -> Path:
    """
    Train the HeadCLIP parameters of `model` on `train_dataset` (rows of `load_anomaly_dataset`).

    Args:
        model: the HeadCLIP to train (its backbone is frozen); wrapped with LoRA when `args.lora_rank > 0`.
        processor: prepares images and masks at the model's working size.
        train_dataset: the auxiliary labelled set (with masks, unless `args.allow_image_labels_only`).
        args: the training arguments.
        eval_datasets: held-out sets by name, evaluated at the end of every epoch (metrics logged and written to
            `<output_dir>/eval/epoch_<k>/<name>/`).
        on_step_end: called as `on_step_end(global_step, loss)` after every optimizer step.

    Returns:
        The folder of the final adapter.
    """
    _check_training_data(train_dataset, args)
    check_working_size(model, processor)
    accelerator = Accelerator(
        cpu=args.use_cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    resume_from = _prepare_output_dir(args, accelerator)
    base_model_name_or_path = model.config._name_or_path
    if args.lora_rank > 0:
        model = add_lora(model, args)
    model.train()

    loader = DataLoader(
        train_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        num_workers=args.dataloader_num_workers,
        collate_fn=AnomalyCollator(processor),
    )
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    _register_checkpoint_hooks(accelerator)
    layout = (accelerator.num_processes, args.per_device_train_batch_size)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        saved_layout = (progress.num_processes, progress.per_device_train_batch_size)
        if progress.batches_in_epoch > 0 and saved_layout != layout:
            raise ValueError(
                f"{resume_from} was saved in the middle of epoch {progress.epoch} by {saved_layout[0]} process(es) "
                f"with batches of {saved_layout[1]}; resuming mid-epoch needs the same layout (now {layout[0]} "
                f"process(es), batches of {layout[1]}). Resume with that layout, or from a checkpoint saved at the "
                "end of an epoch."
            )
        logger.info(f"Resumed from {resume_from} at step {progress.global_step} (epoch {progress.epoch}).")
    progress.num_processes, progress.per_device_train_batch_size = layout
    if args.report_to != "none":
        accelerator.init_trackers("headclip", config={k: str(v) for k, v in asdict(args).items()})

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    total_steps = args.num_train_epochs * steps_per_epoch
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    bar = tqdm(
        total=total_steps, initial=progress.global_step, desc="Training", disable=not accelerator.is_local_main_process
    )
    while progress.global_step < total_steps:
        loader.set_epoch(progress.epoch)
        epoch_loader = accelerator.skip_first_batches(loader, progress.batches_in_epoch)
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                outputs = model(
                    pixel_values=batch["pixel_values"],
                    masks=batch["masks"],
                    labels=batch["labels"],
                    mask_valid=batch["mask_valid"],
                )
                accelerator.backward(outputs.loss)
                optimizer.step()
                optimizer.zero_grad()
            progress.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            progress.global_step += 1
            loss = accelerator.gather(outputs.loss.detach()).mean().item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", epoch=progress.epoch)
            if progress.global_step % args.logging_steps == 0:
                accelerator.log({"train/loss": loss, "train/epoch": progress.epoch}, step=progress.global_step)
            if on_step_end is not None:
                on_step_end(progress.global_step, loss)
            if args.save_steps > 0 and progress.global_step % args.save_steps == 0:
                _save_checkpoint(accelerator, output_dir, progress.global_step)
            if progress.global_step >= total_steps:
                break
        if progress.batches_in_epoch >= len(loader):  # the epoch ran to its end
            progress.epoch += 1
            progress.batches_in_epoch = 0
            if not (args.save_steps > 0 and progress.global_step % args.save_steps == 0):
                _save_checkpoint(accelerator, output_dir, progress.global_step)
            _evaluate(accelerator, model, processor, eval_datasets, args, progress)
    bar.close()

    accelerator.wait_for_everyone()
    adapter_dir = output_dir / ADAPTER_DIR
    if accelerator.is_main_process:
        adapter_dir = _save_adapter(
            accelerator.unwrap_model(model, keep_torch_compile=False), output_dir, base_model_name_or_path
        )
        logger.info(f"Saved the adapter to {adapter_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return adapter_dir


def _evaluate(
    accelerator: Accelerator,
    model,
    processor: HeadCLIPProcessor,
    eval_datasets: dict[str, datasets.Dataset] | None,
    args: HeadCLIPTrainingArguments,
    progress: TrainingProgress,
) -> None:
    for name, dataset in (eval_datasets or {}).items():
        results = evaluate_model(
            accelerator.unwrap_model(model, keep_torch_compile=False),
            processor,
            dataset,
            batch_size=args.per_device_eval_batch_size,
            num_workers=args.dataloader_num_workers,
        )
        if accelerator.is_main_process:
            save_results(results, Path(args.output_dir) / "eval" / f"epoch_{progress.epoch}" / name)
            logger.info(f"Epoch {progress.epoch}, {name}:\n{results_to_markdown(results)}")
        metrics = {
            f"eval/{name}/{metric}": result.value
            for metric, result in results.mean.items()
            if result.value is not None
        }
        accelerator.log(metrics, step=progress.global_step)


__all__ = [
    "DataArguments",
    "HeadCLIPTrainingArguments",
    "ModelArguments",
    "add_lora",
    "train",
]
