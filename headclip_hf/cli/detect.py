# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""`headclip detect`: anomaly score, label, heatmap and mask for image files, folders and glob patterns."""

import argparse
import csv
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from PIL import Image
from tqdm.auto import tqdm

from ..configuration_headclip import DEFAULT_CLIP_CHECKPOINT
from ..export import ExportedDetector, is_export_folder
from ..export import NonFiniteOutputError as ExportNonFiniteOutputError
from ..files import OutputKind, check_output_folder, output_folder
from ..image_utils_headclip import to_rgb_image
from ..pipeline_headclip import (
    DEFAULT_THRESHOLD,
    TASK,
    NonFiniteOutputError,
    ZeroShotAnomalyDetectionPipeline,
    resolve_thresholds,
)
from ..references import load_reference_embeds, read_reference_metadata
from ._common import (
    CommandError,
    add_max_image_pixels_argument,
    add_model_arguments,
    add_output_dir_argument,
    add_speed_arguments,
    collect_images,
    image_pixel_limit,
    load_model_and_processor,
    positive_int,
    probability,
    process_state,
    resolve_device,
)
from .references import add_k_shot_arguments, select_reference_files

SCORES_CSV = "scores.csv"
SCORES_JSON = "scores.json"
HEATMAPS_DIR = "heatmaps"
MASKS_DIR = "masks"
DETECT_OUTPUT = OutputKind("headclip detect output", frozenset({SCORES_CSV, SCORES_JSON, HEATMAPS_DIR, MASKS_DIR}))
# A NaN or infinite score or map, from the pipeline or from an export's runtime.
NON_FINITE_ERRORS = (NonFiniteOutputError, ExportNonFiniteOutputError)
# Options that an export folder fixes when it is made (`headclip export`; zero-shot), with their defaults.
EXPORT_FIXED_OPTIONS = {
    "adapter": None,
    "image_size": None,
    "device": None,
    "dtype": "float32",
    "compile": False,
    "reference_images": None,
    "references": None,
}

EPILOG = f"""examples:
  headclip detect bottle.png                                   # default model ({DEFAULT_CLIP_CHECKPOINT})
  headclip detect images/ 'more/**/*.jpg' --model runs/mvtec/adapter --output_dir detections/
  HF_HUB_OFFLINE=1 headclip detect images/ --model /models/headclip-mvtec --threshold 0.6
  headclip detect images/ --model runs/mvtec/adapter --reference_images good/ --k_shot 4   # few-shot
  headclip detect images/ --model runs/mvtec/adapter --references refs.safetensors         # see headclip references
  headclip detect images/ --model runs/mvtec/adapter --dtype bfloat16 --compile    # PyTorch speed options
  headclip detect images/ --model exports/headclip-onnx     # an export folder (headclip export): ONNX Runtime
  accelerate launch -m headclip_hf.cli detect images/ --model runs/mvtec/adapter   # images shared by processes

Labels and masks use the model's calibrated thresholds (`headclip calibrate`; with --category, that category's where
calibrated), else {DEFAULT_THRESHOLD}; --threshold / --pixel_threshold override them. Writes OUTPUT_DIR/{SCORES_CSV}
and OUTPUT_DIR/{SCORES_JSON} (score and label per image, failed files with their error, the thresholds used and
their source: given, calibrated or default), and per image OUTPUT_DIR/{HEATMAPS_DIR}/<name>.png (the map over the
image, jet colours) and OUTPUT_DIR/{MASKS_DIR}/<name>.png (0/255, map >= pixel threshold), named after the image's
path below the images' common folder. With --reference_images (normal images of the same object) or --references (a
file of `headclip references`), the few-shot mode compares each image with them as well. The outputs appear together
when the run ends (an earlier detect output there is replaced; a folder with other files is refused unless
--overwrite). Unreadable files (corrupt, broken links, images above --max_image_pixels) and images whose score is not
finite are reported and skipped; the exit status is 1 when any image failed. Under `accelerate launch` each process
detects its share of the batches and the main process writes the scores: the outputs are those of a single
process."""


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
    parser.add_argument(
        "--batch_size",
        type=positive_int,
        default=8,
        help="images per forward pass (default: 8; an export without a dynamic batch runs one at a time)",
    )
    add_max_image_pixels_argument(parser)
    few_shot = parser.add_argument_group("few-shot mode (normal reference images of the same object)")
    sources = few_shot.add_mutually_exclusive_group()
    sources.add_argument(
        "--reference_images", nargs="+", metavar="DIR_OR_GLOB", help="normal images: files, folders, glob patterns"
    )
    sources.add_argument("--references", metavar="FILE", help="a references file written by `headclip references`")
    add_k_shot_arguments(few_shot)
    add_speed_arguments(add_model_arguments(parser))
    parser.set_defaults(handler=run)


def _output_names(files: list[Path]) -> list[Path]:
    """
    A distinct relative PNG name per file: its path below the files' common folder with the extension replaced by
    `.png` (kept before `.png` when two images differ only in their extension: `a.jpg.png`, `a.bmp.png`).
    """
    resolved = [file.parent.resolve() / file.name for file in files]  # a broken link resolves nowhere
    root = Path(os.path.commonpath([file.parent for file in resolved]))
    relative = [file.relative_to(root) for file in resolved]
    stems = Counter(path.with_name(path.stem) for path in relative)
    return [
        path.with_name(f"{path.stem if stems[path.with_name(path.stem)] == 1 else path.name}.png") for path in relative
    ]


def run(args: argparse.Namespace) -> int:
    """
    Run `headclip detect`: check the inputs, load the model (or the export), detect batch by batch, write the outputs
    together. Under `accelerate launch` each process detects a contiguous share of the batches (the batches one
    process would run, so the numbers do not depend on the process count) and saves its pictures in the main
    process's staging folder; the main process merges the scores and moves the folder into place.
    """
    with image_pixel_limit(args.max_image_pixels):
        files, failures, few_shot, device = _check_inputs(args)
        state = process_state(device)
        detector, batch_size, thresholds = _load_detector(args, few_shot, device)
        writing = (
            output_folder(args.output_dir, DETECT_OUTPUT, args.overwrite) if state.is_main_process else nullcontext()
        )
        with writing as staging:
            staging = Path(broadcast_object_list([staging and str(staging)])[0])
            shard = _detect_all(detector, files, staging, batch_size, thresholds, state)
            shards = gather_object([shard])  # in process order: the files' order
            rows = [row for shard_rows, _ in shards for row in shard_rows]
            failures += [failure for _, shard_failures in shards for failure in shard_failures]
            if state.is_main_process:
                _write_scores(staging, rows, failures, args, thresholds, few_shot)
    if not state.is_main_process:
        return 1 if failures else 0
    return _report(rows, failures, Path(args.output_dir))


def _check_inputs(args: argparse.Namespace) -> tuple[list[Path], list[tuple[str, str]], dict, torch.device]:
    """
    Everything that can be refused before the model loads: the images (at least one), the options an export folder
    fixes, the few-shot references, the output folder (checked by every process, so that a refusal stops them all),
    the device.

    Returns:
        The image files, `(pattern, reason)` for the patterns that gave none, the few-shot settings
        ([`_few_shot_settings`]) and the device.
    """
    files, failures = collect_images(args.images)
    if not files:
        problems = "; ".join(f"{pattern}: {reason}" for pattern, reason in failures)
        raise CommandError(f"no images to process ({problems})")
    if is_export_folder(args.model):
        fixed = [f"--{name}" for name, default in EXPORT_FIXED_OPTIONS.items() if getattr(args, name) != default]
        if fixed:
            raise CommandError(
                f"{', '.join(fixed)} cannot be used with the export folder {args.model}: an export runs the zero-shot "
                "model it was made from (headclip export) at its image size and precision, on the CPU. Leave them "
                "out, or export again with other settings."
            )
    few_shot = _few_shot_settings(args)
    check_output_folder(args.output_dir, DETECT_OUTPUT, args.overwrite)
    return files, failures, few_shot, resolve_device(args.device)


def _load_detector(args: argparse.Namespace, few_shot: dict, device: torch.device) -> tuple[Callable, int, dict]:
    """
    The detector for `--model`: `ExportedDetector` for an export folder, else the model, its processor and the
    few-shot references (if any) as a pipeline on `device`; with the batch size it runs (1 for an export without a
    dynamic batch) and the thresholds with their sources ([`resolve_thresholds`]: the calibrated ones by default).
    """
    if is_export_folder(args.model):
        try:
            detector = ExportedDetector(args.model)
        except ImportError as error:  # the runtime's extra is not installed
            raise CommandError(str(error)) from error
        thresholds = detector.decision_thresholds(args.threshold, args.pixel_threshold, args.category)
        return detector, args.batch_size if detector.config["dynamic_batch"] else 1, thresholds
    model, processor = load_model_and_processor(
        args.model, args.adapter, args.image_size, device, args.dtype, args.compile
    )
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
    return detector, args.batch_size, thresholds


def _detect_all(
    detector: Callable,
    files: list[Path],
    staging: Path,
    batch_size: int,
    thresholds: dict,
    state: PartialState,
) -> tuple[list[dict], list[tuple[str, str]]]:
    """
    Detect on this process's share of the batches of `files` at `thresholds` ([`resolve_thresholds`]), saving each
    image's heatmap and mask in `staging`. Returns a row per image, and `(path, reason)` for the images that failed
    (unreadable, non-finite score).
    """
    rows, failures = [], []
    names = _output_names(files)
    batches = [range(start, min(start + batch_size, len(files))) for start in range(0, len(files), batch_size)]
    with state.split_between_processes(batches) as shard:
        total = sum(map(len, shard))
        with tqdm(total=total, desc="Detecting", unit="image", disable=not state.is_main_process) as progress:
            for batch in shard:
                images, readable = _read_images([(files[index], names[index]) for index in batch], failures)
                results = _detect_batch(detector, images, readable, failures, batch_size, thresholds)
                rows += [_save_pictures(staging, file, name, result) for (file, name), result in results]
                progress.update(len(batch))
    return rows, failures


def _read_images(
    batch: list[tuple[Path, Path]], failures: list[tuple[str, str]]
) -> tuple[list[Image.Image], list[tuple[Path, Path]]]:
    """The RGB images of the readable files of `batch` and their `(file, name)`; the others go to `failures`."""
    images, readable = [], []
    for file, name in batch:
        try:
            images.append(to_rgb_image(file))
            readable.append((file, name))
        except (OSError, ValueError) as error:
            failures.append((str(file), str(error)))
    return images, readable


def _detect_batch(
    detector: Callable,
    images: list[Image.Image],
    readable: list[tuple[Path, Path]],
    failures: list[tuple[str, str]],
    batch_size: int,
    thresholds: dict,
) -> list[tuple[tuple[Path, Path], dict]]:
    """
    The detector's results for one batch, paired with their `(file, name)`. When an image's score or map is not
    finite the batch runs again image by image, so that only that image fails (appended to `failures`).
    """
    thresholds = {"threshold": thresholds["threshold"], "pixel_threshold": thresholds["pixel_threshold"]}
    try:
        return list(zip(readable, detector(images, batch_size=batch_size, **thresholds), strict=True))
    except NON_FINITE_ERRORS:
        results = []
        for (file, name), image in zip(readable, images, strict=True):
            try:
                results.append(((file, name), detector(image, **thresholds)))
            except NON_FINITE_ERRORS as error:
                failures.append((str(file), str(error)))
        return results


def _save_pictures(staging: Path, file: Path, name: Path, result: dict) -> dict:
    """Save the heatmap and mask of one image under `staging`; returns its row of the scores table."""
    heatmap_name, mask_name = Path(HEATMAPS_DIR) / name, Path(MASKS_DIR) / name
    for relative, picture in ((heatmap_name, result["heatmap"]), (mask_name, result["mask"])):
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        picture.save(staging / relative)
    return {
        "path": str(file),
        "score": result["score"],
        "label": result["label"],
        "heatmap": str(heatmap_name),
        "mask": str(mask_name),
    }


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


def _report(rows: list[dict], failures: list[tuple[str, str]], out: Path) -> int:
    """Print what was done and what failed; the exit status (1 when any image failed)."""
    print(f"{len(rows)} of {len(rows) + len(failures)} images processed; results in {out / SCORES_CSV}")
    if not failures:
        return 0
    print(f"{len(failures)} failed:", file=sys.stderr)
    for path, reason in failures:
        print(f"  {path}: {reason}", file=sys.stderr)
    return 1
