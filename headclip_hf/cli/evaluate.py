# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""`headclip evaluate`: the field's metrics on a labelled data set, per category and their mean."""

import argparse
from pathlib import Path

from accelerate import PartialState

from ..data import LAYOUTS, load_anomaly_dataset
from ..evaluation import evaluate_model
from ..files import OutputKind, check_output_folder, output_folder
from ..provenance import evaluation_provenance
from ..reporting import PLOTS_DIR, RESULTS_JSON, RESULTS_MARKDOWN, results_to_markdown, save_results
from ._common import CommandError, add_model_arguments, add_output_dir_argument, load_model_and_processor, positive_int

EVALUATE_OUTPUT = OutputKind("headclip evaluate output", frozenset({RESULTS_JSON, RESULTS_MARKDOWN, PLOTS_DIR}))

EPILOG = f"""examples:
  headclip evaluate data/mvtec_ad --model runs/visa/adapter --output_dir eval/mvtec
  headclip evaluate data/visa --layout visa --categories candle pcb1 --model runs/mvtec/adapter --output_dir eval/visa

Writes OUTPUT_DIR/{RESULTS_MARKDOWN} (table per category and mean, in percent), OUTPUT_DIR/{RESULTS_JSON} (fractions;
undefined metrics as null with their reason) and OUTPUT_DIR/{PLOTS_DIR}/<category>.png (ROC, PR and PRO curves,
score distributions)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="zero-shot metrics on a labelled data set (table, JSON, plots)",
        description="Evaluate on an anomaly data set: image and pixel metrics per category and their mean.",
        epilog=EPILOG,
    )
    parser.add_argument("data", help="data set root or one category folder")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS, help="folder layout (default: auto-detect)")
    parser.add_argument("--categories", nargs="+", help="evaluate only these categories")
    add_output_dir_argument(parser, "evaluation", "the results table, JSON and plots")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--num_workers", type=int, default=0, help="data loading processes (default: 0)")
    parser.add_argument("--no_plots", action="store_true", help="write the table and JSON only")
    add_model_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    state = PartialState()
    if state.is_main_process:
        check_output_folder(args.output_dir, EVALUATE_OUTPUT, args.overwrite)
    try:
        dataset = load_anomaly_dataset(args.data, layout=args.layout, categories=args.categories)
    except (OSError, ValueError) as error:
        raise CommandError(f"Cannot load the data set {args.data}: {error}") from error
    model, processor = load_model_and_processor(args.model, args.adapter, args.image_size, args.device)
    results = evaluate_model(model, processor, dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    if state.is_main_process:  # under `accelerate launch` every process holds the gathered results
        provenance = evaluation_provenance(
            model, processor, data_source=args.data, model_name_or_path=args.model, adapter=args.adapter
        )
        with output_folder(args.output_dir, EVALUATE_OUTPUT, args.overwrite) as staging:
            written = save_results(results, staging, plots=not args.no_plots, provenance=provenance)
        print(results_to_markdown(results))
        print(
            "Written: "
            + ", ".join(str(Path(args.output_dir) / path.relative_to(staging)) for path in written.values())
        )
    return 0
