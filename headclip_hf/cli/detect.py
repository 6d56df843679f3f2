# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""`headclip detect`: anomaly score, label, heatmap and mask for image files, folders and glob patterns."""

import argparse
import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from ..configuration_headclip import DEFAULT_CLIP_CHECKPOINT
from ..files import OutputKind, check_output_folder, output_folder
from ..pipeline_headclip import DEFAULT_THRESHOLD, TASK, ZeroShotAnomalyDetectionPipeline, resolve_thresholds
from ..references import load_reference_embeds, read_reference_metadata
from ._common import (
    CommandError,
    add_model_arguments,
    add_output_dir_argument,
    collect_images,
    load_model_and_processor,
    positive_int,
    probability,
)
from .references import add_k_shot_arguments, select_reference_files

SCORES_CSV = "scores.csv"
SCORES_JSON = "scores.json"
HEATMAPS_DIR = "heatmaps"
MASKS_DIR = "masks"
DETECT_OUTPUT = OutputKind("headclip detect output", frozenset({SCORES_CSV, SCORES_JSON, HEATMAPS_DIR, MASKS_DIR}))

EPILOG = f"""examples:
  headclip detect bottle.png                                   # default model ({DEFAULT_CLIP_CHECKPOINT})
  headclip detect images/ 'more/**/*.jpg' --model runs/mvtec/adapter --output_dir detections/
  HF_HUB_OFFLINE=1 headclip detect images/ --model /models/headclip-mvtec --threshold 0.6
  headclip detect images/ --model runs/mvtec/adapter --reference_images good/ --k_shot 4   # few-shot
  headclip detect images/ --model runs/mvtec/adapter --references refs.safetensors         # see headclip references

Labels and masks use the model's calibrated thresholds (`headclip calibrate`; with --category, that category's where
calibrated), else {DEFAULT_THRESHOLD}; --threshold / --pixel_threshold override them. Writes OUTPUT_DIR/{SCORES_CSV}
and OUTPUT_DIR/{SCORES_JSON} (score and label per image, failed files with their error, the thresholds used and
their source: given, calibrated or default), and per image OUTPUT_DIR/{HEATMAPS_DIR}/<name>.png (the map over the
image, jet colours) and OUTPUT_DIR/{MASKS_DIR}/<name>.png (0/255, map >= pixel threshold), named after the image's
path below the images' common folder. With --reference_images (normal images of the same object) or --references (a
file of `headclip references`), the few-shot mode compares each image with them as well. The outputs appear together
when the run ends (an earlier detect output there is replaced; a folder with other files is refused unless
--overwrite). Unreadable files are reported and skipped; the exit status is 1 when any image failed."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "detect",
        help="anomaly score, label, heatmap and mask for images",
        description="Detect anomalies in images: score and label per image, heatmap and mask PNGs.",
        epilog=EPILOG,
    )
    parser.add_argument("images", nargs="+", help="image files, folders (their images) and glob patterns")
    add_output_dir_argument(parser, "detections", "the scores, heatmaps and masks")
    parser.add_argument(
        "--threshold",
        type=probability,
        help=f"label 'anomaly' when the score is >= this (default: the model's calibrated threshold, else "
        f"{DEFAULT_THRESHOLD})",
    )
    parser.add_argument(
        "--pixel_threshold",
        type=probability,
        help="mask: map >= this (default: the model's calibrated pixel threshold, else the image threshold)",
    )
    parser.add_argument(
        "--category", help="the images' category: use its calibrated thresholds where the model has them"
    )
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass (default: 8)")
    few_shot = parser.add_argument_group("few-shot mode (normal reference images of the same object)")
    sources = few_shot.add_mutually_exclusive_group()
    sources.add_argument(
        "--reference_images", nargs="+", metavar="DIR_OR_GLOB", help="normal images: files, folders, glob patterns"
    )
    sources.add_argument("--references", metavar="FILE", help="a references file written by `headclip references`")
    add_k_shot_arguments(few_shot)
    add_model_arguments(parser)
    parser.set_defaults(handler=run)


def _output_names(files: list[Path]) -> list[Path]:
    """
    A distinct relative PNG name per file: its path below the files' common folder with the extension replaced by
    `.png` (kept before `.png` when two images differ only in their extension: `a.jpg.png`, `a.bmp.png`).
    """
    resolved = [file.resolve() for file in files]
    root = Path(os.path.commonpath([file.parent for file in resolved]))
    relative = [file.relative_to(root) for file in resolved]
    stems = Counter(path.with_name(path.stem) for path in relative)
    return [
        path.with_name(f"{path.stem if stems[path.with_name(path.stem)] == 1 else path.name}.png") for path in relative
    ]


def run(args: argparse.Namespace) -> int:
    files, failures = collect_images(args.images)
    if not files:
        problems = "; ".join(f"{pattern}: {reason}" for pattern, reason in failures)
        raise CommandError(f"no images to process ({problems})")
    few_shot = _few_shot_settings(args)
    check_output_folder(args.output_dir, DETECT_OUTPUT, args.overwrite)
    model, processor = load_model_and_processor(args.model, args.adapter, args.image_size, args.device)
    reference_embeds = None
    if args.references is not None:
        reference_embeds = load_reference_embeds(args.references, model, image_size=processor.image_size)
    detector = ZeroShotAnomalyDetectionPipeline(
        model=model,
        processor=processor,
        task=TASK,
        device=model.device,
        reference_images=few_shot.get("reference_images"),
        reference_embeds=reference_embeds,
    )
    thresholds = resolve_thresholds(model.config, args.threshold, args.pixel_threshold, args.category)
    rows = []
    names = _output_names(files)
    with output_folder(args.output_dir, DETECT_OUTPUT, args.overwrite) as staging:
        with tqdm(total=len(files), desc="Detecting", unit="image") as progress:
            for start in range(0, len(files), args.batch_size):
                end = start + args.batch_size
                chunk = list(zip(files[start:end], names[start:end], strict=True))
                images, loaded = [], []
                for file, name in chunk:
                    try:
                        images.append(processor.to_rgb_image(file))
                        loaded.append((file, name))
                    except (OSError, ValueError) as error:
                        failures.append((str(file), str(error)))
                results = (
                    detector(
                        images,
                        batch_size=args.batch_size,
                        threshold=thresholds["threshold"],
                        pixel_threshold=thresholds["pixel_threshold"],
                    )
                    if images
                    else []
                )
                for (file, name), result in zip(loaded, results, strict=True):
                    heatmap_name, mask_name = Path(HEATMAPS_DIR) / name, Path(MASKS_DIR) / name
                    for relative, picture in ((heatmap_name, result["heatmap"]), (mask_name, result["mask"])):
                        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                        picture.save(staging / relative)
                    rows.append(
                        {
                            "path": str(file),
                            "score": result["score"],
                            "label": result["label"],
                            "heatmap": str(heatmap_name),
                            "mask": str(mask_name),
                        }
                    )
                progress.update(len(chunk))
        _write_scores(staging, rows, failures, args, thresholds, few_shot)
    out = Path(args.output_dir)
    print(f"{len(rows)} of {len(rows) + len(failures)} images processed; results in {out / SCORES_CSV}")
    if failures:
        print(f"{len(failures)} failed:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


def _few_shot_settings(args: argparse.Namespace) -> dict:
    """
    The few-shot references of the run, checked before the model loads: `{}` (zero-shot), the chosen
    `reference_images`, or the `references` file and the images it was made from.
    """
    if args.reference_images is not None:
        files = select_reference_files(args.reference_images, args.k_shot, args.k_shot_seed)
        return {
            "reference_images": [str(file) for file in files],
            "k_shot": args.k_shot,
            "k_shot_seed": args.k_shot_seed,
        }
    if args.k_shot is not None:
        raise CommandError("--k_shot picks among --reference_images: pass --reference_images DIR_OR_GLOB too")
    if args.references is not None:
        return {
            "references": args.references,
            "files": read_reference_metadata(args.references)["files"],
        }
    return {}


def _write_scores(
    out: Path,
    rows: list[dict],
    failures: list[tuple[str, str]],
    args: argparse.Namespace,
    thresholds: dict,
    few_shot: dict,
) -> None:
    with open(out / SCORES_CSV, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["path", "score", "label", "heatmap", "mask", "error"])
        writer.writeheader()
        writer.writerows(rows)
        writer.writerows({"path": path, "error": reason} for path, reason in failures)
    summary = {
        "model": args.model,
        "adapter": args.adapter,
        "category": args.category,
        **thresholds,
        "few_shot": few_shot or None,
        "images": rows,
        "failed": [{"path": path, "error": reason} for path, reason in failures],
    }
    (out / SCORES_JSON).write_text(json.dumps(summary, indent=2) + "\n")
