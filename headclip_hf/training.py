# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Training HeadCLIP on an auxiliary labelled data set with `accelerate`.

The loop trains only the HeadCLIP parameters (prompts, deep prompts, head weights; plus LoRA weights when asked) of a
frozen CLIP, with AnomalyCLIP's protocol as defaults (Adam, lr 1e-3, betas (0.5, 0.999), constant learning rate,
batch 8, 15 epochs, 518 px, seed 111). The same code runs on one CPU, one GPU, or several GPUs / nodes under
`accelerate launch` (the training data is sharded by accelerate, the evaluation metrics are gathered across
processes). `gradient_checkpointing` recomputes the image encoder's activations in the backward pass instead of
keeping them (HeadCLIP's head weights sit inside the encoder, so every step back-propagates through all of it).

A run writes, under `output_dir`:

- `checkpoints/step_<N>/`: the trainable parameters (`model.safetensors`), the optimizer (`optimizer.pt`, read back
  with `torch.load(..., weights_only=True)`), the learning-rate schedule (`scheduler.json`), each process's random
  number generator states (`rng_state_<rank>.safetensors`) and `training_state.json` (the position in the data, the
  log and evaluation history, the best model so far, the HeadCLIP configuration). Written at the end of every epoch,
  every `save_steps` steps, after every evaluation and at the end; `save_total_limit` keeps the newest (and the best).
  Resuming (`resume_from_checkpoint`: a folder or "latest") reads only tensors and JSON, never a pickled object: a
  checkpoint holding any other file is refused, and so is one written with another HeadCLIP configuration. A resumed
  run ends with exactly the parameters of a run that was never interrupted.
- `eval/step_<N>/<data set>/`: the results of each evaluation (`results.json`, `results.md`; the curve plots too at the
  end of training), at the end of every epoch or every `eval_steps` steps, and always at the end of training.
- `adapter/`: the final model (the best one with `load_best_model_at_end`): a HeadCLIP adapter (see
  `headclip_hf.adapters`), or, with LoRA, a PEFT adapter whose `modules_to_save` carry the HeadCLIP parameters.
- `training_state.json` (the log and evaluation history) and `all_results.json` (the run's summary and the metrics of
  the saved model).

Checkpoints and adapters are written under a temporary name and moved into place, so an interrupted run never leaves
a half-written one under its final name.
"""

import json
import logging
import math
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.tracking import get_available_trackers
from accelerate.utils import DataLoaderConfiguration, LoggerType, set_seed
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .adapters import (
    HEADCLIP_MODULES,
    PEFT_ADAPTER_OUTPUT,
    PEFT_HEADCLIP_CONFIG_NAME,
    check_finite_tensors,
    save_headclip_adapter,
    state_dict_mismatches,
)
from .configuration_headclip import DEFAULT_CLIP_CHECKPOINT, DEFAULT_IMAGE_SIZE
from .data import AnomalyCollator
from .evaluation import evaluate_model
from .files import check_writable_folder, output_file, output_folder, replace_directory
from .hub import ADAPTER_LIBRARY, HUB_PIPELINE_TAG, check_repo_id
from .metrics import METRIC_NAMES
from .modeling_headclip import HeadCLIPModel
from .processing_headclip import HeadCLIPProcessor, check_working_size
from .provenance import evaluation_provenance
from .reporting import results_to_markdown, save_results

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
EVAL_DIR = "eval"
TRAINING_STATE_NAME = "training_state.json"
ALL_RESULTS_NAME = "all_results.json"
DEFAULT_LORA_TARGETS = r"vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"

# The files of a checkpoint folder. Each is read without unpickling arbitrary objects: safetensors, JSON, and the
# optimizer state with `torch.load(..., weights_only=True)`.
CHECKPOINT_WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.json"
SCALER_NAME = "scaler.json"  # mixed precision fp16 only
RNG_STATE_PATTERN = re.compile(r"rng_state_(\d+)\.safetensors")
REQUIRED_CHECKPOINT_FILES = (TRAINING_STATE_NAME, CHECKPOINT_WEIGHTS_NAME, OPTIMIZER_NAME, SCHEDULER_NAME)

# Learning-rate schedules of transformers' `get_scheduler` that need nothing but warmup and training steps.
LR_SCHEDULER_TYPES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
)
# What `metric_for_best_model` may name: a mean metric of the evaluation, or "mad" (the mean of mAD image and mAD
# pixel); prefixed with "<data set>/" it is read on that evaluation set only, else averaged over all of them.
BEST_MODEL_METRICS = (*METRIC_NAMES, "mad")
# `report_to`: "none", "all" (every installed tracker accelerate supports) or names of accelerate's trackers.
TRACKER_NAMES = tuple(str(tracker) for tracker in LoggerType if tracker != LoggerType.ALL)


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
    """
    The auxiliary training set and optional held-out sets: any source `load_anomaly_dataset` reads (a folder, Parquet,
    a `save_to_disk` folder, a Hub data set id), with the data options of the other `headclip` commands. `split`,
    `categories`, `revision` and the column mapping describe `train_data`; the held-out sets are read with
    `eval_split` and their columns found by name; `skip_unreadable` and `allow_outside_root` apply to every set.
    """

    train_data: str = field(
        metadata={
            "help": "Training data set: a folder (MVTec AD, VisA, meta.json, generic, ...), Parquet or a Hub id."
        }
    )
    train_layout: str = field(default="auto", metadata={"help": "Layout of train_data (see load_anomaly_dataset)."})
    eval_data: list[str] = field(
        default_factory=list,
        metadata={"help": "Held-out data sets, evaluated during training (see --eval_steps) and at the end."},
    )
    eval_layout: str = field(default="auto", metadata={"help": "Layout of the eval_data folders."})
    split: str = field(
        default="test", metadata={"help": "Split of train_data (default: test, the labelled split the protocol uses)."}
    )
    eval_split: str = field(default="test", metadata={"help": "Split of the eval_data sets (default: test)."})
    categories: list[str] | None = field(default=None, metadata={"help": "Train on these categories only."})
    revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a Hub train_data."})
    skip_unreadable: bool = field(
        default=False, metadata={"help": "Skip (and list) unreadable images of every set instead of stopping."}
    )
    allow_outside_root: bool = field(
        default=False,
        metadata={
            "help": "Read files that a meta file, CSV or table lists outside its data folder (refused by default)."
        },
    )
    image_column: str | None = field(default=None, metadata={"help": "Table column of train_data's images."})
    mask_column: str | None = field(default=None, metadata={"help": "Table column of train_data's masks."})
    label_column: str | None = field(default=None, metadata={"help": "Table column of train_data's labels."})
    category_column: str | None = field(default=None, metadata={"help": "Table column of train_data's categories."})
    defect_type_column: str | None = field(
        default=None, metadata={"help": "Table column of train_data's defect types."}
    )

    def train_load_arguments(self) -> dict:
        """The `load_anomaly_dataset` keyword arguments of `train_data`."""
        columns = ("image", "mask", "label", "category", "defect_type")
        return {
            "layout": self.train_layout,
            "split": self.split,
            "categories": self.categories,
            "revision": self.revision,
            **self._safety_arguments(),
            **{f"{name}_column": getattr(self, f"{name}_column") for name in columns},
        }

    def eval_load_arguments(self) -> dict:
        """The `load_anomaly_dataset` keyword arguments of each `eval_data` set."""
        return {"layout": self.eval_layout, "split": self.eval_split, **self._safety_arguments()}

    def _safety_arguments(self) -> dict:
        return {"skip_unreadable": self.skip_unreadable, "allow_outside_root": self.allow_outside_root}


@dataclass
class HeadCLIPTrainingArguments:
    """How to train (defaults: AnomalyCLIP's protocol). Invalid values raise a `ValueError` naming the flag."""

    output_dir: str = field(metadata={"help": "Where checkpoints, evaluations, logs and the final adapter go."})
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
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute the image encoder's activations in the backward pass instead of keeping them: much "
            "less memory for some more time (see benchmarks/training.py)."
        },
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of Adam."})
    lr_scheduler_type: str = field(
        default="constant",
        metadata={"help": f"Learning-rate schedule (transformers' get_scheduler): {', '.join(LR_SCHEDULER_TYPES)}."},
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup over this many optimizer steps."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Linear warmup over this fraction of the run."})
    adam_beta1: float = field(default=0.5, metadata={"help": "Adam beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2."})
    weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "Decoupled (AdamW) weight decay of the prompts and LoRA weights; the head weights, which start "
            "at 1, are not decayed."
        },
    )
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Clip the gradient norm to this value (0: no clipping; it is logged anyway)."}
    )
    seed: int = field(default=111, metadata={"help": "Seed of every random number generator and the data order."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'fp16' or 'bf16' (autocast)."})
    use_cpu: bool = field(
        default=False,
        metadata={
            "help": "Train on the CPU even with a GPU present. Several CPU processes: `accelerate launch --multi_gpu "
            "--num_processes 2 examples/train_headclip.py --use_cpu ...` (or torchrun) on a machine without GPUs."
        },
    )
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "Trackers for the logs (loss, learning rate, gradient norm, images/s, evaluation metrics, "
            f"hyper-parameters): 'none', 'all' (every installed one) or some of {', '.join(TRACKER_NAMES)}."
        },
    )
    logging_steps: int = field(default=10, metadata={"help": "Log every this many optimizer steps."})
    save_steps: int = field(
        default=0, metadata={"help": "Also checkpoint every this many steps (0: at the end of every epoch only)."}
    )
    save_total_limit: int | None = field(
        default=None,
        metadata={"help": "Keep at most this many checkpoints: the newest ones, and always the best one."},
    )
    eval_steps: int = field(
        default=0,
        metadata={
            "help": "Evaluate on eval_data every this many steps (0: at the end of every epoch); always also at the "
            "end of training."
        },
    )
    metric_for_best_model: str | None = field(
        default=None,
        metadata={
            "help": "Mean evaluation metric that picks the best model (higher is better): "
            f"{', '.join(BEST_MODEL_METRICS)} (mad: the mean of mAD image and mAD pixel), averaged over the "
            "eval_data sets, or '<data set>/<metric>' for one set."
        },
    )
    load_best_model_at_end: bool = field(
        default=False, metadata={"help": "Save the best model (metric_for_best_model) as the adapter, not the last."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    allow_image_labels_only: bool = field(
        default=False,
        metadata={"help": "Train on a data set without pixel masks (image cross-entropy only; no pixel losses)."},
    )
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the vision attention projections (0: off)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default=DEFAULT_LORA_TARGETS, metadata={"help": "Regex of LoRA target modules."})
    push_to_hub: bool = field(
        default=False,
        metadata={
            "help": "`headclip train`: publish the final (or best) model with `headclip push` at the end, its card "
            "built from the final evaluation on the first eval_data set."
        },
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "The Hub repository to push to, user/name."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: `hf auth login`'s)."})

    def __post_init__(self):
        if isinstance(self.report_to, str):
            self.report_to = [name.strip() for name in self.report_to.split(",")]
        self._check_counts()
        self._check_optimization()
        self._check_model_selection()
        self._check_report_to()
        self._check_hub()

    def _check_counts(self) -> None:
        at_least = {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 1,
            "per_device_eval_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "logging_steps": 1,
            "save_steps": 0,
            "eval_steps": 0,
            "dataloader_num_workers": 0,
            "lora_rank": 0,
        }
        for name, minimum in at_least.items():
            if getattr(self, name) < minimum:
                raise ValueError(f"--{name} {getattr(self, name)} is invalid: it must be at least {minimum}.")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(f"--max_steps {self.max_steps} is invalid: a positive number of steps, or -1 for none.")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"--save_total_limit {self.save_total_limit} is invalid: keep at least 1 checkpoint.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision {self.mixed_precision!r} is invalid: use 'no', 'fp16' or 'bf16'.")

    def _check_optimization(self) -> None:
        if self.lr_scheduler_type not in LR_SCHEDULER_TYPES:
            raise ValueError(
                f"--lr_scheduler_type {self.lr_scheduler_type!r} is not supported: use one of "
                f"{', '.join(LR_SCHEDULER_TYPES)}."
            )
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(
                f"--warmup_steps {self.warmup_steps} / --warmup_ratio {self.warmup_ratio} are invalid: warmup steps "
                "are >= 0, the warmup ratio lies in [0, 1)."
            )
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            raise ValueError("Pass --warmup_steps or --warmup_ratio, not both.")
        if (self.warmup_steps > 0 or self.warmup_ratio > 0) and self.lr_scheduler_type == "constant":
            raise ValueError(
                "The 'constant' schedule has no warmup: use --lr_scheduler_type constant_with_warmup (or another "
                "schedule) with --warmup_steps / --warmup_ratio."
            )
        if not self.max_grad_norm >= 0:  # also refuses NaN
            raise ValueError(
                f"--max_grad_norm {self.max_grad_norm} is invalid: a positive norm to clip to, or 0 for no clipping."
            )
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight_decay {self.weight_decay} is invalid: it must be >= 0.")

    def _check_model_selection(self) -> None:
        if self.metric_for_best_model is not None:
            metric = self.metric_for_best_model.rpartition("/")[2]
            if metric not in BEST_MODEL_METRICS:
                raise ValueError(
                    f"--metric_for_best_model {self.metric_for_best_model!r}: evaluation reports no metric "
                    f"{metric!r}. Use one of {', '.join(BEST_MODEL_METRICS)}, optionally as '<data set>/<metric>'."
                )
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            raise ValueError(
                "--load_best_model_at_end needs --metric_for_best_model, the metric that picks the best model "
                "(e.g. pixel_aupro)."
            )

    def _check_report_to(self) -> None:
        names = [name for name in self.report_to if name != "none"]
        if "none" in self.report_to and names:
            raise ValueError(f"--report_to {' '.join(self.report_to)}: 'none' cannot be combined with trackers.")
        available = {str(tracker) for tracker in get_available_trackers()}
        for name in names:
            if name != "all" and name not in TRACKER_NAMES:
                raise ValueError(
                    f"--report_to {name!r} is not a tracker accelerate supports: use 'none', 'all' or some of "
                    f"{', '.join(TRACKER_NAMES)}."
                )
            if name != "all" and name not in available:
                raise ValueError(f"--report_to {name}: the {name} package is not installed (pip install {name}).")

    def _check_hub(self) -> None:
        if not self.push_to_hub:
            return
        if not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id, the repository to push to (user/name).")
        check_repo_id(self.hub_model_id)

    @property
    def trackers(self) -> list[str] | None:
        """The `log_with` of accelerate's `Accelerator`."""
        return None if self.report_to == ["none"] else self.report_to


@dataclass
class TrainingState:
    """
    Where a run is and what it has seen: `training_state.json` in every checkpoint and in `output_dir`, read back as
    plain JSON when resuming.

    Args:
        global_step (`int`): Optimizer steps done.
        epoch (`int`): Epochs completed.
        batches_in_epoch (`int`): Batches of the current epoch done (per process).
        num_processes (`int`) / per_device_train_batch_size (`int`): The batch layout `batches_in_epoch` counts in.
        train_loss_sum (`float`): Sum of the step losses, for the mean training loss.
        last_evaluation_step (`int`, *optional*): The step of the last evaluation.
        best_metric (`float`, *optional*) / best_model_checkpoint (`str`, *optional*): The best value of
            `metric_for_best_model` so far and the checkpoint (`step_<N>`) that holds that model.
        model_config (`dict`): The HeadCLIP configuration fields and LoRA settings; resuming needs the same.
        log_history (`list[dict]`): Every training log and evaluation, each with its `step`.
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    num_processes: int = 1
    per_device_train_batch_size: int = 0
    train_loss_sum: float = 0.0
    last_evaluation_step: int | None = None
    best_metric: float | None = None
    best_model_checkpoint: str | None = None
    model_config: dict = field(default_factory=dict)
    log_history: list = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TrainingState":
        """Read `path`; `ValueError` naming it when it is not a training state (malformed, other fields or types)."""
        data = _read_json(path)
        expected = {
            "global_step": int,
            "epoch": int,
            "batches_in_epoch": int,
            "num_processes": int,
            "per_device_train_batch_size": int,
            "train_loss_sum": (int, float),
            "last_evaluation_step": (int, type(None)),
            "best_metric": (int, float, type(None)),
            "best_model_checkpoint": (str, type(None)),
            "model_config": dict,
            "log_history": list,
        }
        wrong = sorted(set(data) ^ set(expected)) if isinstance(data, dict) else ["(not a JSON object)"]
        wrong += [name for name, kind in expected.items() if name in data and not isinstance(data[name], kind)]
        if wrong:
            raise ValueError(f"{path} is not a HeadCLIP training state: unexpected, missing or mistyped {wrong}.")
        return cls(**data)


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


def count_training_steps(num_rows: int, args: HeadCLIPTrainingArguments, num_processes: int) -> int:
    """The optimizer steps of a run on `num_rows` training rows sharded over `num_processes` (as accelerate does)."""
    batches_per_process = math.ceil(math.ceil(num_rows / args.per_device_train_batch_size) / num_processes)
    total = args.num_train_epochs * math.ceil(batches_per_process / args.gradient_accumulation_steps)
    return min(total, args.max_steps) if args.max_steps > 0 else total


def count_warmup_steps(args: HeadCLIPTrainingArguments, total_steps: int) -> int:
    return args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)


def check_training_inputs(
    train_dataset: datasets.Dataset,
    eval_datasets: dict[str, datasets.Dataset] | None,
    args: HeadCLIPTrainingArguments,
) -> Path | None:
    """
    Check everything about a run that can be checked before a model is loaded: the output folder (a folder that can be
    written), the data, what needs evaluation data, the run's length against the warmup, a previous run in the output
    folder and the checkpoint to resume from. [`train`] calls it first; `headclip train` calls it before loading the
    model.

    Returns:
        The checkpoint to resume from, or `None`.

    Raises:
        `ValueError`: an empty training set, one without masks (unless `allow_image_labels_only`), model selection or
            publishing without evaluation data, an unknown data set in `metric_for_best_model`, a warmup longer than
            the run, or a checkpoint that cannot be resumed (see [`read_checkpoint`]).
        `FileExistsError`: `output_dir` holds a previous run (and neither resuming nor `overwrite_output_dir`).
        `FileNotFoundError`: no checkpoint to resume from.
        `NotADirectoryError`, `PermissionError`: `output_dir` is a file or cannot be written
            ([`headclip_hf.files.check_writable_folder`]).
    """
    check_writable_folder(args.output_dir, "the training run (checkpoints, evaluations, the adapter)")
    eval_datasets = eval_datasets or {}
    if len(train_dataset) == 0:
        raise ValueError("The training data set is empty.")
    if not any(train_dataset["mask_valid"]) and not args.allow_image_labels_only:
        raise ValueError(
            "Training needs pixel masks, and this training set has none (no row has a known mask). Use a data set "
            "with ground-truth masks, or pass --allow_image_labels_only to train on image labels only (the image "
            "cross-entropy; the pixel losses are left out)."
        )
    _check_evaluation_needs(eval_datasets, args)
    num_processes = PartialState(cpu=args.use_cpu).num_processes
    total_steps = count_training_steps(len(train_dataset), args, num_processes)
    warmup_steps = count_warmup_steps(args, total_steps)
    if warmup_steps > total_steps:
        raise ValueError(
            f"The warmup ({warmup_steps} optimizer steps) is longer than the run ({total_steps} steps of "
            f"{args.per_device_train_batch_size} x {num_processes} x {args.gradient_accumulation_steps} images): "
            "shorten --warmup_steps / --warmup_ratio or train longer."
        )
    return _checkpoint_to_resume(args, num_processes)


def _check_evaluation_needs(eval_datasets: dict[str, datasets.Dataset], args: HeadCLIPTrainingArguments) -> None:
    needs_evaluation = [
        flag
        for flag, asked in (
            ("--metric_for_best_model", args.metric_for_best_model is not None),
            ("--load_best_model_at_end", args.load_best_model_at_end),
            ("--push_to_hub", args.push_to_hub),
        )
        if asked
    ]
    if needs_evaluation and not eval_datasets:
        raise ValueError(
            f"{' and '.join(needs_evaluation)} need(s) evaluation data (the model card and the choice of the best "
            "model come from evaluations): pass --eval_data FOLDER."
        )
    set_name, _, _ = (args.metric_for_best_model or "").rpartition("/")
    if set_name and set_name not in eval_datasets:
        raise ValueError(
            f"--metric_for_best_model {args.metric_for_best_model!r} names the evaluation set {set_name!r}; the "
            f"evaluation sets are {', '.join(eval_datasets)}."
        )


def _latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = [p for p in (output_dir / CHECKPOINTS_DIR).glob("step_*") if re.fullmatch(r"step_\d+", p.name)]
    return max(checkpoints, key=_checkpoint_step, default=None)


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))


def _previous_run_entries(output_dir: Path) -> list[Path]:
    names = (CHECKPOINTS_DIR, ADAPTER_DIR, EVAL_DIR, TRAINING_STATE_NAME, ALL_RESULTS_NAME)
    return [output_dir / name for name in names if (output_dir / name).exists()]


def _checkpoint_to_resume(args: HeadCLIPTrainingArguments, num_processes: int) -> Path | None:
    """The checkpoint to resume from, checked (see [`read_checkpoint`]); refuse to mix a new run with an old one."""
    output_dir = Path(args.output_dir)
    if not args.resume_from_checkpoint:
        previous = _previous_run_entries(output_dir)
        if previous and not args.overwrite_output_dir:
            raise FileExistsError(
                f"{output_dir} holds a previous run ({', '.join(p.name for p in previous)}): pass "
                "--overwrite_output_dir to start afresh or --resume_from_checkpoint latest to continue it."
            )
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoint = _latest_checkpoint(output_dir)
    else:
        checkpoint = Path(args.resume_from_checkpoint)
    if checkpoint is None or not checkpoint.is_dir():
        raise FileNotFoundError(
            f"No checkpoint to resume from: {args.resume_from_checkpoint!r} "
            f"(checkpoints are looked for in {output_dir / CHECKPOINTS_DIR})."
        )
    state = read_checkpoint(checkpoint)
    saved_layout = (state.num_processes, state.per_device_train_batch_size)
    layout = (num_processes, args.per_device_train_batch_size)
    if state.batches_in_epoch > 0 and saved_layout != layout:
        raise ValueError(
            f"{checkpoint} was saved in the middle of epoch {state.epoch + 1} by {saved_layout[0]} process(es) with "
            f"batches of {saved_layout[1]}; resuming mid-epoch needs the same layout (now {layout[0]} process(es), "
            f"batches of {layout[1]}). Resume with that layout, or from a checkpoint saved at the end of an epoch."
        )
    return checkpoint


def read_checkpoint(checkpoint: str | Path) -> TrainingState:
    """
    Check that the folder `checkpoint` is a complete HeadCLIP checkpoint holding nothing else, and return its training
    state. Nothing is unpickled: a checkpoint is tensors (safetensors, and the optimizer state read with
    `torch.load(..., weights_only=True)`) and JSON.

    Raises:
        `ValueError`: a file that is not part of a checkpoint (a pickle, for instance: loading one can run code), a
            missing file, or a malformed training state; each named.
    """
    checkpoint = Path(checkpoint)
    known = {*REQUIRED_CHECKPOINT_FILES, SCALER_NAME}
    foreign = sorted(
        p.name for p in checkpoint.iterdir() if p.name not in known and not RNG_STATE_PATTERN.fullmatch(p.name)
    )
    if foreign:
        raise ValueError(
            f"{checkpoint} holds files that are not part of a HeadCLIP checkpoint: {', '.join(foreign)}. Resuming "
            "reads only tensors and JSON, never pickled objects (loading a pickle can run code), so this checkpoint "
            "is refused. Remove those files if you know where they come from (checkpoints of headclip_hf 0.1 held "
            "pickles and cannot be resumed), or start a new run."
        )
    missing = [name for name in REQUIRED_CHECKPOINT_FILES if not (checkpoint / name).is_file()]
    if missing:
        raise ValueError(
            f"{checkpoint} is incomplete: {', '.join(missing)} missing. Resume from another checkpoint (e.g. "
            "--resume_from_checkpoint with an earlier step_<N> folder) or start a new run."
        )
    return TrainingState.load(checkpoint / TRAINING_STATE_NAME)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error


def _load_weights_only(path: Path):
    """`torch.load(path, weights_only=True)`: tensors and plain containers only; anything else is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"{path} cannot be read as plain tensors (torch.load with weights_only=True): {error}. It is refused; "
            "resume from another checkpoint."
        ) from error


def _load_state_dict(target, path: Path, read: Callable[[Path], object]) -> None:
    """`target.load_state_dict(read(path))`; a state that does not fit `target` is a `ValueError` naming `path`."""
    state = read(path)
    try:
        target.load_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path} does not fit this run ({type(target).__name__}): {error!r}") from error


def _save_rng_state(path: Path) -> None:
    """This process's Python, NumPy, torch (and CUDA) random states, as safetensors with JSON metadata."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())})
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    metadata = {
        "python": json.dumps([version, list(python_state), gauss]),
        "numpy": json.dumps([kind, keys.tolist(), position, has_gauss, cached_gaussian]),
    }
    save_file(tensors, path, metadata=metadata)


def _load_rng_state(path: Path) -> None:
    """Restore the random states of [`_save_rng_state`]; `ValueError` naming `path` when they cannot be read."""
    try:
        with safe_open(path, framework="pt") as reader:
            metadata = reader.metadata()
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
        version, python_state, gauss = json.loads(metadata["python"])
        kind, keys, position, has_gauss, cached_gaussian = json.loads(metadata["numpy"])
        random.setstate((version, tuple(python_state), gauss))
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
        torch.set_rng_state(tensors["torch"])
    except (SafetensorError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a random-number-generator state of a HeadCLIP checkpoint: {error}") from error
    cuda_states = [tensors[f"cuda_{index}"] for index in range(len(tensors) - 1)]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _model_config_record(model: HeadCLIPModel, args: HeadCLIPTrainingArguments) -> dict:
    """What defines the trained model besides its shapes: the HeadCLIP config fields and the LoRA settings (JSON)."""
    record = {**model.config.headclip_fields(), "lora_rank": args.lora_rank}
    if args.lora_rank > 0:
        record.update(
            lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_target_modules=args.lora_target_modules
        )
    return json.loads(json.dumps(record))


def _check_same_model_config(saved: dict, current: dict, checkpoint: Path) -> None:
    differences = [
        f"{name} (checkpoint {saved.get(name, 'unset')!r}, now {current.get(name, 'unset')!r})"
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    ]
    if differences:
        raise ValueError(
            f"{checkpoint} was trained with another HeadCLIP configuration: {'; '.join(differences)}. Resume with "
            "the same model and --config_overrides (and LoRA settings), or start a new run."
        )


def _build_optimizer(model: torch.nn.Module, args: HeadCLIPTrainingArguments) -> torch.optim.Optimizer:
    """Adam (AnomalyCLIP's), with decoupled weight decay on every trainable parameter but the head weights."""
    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (not_decayed if "attention_head_weights" in name else decayed).append(parameter)
    groups = [
        {"params": params, "weight_decay": decay}
        for params, decay in ((decayed, args.weight_decay), (not_decayed, 0.0))
        if params
    ]
    return torch.optim.Adam(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), decoupled_weight_decay=True
    )


def _selection_value(
    metrics: dict[str, float | None], metric_for_best_model: str, set_names: list[str]
) -> float | None:
    """The value of `metric_for_best_model` in one evaluation's `metrics`; `None` when undefined on a set used."""
    set_name, _, metric = metric_for_best_model.rpartition("/")
    parts = ("mad_image", "mad_pixel") if metric == "mad" else (metric,)
    values = [metrics[f"eval/{name}/{part}"] for name in ([set_name] if set_name else set_names) for part in parts]
    return None if any(value is None for value in values) else sum(values) / len(values)


def _tracker_value(value):
    """Hyper-parameters as trackers take them (numbers, strings, booleans)."""
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def _is_hub_id(name_or_path: str) -> bool:
    return bool(name_or_path) and not Path(name_or_path).exists()


def _peft_adapter_card(
    model: PeftModel, base_model_name_or_path: str, args: HeadCLIPTrainingArguments, steps: int
) -> ModelCard:
    """A short model card for a LoRA adapter: what it is, how to load it, how it was trained (no boilerplate)."""
    data = ModelCardData(
        base_model=base_model_name_or_path if _is_hub_id(base_model_name_or_path) else None,
        tags=["headclip", "anomaly-detection", "zero-shot-anomaly-detection", "peft", "lora"],
        library_name=ADAPTER_LIBRARY,  # loaded with this package (`load_headclip_model`), as a HeadCLIP adapter
        pipeline_tag=HUB_PIPELINE_TAG,
    )
    config = model.get_base_model().config
    text = f"""
# HeadCLIP LoRA adapter

LoRA (rank {args.lora_rank}, alpha {args.lora_alpha}) on the image encoder modules matching
`{args.lora_target_modules}` of `{base_model_name_or_path}`, trained with
[headclip_hf](https://arxiv.org/abs/2505.22259) together with HeadCLIP's prompts and head weights (PEFT
`modules_to_save`). The model detects anomalies zero-shot: an anomaly map and an anomaly score per image.

## Use

Loading needs `headclip_hf` (the adapter adapts a `HeadCLIPModel`, not a plain CLIP):

```python
from headclip_hf.adapters import load_headclip_model

model = load_headclip_model("path/to/this/adapter")  # the base, the LoRA weights merged, the HeadCLIP parameters
```

or `headclip detect IMAGES --model path/to/this/adapter`.

## Training

{steps} optimizer steps at {config.image_size} px, batch {args.per_device_train_batch_size} per process, learning rate
{args.learning_rate} ({args.lr_scheduler_type} schedule), seed {args.seed}. `headclip_config.json` holds the HeadCLIP
configuration it was trained with.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")


class _TrainingRun:
    """
    One run of [`train`], phase by phase: `__init__` sets up (accelerator, model, data, optimizer, schedule), `resume`
    restores a checkpoint, `run_loop` trains (`_training_step`, `_log`, `_evaluate`, `_save_checkpoint` along the way),
    `finish` evaluates at the end, picks the best model and saves the adapter and the run's records.
    """

    def __init__(
        self,
        model: HeadCLIPModel,
        processor: HeadCLIPProcessor,
        train_dataset: datasets.Dataset,
        args: HeadCLIPTrainingArguments,
        eval_datasets: dict[str, datasets.Dataset],
        hyperparameters: dict,
    ):
        self.args = args
        self.processor = processor
        self.eval_datasets = eval_datasets
        self.output_dir = Path(args.output_dir)
        self.accelerator = Accelerator(
            cpu=args.use_cpu,
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=args.trackers,
            project_dir=args.output_dir,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        )
        set_seed(args.seed)
        self.base_model_name_or_path = model.config._name_or_path
        self.state = TrainingState(
            num_processes=self.accelerator.num_processes,
            per_device_train_batch_size=args.per_device_train_batch_size,
            model_config=_model_config_record(model, args),
        )
        model = self._training_model(model)
        loader = DataLoader(
            train_dataset,
            batch_size=args.per_device_train_batch_size,
            shuffle=True,
            num_workers=args.dataloader_num_workers,
            collate_fn=AnomalyCollator(processor),
        )
        optimizer = _build_optimizer(model, args)
        self.total_steps = count_training_steps(len(train_dataset), args, self.accelerator.num_processes)
        # Stepped here once per optimizer step (not prepared by accelerate, which steps it once per process).
        self.scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=count_warmup_steps(args, self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.last_saved_step: int | None = None
        self.grad_norm: torch.Tensor | None = None  # of the last optimizer step
        self.learning_rate: float | None = None  # of the last optimizer step
        self.session_images = 0
        self.session_start = time.perf_counter()
        if args.trackers is not None:
            self._init_trackers(hyperparameters)

    def _training_model(self, model: HeadCLIPModel) -> torch.nn.Module:
        """`model` in training mode, with activation checkpointing and LoRA when asked."""
        if self.args.gradient_checkpointing:
            model.activation_checkpointing_enable()
        if self.args.lora_rank > 0:
            model = add_lora(model, self.args)
        return model.train()

    def _init_trackers(self, hyperparameters: dict) -> None:
        """Start the trackers; hyper-parameters: `hyperparameters`, the training arguments, the model config."""
        config = {**hyperparameters, **asdict(self.args), **self.state.model_config}
        config.pop("hub_token")  # a secret, never logged
        self.accelerator.init_trackers("headclip", config={k: _tracker_value(v) for k, v in config.items()})

    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def clear_previous_run(self) -> None:
        """With `overwrite_output_dir`: delete the previous run's entries of `output_dir` (other files stay)."""
        if self.accelerator.is_main_process:
            for path in _previous_run_entries(self.output_dir):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        self.accelerator.wait_for_everyone()

    # Resume

    def resume(self, checkpoint: Path) -> None:
        """Restore the trainable parameters, optimizer, schedule, random states and position of `checkpoint`."""
        state = read_checkpoint(checkpoint)
        _check_same_model_config(state.model_config, self.state.model_config, checkpoint)
        self._load_trainable_parameters(checkpoint)
        _load_state_dict(self.optimizer, checkpoint / OPTIMIZER_NAME, _load_weights_only)
        _load_state_dict(self.scheduler, checkpoint / SCHEDULER_NAME, _read_json)
        if self.accelerator.scaler is not None and (checkpoint / SCALER_NAME).is_file():
            _load_state_dict(self.accelerator.scaler, checkpoint / SCALER_NAME, _read_json)
        rng_file = checkpoint / f"rng_state_{self.accelerator.process_index}.safetensors"
        if rng_file.is_file():
            _load_rng_state(rng_file)
        else:
            logger.warning(f"{rng_file} is missing (saved by fewer processes): this process's random states restart.")
        state.num_processes = self.accelerator.num_processes
        state.per_device_train_batch_size = self.args.per_device_train_batch_size
        self.state = state
        self.last_saved_step = state.global_step
        logger.info(f"Resumed from {checkpoint} at step {state.global_step} (epoch {state.epoch + 1}).")

    def _load_trainable_parameters(self, checkpoint: Path) -> None:
        """
        Load the trainable parameters of `checkpoint`; a model of another shape, or parameters holding NaN or infinite
        values, are refused, with the tensors named.
        """
        saved = _load_tensors(checkpoint / CHECKPOINT_WEIGHTS_NAME)
        check_finite_tensors(saved, str(checkpoint / CHECKPOINT_WEIGHTS_NAME))
        model = self.unwrapped_model
        expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
        problems = state_dict_mismatches(saved, expected)
        if problems:
            raise ValueError(
                f"The checkpoint {checkpoint} comes from a model of another shape: {'; '.join(problems)}."
            )
        model.load_state_dict(saved, strict=False)

    # The loop

    def run_loop(self, on_step_end: Callable[[int, float], None] | None) -> None:
        """Train until `total_steps`, logging, evaluating and checkpointing along the way."""
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.global_step,
            desc="Training",
            disable=not self.accelerator.is_local_main_process,
        )
        window = {"start": time.perf_counter(), "images": 0}
        micro_losses = []
        while self.state.global_step < self.total_steps:
            self.loader.set_epoch(self.state.epoch)
            for batch in self.accelerator.skip_first_batches(self.loader, self.state.batches_in_epoch):
                micro_losses.append(self._training_step(batch))
                images = batch["pixel_values"].shape[0] * self.accelerator.num_processes
                window["images"] += images
                self.session_images += images
                self.state.batches_in_epoch += 1
                if not self.accelerator.sync_gradients:
                    continue
                loss = self.accelerator.gather(torch.stack(micro_losses).mean()).mean().item()
                micro_losses = []
                end_of_epoch = self._count_step(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", epoch=self.state.epoch)
                if self.state.global_step % self.args.logging_steps == 0:
                    self._log_training(loss, window)
                if on_step_end is not None:
                    on_step_end(self.state.global_step, loss)
                paused = time.perf_counter()
                self._evaluate_and_save_when_due(end_of_epoch)
                window["start"] += time.perf_counter() - paused  # images/s counts training time only
                if self.state.global_step >= self.total_steps:
                    break
        bar.close()

    def _training_step(self, batch: dict) -> torch.Tensor:
        """Forward, backward and (on a synchronising batch) clipping, optimizer and schedule step; the batch loss."""
        with self.accelerator.accumulate(self.model):
            outputs = self.model(
                pixel_values=batch["pixel_values"],
                masks=batch["masks"],
                labels=batch["labels"],
                mask_valid=batch["mask_valid"],
            )
            self.accelerator.backward(outputs.loss)
            if self.accelerator.sync_gradients:
                # With no clipping the norm is still computed (for the log); scaling by 1 leaves the gradients as is.
                max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else math.inf
                self.grad_norm = self.accelerator.clip_grad_norm_(self.trainable_parameters, max_norm)
                self.learning_rate = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            if self.accelerator.sync_gradients and not self.optimizer.step_was_skipped:
                self.scheduler.step()
            self.optimizer.zero_grad()
        return outputs.loss.detach().float()

    def _count_step(self, loss: float) -> bool:
        """Count an optimizer step (and the end of an epoch); returns whether the epoch ended."""
        self.state.global_step += 1
        self.state.train_loss_sum += loss
        end_of_epoch = self.state.batches_in_epoch >= len(self.loader)
        if end_of_epoch:
            self.state.epoch += 1
            self.state.batches_in_epoch = 0
        return end_of_epoch

    @property
    def epoch_progress(self) -> float:
        """Epochs done, with the fraction of the current one."""
        return round(self.state.epoch + self.state.batches_in_epoch / len(self.loader), 4)

    def _log_training(self, loss: float, window: dict) -> None:
        elapsed = time.perf_counter() - window["start"]
        self._record(
            {
                "train/loss": loss,
                "train/learning_rate": self.learning_rate,
                "train/grad_norm": self.grad_norm.item(),
                "train/images_per_second": window["images"] / elapsed if elapsed > 0 else None,
            }
        )
        window.update(start=time.perf_counter(), images=0)

    def _record(self, values: dict) -> None:
        """Add `values` to the log history and send the defined ones to the trackers."""
        self.state.log_history.append({"step": self.state.global_step, "epoch": self.epoch_progress, **values})
        defined = {name: value for name, value in values.items() if value is not None}
        self.accelerator.log(defined, step=self.state.global_step)

    def _evaluate_and_save_when_due(self, end_of_epoch: bool) -> None:
        step, args = self.state.global_step, self.args
        evaluate = bool(self.eval_datasets) and (step % args.eval_steps == 0 if args.eval_steps > 0 else end_of_epoch)
        if evaluate:
            self._evaluate()
        if evaluate or end_of_epoch or (args.save_steps > 0 and step % args.save_steps == 0):
            self._save_checkpoint()

    # Evaluation and model selection

    def _evaluate(self) -> None:
        """
        Evaluate on every eval set (results in `eval/step_<N>/<set>/`; with the curve plots at the end of training),
        log the means, track the best model.
        """
        step = self.state.global_step
        metrics = {}
        for name, dataset in self.eval_datasets.items():
            results = evaluate_model(
                self.unwrapped_model,
                self.processor,
                dataset,
                batch_size=self.args.per_device_eval_batch_size,
                num_workers=self.args.dataloader_num_workers,
            )
            if self.accelerator.is_main_process:
                plots = step >= self.total_steps
                # The provenance lets `headclip push` (`--push_to_hub`) publish these results with this model.
                provenance = evaluation_provenance(self.unwrapped_model, self.processor, data_source=name)
                save_results(
                    results, self.output_dir / EVAL_DIR / f"step_{step}" / name, plots=plots, provenance=provenance
                )
                logger.info(f"Step {step}, {name}:\n{results_to_markdown(results)}")
            metrics.update({f"eval/{name}/{metric}": result.value for metric, result in results.mean.items()})
        self.state.last_evaluation_step = step
        self._record(metrics)
        self._track_best_model(metrics)

    def _track_best_model(self, metrics: dict[str, float | None]) -> None:
        """Remember this step as the best when its `metric_for_best_model` beats the best so far."""
        if self.args.metric_for_best_model is None:
            return
        value = _selection_value(metrics, self.args.metric_for_best_model, list(self.eval_datasets))
        if value is None:
            logger.warning(
                f"{self.args.metric_for_best_model} is undefined at step {self.state.global_step}: this model cannot "
                "be the best one."
            )
        elif self.state.best_metric is None or value > self.state.best_metric:
            self.state.best_metric = value
            self.state.best_model_checkpoint = f"step_{self.state.global_step}"  # saved right after the evaluation

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None:
            logger.warning(
                f"No evaluation defined {self.args.metric_for_best_model}: the adapter is the final model, not the "
                "best one."
            )
            return
        self._load_trainable_parameters(self.output_dir / CHECKPOINTS_DIR / best)
        logger.info(f"Loaded the best model ({self.args.metric_for_best_model} {self.state.best_metric:.4f}): {best}")

    # Checkpoints

    def _save_checkpoint(self) -> None:
        """Write `checkpoints/step_<N>` into a staging folder (every process its random states), then move it."""
        accelerator = self.accelerator
        final = self.output_dir / CHECKPOINTS_DIR / f"step_{self.state.global_step}"
        staging = final.with_name(f".{final.name}.partial")
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        _save_rng_state(staging / f"rng_state_{accelerator.process_index}.safetensors")
        if accelerator.is_main_process:
            trainable = {name: p.detach() for name, p in self.unwrapped_model.named_parameters() if p.requires_grad}
            save_file(trainable, staging / CHECKPOINT_WEIGHTS_NAME, metadata={"format": "pt"})
            torch.save(self.optimizer.state_dict(), staging / OPTIMIZER_NAME)
            (staging / SCHEDULER_NAME).write_text(json.dumps(self.scheduler.state_dict()) + "\n")
            if accelerator.scaler is not None:
                (staging / SCALER_NAME).write_text(json.dumps(accelerator.scaler.state_dict()) + "\n")
            self.state.save(staging / TRAINING_STATE_NAME)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            replace_directory(staging, final)
            self._delete_old_checkpoints()
        accelerator.wait_for_everyone()
        self.last_saved_step = self.state.global_step

    def _delete_old_checkpoints(self) -> None:
        """Keep the newest `save_total_limit` checkpoints, and the best one."""
        if self.args.save_total_limit is None:
            return
        checkpoints = sorted(
            (p for p in (self.output_dir / CHECKPOINTS_DIR).glob("step_*") if re.fullmatch(r"step_\d+", p.name)),
            key=_checkpoint_step,
        )
        deletable = [
            p for p in checkpoints[: -self.args.save_total_limit] if p.name != self.state.best_model_checkpoint
        ]
        for path in deletable:
            shutil.rmtree(path)

    # The end

    def finish(self) -> Path:
        """Evaluate and checkpoint the final step, choose the best model, save the adapter and the run's records."""
        step = self.state.global_step
        if self.eval_datasets and self.state.last_evaluation_step != step:
            self._evaluate()
        if self.last_saved_step != step:
            self._save_checkpoint()
        if self.args.load_best_model_at_end:
            self._load_best_model()
        adapter_dir = self.output_dir / ADAPTER_DIR
        if self.accelerator.is_main_process:
            self._save_adapter(adapter_dir)
            self._save_records()
            logger.info(f"Saved the adapter to {adapter_dir}")
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return adapter_dir

    def _save_adapter(self, target: Path) -> None:
        """
        A HeadCLIP adapter; with LoRA a PEFT adapter with a short model card and the HeadCLIP config fields the model
        was trained with (so `load_headclip_model` rebuilds that model). Written atomically.
        """
        model = self.unwrapped_model
        if not isinstance(model, PeftModel):
            save_headclip_adapter(model, target, self.base_model_name_or_path)
            return
        with output_folder(target, PEFT_ADAPTER_OUTPUT) as staging:
            model.save_pretrained(staging)
            card = _peft_adapter_card(model, self.base_model_name_or_path, self.args, self.state.global_step)
            card.save(staging / "README.md")
            fields_record = {"headclip_config": model.get_base_model().config.headclip_fields()}
            (staging / PEFT_HEADCLIP_CONFIG_NAME).write_text(
                json.dumps(fields_record, indent=2, sort_keys=True) + "\n"
            )

    def _save_records(self) -> None:
        """`training_state.json` (the history) and `all_results.json` (the summary, the saved model's metrics)."""
        state = self.state
        model_evaluation_step = (
            _checkpoint_step(Path(state.best_model_checkpoint))
            if self.args.load_best_model_at_end and state.best_model_checkpoint
            else state.last_evaluation_step
        )
        evaluations = [entry for entry in state.log_history if any(name.startswith("eval/") for name in entry)]
        evaluation = next((entry for entry in evaluations if entry["step"] == model_evaluation_step), {})
        runtime = time.perf_counter() - self.session_start
        summary = {
            "global_step": state.global_step,
            "epoch": self.epoch_progress,
            "train_loss": state.train_loss_sum / max(state.global_step, 1),
            "train_runtime": runtime,
            "train_images_per_second": self.session_images / runtime,
            "best_metric": state.best_metric,
            "best_model_checkpoint": state.best_model_checkpoint,
            "model_evaluation_step": model_evaluation_step,
            **{name: value for name, value in evaluation.items() if name.startswith("eval/")},
        }
        for name, content in ((TRAINING_STATE_NAME, asdict(state)), (ALL_RESULTS_NAME, summary)):
            with output_file(self.output_dir / name, overwrite=True) as temporary:
                temporary.write_text(json.dumps(content, indent=2) + "\n")


def train(
    model: HeadCLIPModel,
    processor: HeadCLIPProcessor,
    train_dataset: datasets.Dataset,
    args: HeadCLIPTrainingArguments,
    eval_datasets: dict[str, datasets.Dataset] | None = None,
    on_step_end: Callable[[int, float], None] | None = None,
    hyperparameters: dict | None = None,
) -> Path:
    """
    Train the HeadCLIP parameters of `model` on `train_dataset` (rows of `load_anomaly_dataset`).

    Args:
        model (`HeadCLIPModel`): The HeadCLIP to train (its backbone is frozen); wrapped with LoRA when
            `args.lora_rank > 0`.
        processor (`HeadCLIPProcessor`): Prepares images and masks at the model's working size.
        train_dataset (`datasets.Dataset`): The auxiliary labelled set (with masks, unless
            `args.allow_image_labels_only`).
        args (`HeadCLIPTrainingArguments`): The training arguments.
        eval_datasets (`dict[str, datasets.Dataset]`, *optional*): Held-out sets by name, evaluated during training
            (`args.eval_steps`) and at the end; results in `<output_dir>/eval/step_<N>/<name>/`.
        on_step_end (`Callable[[int, float], None]`, *optional*): Called as `on_step_end(global_step, loss)` after
            every optimizer step.
        hyperparameters (`dict`, *optional*): More settings to log with the training arguments (e.g. the model and
            data arguments).

    Returns:
        `Path`: The folder of the final adapter (the best model's with `args.load_best_model_at_end`).

    Raises:
        The errors of [`check_training_inputs`], before any work; `ValueError` for a checkpoint of another shape or
        HeadCLIP configuration, or one that cannot be read safely.
    """
    eval_datasets = eval_datasets or {}
    resume_from = check_training_inputs(train_dataset, eval_datasets, args)
    check_working_size(model, processor)
    run = _TrainingRun(model, processor, train_dataset, args, eval_datasets, hyperparameters or {})
    if resume_from is None:
        run.clear_previous_run()
    else:
        run.resume(resume_from)
    run.run_loop(on_step_end)
    return run.finish()


__all__ = [
    "DataArguments",
    "HeadCLIPTrainingArguments",
    "ModelArguments",
    "TrainingState",
    "add_lora",
    "check_training_inputs",
    "read_checkpoint",
    "train",
]
