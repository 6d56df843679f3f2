# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Calibrated decisions: the thresholds that turn HeadCLIP's anomaly scores into labels and its maps into masks.

An uncalibrated HeadCLIP labels an image "anomaly" when its joint score is >= 0.5, a number that means nothing for a
given product line. `calibrate` runs the model over a few images of the user's own data (the loop of
`headclip evaluate`, `iterate_model_outputs`) and picks, at the image level and at the pixel level:

- `"f1"` (labelled data with normal and anomalous images, and masks): the threshold that maximises F1 over the images
  (pixels) it is computed from (`image_f1_max_threshold`, `PixelScoreHistograms.f1_max_threshold`). A category's
  threshold (`per_category=True`) is the operating point behind that category's `image_f1_max` / `pixel_f1_max` in
  `headclip evaluate`: the same scores flagged, the same F1. The model-wide threshold maximises F1 over all the images
  pooled; with one category that is the same point, with several it is not (evaluate's F1-max is per category, then
  averaged).
- `"normal_quantile"` (normal images only): the lowest threshold at which at most `target_fpr` of the normal images are
  flagged, and at most `pixel_target_fpr` of their pixels. With N normal images the image rate moves in steps of 1 / N,
  so a target below 1 / N cannot be resolved: the threshold then flags none of them (it lies just above the highest
  normal score), and a warning says which rate the data can resolve. A false-alarm rate of 1% needs at least 100 normal
  images.
- `"auto"`: `"f1"` at each level where both classes are present (images; pixels with masks), else `"normal_quantile"`.

An image threshold lies halfway between the lowest score it flags and the highest score it does not
(`threshold_between`), so the decisions on the calibration images do not hinge on the last bit of a score; a pixel
threshold is an edge of the streaming score histograms (`PixelScoreHistograms`, 2**16 bins of [0, 1]), which keep
the pixel statistics in constant memory however many images there are.

`CalibrationResult.apply(model)` writes the thresholds into the model's config (`image_threshold`, `pixel_threshold`,
per category `image_thresholds` / `pixel_thresholds`, and `calibration`: how they were obtained), which the pipeline,
`headclip detect` and `headclip evaluate` use; `save_pretrained` and adapters carry them.
"""

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from .evaluation import gather_accumulator, iterate_model_outputs
from .metrics import (
    DEFAULT_NUM_BINS,
    AnomalyMetricsAccumulator,
    PixelScoreHistograms,
    UndefinedMetricError,
    image_f1_max_threshold,
    image_operating_point,
    threshold_between,
)
from .modeling_headclip import HeadCLIPModel
from .processing_headclip import check_working_size

logger = logging.getLogger(__name__)

METHODS = ("auto", "f1", "normal_quantile")
# The columns of `load_anomaly_dataset` that calibrating reads.
CALIBRATION_COLUMNS = ("image", "mask", "label", "mask_valid", "category")
DEFAULT_TARGET_FPR = 0.01


@dataclass
class CalibrationResult:
    """
    Calibrated thresholds and how they were obtained (`calibrate`).

    Args:
        image_threshold (`float`): An image is "anomaly" when its score is `>= image_threshold`.
        pixel_threshold (`float`): A pixel is in the mask when its map value is `>= pixel_threshold`.
        calibration (`dict`): The method asked for, the target false-positive rates, the data, the package version and,
            for the whole data set (and per category under `"categories"`), per level (`"image"`, `"pixel"`): the
            method used, the threshold, the normal / anomalous images or pixels it was computed from and what it
            `"achieved"` on the data (`OperatingPoint.to_dict`: confusion counts, precision, recall, false-positive
            rate, accuracy, F1; `None` where undefined).
        image_thresholds (`dict[str, float]`, *optional*): Per-category image thresholds (`per_category=True`).
        pixel_thresholds (`dict[str, float]`, *optional*): Per-category pixel thresholds.
    """

    image_threshold: float
    pixel_threshold: float
    calibration: dict[str, Any]
    image_thresholds: dict[str, float] | None = None
    pixel_thresholds: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The `HeadCLIPConfig` fields this result sets, JSON-ready (what `calibration.json` holds)."""
        return {
            "image_threshold": self.image_threshold,
            "pixel_threshold": self.pixel_threshold,
            "image_thresholds": self.image_thresholds,
            "pixel_thresholds": self.pixel_thresholds,
            "calibration": self.calibration,
        }

    def apply(self, model: HeadCLIPModel) -> HeadCLIPModel:
        """Write the thresholds and their record into `model.config` (replacing earlier ones); returns `model`."""
        for name, value in self.to_dict().items():
            setattr(model.config, name, value)
        model.config.validate()  # the config's own validation (`@strict`), as after any assignment
        return model


def check_calibration_data(
    dataset: datasets.Dataset,
    method: str = "auto",
    target_fpr: float = DEFAULT_TARGET_FPR,
    pixel_target_fpr: float = DEFAULT_TARGET_FPR,
    per_category: bool = False,
) -> None:
    """
    Check the arguments of `calibrate` and that `dataset` holds the images `method` needs, from its columns alone (no
    image is decoded, no model runs), and warn when the normal images are too few to resolve `target_fpr`.

    Raises:
        `ValueError`: an unknown method, a target rate outside (0, 1), a streaming or empty data set, a data set
            without the columns of `load_anomaly_dataset` (`CALIBRATION_COLUMNS`) or with labels other than 0 / 1,
            a data set (or, with `per_category`, a category) without the images the method needs.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown calibration method {method!r}: choose one of {', '.join(METHODS)}.")
    for name, value in (("target_fpr", target_fpr), ("pixel_target_fpr", pixel_target_fpr)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
            raise ValueError(
                f"{name}={value!r} is invalid: it is a false-positive rate and must lie strictly between 0 and 1 "
                "(e.g. 0.01 to flag at most 1% of normal images)."
            )
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(
            f"Calibration needs a datasets.Dataset, got {type(dataset).__name__}: its labels are checked before the "
            "model runs. Load the data without streaming (load_anomaly_dataset(..., streaming=False))."
        )
    if len(dataset) == 0:
        raise ValueError("The calibration data set is empty: calibrating needs images (normal ones at least).")
    missing = [column for column in CALIBRATION_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The calibration data set has no column {', '.join(map(repr, missing))}: calibrating needs the columns "
            f"{', '.join(CALIBRATION_COLUMNS)} of load_anomaly_dataset (it has {', '.join(dataset.column_names)}). "
            "Load the data with load_anomaly_dataset, naming the source's own columns with image_column=, "
            "label_column=, ... where they differ."
        )
    raw_labels = np.asarray(dataset["label"])
    if raw_labels.dtype != bool and not np.isin(raw_labels, (0, 1)).all():
        others = sorted({label for label in raw_labels.tolist() if label not in (0, 1)}, key=repr)
        raise ValueError(
            f"The calibration data set's labels must be 0 (normal) or 1 (anomalous), but its label column also holds "
            f"{', '.join(map(repr, others[:5]))}{' ...' if len(others) > 5 else ''}. Map the labels to 0 / 1 first "
            "(load_anomaly_dataset(..., label_column=...) reads 'good'/'normal' as 0 and defect names as 1)."
        )
    labels = raw_labels.astype(bool)
    mask_valid = np.asarray(dataset["mask_valid"], dtype=bool)
    groups = {"the data set": np.ones(labels.size, dtype=bool)}
    if per_category:
        categories = np.asarray(dataset["category"], dtype=object)
        groups.update({f"category {name!r}": categories == name for name in dict.fromkeys(categories.tolist())})
    for where, selected in groups.items():
        num_anomalous = int(labels[selected].sum())
        num_normal = int(selected.sum()) - num_anomalous
        if num_normal == 0:
            needs = "normal and anomalous images" if method == "f1" else "normal images"
            raise ValueError(
                f"Calibration with method={method!r} needs {needs}, but {where} has no normal images (all "
                f"{num_anomalous} are anomalous). Add images of defect-free items"
                + (" or leave this category out (--categories)." if where != "the data set" else ".")
            )
        if method == "f1" and num_anomalous == 0:
            raise ValueError(
                f"Calibration with method='f1' needs normal and anomalous images, but {where} has only normal ones "
                f"({num_normal}). Use method='normal_quantile' (or 'auto'), which needs normal images only."
            )
        if method == "f1" and not (labels & mask_valid & selected).any():
            raise ValueError(
                f"Calibration with method='f1' needs masks of anomalous images for the pixel threshold, but {where} "
                "has none. Use method='auto': the pixel threshold then comes from the normal images' pixels."
            )
        if method == "normal_quantile" or (method == "auto" and num_anomalous == 0):
            _warn_if_unresolvable(num_normal, target_fpr, "normal images", where)


def _warn_if_unresolvable(num_normal: int, target_fpr: float, what: str, where: str) -> None:
    if num_normal * target_fpr < 1:
        logger.warning(
            f"Only {num_normal} {what} in {where}: the smallest false-positive rate they resolve is 1/{num_normal} = "
            f"{1 / num_normal:.3g}, above the target {target_fpr:g}. The threshold flags none of them (it lies just "
            f"above the highest normal score), and on new {what} the rate is only known to be about "
            f"{1 / num_normal:.3g} or less. A rate of {target_fpr:g} needs at least {math.ceil(1 / target_fpr)} "
            f"{what}."
        )


def calibrate(
    model: HeadCLIPModel,
    processor: Any,
    dataset: datasets.Dataset,
    method: str = "auto",
    target_fpr: float = DEFAULT_TARGET_FPR,
    pixel_target_fpr: float = DEFAULT_TARGET_FPR,
    per_category: bool = False,
    *,
    data_source: str | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    num_bins: int = DEFAULT_NUM_BINS,
    show_progress: bool = True,
) -> CalibrationResult:
    """
    Calibrate the image and pixel thresholds of `model` on `dataset` (see the module docstring for the methods).

    Args:
        model (`HeadCLIPModel`): The model, run in eval mode on its device (its training mode is restored).
        processor (`HeadCLIPProcessor`): Prepares images and masks, as in `evaluate_model`.
        dataset (`datasets.Dataset`): Rows of `load_anomaly_dataset`. Pixel ground truth: the rows with a valid mask,
            and every normal image (all its pixels are normal).
        method (`str`, *optional*, defaults to `"auto"`): `"f1"`, `"normal_quantile"` or `"auto"`.
        target_fpr (`float`, *optional*, defaults to 0.01): `"normal_quantile"`: the largest share of normal images
            the image threshold may flag, in (0, 1).
        pixel_target_fpr (`float`, *optional*, defaults to 0.01): `"normal_quantile"`: the largest share of the normal
            images' pixels the pixel threshold may flag, in (0, 1).
        per_category (`bool`, *optional*, defaults to `False`): Also calibrate each category on its own images
            (`image_thresholds` / `pixel_thresholds`); the model-wide thresholds always come from all the images.
        data_source (`str`, *optional*): What the data is, for the record; defaults to the data set's description.
        batch_size (`int`, *optional*, defaults to 8): Images per forward pass.
        num_workers (`int`, *optional*, defaults to 0): Data loading processes of the `DataLoader`.
        num_bins (`int`, *optional*, defaults to 2**16): Pixel score histogram bins.
        show_progress (`bool`, *optional*, defaults to `True`): Show a progress bar.

    Returns:
        `CalibrationResult`: apply it with `result.apply(model)`.

    Raises:
        `ValueError`: as `check_calibration_data` (before the model runs); non-finite scores or maps; scores (or maps)
            all equal, which no threshold can separate.
    """
    from . import __version__  # here, not at the top: the package's __init__ may import this module

    check_calibration_data(dataset, method, target_fpr, pixel_target_fpr, per_category)
    check_working_size(model, processor)
    target_fpr, pixel_target_fpr = float(target_fpr), float(pixel_target_fpr)  # e.g. numpy scalars, for the record
    # Everything with ground truth (as `evaluate_model`, plus normal images whose masks are unknown), and the normal
    # images alone (the `normal_quantile` statistics).
    accumulator = AnomalyMetricsAccumulator(num_bins=num_bins)
    normal_accumulator = AnomalyMetricsAccumulator(num_bins=num_bins)
    for batch, categories, outputs in iterate_model_outputs(
        model, processor, dataset, batch_size, num_workers, show_progress, description="Calibrating"
    ):
        scores, maps = outputs.image_score.float().cpu(), outputs.anomaly_map.float().cpu()
        _check_finite(scores, maps, categories)
        labels = batch["labels"]
        normal = labels == 0
        accumulator.update(
            categories=categories,
            labels=labels,
            scores=scores,
            masks=batch["masks"],
            anomaly_maps=maps,
            mask_valid=batch["mask_valid"] | normal,
        )
        if normal.any():
            normal_categories = [
                name for name, is_normal in zip(categories, normal.tolist(), strict=True) if is_normal
            ]
            normal_accumulator.update(
                categories=normal_categories,
                labels=labels[normal],
                scores=scores[normal],
                masks=torch.zeros_like(maps[normal]),
                anomaly_maps=maps[normal],
            )
    accumulator, normal_accumulator = gather_accumulator(accumulator), gather_accumulator(normal_accumulator)

    settings = (method, target_fpr, pixel_target_fpr)
    (image_threshold, pixel_threshold), summary = _calibrate_group(None, accumulator, normal_accumulator, *settings)
    calibration = {
        "method": method,
        "target_fpr": target_fpr,
        "pixel_target_fpr": pixel_target_fpr,
        "data": data_source or dataset.info.description or f"a data set of {len(dataset)} images",
        "num_bins": num_bins,
        "package": f"headclip_hf {__version__}",
        **summary,
    }
    result = CalibrationResult(image_threshold, pixel_threshold, calibration)
    if per_category:
        result.image_thresholds, result.pixel_thresholds, calibration["categories"] = {}, {}, {}
        for name in accumulator.categories:
            thresholds, summary = _calibrate_group(name, accumulator, normal_accumulator, *settings)
            result.image_thresholds[name], result.pixel_thresholds[name] = thresholds
            calibration["categories"][name] = summary
    return result


def _check_finite(scores: torch.Tensor, maps: torch.Tensor, categories: list[str]) -> None:
    finite = torch.isfinite(scores) & torch.isfinite(maps).flatten(1).all(dim=1)
    if not finite.all():
        bad = sorted({name for name, ok in zip(categories, finite.tolist(), strict=True) if not ok})
        raise ValueError(
            f"The model produced non-finite scores or maps (NaN or infinity) for {int((~finite).sum())} of the "
            f"{len(categories)} images of a batch (categories {bad}): no threshold can be calibrated from them. Check "
            "the model's weights (NaN after a diverged training?) and dtype (float16 can overflow; use float32)."
        )


def _calibrate_group(
    category: str | None,
    accumulator: AnomalyMetricsAccumulator,
    normal_accumulator: AnomalyMetricsAccumulator,
    method: str,
    target_fpr: float,
    pixel_target_fpr: float,
) -> tuple[tuple[float, float], dict[str, Any]]:
    """The `(image, pixel)` thresholds of `category` (all the data when `None`) and their record."""
    where = "the data set" if category is None else f"category {category!r}"
    labels, scores = accumulator.image_labels_and_scores(category)
    pixels = accumulator.pixel_histograms(category)
    normal_scores = scores[~labels]
    normal_pixels = normal_accumulator.pixel_histograms(category)
    if scores.size > 1 and scores.min() == scores.max():
        raise ValueError(
            f"All {scores.size} image scores of {where} are equal ({scores[0]}): the model does not tell these images "
            "apart, so no threshold can be calibrated. Check the model (a broken checkpoint?) and the data."
        )
    if np.count_nonzero(pixels.positive_counts + pixels.negative_counts) == 1:
        raise ValueError(
            f"Every anomaly-map pixel of {where} has the same score (up to 1/{pixels.num_bins}): the model does not "
            "tell pixels apart, so no pixel threshold can be calibrated. Check the model and the data."
        )
    both_image_classes = 0 < labels.sum() < labels.size
    image_method = method if method != "auto" else ("f1" if both_image_classes else "normal_quantile")
    if image_method == "f1":
        image_threshold = image_f1_max_threshold(labels, scores)[1]
        image_counts = {"num_normal_images": normal_scores.size, "num_anomalous_images": int(labels.sum())}
    else:
        image_threshold = _normal_image_threshold(normal_scores, target_fpr, where)
        image_counts = {"num_normal_images": normal_scores.size, "num_anomalous_images": 0}

    both_pixel_classes = pixels.num_positive > 0 and pixels.num_negative > 0
    pixel_method = method if method != "auto" else ("f1" if both_pixel_classes else "normal_quantile")
    if pixel_method == "f1":
        try:
            pixel_threshold = pixels.f1_max_threshold()[1]
        except UndefinedMetricError as error:
            raise ValueError(
                f"Calibration with method='f1' needs anomalous and normal pixels, but {where} has {error.reason}. "
                "Use method='auto': the pixel threshold then comes from the normal images' pixels."
            ) from error
        pixel_counts = {"num_normal_pixels": pixels.num_negative, "num_anomalous_pixels": pixels.num_positive}
    else:
        _warn_if_unresolvable(normal_pixels.num_negative, pixel_target_fpr, "normal pixels", where)
        pixel_threshold = _normal_pixel_threshold(normal_pixels, pixel_target_fpr)
        pixel_counts = {"num_normal_pixels": normal_pixels.num_negative, "num_anomalous_pixels": 0}

    summary = {
        "image": {
            "method": image_method,
            "threshold": image_threshold,
            **image_counts,
            "achieved": image_operating_point(labels, scores, image_threshold).to_dict(),
        },
        "pixel": {
            "method": pixel_method,
            "threshold": pixel_threshold,
            **pixel_counts,
            "achieved": pixels.operating_point(pixel_threshold).to_dict(),
        },
    }
    return (image_threshold, pixel_threshold), summary


def _normal_image_threshold(normal_scores: np.ndarray, target_fpr: float, where: str) -> float:
    """
    The lowest threshold flagging at most `floor(target_fpr * N)` of the N normal scores, halfway below the lowest
    score it flags (`threshold_between`), or just above the highest normal score when it may flag none.
    """
    descending = np.sort(normal_scores)[::-1]
    allowed = math.floor(target_fpr * descending.size + 1e-9)  # target_fpr < 1, so allowed < N
    highest_kept = float(descending[allowed])
    flagged = descending[descending > highest_kept]
    if flagged.size:
        return threshold_between(highest_kept, float(flagged.min()))
    just_above = float(np.nextafter(np.float32(highest_kept), np.float32(np.inf)))
    if just_above > 1.0:
        raise ValueError(
            f"The highest normal image score of {where} is {highest_kept}: no threshold in [0, 1] leaves it "
            "unflagged. Use a larger target_fpr or check the model."
        )
    return just_above


def _normal_pixel_threshold(normal_pixels: PixelScoreHistograms, pixel_target_fpr: float) -> float:
    """The lowest bin edge at which at most `floor(pixel_target_fpr * N)` of the N normal pixels are flagged."""
    allowed = math.floor(pixel_target_fpr * normal_pixels.num_negative + 1e-9)
    # flagged_from[k]: normal pixels in bins k and above, i.e. flagged at the threshold k / num_bins (non-increasing).
    flagged_from = np.cumsum(normal_pixels.negative_counts[::-1])[::-1]
    first_bin = int(np.count_nonzero(flagged_from > allowed))
    return first_bin / normal_pixels.num_bins


__all__ = ["METHODS", "CalibrationResult", "calibrate", "check_calibration_data"]
