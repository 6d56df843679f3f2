# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Few-shot references: pick K normal images, encode them once, save them and load them for later runs.

The few-shot mode compares each patch of an image with the patches of a few normal images of the same object
(`HeadCLIPModel.encode_references`, `forward(..., reference_embeds=...)`). Encoding the references costs K forward
passes; a references file keeps the result for every later run:

    chosen = select_k_shot(sorted(Path("good").glob("*.png")), k_shot=4, seed=0)
    reference_embeds = encode_reference_images(model, processor, chosen)
    save_reference_embeds(reference_embeds, "refs.safetensors", model, image_size=processor.image_size, files=chosen)
    ...
    outputs = model(**inputs, reference_embeds=load_reference_embeds("refs.safetensors", model))

A references file (safetensors) holds the `(L, M, P)` tensor under `reference_embeds` and, as metadata, what the
embeddings are only valid for: the identity of the model (a SHA-256 of everything the patch features depend on:
the vision encoder, the visual projection, the head weights in effect and the feature settings; and the model's
`name_or_path` for the message), the image size, the feature layers, the number of images and the files used.
Loading it into another model or for another image size is refused with a `ValueError` naming what differs.
"""

import json
import numbers
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import check_output_file, output_file
from .modeling_headclip import HeadCLIPModel
from .provenance import tensors_sha256

REFERENCES_FORMAT = "headclip-references"
REFERENCES_FORMAT_VERSION = 1
REFERENCES_TENSOR_NAME = "reference_embeds"
# Config fields the patch features depend on beyond the parameters hashed by `reference_model_identity`.
FEATURE_CONFIG_FIELDS = ("feature_layers", "vv_start_layer", "position_interpolation")
FEATURE_VISION_CONFIG_FIELDS = ("hidden_act", "layer_norm_eps", "num_attention_heads")

Item = TypeVar("Item")


def select_k_shot(
    items: Sequence[Item], k_shot: int | None, seed: int = 0, what: str = "reference images"
) -> list[Item]:
    """
    Pick `k_shot` of `items` at random with `seed` (all of them when `k_shot` is `None` or equals their number), in
    their original order. The same items, `k_shot` and `seed` always give the same choice.

    Args:
        items (`Sequence`): The candidates, e.g. image paths or data set rows.
        k_shot (`int`, *optional*): How many to pick; all when `None`.
        seed (`int`, defaults to 0): Seed of the random choice (`random.Random(seed)`).
        what (`str`, defaults to `"reference images"`): What the items are, for error messages.

    Raises:
        `ValueError`: `k_shot` is not a whole number, there are no items, `k_shot` is below 1, or `k_shot` is larger
            than the number of items.
    """
    if k_shot is not None and (isinstance(k_shot, bool) or not isinstance(k_shot, numbers.Integral)):
        raise ValueError(f"k_shot={k_shot!r} is invalid: it must be a whole number of images (or None for all).")
    if len(items) == 0:
        raise ValueError(f"There are no {what} to choose from: pass at least one normal image.")
    if k_shot is None:
        return list(items)
    if k_shot < 1:
        raise ValueError(f"k_shot={k_shot} is invalid: it must be at least 1.")
    if k_shot > len(items):
        raise ValueError(
            f"k_shot={k_shot} is larger than the {len(items)} {what} available: pass k_shot <= {len(items)} or add "
            "normal images."
        )
    chosen = sorted(random.Random(seed).sample(range(len(items)), int(k_shot)))
    return [items[index] for index in chosen]


def image_names(images: Sequence[Any]) -> list[str]:
    """How `images` are recorded in a references file: the path of a file, `<in-memory image i>` otherwise."""
    return [
        str(image) if isinstance(image, (str, os.PathLike)) else f"<in-memory image {i}>"
        for i, image in enumerate(images)
    ]


@torch.no_grad()
def encode_reference_images(model: HeadCLIPModel, processor: Any, images: Sequence[Any]) -> torch.Tensor:
    """
    Encode normal reference images for the few-shot mode: the processor prepares them at its size, the model's
    `encode_references` turns them into patch embeddings.

    Args:
        model ([`HeadCLIPModel`]): The model the references will be used with.
        processor ([`HeadCLIPProcessor`]): Prepares the images; its `image_size` is the size the model will run at.
        images (`Sequence` of paths, PIL images or arrays): The normal images (see `select_k_shot` to pick K).

    Returns:
        `torch.FloatTensor` of shape `(L, M, P)` on the model's device, M = len(images) x patches per image.

    Raises:
        `ValueError`: no images, or an unreadable image file (named).
    """
    if len(images) == 0:
        raise ValueError("There are no reference images: pass at least one normal image.")
    pixel_values = processor(images=list(images), return_tensors="pt")["pixel_values"]
    return model.encode_references(pixel_values.to(device=model.device, dtype=model.dtype))


def reference_model_identity(model: HeadCLIPModel) -> str:
    """
    The identity of `model` as far as its patch features go (`tensors_sha256`): the float32 values of the vision
    encoder, the visual projection and the head weights in effect, and the config fields the features depend on
    (`FEATURE_CONFIG_FIELDS`, `FEATURE_VISION_CONFIG_FIELDS`). Prompts and the text encoder do not enter: references
    stay valid for a model whose prompts were retrained. Reads every vision weight.
    """
    settings = {name: getattr(model.config, name) for name in FEATURE_CONFIG_FIELDS}
    settings.update({name: getattr(model.config.vision_config, name) for name in FEATURE_VISION_CONFIG_FIELDS})
    tensors = [*model.vision_model.named_parameters(prefix="vision_model")]
    tensors.append(("visual_projection.weight", model.visual_projection.weight))
    if model.config.use_head_weights:
        tensors.append(("head_weights", model.attention_head_weights()))
    return tensors_sha256(tensors, settings)


def is_references_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a HeadCLIP references file (one `save_reference_embeds` may replace without `overwrite`)."""
    try:
        read_reference_metadata(path)
    except (OSError, ValueError):
        return False
    return True


def check_references_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """
    Check, before any work, that `save_reference_embeds` may write `path`: a new file, an earlier references file
    (replaced), or any other file only with `overwrite`.

    Raises:
        `FileExistsError`: `path` is another kind of file and `overwrite` is False.
        `IsADirectoryError` / `NotADirectoryError` / `PermissionError`: `path` cannot be written.
    """
    return check_output_file(path, overwrite, is_earlier_output=is_references_file)


def save_reference_embeds(
    reference_embeds: torch.Tensor,
    path: str | os.PathLike,
    model: HeadCLIPModel,
    image_size: int,
    files: Sequence[Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """
    Save few-shot reference embeddings with what they are valid for (see the module docstring). The file is written
    under a temporary name next to `path` and renamed (`headclip_hf.files.output_file`), so it is never left
    half-written; an earlier references file at `path` is replaced, any other file only with `overwrite`.

    Args:
        reference_embeds (`torch.FloatTensor` of shape `(L, M, P)`): From `encode_reference_images` /
            `model.encode_references`.
        path (`str` or `os.PathLike`): The `.safetensors` file to write.
        model ([`HeadCLIPModel`]): The model that computed them.
        image_size (`int`): The input size they were computed at (`processor.image_size`).
        files (`Sequence`, *optional*): The reference images, in encoding order (paths are recorded as they are,
            in-memory images by position).
        overwrite (`bool`, defaults to `False`): Replace a file at `path` that is not a references file.

    Returns:
        The written path.

    Raises:
        `FileExistsError`: `path` is another kind of file and `overwrite` is False.
        `ValueError`: `reference_embeds` does not have this model's `(L, M, P)` shape, or M is not a whole number of
            images at `image_size`.
    """
    check_references_output(path, overwrite)
    model.check_reference_embeds(reference_embeds)
    patches_per_image = (image_size // model.config.vision_config.patch_size) ** 2
    num_images, remainder = divmod(reference_embeds.shape[1], patches_per_image)
    if remainder or (files is not None and len(files) != num_images):
        raise ValueError(
            f"reference_embeds holds {reference_embeds.shape[1]} patch embeddings per layer, which is not "
            f"{len(files) if files is not None else 'a whole number of'} images of {patches_per_image} patches at "
            f"image_size={image_size}: pass the size and the files they were computed from."
        )
    metadata = {
        "format": REFERENCES_FORMAT,
        "format_version": str(REFERENCES_FORMAT_VERSION),
        "model_identity": reference_model_identity(model),
        "model_name_or_path": str(model.config._name_or_path or ""),
        "image_size": str(image_size),
        "feature_layers": json.dumps(list(model.config.feature_layers)),
        "num_images": str(num_images),
        "files": json.dumps(image_names(files) if files is not None else []),
    }
    tensors = {REFERENCES_TENSOR_NAME: reference_embeds.detach().to(device="cpu", dtype=torch.float32).contiguous()}
    with output_file(path, overwrite, is_earlier_output=is_references_file) as temporary:
        save_file(tensors, temporary, metadata=metadata)
    return Path(path)


def read_reference_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """
    The metadata of a references file: `model_identity`, `model_name_or_path`, `image_size` (int), `feature_layers`
    (list), `num_images` (int), `files` (list), `format_version` (int).

    Raises:
        `FileNotFoundError`: no file at `path`.
        `ValueError`: the file is not a HeadCLIP references file, or its metadata is incomplete or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"References file {path} does not exist: create it with `headclip references`.")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a safetensors file ({error}): create it with `headclip references`."
        ) from error
    if metadata.get("format") != REFERENCES_FORMAT:
        raise ValueError(
            f"{path} is not a HeadCLIP references file (its metadata has no format {REFERENCES_FORMAT!r}): create it "
            "with `headclip references` or `save_reference_embeds`."
        )
    readers = {
        "format_version": int,
        "model_identity": str,
        "model_name_or_path": str,
        "image_size": int,
        "feature_layers": json.loads,
        "num_images": int,
        "files": json.loads,
    }
    missing = [key for key in readers if key not in metadata]
    if missing:
        raise ValueError(
            f"{path} is a damaged HeadCLIP references file: its metadata lacks {', '.join(missing)}. Create it again "
            "with `headclip references` or `save_reference_embeds`."
        )
    values = {}
    for key, read in readers.items():
        try:
            values[key] = read(metadata[key])
        except ValueError:  # int() of a non-number, or json.loads (JSONDecodeError is a ValueError)
            raise ValueError(
                f"{path} is a damaged HeadCLIP references file: its metadata {key}={metadata[key]!r} cannot be read. "
                "Create it again with `headclip references` or `save_reference_embeds`."
            ) from None
    if values["format_version"] > REFERENCES_FORMAT_VERSION:
        raise ValueError(
            f"{path} has references format version {values['format_version']}; this headclip_hf reads up to "
            f"{REFERENCES_FORMAT_VERSION}: upgrade headclip_hf."
        )
    return values


def load_reference_embeds(
    path: str | os.PathLike,
    model: HeadCLIPModel,
    image_size: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """
    Load few-shot reference embeddings saved by `save_reference_embeds`, after checking they fit `model` at
    `image_size`.

    Args:
        path (`str` or `os.PathLike`): The references file.
        model ([`HeadCLIPModel`]): The model they will be used with.
        image_size (`int`, *optional*): The input size the model will run at (`processor.image_size`); defaults to
            the model's `config.image_size`.
        device (`str` or `torch.device`, *optional*): Where to put them; defaults to the model's device.

    Returns:
        `torch.FloatTensor` of shape `(L, M, P)`.

    Raises:
        `FileNotFoundError`: no file at `path`.
        `ValueError`: not a references file, or computed with other feature layers, another image size or another
            model (the message names what differs).
    """
    metadata = read_reference_metadata(path)
    image_size = model.config.image_size if image_size is None else image_size
    origin = f"computed with {metadata['model_name_or_path'] or 'a model of unknown origin'}"
    if metadata["feature_layers"] != list(model.config.feature_layers):
        raise ValueError(
            f"The references in {path} were {origin} at feature layers {metadata['feature_layers']}, but this model "
            f"uses feature layers {model.config.feature_layers}: compute references with this model."
        )
    if metadata["image_size"] != image_size:
        raise ValueError(
            f"The references in {path} were computed at image size {metadata['image_size']} px, but the model runs "
            f"at {image_size} px here: run at {metadata['image_size']} px (--image_size {metadata['image_size']}) or "
            "compute the references again at this size."
        )
    if metadata["model_identity"] != reference_model_identity(model):
        raise ValueError(
            f"The references in {path} were {origin}, another model than this one "
            f"({model.config._name_or_path or 'unknown origin'}): its vision weights, head weights or feature "
            "settings differ. Compute the references again with this model."
        )
    with safe_open(path, framework="pt", device="cpu") as file:
        reference_embeds = file.get_tensor(REFERENCES_TENSOR_NAME)
    model.check_reference_embeds(reference_embeds)
    return reference_embeds.to(device=model.device if device is None else device)


__all__ = [
    "check_references_output",
    "encode_reference_images",
    "is_references_file",
    "load_reference_embeds",
    "read_reference_metadata",
    "reference_model_identity",
    "save_reference_embeds",
    "select_k_shot",
]
