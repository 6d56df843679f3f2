# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""`headclip train` (and `examples/train_headclip.py`): the training arguments parsed by transformers'
`HfArgumentParser`, the model and data loaded, `headclip_hf.training.train` run."""

import argparse
import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import set_seed
from transformers import HfArgumentParser

from ..adapters import is_peft_adapter, load_headclip_model_and_processor
from ..hub import check_upload_access
from ..reporting import safe_file_name
from ..training import (
    ALL_RESULTS_NAME,
    EVAL_DIR,
    DataArguments,
    HeadCLIPTrainingArguments,
    ModelArguments,
    check_training_inputs,
    train,
)
from ._common import HelpFormatter, add_option_alias, check_model_location, load_data_set


def parse_config_overrides(overrides: str | None) -> dict:
    """'field=value,field=value' -> {field: value}; values are JSON (numbers, true/false, lists) or plain strings."""
    if not overrides:
        return {}
    parsed = {}
    # Split at the commas that start a new "field=", so that list values such as [6,12,18,24] stay whole.
    for item in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", overrides.strip().rstrip(",")):
        key, separator, value = item.partition("=")
        if not separator or not key.strip().isidentifier():
            raise ValueError(f"config_overrides item {item!r} is not 'field=value' (e.g. 'joint_alpha=1.0').")
        try:
            parsed[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip()] = value.strip()
    return parsed


TRAIN_EXAMPLES = """examples:
  # one CPU or GPU: train on MVTec AD's test split, evaluate on VisA after every epoch
  headclip train --train_data data/mvtec_ad --eval_data data/visa --output_dir runs/mvtec

  # several GPUs or nodes (data sharded, metrics gathered), bf16 autocast, TensorBoard logs
  accelerate launch examples/train_headclip.py --train_data data/mvtec_ad --output_dir runs/mvtec \\
      --mixed_precision bf16 --report_to tensorboard

  # two CPU processes on a machine without GPUs (accelerate's multi-process launcher, gloo)
  accelerate launch --multi_gpu --num_processes 2 examples/train_headclip.py --use_cpu \\
      --train_data data/mvtec_ad --output_dir runs/mvtec

  # continue an interrupted run where it stopped
  headclip train --train_data data/mvtec_ad --output_dir runs/mvtec --resume_from_checkpoint latest

  # LoRA (rank 8) on the vision attention projections on top of HeadCLIP: a PEFT adapter
  headclip train --train_data data/mvtec_ad --output_dir runs/mvtec-lora --lora_rank 8

  # ablation: AnomalyCLIP's image score and no head weights
  headclip train --train_data data/mvtec_ad --output_dir runs/ablation \\
      --config_overrides 'joint_alpha=1.0,use_head_weights=false'

  # the paper's scale on a 24 GB GPU: activation checkpointing, cosine schedule with warmup, clipping, evaluation
  # every 500 steps, the best model by pixel AUPRO on VisA, published on the Hub at the end
  headclip train --train_data data/mvtec_ad --eval_data data/visa --output_dir runs/mvtec \\
      --gradient_checkpointing --lr_scheduler_type cosine --warmup_ratio 0.05 --max_grad_norm 1.0 \\
      --eval_steps 500 --metric_for_best_model pixel_aupro --load_best_model_at_end --save_total_limit 2 \\
      --push_to_hub --hub_model_id you/headclip-mvtec

The result is <output_dir>/adapter; use it with `headclip detect IMAGES --model <output_dir>/adapter`. Next to it:
checkpoints/ (resumable; only tensors and JSON are read back), eval/step_N/<set>/, training_state.json (log and
evaluation history) and all_results.json (summary and the saved model's metrics)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Listed for the overview; `headclip_hf.cli.main` hands `train`'s arguments to [`main`]'s own parser."""
    commands.add_parser("train", help="train HeadCLIP on an auxiliary data set (examples/train_headclip.py)")


def main(argv: list[str] | None = None) -> Path:
    """`headclip train` / `examples/train_headclip.py`: parse the arguments, check them and the data, load the model,
    train, and publish with `--push_to_hub`. Every check that needs no model runs before the model is loaded.

    Returns:
        The folder of the final adapter.
    """
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, HeadCLIPTrainingArguments),
        prog="headclip train",
        description="Train HeadCLIP's prompts and head weights on an auxiliary labelled anomaly data set.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    add_option_alias(parser, "--output_dir", "--out")  # as every other command (HfArgumentParser adds --output-dir)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_model_location(model_args.model_name_or_path, "--model_name_or_path")
    if training_args.push_to_hub:  # the login, before hours of training
        check_upload_access(training_args.hub_token, "--hub_token", "leave out --push_to_hub")
    if is_peft_adapter(model_args.model_name_or_path):
        raise ValueError(
            f"{model_args.model_name_or_path} is a LoRA (PEFT) adapter: training cannot continue from it (the new "
            "adapter would name the plain base and lose the LoRA weights). Start from its base checkpoint, or from "
            "a full model saved with `load_headclip_model(adapter).save_pretrained(folder)`."
        )
    config_overrides = parse_config_overrides(model_args.config_overrides)
    train_dataset = load_data_set(data_args.train_data, **data_args.train_load_arguments())
    eval_datasets = {
        dataset_name(path): load_data_set(path, **data_args.eval_load_arguments()) for path in data_args.eval_data
    }
    check_training_inputs(train_dataset, eval_datasets, training_args)
    set_seed(training_args.seed)  # before loading: prompt positions left free by the init phrase start random
    model, processor = load_headclip_model_and_processor(
        model_args.model_name_or_path, image_size=model_args.image_size, **config_overrides
    )
    hyperparameters = {**asdict(model_args), **asdict(data_args)}
    adapter = train(
        model, processor, train_dataset, training_args, eval_datasets=eval_datasets, hyperparameters=hyperparameters
    )
    if training_args.push_to_hub and PartialState().is_main_process:
        push_to_hub(adapter, dataset_name(data_args.train_data), training_args)
    return adapter


def dataset_name(path: str) -> str:
    """The name of a data set folder in results, logs and model cards (its folder name, made file-name safe)."""
    return safe_file_name(Path(path).resolve().name)


def push_to_hub(adapter: Path, train_dataset_name: str, args: HeadCLIPTrainingArguments) -> None:
    """
    Publish the trained model with `headclip push`: the model saved in `adapter`, its card built from the evaluation
    of that model on the first evaluation set (recorded in `all_results.json`).
    """
    from . import build_parser  # the command's own parser; imported here, as `headclip_hf.cli` imports this module

    output_dir = Path(args.output_dir)
    summary = json.loads((output_dir / ALL_RESULTS_NAME).read_text())
    eval_name = next(name.split("/")[1] for name in summary if name.startswith("eval/"))
    results_dir = output_dir / EVAL_DIR / f"step_{summary['model_evaluation_step']}" / eval_name
    push_argv = ["push", "--model", str(adapter), "--results", str(results_dir), "--repo_id", args.hub_model_id]
    push_argv += ["--train_dataset", train_dataset_name, "--eval_dataset", eval_name]
    push_argv += ["--private"] if args.hub_private_repo else []
    push_argv += ["--token", args.hub_token] if args.hub_token else []
    push_args = build_parser().parse_args(push_argv)
    push_args.handler(push_args)
