# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""The "zero-shot-anomaly-detection" pipeline: per image a HeadCLIP anomaly score, label, map, mask and heatmap.

This file imports only numpy, PIL, torch and transformers (no relative imports, nothing from headclip_hf), so it ships
as Hub remote code next to a saved HeadCLIP: with `custom_pipelines` in `config.json`,
`pipeline("zero-shot-anomaly-detection", model=<folder or Hub id>, trust_remote_code=True)` works on a machine without
the headclip_hf package. Importing headclip_hf registers the task (`register_pipeline`).

Conventions (all documented on the pipeline's `__call__`):

- The map is computed at the model's working size (518 x 518 by default) and resized back to the input image's own
  width and height by bilinear interpolation of the float map (`align_corners=False`), so it lines up with the image.
- `label` is "anomaly" when `score >= threshold`, else "normal"; the `mask` marks the pixels whose map value is
  `>= pixel_threshold`. Both default to the model's calibrated thresholds (`image_threshold` / `pixel_threshold` of
  its config, set by `headclip calibrate`; per category when the call names one); an uncalibrated model uses 0.5 on
  the joint anomaly score (and logs once that it is uncalibrated) and the image threshold for the mask
  (`resolve_thresholds`).
- The heatmap is the map through the "jet" colour map (blue = normal, red = anomalous; the colour map AnomalyCLIP's
  visualisations use), blended over the image with weight `heatmap_alpha` (0.5).
- Few-shot mode: with `reference_images` (normal images of the same object) or `reference_embeds`, at construction or
  per call, the model compares each patch with the references' patches as well (`HeadCLIPModel.encode_references`).
- Inputs are checked before any forward pass: a list holding one unreadable or empty image raises a `ValueError`
  naming its index and source, and an empty list gives an empty list. A NaN or infinite score or map raises
  [`NonFiniteOutputError`] naming the image: it never becomes a label.
"""

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, Pipeline, PretrainedConfig
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

logger = logging.get_logger(__name__)

TASK = "zero-shot-anomaly-detection"
LABELS = ("normal", "anomaly")
DEFAULT_THRESHOLD = 0.5
DEFAULT_HEATMAP_ALPHA = 0.5


class NonFiniteOutputError(ValueError):
    """The model gave a NaN or infinite anomaly score or map for an image, so no label or mask can be given."""


@dataclass
class _LoadedImage:
    """An input converted to RGB and checked before any forward pass, with a description of where it came from."""

    image: Image.Image
    source: str


def _describe_input(image: Any) -> str:
    """Where an input came from, for messages: its path, or its kind and size."""
    if isinstance(image, (str, Path)):
        return repr(str(image))
    if isinstance(image, np.ndarray):
        return f"a numpy array of shape {image.shape}"
    if isinstance(image, Image.Image):
        return f"a {image.width}x{image.height} PIL image"
    return f"a value of type {type(image).__name__}"


def _check_unit_interval(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    return float(value)


def resolve_thresholds(
    config: PretrainedConfig,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    category: str | None = None,
) -> dict[str, Any]:
    """
    The image and pixel thresholds a detection uses, and where each comes from.

    Args:
        config (`HeadCLIPConfig`): The model's config, whose `calibrated_thresholds(category)` are the defaults.
        threshold (`float`, *optional*): The image threshold asked for; by default the calibrated one, else 0.5.
        pixel_threshold (`float`, *optional*): The pixel threshold asked for; by default the calibrated one, else the
            image threshold.
        category (`str`, *optional*): Use this category's calibrated thresholds where the model has them.

    Returns:
        `dict`: `threshold`, `threshold_source` ("given", "calibrated" or "default"), `pixel_threshold`,
        `pixel_threshold_source` ("given", "calibrated", or "threshold": the image threshold was used).
    """
    calibrated_image, calibrated_pixel = config.calibrated_thresholds(category)
    known_categories = sorted(config.image_thresholds or {})
    if category is not None and known_categories and category not in known_categories:
        logger.warning_once(
            f"The model has no thresholds calibrated for category {category!r} (it has them for {known_categories}): "
            "its model-wide thresholds are used."
        )
    threshold, threshold_source = _first_threshold(threshold, calibrated_image, DEFAULT_THRESHOLD, "default")
    if threshold_source == "default":
        logger.warning_once(
            f"This HeadCLIP model is uncalibrated: labels use score >= {DEFAULT_THRESHOLD} (and masks map >= "
            f"{DEFAULT_THRESHOLD} unless pixel_threshold is given), which fits no category in particular. Calibrate "
            "it on a few images of your own (`headclip calibrate`, or headclip_hf.calibration.calibrate), or pass "
            "threshold=..."
        )
    pixel_threshold, pixel_threshold_source = _first_threshold(
        pixel_threshold, calibrated_pixel, threshold, "threshold"
    )
    return {
        "threshold": float(threshold),
        "threshold_source": threshold_source,
        "pixel_threshold": float(pixel_threshold),
        "pixel_threshold_source": pixel_threshold_source,
    }


def _first_threshold(
    given: float | None, calibrated: float | None, fallback: float, fallback_source: str
) -> tuple[float, str]:
    """The given threshold, else the calibrated one, else `fallback`, with its source."""
    if given is not None:
        return given, "given"
    if calibrated is not None:
        return calibrated, "calibrated"
    return fallback, fallback_source


class ZeroShotAnomalyDetectionPipeline(Pipeline):
    """
    Zero-shot anomaly detection with a HeadCLIP model: per image an anomaly score and label, a pixel anomaly map at the
    image's own size, a binary mask and a heatmap overlay.

    Example:

    ```python
    >>> import headclip_hf  # registers the task
    >>> from transformers import pipeline

    >>> detector = pipeline("zero-shot-anomaly-detection", model="path/to/headclip")
    >>> result = detector("bottle.png")  # the model's calibrated thresholds (0.5 when uncalibrated)
    >>> result["score"], result["label"], result["anomaly_map"].shape  # map at the image's (height, width)
    >>> result["heatmap"].save("bottle_heatmap.png")
    ```

    A published HeadCLIP (config with `custom_pipelines`) loads without the package:
    `pipeline("zero-shot-anomaly-detection", model="user/headclip-mvtec", trust_remote_code=True)`. A model built in
    Python (e.g. `load_headclip_model(base, adapter=...)`) is passed with its processor:
    `pipeline("zero-shot-anomaly-detection", model=model, processor=processor)`.

    The pipeline needs a HeadCLIP model and a HeadCLIP processor (the processor defines the preprocessing, so the
    score equals `model(**processor(images=image)).image_score`). The model runs as given: `from_pretrained` returns
    it in eval mode, where its maps are Gaussian-smoothed; call `model.eval()` on a model fresh from training.

    Few-shot mode: a handful of normal images of the object, given at construction, are encoded once and used for
    every call (a call may pass its own instead):

    ```python
    >>> detector = pipeline("zero-shot-anomaly-detection", model="path/to/headclip", reference_images=["good/000.png"])
    >>> detector("bottle.png")["score"]  # joint score on the combined zero-shot + few-shot map
    ```
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, reference_images: Any = None, reference_embeds: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.model.config, "model_type", None) != "headclip":
            raise ValueError(
                f"The {TASK} pipeline needs a HeadCLIP model, got {type(self.model).__name__}. For a plain CLIP "
                "checkpoint, load it as a HeadCLIP first: `model = HeadCLIPModel.from_pretrained(name)`, "
                "`processor = HeadCLIPProcessor.from_pretrained(name)`, then `pipeline(task, model=model, "
                "processor=processor)`."
            )
        if type(self.processor).__name__ != "HeadCLIPProcessor":
            raise ValueError(
                f"The {TASK} pipeline needs a HeadCLIPProcessor, got {type(self.processor).__name__}: pass "
                "`processor=HeadCLIPProcessor.from_pretrained(...)`."
            )
        # References given here are encoded once and kept for every call.
        self._forward_params.update(self._reference_params(reference_images, reference_embeds))

    def __call__(self, inputs: Any, **kwargs: Any) -> dict[str, Any] | list[dict[str, Any]]:
        """
        Detect anomalies in one image or a list of images.

        Args:
            inputs (`str`, `Path`, `PIL.Image`, `np.ndarray`, or a list of them):
                Image file paths, PIL images in any mode, or numpy arrays (HxW, HxWx1, HxWx3, HxWx4; uint8, uint16 or
                float), converted to RGB as [`HeadCLIPProcessor`] does. An unreadable file raises `ValueError` naming
                it.
            batch_size (`int`, *optional*, defaults to 1):
                Images per model forward pass.
            threshold (`float`, *optional*):
                `label` is "anomaly" when `score >= threshold`, else "normal". Defaults to the model's calibrated
                `image_threshold` (`headclip calibrate`), else 0.5.
            pixel_threshold (`float`, *optional*):
                A pixel is in `mask` when its `anomaly_map` value is `>= pixel_threshold`. Defaults to the model's
                calibrated `pixel_threshold`, else `threshold`.
            category (`str`, *optional*):
                The images' category: its calibrated thresholds (`image_thresholds` / `pixel_thresholds` of the
                model's config) are the defaults where the model has them.
            heatmap_alpha (`float`, *optional*, defaults to 0.5):
                Weight of the coloured map in `heatmap` (0: the image only, 1: the colour map only).
            reference_images (`list` of paths, PIL images or arrays, *optional*):
                Few-shot mode: normal images of the same object, encoded for this call (instead of those given at
                construction).
            reference_embeds (`torch.FloatTensor` of shape `(L, M, P)`, *optional*):
                Few-shot mode: references already encoded by `model.encode_references` at the processor's size.

        Returns:
            A dict per image (a list of dicts for a list input):

            - **score** (`float`) -- the joint anomaly score in [0, 1], the model's `image_score`.
            - **label** (`str`) -- "normal" or "anomaly".
            - **anomaly_map** (`np.ndarray` float32 of shape (height, width)) -- the model's (Gaussian-smoothed) map,
              bilinearly resized from the working size to the input image's own size, in [0, 1].
            - **mask** (`PIL.Image`, mode "L", 0 or 255) -- `anomaly_map >= pixel_threshold`, at the image's size.
            - **heatmap** (`PIL.Image`, RGB) -- the map through the "jet" colour map blended over the image.

            An empty list gives an empty list.

        Raises:
            `ValueError`: an input cannot be read, is empty (0 pixels wide or high) or is not an image (a path, PIL
                image or array; also a `TypeError`); for a list, raised before any forward pass and naming the input's
                index (`inputs[i]`) and source.
            [`NonFiniteOutputError`] (a `ValueError`): the model's score or map for an image holds NaN or infinite
                values (broken weights, or an overflow in reduced precision).
        """
        if isinstance(inputs, (list, tuple)):
            inputs = [self._load_input(image, f"inputs[{index}]") for index, image in enumerate(inputs)]
            if not inputs:
                return []
        elif isinstance(inputs, (str, Path, Image.Image, np.ndarray)):
            inputs = self._load_input(inputs)
        return super().__call__(inputs, **kwargs)

    def _load_input(self, image: Any, position: str | None = None) -> _LoadedImage:
        """
        The RGB image of one input, checked to be readable and not empty; errors name `position` (e.g. "inputs[3]")
        and the input's source.
        """
        source = _describe_input(image) if position is None else f"{position} ({_describe_input(image)})"
        prefix = "" if position is None else f"{source}: "
        try:
            rgb_image = self.processor.to_rgb_image(image)
        except ValueError as error:
            # An input that is not an image keeps its kind (the processor's UnsupportedImageTypeError, also a
            # TypeError); every other problem is a ValueError.
            kind = type(error) if isinstance(error, TypeError) else ValueError
            raise kind(f"{prefix}{error}") from error
        if rgb_image.width == 0 or rgb_image.height == 0:
            raise ValueError(
                f"{source} is an empty image ({rgb_image.width}x{rgb_image.height} pixels, width x height): an image "
                "needs at least one pixel."
            )
        return _LoadedImage(rgb_image, source)

    def _sanitize_parameters(
        self,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        heatmap_alpha: float | None = None,
        category: str | None = None,
        reference_images: Any = None,
        reference_embeds: Any = None,
    ) -> tuple[dict, dict, dict]:
        forward_params = self._reference_params(reference_images, reference_embeds)
        decision = {}  # what decides the labels and masks
        if category is not None:
            if not isinstance(category, str):
                raise ValueError(f"category must be a category name (a string), got {category!r}.")
            decision["category"] = category
        if threshold is not None:
            decision["threshold"] = _check_unit_interval("threshold", threshold)
        if pixel_threshold is not None:
            decision["pixel_threshold"] = _check_unit_interval("pixel_threshold", pixel_threshold)
        postprocess_params = {}
        if heatmap_alpha is not None:
            postprocess_params["heatmap_alpha"] = _check_unit_interval("heatmap_alpha", heatmap_alpha)
        if not hasattr(self, "_postprocess_params"):
            # Called by `Pipeline.__init__` (before it stores the parameters): the defaults of every call.
            self._decision_defaults = decision
        else:
            # Called once per `__call__`: the thresholds of this call, resolved once for all its images.
            decision = {**self._decision_defaults, **decision}
            postprocess_params["thresholds"] = resolve_thresholds(self.model.config, **decision)
        return {}, forward_params, postprocess_params

    def _reference_params(self, reference_images: Any, reference_embeds: Any) -> dict[str, Any]:
        """The few-shot forward parameters: `reference_embeds`, encoded from `reference_images` if given."""
        if reference_images is not None and reference_embeds is not None:
            raise ValueError("Pass either reference_images or reference_embeds, not both.")
        if reference_images is not None:
            if not isinstance(reference_images, (list, tuple)) or len(reference_images) == 0:
                raise ValueError(
                    "reference_images must be a non-empty list of normal images (file paths, PIL images or arrays), "
                    f"got {reference_images!r}."
                )
            images = [
                self._load_input(image, f"reference_images[{index}]").image
                for index, image in enumerate(reference_images)
            ]
            pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                reference_embeds = self.model.encode_references(pixel_values.to(self.device, self.model.dtype))
        if reference_embeds is None:
            return {}
        self.model.check_reference_embeds(reference_embeds)
        return {"reference_embeds": reference_embeds.to(self.device)}

    def preprocess(self, image: Any) -> dict[str, Any]:
        loaded = image if isinstance(image, _LoadedImage) else self._load_input(image)  # streamed inputs load here
        pixel_values = self.processor(images=loaded.image, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "image": loaded.image, "source": loaded.source}

    def _forward(self, model_inputs: dict[str, Any], reference_embeds: torch.Tensor | None = None) -> dict[str, Any]:
        pixel_values = model_inputs["pixel_values"].to(self.model.dtype)
        outputs = self.model(pixel_values=pixel_values, reference_embeds=reference_embeds)
        return {
            "image_score": outputs.image_score,
            "anomaly_map": outputs.anomaly_map,
            "image": model_inputs["image"],
            "source": model_inputs["source"],
        }

    def postprocess(
        self,
        model_outputs: dict[str, Any],
        thresholds: dict[str, Any] | None = None,
        heatmap_alpha: float = DEFAULT_HEATMAP_ALPHA,
    ) -> dict[str, Any]:
        """
        The result of one image. `thresholds` are the call's (`resolve_thresholds`, resolved once per call by
        `_sanitize_parameters`); by default the model's.
        """
        thresholds = resolve_thresholds(self.model.config) if thresholds is None else thresholds
        image = model_outputs["image"]
        score = model_outputs["image_score"][0].item()
        working_map = model_outputs["anomaly_map"][:1, None].float()  # (1, 1, S, S)
        if not math.isfinite(score) or not torch.isfinite(working_map).all():
            raise NonFiniteOutputError(
                f"The model's anomaly score ({score}) or map for {model_outputs['source']} holds NaN or infinite "
                "values, so it gets no label. The model's weights are not finite or its precision overflowed: load "
                "it with headclip_hf's load_headclip_model (which refuses non-finite weights), or run it in float32."
            )
        resized = F.interpolate(working_map, size=(image.height, image.width), mode="bilinear", align_corners=False)
        anomaly_map = resized[0, 0].clamp(0.0, 1.0).numpy()
        mask = Image.fromarray(np.where(anomaly_map >= thresholds["pixel_threshold"], 255, 0).astype(np.uint8))
        return {
            "score": score,
            "label": LABELS[int(score >= thresholds["threshold"])],
            "anomaly_map": anomaly_map,
            "mask": mask,
            "heatmap": self.processor.anomaly_heatmap(image, anomaly_map, heatmap_alpha),
        }


def register_pipeline() -> None:
    """Register the "zero-shot-anomaly-detection" task with transformers' `pipeline` (importing headclip_hf does)."""
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=ZeroShotAnomalyDetectionPipeline, pt_model=AutoModel, type="image"
    )


__all__ = [
    "DEFAULT_HEATMAP_ALPHA",
    "DEFAULT_THRESHOLD",
    "LABELS",
    "TASK",
    "NonFiniteOutputError",
    "ZeroShotAnomalyDetectionPipeline",
    "register_pipeline",
    "resolve_thresholds",
]
