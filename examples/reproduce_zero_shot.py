#!/usr/bin/env python
# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""
Reproduce the zero-shot protocol and the paper's ablation in one command (for a machine with a GPU and the data):

    python examples/reproduce_zero_shot.py --mvtec data/mvtec_ad --visa data/visa --output_dir runs/reproduction
    accelerate launch examples/reproduce_zero_shot.py ...        # several GPUs

For each variant it trains on one data set's labelled test split and evaluates zero-shot on the other, in both
directions as the papers do (MVTec AD -> VisA, VisA -> MVTec AD), and writes one table, variant x data set x metric,
as `reproduction.md` and `reproduction.json` in `--output_dir` (each run's checkpoints, evaluations and adapter are in
`<output_dir>/<variant>/train_on_<data set>/`). The variants start from AnomalyCLIP's configuration
(`headclip_hf.conversion.anomalyclip_config`) and add HeadCLIP's two components:

- `anomalyclip`: the AnomalyCLIP preset (no head weights; image score = global score);
- `head_weights`: + learnable attention head weights;
- `joint_score`: + the joint anomaly score (alpha 0.5: global score and pooled map);
- `headclip`: both.

Every training argument of `examples/train_headclip.py` applies to every run (defaults: AnomalyCLIP's protocol, 15
epochs at 518 px; add `--gradient_checkpointing` on a 24 GB GPU). `--max_eval_samples` evaluates on a random subset,
for a quick check of the whole pipeline.

Every run's output folder and the two table files are checked before anything is trained: a folder holding a previous
run needs `--overwrite_output_dir` (start afresh) or `--resume_from_checkpoint latest`, and `reproduction.md` /
`reproduction.json` files that this script did not write are replaced only with `--overwrite_output_dir`. Errors are
one line `reproduce_zero_shot.py: error: ...` (as the `headclip` command's).
"""

import dataclasses
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import set_seed
from transformers import HfArgumentParser

from headclip_hf import HeadCLIPConfig, load_anomaly_dataset
from headclip_hf.adapters import load_headclip_model_and_processor
from headclip_hf.cli import report_errors
from headclip_hf.cli.train import parse_config_overrides
from headclip_hf.configuration_headclip import DEFAULT_CLIP_CHECKPOINT, DEFAULT_IMAGE_SIZE
from headclip_hf.conversion import anomalyclip_config
from headclip_hf.files import check_output_file, output_file
from headclip_hf.metrics import METRIC_NAMES
from headclip_hf.reporting import METRIC_TITLES
from headclip_hf.training import ALL_RESULTS_NAME, HeadCLIPTrainingArguments, check_training_inputs, train

# Each variant's HeadCLIP fields on top of the AnomalyCLIP preset.
VARIANTS = {
    "anomalyclip": {},
    "head_weights": {"use_head_weights": True},
    "joint_score": {"joint_alpha": 0.5},
    "headclip": {"use_head_weights": True, "joint_alpha": 0.5},
}
MVTEC, VISA = "MVTec AD", "VisA"
DIRECTIONS = ((MVTEC, VISA), (VISA, MVTEC))  # (trained on, evaluated on)
RESULTS_JSON, RESULTS_MARKDOWN = "reproduction.json", "reproduction.md"
MARKDOWN_TITLE = "# Zero-shot reproduction"


@dataclass
class ReproductionArguments:
    mvtec: str = field(metadata={"help": "MVTec AD folder (any layout load_anomaly_dataset reads)."})
    visa: str = field(metadata={"help": "VisA folder (raw with split_csv/, MVTec-like, or meta.json)."})
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS), metadata={"help": f"Variants to run: {', '.join(VARIANTS)}."}
    )
    model_name_or_path: str = field(
        default=DEFAULT_CLIP_CHECKPOINT, metadata={"help": "The CLIP to start from (Hub id or local folder)."}
    )
    image_size: int = field(
        default=DEFAULT_IMAGE_SIZE,
        metadata={
            "help": f"Working input size in pixels, a multiple of the patch size (AnomalyCLIP: {DEFAULT_IMAGE_SIZE})."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "HeadCLIP config fields applied to every variant, as 'field=value,...' (JSON values), e.g. "
            "'deep_prompt_depth=3' for a CLIP with 3 text layers."
        },
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many images per data set (a quick check)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "The `datasets` cache folder."})

    def __post_init__(self):
        unknown = [variant for variant in self.variants if variant not in VARIANTS]
        if unknown:
            raise ValueError(f"Unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}.")


def slug(name: str) -> str:
    """'MVTec AD' -> 'mvtec_ad': folder names and evaluation-set names."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def variant_fields(args: ReproductionArguments, variant: str) -> dict:
    """
    The HeadCLIP config fields of `variant`: the AnomalyCLIP preset for this CLIP, the variant's changes, then
    `--config_overrides`.
    """
    overrides = {**VARIANTS[variant], **parse_config_overrides(args.config_overrides)}
    config = anomalyclip_config(HeadCLIPConfig.from_pretrained(args.model_name_or_path), **overrides)
    fields = config.headclip_fields()
    fields.pop("image_size")  # --image_size decides
    return fields


def load_data(args: ReproductionArguments, seed: int) -> tuple[dict, dict]:
    """The two data sets, for training and (subsampled with `max_eval_samples`) for evaluation."""
    train_sets = {
        MVTEC: load_anomaly_dataset(args.mvtec, cache_dir=args.cache_dir),
        VISA: load_anomaly_dataset(args.visa, cache_dir=args.cache_dir),
    }
    eval_sets = dict(train_sets)
    if args.max_eval_samples is not None:
        eval_sets = {
            name: dataset.shuffle(seed=seed).select(range(min(args.max_eval_samples, len(dataset))))
            for name, dataset in train_sets.items()
        }
    return train_sets, eval_sets


def is_earlier_table(path: Path) -> bool:
    """Whether `path` is a `reproduction.json` / `reproduction.md` this script wrote (then it may be replaced)."""
    try:
        text = path.read_text()
        if path.name == RESULTS_MARKDOWN:
            return text.startswith(MARKDOWN_TITLE + "\n")
        record = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and set(record) == {"settings", "results"}


def results_markdown(results: dict, args: ReproductionArguments, training: HeadCLIPTrainingArguments) -> str:
    lines = [
        MARKDOWN_TITLE,
        "",
        f"Model {args.model_name_or_path} at {args.image_size} px; {training.num_train_epochs} epoch(s)"
        + (f", at most {training.max_steps} steps" if training.max_steps > 0 else "")
        + f", batch {training.per_device_train_batch_size} per process, learning rate {training.learning_rate}, seed "
        f"{training.seed}. Mean metrics over each data set's categories, in percent; n/a: undefined on that data set "
        "(e.g. image metrics on a set without normal images).",
    ]
    for train_name, eval_name in DIRECTIONS:
        lines += ["", f"## Trained on {train_name}, evaluated on {eval_name}", ""]
        lines.append("| variant | " + " | ".join(METRIC_TITLES[name] for name in METRIC_NAMES) + " |")
        lines.append("|:---|" + "---:|" * len(METRIC_NAMES))
        for variant, by_set in results.items():
            values = by_set[eval_name]
            cells = ["n/a" if values[name] is None else f"{100 * values[name]:.1f}" for name in METRIC_NAMES]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    """Run every variant in both directions; returns the markdown table (also written to `--output_dir`)."""
    parser = HfArgumentParser((ReproductionArguments, HeadCLIPTrainingArguments))
    args, training = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    output_dir = Path(training.output_dir)
    overwrite = training.overwrite_output_dir
    for name in (RESULTS_JSON, RESULTS_MARKDOWN):  # the tables' files, before any work
        check_output_file(output_dir / name, overwrite, is_earlier_output=is_earlier_table)
    train_sets, eval_sets = load_data(args, training.seed)
    runs = [
        (
            variant,
            train_name,
            eval_name,
            dataclasses.replace(training, output_dir=str(output_dir / variant / f"train_on_{slug(train_name)}")),
        )
        for variant in args.variants
        for train_name, eval_name in DIRECTIONS
    ]
    for _, train_name, eval_name, run_args in runs:  # every run's inputs and output folder, before any training
        check_training_inputs(train_sets[train_name], {slug(eval_name): eval_sets[eval_name]}, run_args)

    results = {variant: {} for variant in args.variants}
    for variant, train_name, eval_name, run_args in runs:
        set_seed(run_args.seed)  # before loading: the prompts' free positions start random
        model, processor = load_headclip_model_and_processor(
            args.model_name_or_path, image_size=args.image_size, **variant_fields(args, variant)
        )
        train(
            model,
            processor,
            train_sets[train_name],
            run_args,
            eval_datasets={slug(eval_name): eval_sets[eval_name]},
            hyperparameters={**dataclasses.asdict(args), "variant": variant, "trained_on": train_name},
        )
        summary = json.loads((Path(run_args.output_dir) / ALL_RESULTS_NAME).read_text())
        results[variant][eval_name] = {name: summary[f"eval/{slug(eval_name)}/{name}"] for name in METRIC_NAMES}

    markdown = results_markdown(results, args, training)
    if PartialState().is_main_process:
        record = {
            "settings": {**dataclasses.asdict(args), "training": dataclasses.asdict(training)},
            "results": results,
        }
        record["settings"]["training"].pop("hub_token")
        for name, content in ((RESULTS_JSON, json.dumps(record, indent=2) + "\n"), (RESULTS_MARKDOWN, markdown)):
            with output_file(output_dir / name, overwrite, is_earlier_output=is_earlier_table) as temporary:
                temporary.write_text(content)
        print(markdown)
    return markdown


if __name__ == "__main__":
    sys.exit(report_errors(main, prog=Path(__file__).name))
