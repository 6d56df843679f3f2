# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Image helpers of HeadCLIP that need neither PyTorch nor transformers: RGB conversion of any input, heatmaps.

This file imports only numpy, PIL and the standard library. It is the one home of this logic for
`processing_headclip.py` (which imports it relatively, so it ships with the processor as Hub remote code), for the
pipeline (through the processor) and for `headclip_hf.export.ExportedDetector`, which runs exported graphs where
PyTorch cannot be imported.
"""

import numbers
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_HEATMAP_ALPHA = 0.5

ImageLike = Image.Image | np.ndarray | str | Path


class UnsupportedImageTypeError(ValueError, TypeError):
    """An image input of a type that is not an image (a `ValueError`, as every user error; also a `TypeError`)."""


def open_image(path: str | Path) -> Image.Image:
    """
    Read the image file `path` completely. Raises `ValueError` naming the file when it is missing (or a broken
    symbolic link), not an image, truncated, or larger than PIL's decompression-bomb limit (twice
    `PIL.Image.MAX_IMAGE_PIXELS` pixels; the commands' `--max_image_pixels`).
    """
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"Cannot read image file {str(path)!r}: {error} For a file you trust, raise the limit "
            f"(--max_image_pixels, PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})."
        ) from error
    except (OSError, UnidentifiedImageError) as error:
        reason = error
        if Path(path).is_symlink() and not Path(path).exists():
            reason = f"it is a broken symbolic link (its target {Path(path).readlink()} does not exist)"
        raise ValueError(f"Cannot read image file {str(path)!r}: {reason}") from error


def _image_array_to_unit_range(array: np.ndarray) -> np.ndarray:
    """
    Scale image content to float64 in [0, 1]: uint8 by 255, uint16 by 65535, wider integers (PIL mode "I") by 255 or
    65535 from their content, floats as [0, 1] when they fit, else as [0, 255].
    """
    if array.dtype == bool:
        return array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("The image array contains NaN or infinite values.")
        return np.clip(array / (1.0 if array.max(initial=0.0) <= 1.0 else 255.0), 0.0, 1.0)
    if array.dtype == np.uint8:
        return array / 255.0
    if array.dtype == np.uint16:
        return array / 65535.0
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(array / (255.0 if array.max(initial=0) <= 255 else 65535.0), 0.0, 1.0)
    raise ValueError(f"Unsupported image array dtype {array.dtype}: use bool, uint8, uint16 or float.")


def to_rgb_image(image: ImageLike) -> Image.Image:
    """
    Convert an image in any PIL mode (RGB, L, LA, P, RGBA, CMYK, I;16, I, F, ...), a numpy array (HxW, HxWx1, HxWx3,
    HxWx4; uint8, uint16 or float in [0, 1] or [0, 255]) or an image file path to an 8-bit RGB PIL image. Alpha is
    dropped; 16-bit and float content is scaled to 8 bits.
    """
    if isinstance(image, (str, Path)):
        image = open_image(image)
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            image = np.asarray(image)
        else:
            return image.convert("RGB")
    if not isinstance(image, np.ndarray):
        raise UnsupportedImageTypeError(
            f"Expected a PIL image, a numpy array or a file path, got {type(image).__name__}. "
            "Convert tensors with `.numpy()` (HxWxC) first."
        )
    array = image
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(
            f"Image array of shape {array.shape} is not supported: use HxW, HxWx1, HxWx3 or HxWx4 (channels last)."
        )
    if array.ndim == 3:
        array = array[..., :3]
    array8 = np.round(_image_array_to_unit_range(array) * 255.0).astype(np.uint8)
    return Image.fromarray(array8).convert("RGB")


def check_unit_interval(name: str, value: Any) -> float:
    """`value` as a float; `ValueError` naming `name` unless it is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    return float(value)


def jet_colormap(values: np.ndarray) -> np.ndarray:
    """
    The "jet" colour map: values in [0, 1] (clipped) -> uint8 RGB, shape `values.shape + (3,)`. 0 is dark blue
    (0, 0, 128), 0.5 light green (128, 255, 128), 1 dark red (128, 0, 0); each channel is
    `clip(1.5 - |4 v - c|, 0, 1)` with c = 3 (red), 2 (green), 1 (blue).
    """
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    channels = np.clip(1.5 - np.abs(4.0 * values[..., None] - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return np.round(channels * 255.0).astype(np.uint8)


def anomaly_heatmap(image: Image.Image, anomaly_map: np.ndarray, alpha: float = DEFAULT_HEATMAP_ALPHA) -> Image.Image:
    """
    Overlay `anomaly_map` (H, W) in [0, 1] on the RGB `image` of the same size: `(1 - alpha) * image + alpha *
    jet(map)`, an RGB PIL image (`alpha` 0 gives the image, 1 the coloured map alone).
    """
    if anomaly_map.shape != (image.height, image.width):
        raise ValueError(
            f"The anomaly map has shape {anomaly_map.shape}, the image is {image.width}x{image.height} (width x "
            "height): the map must have the image's size (H, W)."
        )
    alpha = check_unit_interval("heatmap_alpha", alpha)
    return Image.blend(image.convert("RGB"), Image.fromarray(jet_colormap(anomaly_map)), alpha)


__all__ = [
    "DEFAULT_HEATMAP_ALPHA",
    "ImageLike",
    "UnsupportedImageTypeError",
    "anomaly_heatmap",
    "check_unit_interval",
    "jet_colormap",
    "open_image",
    "to_rgb_image",
]
