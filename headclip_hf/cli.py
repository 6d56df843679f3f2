# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""The `headclip` command: detect, evaluate, train, push and convert.

    headclip detect images/ --out detections/                  # default model from the Hub
    headclip evaluate data/visa --model runs/mvtec/adapter --out eval/visa
    headclip train --train_data data/mvtec_ad --output_dir runs/mvtec
    headclip push --model runs/mvtec/adapter --results eval/visa --repo-id user/headclip-mvtec ...
    headclip convert anomalyclip ...

`headclip <command> --help` documents each command. `train` takes the arguments of `examples/train_headclip.py`
(`headclip_hf.training.main`), `convert anomalyclip` those of `headclip_hf.conversion`.
"""

import argparse
import csv
import glob
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from . import training
from .adapters import is_peft_adapter, load_headclip_model_and_processor
from .configuration_headclip import DEFAULT_CLIP_CHECKPOINT
from .conversion import add_convert_arguments, run_convert
from .data import IMAGE_EXTENSIONS, LAYOUTS, load_anomaly_dataset
from .evaluation import evaluate_model
from .hub import (
    DEFAULT_LICENSE,
    RESULTS_JSON,
    RESULTS_MARKDOWN,
    render_model_card,
    save_hub_folder,
    upload_hub_folder,
)
from .modeling_headclip import HeadCLIPModel
from .pipeline_headclip import DEFAULT_THRESHOLD, TASK, ZeroShotAnomalyDetectionPipeline
from .processing_headclip import HeadCLIPProcessor
from .reporting import results_to_markdown, save_results

DEFAULT_MODEL = DEFAULT_CLIP_CHECKPOINT
SCORES_CSV = "scores.csv"
SCORES_JSON = "scores.json"


class CommandError(Exception):
    """A failure to report to the user in one message, without a traceback (exit status 1)."""


# ---------------------------------------------------------------------------------------------------------------------
# Shared: model loading
# ---------------------------------------------------------------------------------------------------------------------


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"CLIP or HeadCLIP checkpoint (Hub id or local folder), or a HeadCLIP adapter folder "
        f"(default: {DEFAULT_MODEL}, an untrained HeadCLIP); offline: a local folder, HF_HUB_OFFLINE=1 is honoured",
    )
    group.add_argument("--adapter", help="HeadCLIP adapter folder to load on top of --model, e.g. runs/mvtec/adapter")
    group.add_argument(
        "--image-size", type=_positive_int, help="working input size in pixels (default: the model's, 518)"
    )
    group.add_argument(
        "--device", help="device, e.g. cpu, cuda, cuda:1, mps (default: the first accelerator, else the CPU)"
    )


def load_model_and_processor(
    model_name_or_path: str,
    adapter: str | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[HeadCLIPModel, HeadCLIPProcessor]:
    """
    Load a HeadCLIP (`load_headclip_model`: a checkpoint, an adapter folder, or a checkpoint plus `adapter`) in eval
    mode on `device`, and the processor of the checkpoint it came from, at the model's working size.

    Raises:
        `CommandError`: the model or processor cannot be loaded (no network and no local copy, a wrong path, ...); the
            message says how to work offline.
    """
    try:
        model, processor = load_headclip_model_and_processor(model_name_or_path, adapter, image_size)
    except ValueError as error:  # e.g. a malformed adapter folder
        raise CommandError(f"Cannot load the model from {model_name_or_path!r}: {error}") from error
    except OSError as error:  # includes huggingface_hub's offline, not-found and HTTP errors
        raise CommandError(
            f"Cannot load the model or processor from {model_name_or_path!r}: {error}\n"
            "Without network access, point --model at a local folder holding the checkpoint (config.json, "
            "model.safetensors, preprocessor and tokenizer files; e.g. one written by `save_pretrained` or downloaded "
            "with `hf download` on a connected machine): --model /path/to/local/folder. HF_HUB_OFFLINE=1 is "
            "honoured: the Hub is then not contacted and only local folders and the local Hugging Face cache are used."
        ) from error
    return model.to(device or PartialState().device).eval(), processor


# ---------------------------------------------------------------------------------------------------------------------
# detect
# ---------------------------------------------------------------------------------------------------------------------


def collect_images(patterns: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """
    Expand `patterns` (image files, folders, glob patterns with `*`, `?`, `[...]` and `**`) into image files.

    A folder contributes its image files (by extension, not recursive); a glob its matching files. Files keep the
    order of the patterns, sorted within a folder or glob, without duplicates.

    Returns:
        The files, and `(pattern, reason)` for each pattern that gives no image (missing path, empty folder, no match).
    """
    files: dict[Path, None] = {}
    problems = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            reason = f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder"
        elif path.is_file():
            found, reason = [path], ""
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            reason = "no file matches this pattern"
        else:
            found, reason = [], "no such file or folder"
        if not found:
            problems.append((pattern, reason))
        files.update(dict.fromkeys(found))
    return list(files), problems


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


def _detect(args: argparse.Namespace) -> int:
    files, failures = collect_images(args.images)
    if not files:
        problems = "; ".join(f"{pattern}: {reason}" for pattern, reason in failures)
        raise CommandError(f"no images to process ({problems})")
    model, processor = load_model_and_processor(args.model, args.adapter, args.image_size, args.device)
    detector = ZeroShotAnomalyDetectionPipeline(model=model, processor=processor, task=TASK, device=model.device)
    out = Path(args.out)
    pixel_threshold = args.threshold if args.pixel_threshold is None else args.pixel_threshold
    rows = []
    names = _output_names(files)
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
                detector(images, batch_size=args.batch_size, threshold=args.threshold, pixel_threshold=pixel_threshold)
                if images
                else []
            )
            for (file, name), result in zip(loaded, results, strict=True):
                heatmap_path, mask_path = out / "heatmaps" / name, out / "masks" / name
                for path, picture in ((heatmap_path, result["heatmap"]), (mask_path, result["mask"])):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    picture.save(path)
                rows.append(
                    {
                        "path": str(file),
                        "score": result["score"],
                        "label": result["label"],
                        "heatmap": str(heatmap_path.relative_to(out)),
                        "mask": str(mask_path.relative_to(out)),
                    }
                )
            progress.update(len(chunk))
    _write_detections(out, rows, failures, args, pixel_threshold)
    print(f"{len(rows)} of {len(rows) + len(failures)} images processed; results in {out / SCORES_CSV}")
    if failures:
        print(f"{len(failures)} failed:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


def _write_detections(
    out: Path, rows: list[dict], failures: list[tuple[str, str]], args: argparse.Namespace, pixel_threshold: float
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / SCORES_CSV, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["path", "score", "label", "heatmap", "mask", "error"])
        writer.writeheader()
        writer.writerows(rows)
        writer.writerows({"path": path, "error": reason} for path, reason in failures)
    summary = {
        "model": args.model,
        "adapter": args.adapter,
        "threshold": args.threshold,
        "pixel_threshold": pixel_threshold,
        "images": rows,
        "failed": [{"path": path, "error": reason} for path, reason in failures],
    }
    (out / SCORES_JSON).write_text(json.dumps(summary, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------------


def _evaluate(args: argparse.Namespace) -> int:
    try:
        dataset = load_anomaly_dataset(args.data, layout=args.layout, categories=args.categories)
    except (OSError, ValueError) as error:
        raise CommandError(f"Cannot load the data set {args.data}: {error}") from error
    model, processor = load_model_and_processor(args.model, args.adapter, args.image_size, args.device)
    results = evaluate_model(model, processor, dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    if PartialState().is_main_process:  # under `accelerate launch` every process holds the gathered results
        written = save_results(results, args.out, plots=not args.no_plots)
        print(results_to_markdown(results))
        print("Written: " + ", ".join(str(path) for path in written.values()))
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------------------------------


def _push(args: argparse.Namespace) -> int:
    if args.dry_run and args.output_dir is None:
        raise CommandError("--dry-run writes the repository folder to --output-dir: pass --output-dir DIR.")
    results_dir = Path(args.results)
    if not all((results_dir / name).is_file() for name in (RESULTS_JSON, RESULTS_MARKDOWN)):
        raise CommandError(
            f"{results_dir} holds no evaluation results ({RESULTS_JSON}, {RESULTS_MARKDOWN}): pass the --out folder "
            "of `headclip evaluate`."
        )
    if args.adapter_only and is_peft_adapter(args.adapter or args.model):
        raise CommandError(
            "A LoRA (PEFT) adapter changes the CLIP backbone, which a HeadCLIP adapter does not hold: publish the "
            "full model (without --adapter-only)."
        )
    model, processor = load_model_and_processor(args.model, args.adapter, args.image_size, "cpu")
    base_model = args.base_model or _hub_id_or_none(model.config._name_or_path)
    if args.adapter_only and base_model is None:
        raise CommandError(
            f"The model came from the local folder {model.config._name_or_path}: an adapter-only repository must name "
            "its base on the Hub, pass --base-model (e.g. openai/clip-vit-large-patch14-336)."
        )
    card = render_model_card(
        model,
        results_dir,
        repo_id=args.repo_id,
        train_dataset=args.train_dataset,
        eval_dataset=args.eval_dataset,
        license=args.license,
        base_model=base_model,
        adapter_only=args.adapter_only,
    )
    with tempfile.TemporaryDirectory(prefix="headclip-push-") as staging:
        folder = Path(args.output_dir or Path(staging) / "repo")
        try:
            save_hub_folder(
                model, processor, folder, card, results_dir, adapter_only=args.adapter_only, base_model=base_model
            )
        except FileExistsError as error:
            raise CommandError(str(error)) from error
        if args.dry_run:
            print(f"Dry run: wrote the repository folder for {args.repo_id} to {folder}; nothing was uploaded.")
            return 0
        url = upload_hub_folder(
            folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            token=args.token,
            commit_message=args.commit_message,
        )
    print(f"Uploaded {args.repo_id}: {url}")
    return 0


def _hub_id_or_none(name_or_path: str) -> str | None:
    """`name_or_path` if it names a Hub repository rather than a local folder."""
    return None if not name_or_path or Path(name_or_path).exists() else name_or_path


# ---------------------------------------------------------------------------------------------------------------------
# train, convert: run by their modules
# ---------------------------------------------------------------------------------------------------------------------


def _convert(args: argparse.Namespace) -> int:
    run_convert(args)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Parser and entry point
# ---------------------------------------------------------------------------------------------------------------------

DETECT_EPILOG = f"""examples:
  headclip detect bottle.png                                   # default model ({DEFAULT_MODEL})
  headclip detect images/ 'more/**/*.jpg' --model runs/mvtec/adapter --out detections/
  HF_HUB_OFFLINE=1 headclip detect images/ --model /models/headclip-mvtec --threshold 0.6

Writes OUT/{SCORES_CSV} and OUT/{SCORES_JSON} (score and label per image, failed files with their error), and per
image OUT/heatmaps/<name>.png (the map over the image, jet colours) and OUT/masks/<name>.png (0/255, map >= pixel
threshold), named after the image's path below the images' common folder. Unreadable files are reported and
skipped; the exit status is 1 when any image failed."""

EVALUATE_EPILOG = """examples:
  headclip evaluate data/mvtec_ad --model runs/visa/adapter --out eval/mvtec
  headclip evaluate data/visa --layout visa --categories candle pcb1 --model runs/mvtec/adapter --out eval/visa

Writes OUT/results.md (table per category and mean, in percent), OUT/results.json (fractions; undefined metrics as
null with their reason) and OUT/plots/<category>.png (ROC, PR and PRO curves, score distributions)."""

PUSH_EPILOG = """examples:
  headclip push --model runs/mvtec/adapter --results eval/visa --train-dataset "MVTec AD" --eval-dataset VisA \\
      --repo-id user/headclip-mvtec --dry-run --output-dir hub-preview/
  headclip push --model runs/mvtec/adapter --results eval/visa --train-dataset "MVTec AD" --eval-dataset VisA \\
      --repo-id user/headclip-mvtec --private --revision v1

The repository holds the full model with its remote code and the custom pipeline (loads with
AutoModel/pipeline(..., trust_remote_code=True) without headclip_hf), or with --adapter-only the adapter alone;
plus the processor, the model card (README.md, metrics in its table and model-index metadata) and the evaluation
run under evaluation/. Log in first (`hf auth login`) or pass --token."""

CONVERT_EPILOG = """examples:
  headclip convert anomalyclip checkpoints/9_12_4_multiscale_visa/epoch_15.pth --out anomalyclip-visa
  headclip convert anomalyclip epoch_15.pth --base /models/clip-vit-large-patch14-336 --out adapter/ --adapter

Writes a HeadCLIP save_pretrained folder (or, with --adapter, a HeadCLIP adapter of --base) that computes what
AnomalyCLIP computes; use it with --model in the other commands."""


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1] (scores and maps are probabilities)")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `headclip` argument parser (`headclip train` arguments go to the training example's own parser)."""
    parser = argparse.ArgumentParser(
        prog="headclip",
        description="HeadCLIP zero-shot anomaly detection: anomaly maps and scores for images of unseen objects.",
        epilog="`headclip <command> --help` shows each command's options and examples.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    formatter = argparse.RawDescriptionHelpFormatter

    detect = commands.add_parser(
        "detect",
        help="anomaly score, label, heatmap and mask for images",
        description="Detect anomalies in images: score and label per image, heatmap and mask PNGs.",
        epilog=DETECT_EPILOG,
        formatter_class=formatter,
    )
    detect.add_argument("images", nargs="+", help="image files, folders (their images) and glob patterns")
    detect.add_argument("--out", default="detections", help="output folder (default: detections)")
    detect.add_argument(
        "--threshold",
        type=_probability,
        default=DEFAULT_THRESHOLD,
        help=f"label 'anomaly' when the score is >= this (default: {DEFAULT_THRESHOLD})",
    )
    detect.add_argument("--pixel-threshold", type=_probability, help="mask: map >= this (default: --threshold)")
    detect.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default: 8)")
    _add_model_arguments(detect)
    detect.set_defaults(handler=_detect)

    evaluate = commands.add_parser(
        "evaluate",
        help="zero-shot metrics on a labelled data set (table, JSON, plots)",
        description="Evaluate on an anomaly data set: image and pixel metrics per category and their mean.",
        epilog=EVALUATE_EPILOG,
        formatter_class=formatter,
    )
    evaluate.add_argument("data", help="data set root or one category folder")
    evaluate.add_argument("--layout", default="auto", choices=LAYOUTS, help="folder layout (default: auto-detect)")
    evaluate.add_argument("--categories", nargs="+", help="evaluate only these categories")
    evaluate.add_argument("--out", default="evaluation", help="output folder (default: evaluation)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default: 8)")
    evaluate.add_argument("--num-workers", type=int, default=0, help="data loading processes (default: 0)")
    evaluate.add_argument("--no-plots", action="store_true", help="write the table and JSON only")
    _add_model_arguments(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    # Listed for the overview; `main` hands the arguments to the training example's own parser.
    commands.add_parser("train", help="train HeadCLIP on an auxiliary data set (examples/train_headclip.py)")

    push = commands.add_parser(
        "push",
        help="publish a trained HeadCLIP with its model card on the Hub",
        description="Publish a trained HeadCLIP on the Hugging Face Hub, with a model card holding its metrics.",
        epilog=PUSH_EPILOG,
        formatter_class=formatter,
    )
    push.add_argument("--repo-id", required=True, help="Hub repository, user/name")
    push.add_argument("--results", required=True, help="the --out folder of `headclip evaluate` for this model")
    push.add_argument("--train-dataset", required=True, help='data set the model was trained on, e.g. "MVTec AD"')
    push.add_argument("--eval-dataset", required=True, help="data set of the --results run, e.g. VisA")
    push.add_argument(
        "--license", default=DEFAULT_LICENSE, help=f"Hub licence id (default: {DEFAULT_LICENSE}, MVTec AD's)"
    )
    push.add_argument("--base-model", help="Hub id of the base CLIP (default: where the model came from, if the Hub)")
    push.add_argument("--adapter-only", action="store_true", help="publish the adapter only, not the full model")
    push.add_argument("--dry-run", action="store_true", help="write the repository folder to --output-dir, no upload")
    push.add_argument("--output-dir", help="where to write the repository folder (default: a temporary folder)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    push.add_argument("--token", help="Hub token (default: the one of `hf auth login` or HF_TOKEN)")
    push.add_argument("--commit-message", default="Upload HeadCLIP", help="commit message")
    _add_model_arguments(push)
    push.set_defaults(handler=_push)

    convert = commands.add_parser(
        "convert",
        help="convert checkpoints of other methods (AnomalyCLIP) to HeadCLIP",
        description="Convert checkpoints of other methods to HeadCLIP.",
    )
    sources = convert.add_subparsers(dest="source", required=True, metavar="source")
    anomalyclip = sources.add_parser(
        "anomalyclip",
        help="an AnomalyCLIP prompt-learner checkpoint (.pth of its train.py)",
        description="Convert an AnomalyCLIP checkpoint to a HeadCLIP that computes what AnomalyCLIP computes.",
        epilog=CONVERT_EPILOG,
        formatter_class=formatter,
    )
    add_convert_arguments(anomalyclip)
    anomalyclip.set_defaults(handler=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `headclip` command with `argv` (default: the process arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["train"]:
            training.main(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except CommandError as error:
        print(f"headclip: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
