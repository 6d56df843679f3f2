#!/usr/bin/env python
# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""
Zero-shot evaluation: a trained HeadCLIP (model or adapter) on one or more data sets it was not trained on ->
per-category metrics (image AUROC / AP / F1-max, pixel AUROC / AP / F1-max / AUPRO), as a markdown table, JSON and
ROC / PR / PRO plots per category.

    python examples/evaluate_headclip.py --model runs/mvtec/adapter --data data/visa data/mpdd --output_dir eval/

writes `eval/<data set>/results.md`, `results.json` and `plots/<category>.png` for each data set.

Few-shot protocol: `--k_shot 4 --k_shot_seeds 0 1 2` draws 4 normal reference images per category and seed (from the
layout's training normals, MVTec AD / VisA `train/good`, else from the test normals, which are then left out of that
category's evaluation) and writes `eval/<data set>/k_shot_results.md` (mean ± standard deviation over the seeds),
`k_shot_results.json` (with the reference files used) and each seed's results under `seed_<seed>/`.
"""

from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from transformers import HfArgumentParser

from headclip_hf import DEFAULT_IMAGE_SIZE, load_anomaly_dataset
from headclip_hf.adapters import load_headclip_model_and_processor
from headclip_hf.evaluation import evaluate_k_shot, evaluate_model, load_training_normals
from headclip_hf.reporting import k_shot_results_to_markdown, results_to_markdown, save_k_shot_results, save_results


@dataclass
class EvaluationArguments:
    model: str = field(metadata={"help": "HeadCLIP or CLIP checkpoint (Hub id or folder), or an adapter folder."})
    data: list[str] = field(metadata={"help": "Data set folders to evaluate on."})
    output_dir: str = field(metadata={"help": "Where each data set's table, JSON and plots go."})
    adapter: str | None = field(default=None, metadata={"help": "An adapter folder to load on top of --model."})
    layout: str = field(default="auto", metadata={"help": "Layout of the data folders (see load_anomaly_dataset)."})
    image_size: int | None = field(
        default=None,
        metadata={
            "help": f"Working input size in pixels, a multiple of the patch size (default: the model's, "
            f"{DEFAULT_IMAGE_SIZE} for ViT-L/14 as in AnomalyCLIP)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Images per batch."})
    k_shot: int | None = field(
        default=None,
        metadata={"help": "Few-shot protocol: K normal reference images per category; zero-shot without it."},
    )
    k_shot_seeds: list[int] = field(
        default_factory=lambda: [0], metadata={"help": "Few-shot protocol: one evaluation per seed."}
    )


def main() -> None:
    (args,) = HfArgumentParser(EvaluationArguments).parse_args_into_dataclasses()
    model, processor = load_headclip_model_and_processor(args.model, args.adapter, image_size=args.image_size)
    model.to(PartialState().device)
    for data in args.data:
        dataset = load_anomaly_dataset(data, layout=args.layout)
        if args.k_shot is None:
            results = evaluate_model(model, processor, dataset, args.batch_size)
            save, to_markdown = save_results, results_to_markdown
        else:
            training_normals = load_training_normals(data, layout=args.layout)
            results = evaluate_k_shot(
                model, processor, dataset, args.k_shot, args.k_shot_seeds, training_normals, args.batch_size
            )
            save, to_markdown = save_k_shot_results, k_shot_results_to_markdown
        if PartialState().is_main_process:  # under `accelerate launch` every process holds the gathered results
            written = save(results, Path(args.output_dir) / Path(data).resolve().name)
            print(f"{data}:\n{to_markdown(results)}\nWritten: {', '.join(str(p) for p in written.values())}")


if __name__ == "__main__":
    main()
