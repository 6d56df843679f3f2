# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""`headclip references`: encode a few normal images once into a references file for the few-shot mode."""

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..references import (
    check_references_output,
    encode_reference_images,
    read_reference_metadata,
    save_reference_embeds,
    select_k_shot,
)
from ._common import (
    CommandError,
    add_model_arguments,
    add_output_file_argument,
    collect_images,
    load_model_and_processor,
    positive_int,
)

DEFAULT_OUTPUT_FILE = "references.safetensors"

EPILOG = """examples:
  headclip references good/ --model runs/mvtec/adapter --output_file bottle_refs.safetensors
  headclip references 'line3/good/*.png' --k_shot 4 --k_shot_seed 1 --model runs/mvtec/adapter --out refs.safetensors
  headclip detect images/ --model runs/mvtec/adapter --references bottle_refs.safetensors

Writes OUTPUT_FILE (safetensors): the patch embeddings of the normal reference images at the model's feature layers,
with the model's identity, the image size, the feature layers and the files used. `headclip detect --references` and
`headclip_hf.load_reference_embeds` refuse it for another model or image size. An earlier references file is
replaced; any other file only with --overwrite. With --k_shot, K of the images are drawn at random (--k_shot_seed)."""


def add_k_shot_arguments(parser: argparse.ArgumentParser) -> None:
    """`--k_shot` and `--k_shot_seed`: how many of the given reference images to use, drawn with which seed."""
    parser.add_argument(
        "--k_shot", type=positive_int, help="use K of the reference images, drawn at random (default: all of them)"
    )
    parser.add_argument("--k_shot_seed", type=int, default=0, help="seed of the draw of --k_shot images (default: 0)")


def select_reference_files(patterns: Sequence[str], k_shot: int | None, seed: int) -> list[Path]:
    """
    The reference image files of `patterns` (files, folders, globs; see `collect_images`), `k_shot` of them drawn with
    `seed` when given.

    Raises:
        `CommandError`: a pattern gives no image (an empty folder, no match, a missing path).
        `ValueError`: `k_shot` is larger than the number of images.
    """
    files, problems = collect_images(patterns)
    if problems:
        details = "; ".join(f"{pattern}: {reason}" for pattern, reason in problems)
        raise CommandError(f"no reference images in {details}: give a folder or pattern with normal images")
    return select_k_shot([file.resolve() for file in files], k_shot, seed)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "references",
        help="encode normal reference images for the few-shot mode (a references file)",
        description="Encode a few normal images of an object into a references file for the few-shot mode.",
        epilog=EPILOG,
    )
    parser.add_argument("images", nargs="+", help="normal images: files, folders (their images) and glob patterns")
    add_output_file_argument(parser, DEFAULT_OUTPUT_FILE, "the reference embeddings")
    add_k_shot_arguments(parser)
    add_model_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    files = select_reference_files(args.images, args.k_shot, args.k_shot_seed)
    check_references_output(args.output_file, args.overwrite)
    model, processor = load_model_and_processor(args.model, args.adapter, args.image_size, args.device)
    print(f"Encoding {len(files)} reference images at {processor.image_size} px ...")
    reference_embeds = encode_reference_images(model, processor, files)
    path = save_reference_embeds(
        reference_embeds, args.output_file, model, processor.image_size, files=files, overwrite=args.overwrite
    )
    metadata = read_reference_metadata(path)
    print(
        f"Wrote {path}: {metadata['num_images']} reference images at {metadata['image_size']} px, "
        f"{path.stat().st_size / 2**20:.1f} MiB, for {metadata['model_name_or_path'] or args.model}."
    )
    return 0
