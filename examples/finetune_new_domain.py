#!/usr/bin/env python
# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""
Adapt HeadCLIP to your own domain: a folder of your images with masks -> an adapter for that domain.

Your folder follows the generic layout (the MVTec AD test split without its `test/` level):

    my_parts/
      good/                      normal images
      scratch/, dent/, ...       anomalous images, one folder per defect type
      ground_truth/scratch/<stem>_mask.png, ...   one mask per anomalous image (same size as the image)

Run:

    python examples/finetune_new_domain.py --data my_parts --output_dir runs/my_parts

It evaluates the starting model on your folder, trains the HeadCLIP parameters (a few minutes on a GPU for a few
hundred images), evaluates again and prints both results tables, so you see what the adaptation bought. Use the
adapter with `headclip detect IMAGES --adapter runs/my_parts/adapter` or
`headclip_hf.adapters.load_headclip_model("runs/my_parts/adapter")`.

Evaluating on the images you trained on measures fit, not zero-shot transfer: hold out a part of your folder
(`--eval_data`) for an honest figure.
"""

from dataclasses import dataclass, field

from accelerate import PartialState
from transformers import HfArgumentParser

from headclip_hf import load_anomaly_dataset
from headclip_hf.adapters import load_headclip_model, load_headclip_model_and_processor
from headclip_hf.configuration_headclip import DEFAULT_CLIP_CHECKPOINT, DEFAULT_IMAGE_SIZE
from headclip_hf.evaluation import evaluate_model
from headclip_hf.reporting import results_to_markdown
from headclip_hf.training import HeadCLIPTrainingArguments, train


@dataclass
class DomainArguments:
    data: str = field(metadata={"help": "Your folder of images and masks (generic layout)."})
    eval_data: str | None = field(default=None, metadata={"help": "A held-out folder (same layout); default: data."})
    model_name_or_path: str = field(
        default=DEFAULT_CLIP_CHECKPOINT,
        metadata={"help": "CLIP or HeadCLIP to start from (Hub id or local folder), or a HeadCLIP adapter folder."},
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": f"Working input size in pixels, a multiple of the patch size (default: the model's, "
            f"{DEFAULT_IMAGE_SIZE} for ViT-L/14 as in AnomalyCLIP)."
        },
    )


def main() -> None:
    parser = HfArgumentParser((DomainArguments, HeadCLIPTrainingArguments))
    domain_args, training_args = parser.parse_args_into_dataclasses()
    model, processor = load_headclip_model_and_processor(
        domain_args.model_name_or_path, image_size=domain_args.image_size
    )
    model.to(PartialState().device)
    train_set = load_anomaly_dataset(domain_args.data, layout="generic")
    eval_set = load_anomaly_dataset(domain_args.eval_data, layout="generic") if domain_args.eval_data else train_set

    before = evaluate_model(model, processor, eval_set, batch_size=training_args.per_device_eval_batch_size)
    adapter = train(model, processor, train_set, training_args)
    adapted = load_headclip_model(adapter).to(PartialState().device)
    after = evaluate_model(adapted, processor, eval_set, batch_size=training_args.per_device_eval_batch_size)
    if PartialState().is_main_process:
        print(f"Before adaptation:\n{results_to_markdown(before)}\nAfter adaptation:\n{results_to_markdown(after)}")
        print(f"Adapter: {adapter}")


if __name__ == "__main__":
    main()
