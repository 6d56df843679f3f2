# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""`headclip calibrate`: decision thresholds learned from a few images, written into a copy of the model."""

import argparse
import json
from pathlib import Path

from ..adapters import ADAPTER_OUTPUT, is_headclip_adapter, write_headclip_adapter
from ..calibration import DEFAULT_TARGET_FPR, METHODS, CalibrationResult, calibrate, check_calibration_data
from ..conversion import HEADCLIP_MODEL_OUTPUT
from ..files import OutputKind, check_output_folder, output_folder
from ._common import (
    add_data_arguments,
    add_max_image_pixels_argument,
    add_model_arguments,
    add_output_dir_argument,
    image_pixel_limit,
    load_data,
    load_model_and_processor,
    non_negative_int,
    positive_int,
    rate,
)

CALIBRATION_JSON = "calibration.json"
CALIBRATED_ADAPTER_OUTPUT = OutputKind("calibrated HeadCLIP adapter", ADAPTER_OUTPUT.entries | {CALIBRATION_JSON})
# A HeadCLIP model folder (`save_pretrained` of the model and of its processor) and the calibration record.
CALIBRATED_MODEL_OUTPUT = OutputKind(
    "calibrated HeadCLIP model", HEADCLIP_MODEL_OUTPUT.entries | {CALIBRATION_JSON}, HEADCLIP_MODEL_OUTPUT.patterns
)

EPILOG = f"""examples:
  headclip calibrate data/my_line --model runs/mvtec/adapter --output_dir runs/my_line/adapter
  headclip calibrate good_images/ --model runs/mvtec/adapter --method normal_quantile --target_fpr 0.01 --out cal/
  headclip calibrate data/mvtec_ad --layout mvtec --per_category --model user/headclip-mvtec --output_dir cal/mvtec

Methods: "f1" (images of both classes, with masks): the thresholds that maximise image and pixel F1 on DATA, the
operating points of the F1-max of `headclip evaluate`; "normal_quantile" (normal images only): the lowest thresholds
that flag at most --target_fpr of the normal images and --pixel_target_fpr of their pixels (a rate of 1% needs at
least 100 normal images); "auto" (default): "f1" where both classes are present, else "normal_quantile".

Writes OUTPUT_DIR as a HeadCLIP adapter when the model came as one (--model or --adapter an adapter folder), else as
a full model (save_pretrained, with the processor), its config carrying the thresholds (image_threshold,
pixel_threshold, with --per_category image_thresholds / pixel_thresholds, and the calibration record), plus
OUTPUT_DIR/{CALIBRATION_JSON}. `headclip detect`, `headclip evaluate` and the pipeline then use these thresholds."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "calibrate",
        help="learn decision thresholds from a few images (writes a calibrated model)",
        description="Calibrate the image and pixel thresholds of a HeadCLIP on your images and save the calibrated "
        "model.",
        epilog=EPILOG,
    )
    add_data_arguments(parser, streaming=False)
    add_output_dir_argument(parser, None, "the calibrated model or adapter and calibration.json")
    parser.add_argument("--method", default="auto", choices=METHODS, help="calibration method (default: auto)")
    parser.add_argument(
        "--target_fpr",
        type=rate,
        default=DEFAULT_TARGET_FPR,
        help=f"normal_quantile: largest share of normal images flagged (default: {DEFAULT_TARGET_FPR})",
    )
    parser.add_argument(
        "--pixel_target_fpr",
        type=rate,
        default=DEFAULT_TARGET_FPR,
        help=f"normal_quantile: largest share of normal pixels in the masks (default: {DEFAULT_TARGET_FPR})",
    )
    parser.add_argument("--per_category", action="store_true", help="also calibrate each category on its own images")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--num_workers", type=non_negative_int, default=0, help="data loading processes (default: 0)")
    add_max_image_pixels_argument(parser)
    add_model_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    as_adapter = is_headclip_adapter(args.adapter or args.model)
    kind = CALIBRATED_ADAPTER_OUTPUT if as_adapter else CALIBRATED_MODEL_OUTPUT
    check_output_folder(args.output_dir, kind, args.overwrite)
    with image_pixel_limit(args.max_image_pixels):
        dataset = load_data(args)
        check_calibration_data(dataset, args.method, args.target_fpr, args.pixel_target_fpr, args.per_category)
        model, processor = load_model_and_processor(args.model, args.adapter, args.image_size, args.device)
        result = calibrate(
            model,
            processor,
            dataset,
            method=args.method,
            target_fpr=args.target_fpr,
            pixel_target_fpr=args.pixel_target_fpr,
            per_category=args.per_category,
            data_source=args.data,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
        )
    result.apply(model)
    with output_folder(args.output_dir, kind, args.overwrite) as staging:
        if as_adapter:
            write_headclip_adapter(model, staging)
        else:
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
        record = {**result.to_dict(), "model": args.model, "adapter": args.adapter}
        (staging / CALIBRATION_JSON).write_text(json.dumps(record, indent=2) + "\n")
    print(describe_calibration(result))
    print(f"Written: {Path(args.output_dir)} ({kind.name}, with {CALIBRATION_JSON})")
    return 0


def describe_calibration(result: CalibrationResult) -> str:
    """The thresholds of `result` and what they achieve on the calibration data, as lines of text."""
    record = result.calibration
    lines = [
        f"Calibrated on {record['data']} (method {record['method']}, target false-positive rates: images "
        f"{record['target_fpr']:g}, pixels {record['pixel_target_fpr']:g}):"
    ]
    lines += [f"  {line}" for line in _describe_levels(record)]
    for name, category in record.get("categories", {}).items():
        lines.append(f"  category {name}:")
        lines += [f"    {line}" for line in _describe_levels(category)]
    return "\n".join(lines)


def _describe_levels(record: dict) -> list[str]:
    lines = []
    for level, unit in (("image", "images"), ("pixel", "pixels")):
        entry, achieved = record[level], record[level]["achieved"]
        normal = achieved["false_positives"] + achieved["true_negatives"]
        flagged = achieved["true_positives"] + achieved["false_positives"]
        total = normal + achieved["true_positives"] + achieved["false_negatives"]
        rates = ", ".join(f"{key} {_percent(achieved[key])}" for key in ("precision", "recall", "accuracy"))
        lines.append(
            f"{level} threshold {entry['threshold']:.4f} ({entry['method']}): flags {flagged:,} of {total:,} {unit}; "
            f"false-positive rate {_percent(achieved['false_positive_rate'])} ({achieved['false_positives']:,} of "
            f"{normal:,} normal {unit}), {rates}"
        )
    return lines


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
