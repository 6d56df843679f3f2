# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""`headclip evaluate`: the field's metrics on a labelled data set, per category and their mean."""

import argparse
from pathlib import Path

from ..evaluation import draw_k_shot_references, evaluate_k_shot, evaluate_model, load_training_normals
from ..evaluation_report import DEFAULT_GALLERY_SIZE, write_evaluation_report
from ..files import check_output_folder, output_folder
from ..provenance import evaluation_provenance
from ..reporting import (
    K_SHOT_JSON,
    K_SHOT_MARKDOWN,
    PER_IMAGE_CSV,
    PLOTS_DIR,
    REPORT_FILES_DIR,
    REPORT_HTML,
    RESULTS_JSON,
    RESULTS_MARKDOWN,
    evaluate_output_kind,
    k_shot_results_to_markdown,
    results_to_markdown,
    write_k_shot_results,
    write_results,
)
from ._common import (
    CommandError,
    add_data_arguments,
    add_max_image_pixels_argument,
    add_model_arguments,
    add_output_dir_argument,
    add_speed_arguments,
    data_arguments,
    image_pixel_limit,
    load_data,
    load_model_and_processor,
    non_negative_int,
    positive_int,
    process_state,
    resolve_device,
)

EPILOG = f"""examples:
  headclip evaluate data/mvtec_ad --model runs/visa/adapter --output_dir eval/mvtec
  headclip evaluate data/visa --layout visa --categories candle pcb1 --model runs/mvtec/adapter --output_dir eval/visa
  headclip evaluate data/mvtec_ad --model runs/visa/adapter --output_dir eval/mvtec --report   # + report.html
  headclip evaluate user/mvtec-ad --split test --streaming --model runs/visa/adapter --output_dir eval/mvtec
  headclip evaluate data/mvtec_ad --model runs/visa/adapter --k_shot 4 --k_shot_seeds 0 1 2 --output_dir eval/4shot

Writes OUTPUT_DIR/{RESULTS_MARKDOWN} (table per category and mean, in percent), OUTPUT_DIR/{RESULTS_JSON} (fractions;
undefined metrics as null with their reason) and OUTPUT_DIR/{PLOTS_DIR}/<category>.png (ROC, PR and PRO curves,
score distributions). Both files also give per category the F1-optimal image and pixel thresholds and, for a
calibrated model (`headclip calibrate`), the decisions at its thresholds: confusion counts, precision, recall,
false-positive rate and accuracy. With --report also OUTPUT_DIR/{REPORT_HTML} (open it in a browser, no server needed:
the metrics, the plots and per category the highest-scoring normal images, the lowest-scoring anomalous images and
the best detections as image | ground truth | heatmap | predicted mask; pictures in OUTPUT_DIR/{REPORT_FILES_DIR}/)
and OUTPUT_DIR/{PER_IMAGE_CSV} (path, category, label, score, predicted label, threshold per image). The threshold is
the model's calibrated one, else the category's F1-optimal one.

With --k_shot K (few-shot protocol): per seed and category, K normal reference images are drawn from the layout's
training normals (MVTec AD, VisA: train/good) or, where there are none, from the test normals, which are then left
out of that category's evaluation. Writes OUTPUT_DIR/{K_SHOT_MARKDOWN} (mean ± standard deviation over the seeds),
OUTPUT_DIR/{K_SHOT_JSON} (also the reference files used per seed and category) and each seed's results in
OUTPUT_DIR/seed_<seed>/."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="zero-shot metrics on a labelled data set (table, JSON, plots)",
        description="Evaluate on an anomaly data set: image and pixel metrics per category and their mean.",
        epilog=EPILOG,
    )
    add_data_arguments(parser)
    add_output_dir_argument(parser, "evaluation", "the results table, JSON and plots")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--num_workers", type=non_negative_int, default=0, help="data loading processes (default: 0)")
    parser.add_argument("--no_plots", action="store_true", help="write the table and JSON only")
    add_max_image_pixels_argument(parser)
    parser.add_argument(
        "--report",
        action="store_true",
        help=f"also write {REPORT_HTML} (metrics, plots, a gallery of false alarms, misses and best detections per "
        f"category) and {PER_IMAGE_CSV} (zero-shot evaluation)",
    )
    parser.add_argument(
        "--gallery_size",
        type=positive_int,
        default=DEFAULT_GALLERY_SIZE,
        help=f"images per gallery section of --report (default: {DEFAULT_GALLERY_SIZE})",
    )
    few_shot = parser.add_argument_group("few-shot protocol")
    few_shot.add_argument(
        "--k_shot", type=positive_int, help="K normal reference images per category (default: zero-shot)"
    )
    few_shot.add_argument(
        "--k_shot_seeds", type=int, nargs="+", help="one evaluation per seed, drawing other references (default: 0)"
    )
    add_speed_arguments(add_model_arguments(parser))
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run `headclip evaluate`: check the inputs, load the data and the model, evaluate, write the results."""
    if args.k_shot_seeds is not None and args.k_shot is None:
        raise CommandError("--k_shot_seeds draws few-shot references: pass --k_shot K too")
    if args.report and args.k_shot is not None:
        raise CommandError("--report shows a zero-shot evaluation: leave out --k_shot, or --report")
    if args.k_shot is not None and args.streaming:
        raise CommandError("--k_shot draws references from the whole data set: leave out --streaming")
    if args.report and args.streaming:
        raise CommandError("--report shows the gallery images again, which a stream cannot: leave out --streaming")
    seeds = args.k_shot_seeds or [0]
    output_kind = evaluate_output_kind(args.k_shot)
    device = resolve_device(args.device)
    state = process_state(device)
    if state.is_main_process:
        check_output_folder(args.output_dir, output_kind, args.overwrite)
    with image_pixel_limit(args.max_image_pixels):
        dataset = load_data(args)
        training_normals = None
        if args.k_shot is not None:  # the references are drawn (and checked) before the model loads
            training_normals = load_training_normals(args.data, **data_arguments(args))  # as the test data
            draw_k_shot_references(dataset, args.k_shot, seeds, training_normals)
        model, processor = load_model_and_processor(
            args.model, args.adapter, args.image_size, device, args.dtype, args.compile
        )
        if args.k_shot is None:
            results = evaluate_model(
                model, processor, dataset, batch_size=args.batch_size, num_workers=args.num_workers
            )
            write, to_markdown = write_results, results_to_markdown
        else:
            results = evaluate_k_shot(
                model,
                processor,
                dataset,
                k_shot=args.k_shot,
                seeds=seeds,
                reference_dataset=training_normals,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
            )
            write, to_markdown = write_k_shot_results, k_shot_results_to_markdown
    if state.is_main_process:  # under `accelerate launch` every process holds the gathered results
        provenance = evaluation_provenance(
            model, processor, data_source=args.data, model_name_or_path=args.model, adapter=args.adapter
        )
        with output_folder(args.output_dir, output_kind, args.overwrite) as staging:
            written = write(staging, results, plots=not args.no_plots, provenance=provenance)
            if args.report:
                written |= write_evaluation_report(
                    staging,
                    results,
                    dataset,
                    model,
                    processor,
                    gallery_size=args.gallery_size,
                    plots=not args.no_plots,
                    model_name=args.model if args.adapter is None else f"{args.model} + {args.adapter}",
                    dataset_name=args.data,
                )
        print(to_markdown(results))
        print(
            "Written: "
            + ", ".join(str(Path(args.output_dir) / path.relative_to(staging)) for path in written.values())
        )
    return 0
