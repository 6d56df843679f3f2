"""Anomaly detection metrics: image AUROC / AP / F1-max, pixel AUROC / AP / F1-max / AUPRO, per category and mean.

This module is the one home of the metric math. Its conventions are those of the field: label / mask value 1 means
anomalous, a higher score means more anomalous, every metric is computed per category and then averaged over
categories, mAD image is the mean of the three image metrics and mAD pixel the mean of the four pixel metrics.

Two ways in, one computation:

- Functions named for what they compute (`image_auroc`, `image_ap`, `image_f1_max`, `pixel_auroc`, `pixel_ap`,
  `pixel_f1_max`, `pixel_aupro`) for arrays held in memory. They return a plain `float`; when a metric is undefined
  (one class only, no masks) they raise `UndefinedMetricError` (a `ValueError`) carrying the reason, the way
  scikit-learn raises on a single class, so an undefined metric can never pass for a number.
- `AnomalyMetricsAccumulator`, which streams batches of any number of categories in bounded memory, merges across
  processes and computes `AnomalyDetectionResults`: per category and mean `MetricResult`s, where an undefined metric
  is `value=None` plus a `reason` (JSON null, "n/a" in markdown), never 0, 0.5 or NaN.

The functions and the accumulator share the pixel-level code below, so they give identical numbers; the `evaluate`
module in `metrics/anomaly_detection` delegates to the accumulator.

Image level. All scores are kept (one float per image, 1,725 for the whole MVTec AD test set) and scikit-learn
computes AUROC (`roc_auc_score`), AP (`average_precision_score`: the step-wise sum of precision times recall
increments, no interpolation) and F1-max (the maximum of 2PR / (P + R) over the points of `precision_recall_curve`).

Pixel level, streaming. Holding every pixel is not an option (463 M pixels for MVTec AD at 518 x 518), so each
category keeps fixed-size histograms over `num_bins` equal bins of [0, 1] (anomaly maps are probabilities):

- `negative_counts[k]` / `positive_counts[k]`: number of normal / anomalous ground-truth pixels whose score falls in
  bin k, i.e. k = floor(score * num_bins), with a score of exactly 1 in the top bin;
- `region_overlap[k]`: sum, over the anomalous pixels in bin k, of 1 / (size of the ground-truth region holding the
  pixel). Regions are the 8-connected components of each mask (`scipy.ndimage.label` with a 3 x 3 structuring
  element, as in the MVTec AD evaluation code), labelled once per image;
- `num_regions`: number of ground-truth regions seen.

Thresholds are the bin edges t_k = k / num_bins and a pixel is predicted anomalous when its score is >= t_k. Summing
the histograms from the top bin down to bin k gives, at t_k, the true positives, the false positives, and the sum
over regions of the fraction of each region above the threshold. From these cumulative sums:

- pixel AUROC: trapezoidal area under the ROC curve through (0, 0) and every occupied threshold;
- pixel AP: sum over thresholds of (recall increment) x precision, scikit-learn's definition;
- pixel F1-max: maximum over thresholds of 2 TP / (2 TP + FP + FN);
- pixel AUPRO: PRO(t) = mean over all regions of the fraction of the region with score >= t (= cumulative
  `region_overlap` / `num_regions`), FPR(t) = false positives / normal pixels (normal pixels of all images, including
  anomaly-free ones). The curve (FPR, PRO) starts at (0, 0); its trapezoidal area for FPR in [0, `fpr_limit`] (0.3),
  with the curve linearly interpolated at exactly FPR = `fpr_limit`, is divided by `fpr_limit`, so a perfect map
  scores 1. This is the definition of the MVTec AD evaluation code (Bergmann et al., IJCV 2021); note that
  AnomalyCLIP's `cal_pro_score` instead samples 200 thresholds and min-max rescales the FPRs below 0.3, which can
  differ slightly.

Operating points (decisions rather than rankings). `image_f1_max_threshold` and
`PixelScoreHistograms.f1_max_threshold` return the F1-max together with the threshold that achieves it (the metrics
above are their first element, so the two cannot disagree); `image_operating_point` and
`PixelScoreHistograms.operating_point` give the confusion counts, precision, recall, false-positive rate and accuracy
at any threshold (`OperatingPoint`). An image threshold is placed halfway between the lowest score it flags and the
highest score it does not (`threshold_between`), so the decisions on the scores it came from do not hinge on the last
bit of a score; a pixel threshold is a bin edge, where the histogram's counts are exact.

The binned metrics are exactly the metrics of the quantised scores floor(score * num_bins) / num_bins: the only
approximation is that two scores in the same bin count as tied. With the default 2**16 bins (a bin is 1.5e-5 wide) the
difference from the unbinned metrics stays far below 1e-3 for real and random maps (the tests check it); maps squeezed
into a tiny range would need more bins (`num_bins`). A power of two makes `score * num_bins` exact in floating
point, so bin edges are exact. The state is O(num_bins) per category whatever the number of images: 1.5 MiB per
category at 2**16 bins, plus 16 bytes per image for the image labels and scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

DEFAULT_NUM_BINS = 2**16
DEFAULT_FPR_LIMIT = 0.3

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
METRIC_NAMES = IMAGE_METRICS + ("mad_image",) + PIXEL_METRICS + ("mad_pixel",)

# 8-connectivity inside each image of a [B, H, W] batch, none across images: one `ndimage.label` call per batch.
_IN_IMAGE_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_IN_IMAGE_8_CONNECTIVITY[1] = True


class UndefinedMetricError(ValueError):
    """A metric is undefined on the given data (one class only, no masks); `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(f"undefined: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class MetricResult:
    """One metric value, or why there is none.

    Args:
        value (`float`, *optional*):
            The metric in [0, 1], or `None` when it is undefined.
        reason (`str`, *optional*):
            Why the metric is undefined (`None` when it is defined).
        num_categories (`int`, *optional*):
            For a mean over categories, how many categories it averages (the defined ones).
    """

    value: float | None
    reason: str | None = None
    num_categories: int | None = None

    @property
    def is_defined(self) -> bool:
        return self.value is not None

    def to_dict(self) -> dict[str, Any]:
        result = {"value": self.value, "reason": self.reason}
        if self.num_categories is not None:
            result["num_categories"] = self.num_categories
        return result


# ---------------------------------------------------------------------------------------------------------------------
# Input conversion and validation
# ---------------------------------------------------------------------------------------------------------------------


def _as_numpy(array: Any) -> np.ndarray:
    """numpy view of a numpy array, a torch tensor (any device; half precision goes to float32) or a nested list."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # a torch.Tensor, without importing torch here
        array = array.detach().cpu()
        if array.is_floating_point() and array.element_size() < 4:  # bfloat16 / float16 have no (exact) numpy twin
            array = array.float()
        array = array.numpy()
    return np.asarray(array)


def _check_binary(array: np.ndarray, name: str) -> np.ndarray:
    """`array` as bool, after checking that it only holds 0 and 1."""
    if array.dtype == bool:
        return array
    if not ((array == 0) | (array == 1)).all():
        found = np.unique(array[(array != 0) & (array != 1)])[:5]
        raise ValueError(
            f"`{name}` must be binary (0/1 or bool, 1 = anomalous); found values such as {found.tolist()}"
            + (" (a 0/255 mask image must be thresholded or divided by 255 first)" if name == "masks" else "")
        )
    return array.astype(bool)


def _check_scores(array: np.ndarray, name: str, *, unit_interval: bool) -> np.ndarray:
    """`array` as float32 / float64 after checking it is finite (and in [0, 1] when `unit_interval`)."""
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise TypeError(f"`{name}` must hold numbers; got dtype {array.dtype}")
    # float16 would overflow at score * 2**16; integers and bools become float32 like the maps models produce.
    array = array if array.dtype == np.float64 else array.astype(np.float32)
    if array.size == 0:
        return array
    low, high = array.min(), array.max()
    if np.isnan(low) or np.isnan(high):
        raise ValueError(f"`{name}` contains NaN")
    if unit_interval and (low < 0 or high > 1):
        raise ValueError(f"`{name}` must lie in [0, 1] (anomaly probabilities); found values in [{low}, {high}]")
    if not unit_interval and not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"`{name}` contains infinite values")
    return array


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated image labels (bool [N]) and scores (float [N])."""
    labels, scores = _as_numpy(labels), _as_numpy(scores)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"`labels` and `scores` must both have shape [N]; got labels {labels.shape} and scores {scores.shape}"
        )
    return _check_binary(labels, "labels"), _check_scores(scores, "scores", unit_interval=False)


def _pixel_inputs(masks: Any, maps: Any, maps_name: str = "maps") -> tuple[np.ndarray, np.ndarray]:
    """Validated masks (bool [N, H, W]) and anomaly maps (float in [0, 1], [N, H, W]), errors naming `maps_name`."""
    masks, maps = _as_numpy(masks), _as_numpy(maps)
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"`masks` and `{maps_name}` must both have shape [N, H, W]; got masks {masks.shape} and {maps_name} "
            f"{maps.shape}"
        )
    return _check_binary(masks, "masks"), _check_scores(maps, maps_name, unit_interval=True)


# ---------------------------------------------------------------------------------------------------------------------
# Image level
# ---------------------------------------------------------------------------------------------------------------------


def _require_both_image_classes(labels: np.ndarray) -> None:
    num_images, num_anomalous = labels.size, int(labels.sum())
    if num_images == 0:
        raise UndefinedMetricError("no images")
    if num_anomalous == num_images:
        raise UndefinedMetricError(f"no normal images (all {num_images} images are anomalous)")
    if num_anomalous == 0:
        raise UndefinedMetricError(f"no anomalous images (all {num_images} images are normal)")


def image_auroc(labels: Any, scores: Any) -> float:
    """Image-level area under the ROC curve.

    Args:
        labels (array-like of shape `(N,)`):
            0 (normal) / 1 (anomalous); numpy, torch or list.
        scores (array-like of shape `(N,)`):
            Anomaly scores, higher = more anomalous.

    Raises:
        `UndefinedMetricError`: when the images are all normal or all anomalous.
    """
    labels, scores = _image_inputs(labels, scores)
    _require_both_image_classes(labels)
    return float(roc_auc_score(labels, scores))


def image_ap(labels: Any, scores: Any) -> float:
    """Image-level average precision (scikit-learn's step-wise definition). Arguments as in `image_auroc`."""
    labels, scores = _image_inputs(labels, scores)
    _require_both_image_classes(labels)
    return float(average_precision_score(labels, scores))


def image_f1_max(labels: Any, scores: Any) -> float:
    """Image-level F1-max: the best F1 over all thresholds. Arguments as in `image_auroc`."""
    return image_f1_max_threshold(labels, scores)[0]


def image_f1_max_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """
    Image-level F1-max and the threshold that achieves it: the operating point of `precision_recall_curve` with the
    highest F1 (the lowest such threshold on ties, as `PixelScoreHistograms.f1_max_threshold`: of equally good
    operating points, the one that misses fewer anomalous images), its threshold placed by `threshold_between` below
    the lowest score it flags. Flagging `scores >= threshold` gives exactly that F1 on these scores.

    Args:
        labels (array-like of shape `(N,)`):
            0 (normal) / 1 (anomalous); numpy, torch or list.
        scores (array-like of shape `(N,)`):
            Anomaly scores, higher = more anomalous.

    Returns:
        `tuple[float, float]`: `(f1_max, threshold)`.

    Raises:
        `UndefinedMetricError`: when the images are all normal or all anomalous.
    """
    labels, scores = _image_inputs(labels, scores)
    _require_both_image_classes(labels)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = f1_scores(precision, recall)
    best = int(np.argmax(f1))  # never the last point (recall 0, no threshold): F1 > 0 where every image is flagged
    lowest_flagged = float(thresholds[best])
    not_flagged = scores[scores < lowest_flagged]
    threshold = threshold_between(float(not_flagged.max()), lowest_flagged) if not_flagged.size else lowest_flagged
    return float(f1[best]), threshold


def f1_scores(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    denominator = precision + recall
    return np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)


def threshold_between(lower: float, upper: float) -> float:
    """
    A decision threshold `t` with `lower < t <= upper`, halfway between them where possible: flagging `score >= t`
    flags `upper` and not `lower`. It is a float32 number whenever one fits in between, so that comparing float32 and
    float64 scores with it makes the same decisions.
    """
    middle = (lower + upper) / 2
    for candidate in (float(np.float32(middle)), middle, upper):
        if lower < candidate <= upper:
            return candidate
    raise ValueError(f"no threshold lies between {lower} and {upper}: `lower` must be < `upper`")


@dataclass(frozen=True)
class OperatingPoint:
    """
    The decisions at one threshold (anomalous when `score >= threshold`) against the ground truth.

    Args:
        threshold (`float`): The decision threshold.
        true_positives, false_positives, true_negatives, false_negatives (`int`): The confusion counts (images or
            pixels; positive = anomalous).
    """

    threshold: float
    true_positives: int
    false_positives: int
    true_negatives: int
    false_negatives: int

    @staticmethod
    def _ratio(numerator: int, denominator: int) -> float | None:
        return numerator / denominator if denominator else None

    @property
    def precision(self) -> float | None:
        """Anomalous among the flagged; `None` when nothing is flagged."""
        return self._ratio(self.true_positives, self.true_positives + self.false_positives)

    @property
    def recall(self) -> float | None:
        """Flagged among the anomalous; `None` without anomalous samples."""
        return self._ratio(self.true_positives, self.true_positives + self.false_negatives)

    @property
    def false_positive_rate(self) -> float | None:
        """Flagged among the normal; `None` without normal samples."""
        return self._ratio(self.false_positives, self.false_positives + self.true_negatives)

    @property
    def accuracy(self) -> float | None:
        """Correct decisions among all samples; `None` without samples."""
        correct = self.true_positives + self.true_negatives
        return self._ratio(correct, correct + self.false_positives + self.false_negatives)

    @property
    def f1(self) -> float | None:
        """2 TP / (2 TP + FP + FN); `None` when there is nothing anomalous and nothing flagged."""
        return self._ratio(
            2 * self.true_positives, 2 * self.true_positives + self.false_positives + self.false_negatives
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the threshold, the counts and the rates (`None` where undefined)."""
        return {
            "threshold": self.threshold,
            "true_positives": self.true_positives,
            "false_positives": self.false_positives,
            "true_negatives": self.true_negatives,
            "false_negatives": self.false_negatives,
            "precision": self.precision,
            "recall": self.recall,
            "false_positive_rate": self.false_positive_rate,
            "accuracy": self.accuracy,
            "f1": self.f1,
        }


def image_operating_point(labels: Any, scores: Any, threshold: float) -> OperatingPoint:
    """The image-level decisions `scores >= threshold` against `labels` ([N] each, as in `image_auroc`)."""
    labels, scores = _image_inputs(labels, scores)
    flagged = scores >= threshold
    true_positives, false_positives = int((flagged & labels).sum()), int((flagged & ~labels).sum())
    num_anomalous = int(labels.sum())
    return OperatingPoint(
        threshold=float(threshold),
        true_positives=true_positives,
        false_positives=false_positives,
        true_negatives=labels.size - num_anomalous - false_positives,
        false_negatives=num_anomalous - true_positives,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Pixel level: streaming histograms
# ---------------------------------------------------------------------------------------------------------------------


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under the polyline (x, y) for x in [x[0], x_max], interpolating y linearly at x_max.

    `x` is non-decreasing and reaches `x_max` (ROC-like curves end at 1).
    """
    end = int(np.searchsorted(x, x_max, side="right"))  # x[:end] <= x_max < x[end:]
    x_kept, y_kept = x[:end], y[:end]
    if end < x.size and x_kept[-1] < x_max:
        y_at_max = y_kept[-1] + (y[end] - y_kept[-1]) * (x_max - x_kept[-1]) / (x[end] - x_kept[-1])
        x_kept, y_kept = np.append(x_kept, x_max), np.append(y_kept, y_at_max)
    return _trapezoid(x_kept, y_kept)


@dataclass
class PixelScoreHistograms:
    """Sufficient statistics of the pixel-level metrics of one category (see the module docstring).

    All fields are plain numpy arrays / ints that add up across batches and processes (`merge`).

    Attributes:
        positive_counts: [num_bins] int64, anomalous pixels per score bin.
        negative_counts: [num_bins] int64, normal pixels per score bin.
        region_overlap: [num_bins] float64, sum of 1 / region size over the anomalous pixels of each bin.
        num_regions: number of ground-truth regions (8-connected components of the masks).
        num_images: number of images with a mask that were added.
    """

    positive_counts: np.ndarray
    negative_counts: np.ndarray
    region_overlap: np.ndarray
    num_regions: int = 0
    num_images: int = 0

    @classmethod
    def empty(cls, num_bins: int = DEFAULT_NUM_BINS) -> PixelScoreHistograms:
        if num_bins < 2:
            raise ValueError(f"`num_bins` must be at least 2; got {num_bins}")
        return cls(
            positive_counts=np.zeros(num_bins, dtype=np.int64),
            negative_counts=np.zeros(num_bins, dtype=np.int64),
            region_overlap=np.zeros(num_bins, dtype=np.float64),
        )

    @property
    def num_bins(self) -> int:
        return self.positive_counts.size

    @property
    def num_positive(self) -> int:
        return int(self.positive_counts.sum())

    @property
    def num_negative(self) -> int:
        return int(self.negative_counts.sum())

    def update(self, masks: np.ndarray, maps: np.ndarray) -> None:
        """Add a batch. `masks`: bool [B, H, W]; `maps`: float [B, H, W] in [0, 1] (already validated)."""
        if masks.shape[0] == 0:
            return
        # Bin index k = floor(score * num_bins), score 1.0 in the top bin; then one bincount over (bin, label) codes.
        codes = (maps * self.num_bins).astype(np.intp)
        np.minimum(codes, self.num_bins - 1, out=codes)
        codes <<= 1
        codes |= masks
        counts = np.bincount(codes.ravel(), minlength=2 * self.num_bins)
        self.negative_counts += counts[0::2]
        self.positive_counts += counts[1::2]

        # Regions: label each mask once; every anomalous pixel adds 1 / (its region's size) to its bin.
        regions, num_regions = ndimage.label(masks, structure=_IN_IMAGE_8_CONNECTIVITY)
        if num_regions:
            region_of_pixel = regions[masks]  # [num anomalous pixels], values 1..num_regions
            region_sizes = np.bincount(region_of_pixel, minlength=num_regions + 1)
            self.region_overlap += np.bincount(
                codes[masks] >> 1, weights=1.0 / region_sizes[region_of_pixel], minlength=self.num_bins
            )
        self.num_regions += num_regions
        self.num_images += masks.shape[0]

    def merge(self, other: PixelScoreHistograms) -> None:
        """Add the statistics of `other` (same `num_bins`) into these."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge histograms with {other.num_bins} bins into ones with {self.num_bins}")
        self.positive_counts += other.positive_counts
        self.negative_counts += other.negative_counts
        self.region_overlap += other.region_overlap
        self.num_regions += other.num_regions
        self.num_images += other.num_images

    def require_both_classes(self) -> None:
        """Raise `UndefinedMetricError` unless there are anomalous and normal ground-truth pixels."""
        if self.num_images == 0:
            raise UndefinedMetricError("no pixel-level ground truth (no image has a mask)")
        if self.num_positive == 0:
            raise UndefinedMetricError(f"no anomalous pixels (all {self.num_images} masks are empty)")
        if self.num_negative == 0:
            raise UndefinedMetricError(f"no normal pixels (all {self.num_images} masks are fully anomalous)")

    def _occupied_bins(self) -> np.ndarray:
        """Indices of the bins holding pixels, highest first: the thresholds of the curves."""
        return np.flatnonzero((self.positive_counts + self.negative_counts) > 0)[::-1]

    def _cumulative(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """True positives, false positives and summed region overlap at each occupied threshold, highest first."""
        self.require_both_classes()
        occupied = self._occupied_bins()
        return (
            np.cumsum(self.positive_counts[occupied]),
            np.cumsum(self.negative_counts[occupied]),
            np.cumsum(self.region_overlap[occupied]),
        )

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(false positive rate, true positive rate), each [T + 1], from (0, 0) to (1, 1)."""
        true_positives, false_positives, _ = self._cumulative()
        fpr = np.concatenate([[0.0], false_positives / self.num_negative])
        tpr = np.concatenate([[0.0], true_positives / self.num_positive])
        return fpr, tpr

    def precision_recall_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision), each [T], for thresholds from the highest to the lowest occupied bin."""
        true_positives, false_positives, _ = self._cumulative()
        return true_positives / self.num_positive, true_positives / (true_positives + false_positives)

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(false positive rate, mean per-region overlap), each [T + 1], from (0, 0) to (1, 1)."""
        _, false_positives, overlap = self._cumulative()
        fpr = np.concatenate([[0.0], false_positives / self.num_negative])
        pro = np.concatenate([[0.0], np.minimum(overlap / self.num_regions, 1.0)])  # clip float round-off
        return fpr, pro

    def auroc(self) -> float:
        return _trapezoid(*self.roc_curve())

    def average_precision(self) -> float:
        recall, precision = self.precision_recall_curve()
        return float(np.sum(np.diff(recall, prepend=0.0) * precision))

    def f1_max(self) -> float:
        return self.f1_max_threshold()[0]

    def f1_max_threshold(self) -> tuple[float, float]:
        """
        Pixel F1-max and the bin edge that achieves it (the lowest one on ties, as `image_f1_max_threshold`: of equally
        good operating points, the one that misses fewer anomalous pixels): `(f1_max, threshold)`; flagging
        `map >= threshold` gives exactly that F1 on the pixels added.
        """
        true_positives, false_positives, _ = self._cumulative()
        f1 = 2 * true_positives / (true_positives + false_positives + self.num_positive)
        best = f1.size - 1 - int(np.argmax(f1[::-1]))  # thresholds run from the highest bin down: the last maximum
        return float(f1[best]), float(self._occupied_bins()[best] / self.num_bins)

    def operating_point(self, threshold: float) -> OperatingPoint:
        """
        The pixel decisions `map >= threshold` against the masks, counted by bin: exact when `threshold` is a bin edge
        (`k / num_bins`, as calibrated pixel thresholds are), otherwise as if it were rounded up to the next edge.
        """
        first_flagged_bin = int(np.ceil(threshold * self.num_bins))
        true_positives = int(self.positive_counts[first_flagged_bin:].sum())
        false_positives = int(self.negative_counts[first_flagged_bin:].sum())
        return OperatingPoint(
            threshold=float(threshold),
            true_positives=true_positives,
            false_positives=false_positives,
            true_negatives=self.num_negative - false_positives,
            false_negatives=self.num_positive - true_positives,
        )

    def aupro(self, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
        if not 0 < fpr_limit <= 1:
            raise ValueError(f"`fpr_limit` must be in (0, 1]; got {fpr_limit}")
        fpr, pro = self.pro_curve()
        return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _pixel_histograms(masks: Any, maps: Any, num_bins: int) -> PixelScoreHistograms:
    histograms = PixelScoreHistograms.empty(num_bins)
    histograms.update(*_pixel_inputs(masks, maps))
    return histograms


def pixel_auroc(masks: Any, maps: Any, *, num_bins: int = DEFAULT_NUM_BINS) -> float:
    """Pixel-level AUROC over all pixels of all images.

    Args:
        masks (array-like of shape `(N, H, W)`):
            Ground truth, 0 (normal) / 1 (anomalous); numpy or torch.
        maps (array-like of shape `(N, H, W)`):
            Anomaly maps in [0, 1].
        num_bins (`int`, *optional*, defaults to `DEFAULT_NUM_BINS`):
            Score histogram resolution (see the module docstring).

    Raises:
        `UndefinedMetricError`: when there are no anomalous or no normal pixels.
    """
    return _pixel_histograms(masks, maps, num_bins).auroc()


def pixel_ap(masks: Any, maps: Any, *, num_bins: int = DEFAULT_NUM_BINS) -> float:
    """Pixel-level average precision. Arguments as in `pixel_auroc`."""
    return _pixel_histograms(masks, maps, num_bins).average_precision()


def pixel_f1_max(masks: Any, maps: Any, *, num_bins: int = DEFAULT_NUM_BINS) -> float:
    """Pixel-level F1-max: the best F1 over all thresholds. Arguments as in `pixel_auroc`."""
    return _pixel_histograms(masks, maps, num_bins).f1_max()


def pixel_aupro(
    masks: Any, maps: Any, *, fpr_limit: float = DEFAULT_FPR_LIMIT, num_bins: int = DEFAULT_NUM_BINS
) -> float:
    """Area under the per-region-overlap curve up to FPR `fpr_limit`, divided by `fpr_limit` (module docstring).

    Arguments as in `pixel_auroc`; regions are the 8-connected components of each mask.
    """
    return _pixel_histograms(masks, maps, num_bins).aupro(fpr_limit)


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class CategoryResult:
    """Metrics of one category.

    Attributes:
        name: the category.
        metrics: a `MetricResult` for each name of `METRIC_NAMES`.
        counts: num_images, num_normal_images, num_anomalous_images, num_pixel_images (images with a mask),
            num_normal_pixels, num_anomalous_pixels, num_regions.
        curves: for plotting, the curves of the defined metrics: "image_roc" and "pixel_roc" (fpr, tpr),
            "image_pr" and "pixel_pr" (recall ascending, precision), "pixel_pro" (fpr, pro). Not serialised.
        image_labels, image_scores: [num_images] the image-level inputs, for plotting score distributions.
        f1_max_thresholds: "image" and "pixel": the threshold of the image (pixel) F1-max, undefined where that is.
        operating_points: "image" and / or "pixel": the decisions at the thresholds given to `compute` (a calibrated
            model's), empty when none were given.
    """

    name: str
    metrics: dict[str, MetricResult]
    counts: dict[str, int]
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    image_labels: np.ndarray | None = field(default=None, repr=False)
    image_scores: np.ndarray | None = field(default=None, repr=False)
    f1_max_thresholds: dict[str, MetricResult] = field(default_factory=dict)
    operating_points: dict[str, OperatingPoint] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": {name: result.to_dict() for name, result in self.metrics.items()},
            "counts": self.counts,
            "f1_max_thresholds": {level: result.to_dict() for level, result in self.f1_max_thresholds.items()},
            "operating_points": {level: point.to_dict() for level, point in self.operating_points.items()},
        }


@dataclass
class AnomalyDetectionResults:
    """Per-category results and their means over categories.

    `mean[name]` averages the categories on which `name` is defined and says how many (`num_categories`); it is
    undefined only when the metric is undefined on every category. The mean of mAD image / mAD pixel is the mean of
    the per-category mADs. Values are fractions in [0, 1]; the markdown report shows percentages.
    """

    categories: dict[str, CategoryResult]
    mean: dict[str, MetricResult]
    num_bins: int = DEFAULT_NUM_BINS
    fpr_limit: float = DEFAULT_FPR_LIMIT

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: undefined values are `None` (null) next to their reason."""
        return {
            "categories": {name: category.to_dict() for name, category in self.categories.items()},
            "mean": {name: result.to_dict() for name, result in self.mean.items()},
            "num_categories": len(self.categories),
            "settings": {"num_bins": self.num_bins, "aupro_fpr_limit": self.fpr_limit},
        }


def _metric_result(compute: Callable[[], float], category: str) -> MetricResult:
    """Run `compute()`; an `UndefinedMetricError` becomes an undefined result whose reason names the category."""
    try:
        return MetricResult(float(compute()))
    except UndefinedMetricError as error:
        return MetricResult(None, f"category '{category}': {error.reason}")


def _f1_max_results(compute: Callable[[], tuple[float, float]], category: str) -> tuple[MetricResult, MetricResult]:
    """`(F1-max, its threshold)` of `compute()` as results, both undefined with the reason when F1-max is."""
    try:
        f1_max, threshold = compute()
    except UndefinedMetricError as error:
        undefined = MetricResult(None, f"category '{category}': {error.reason}")
        return undefined, undefined
    return MetricResult(f1_max), MetricResult(threshold)


def _mean_of_parts(parts: list[MetricResult]) -> MetricResult:
    """mAD: the mean of its parts, undefined (with the first part's reason) when one part is undefined."""
    for part in parts:
        if not part.is_defined:
            return MetricResult(None, part.reason)
    return MetricResult(float(np.mean([part.value for part in parts])))


def _mean_over_categories(categories: dict[str, CategoryResult]) -> dict[str, MetricResult]:
    means = {}
    for name in METRIC_NAMES:
        results = [category.metrics[name] for category in categories.values()]
        values = [result.value for result in results if result.is_defined]
        if values:
            means[name] = MetricResult(float(np.mean(values)), None, num_categories=len(values))
        elif results:
            reason = f"undefined on all {len(results)} categories, e.g. {results[0].reason}"
            means[name] = MetricResult(None, reason, num_categories=0)
        else:
            means[name] = MetricResult(None, "no category was evaluated", num_categories=0)
    return means


# ---------------------------------------------------------------------------------------------------------------------
# Streaming accumulator
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _CategoryState:
    labels: list[np.ndarray]
    scores: list[np.ndarray]
    pixels: PixelScoreHistograms


class AnomalyMetricsAccumulator:
    """Streams batches of image scores and anomaly maps, per category, into the state all metrics need.

    Memory does not grow with the number of pixels: per category the state is the image labels and scores (16 bytes
    an image) and the pixel histograms of `PixelScoreHistograms` (3 x `num_bins` x 8 bytes, 1.5 MiB at 2**16 bins).
    A batch only needs temporary arrays a few times its own size.

    Distributed evaluation: the state is plain numpy arrays that add up (histograms, counts) or concatenate (image
    labels and scores). Give every process its own accumulator, then bring them together with `merge`, e.g. with
    accelerate: `states = accelerate.utils.gather_object([accumulator.state_dict()])`, then
    `AnomalyMetricsAccumulator.from_state_dict(states[0])` merged with the others (drop the samples a distributed
    sampler duplicates to even out the last batch before `update`, as `gather_for_metrics` does).

    Args:
        num_bins (`int`, *optional*, defaults to `DEFAULT_NUM_BINS`):
            Resolution of the pixel score histograms (module docstring); a power of two keeps bin edges exact.
        fpr_limit (`float`, *optional*, defaults to `DEFAULT_FPR_LIMIT`):
            The FPR up to which the PRO curve is integrated for AUPRO.

    Example:
        ```python
        accumulator = AnomalyMetricsAccumulator()
        for batch in dataloader:
            output = model(pixel_values=batch["pixel_values"])
            accumulator.update(
                categories=batch["category"], labels=batch["label"], scores=output.image_score,
                masks=batch["mask"], anomaly_maps=output.anomaly_map,
            )
        results = accumulator.compute()
        results.mean["image_auroc"].value
        ```
    """

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, fpr_limit: float = DEFAULT_FPR_LIMIT):
        if num_bins < 2:
            raise ValueError(f"`num_bins` must be at least 2; got {num_bins}")
        if not 0 < fpr_limit <= 1:
            raise ValueError(f"`fpr_limit` must be in (0, 1]; got {fpr_limit}")
        self.num_bins = num_bins
        self.fpr_limit = fpr_limit
        self._states: dict[str, _CategoryState] = {}

    @property
    def categories(self) -> list[str]:
        """The categories seen so far, in the order they first appeared."""
        return list(self._states)

    def _state(self, category: str) -> _CategoryState:
        if category not in self._states:
            self._states[category] = _CategoryState([], [], PixelScoreHistograms.empty(self.num_bins))
        return self._states[category]

    def update(
        self,
        *,
        categories: str | Sequence[str],
        labels: Any,
        scores: Any,
        masks: Any | None = None,
        anomaly_maps: Any | None = None,
        mask_valid: Any | None = None,
    ) -> None:
        """Add a batch of B images. The keyword names are those of the `evaluate` module's `add_batch`.

        Args:
            categories (`str` or `Sequence[str]`):
                The category of every image (one string) or of each image ([B] strings).
            labels (array-like of shape `(B,)`):
                0 (normal) / 1 (anomalous); numpy, torch or list.
            scores (array-like of shape `(B,)`):
                Image anomaly scores, higher = more anomalous.
            masks (array-like of shape `(B, H, W)`, *optional*):
                Ground-truth masks, 0 / 1 or bool. `None`: no pixel-level ground truth in this batch.
            anomaly_maps (array-like of shape `(B, H, W)`, *optional*):
                Anomaly maps in [0, 1]; required with `masks` (pass neither for image-level only).
            mask_valid (array-like of shape `(B,)`, *optional*):
                Bool; images whose mask is unknown (False) are left out of the pixel metrics. Default: every mask is
                valid.
        """
        labels, scores = _image_inputs(labels, scores)
        batch_size = labels.shape[0]
        if isinstance(categories, str):
            groups = [(categories, slice(None))]
        else:
            names = np.asarray(categories, dtype=object)
            if names.shape != (batch_size,):
                raise ValueError(
                    f"`categories` must be one string or [B] strings; got {names.shape} for B={batch_size}"
                )
            groups = [(name, names == name) for name in dict.fromkeys(names.tolist())]

        if masks is None and mask_valid is not None:
            raise ValueError("`mask_valid` was given without `masks`")
        if (masks is None) != (anomaly_maps is None):
            raise ValueError("`masks` and `anomaly_maps` go together: pass both for pixel-level metrics or neither")
        if masks is not None:
            masks, anomaly_maps = _pixel_inputs(masks, anomaly_maps, "anomaly_maps")
            if masks.shape[0] != batch_size:
                raise ValueError(
                    f"`masks` / `anomaly_maps` need one entry per image; got labels {labels.shape} and masks "
                    f"{masks.shape}"
                )
            valid = np.ones(batch_size, dtype=bool) if mask_valid is None else _as_numpy(mask_valid)
            if valid.shape != (batch_size,):
                raise ValueError(f"`mask_valid` must have shape [B]; got {valid.shape} with labels {labels.shape}")
            valid = _check_binary(valid, "mask_valid")

        for name, selection in groups:
            state = self._state(str(name))
            state.labels.append(labels[selection].copy())  # a copy: the caller may reuse its buffers
            state.scores.append(scores[selection].copy())
            if masks is not None:
                pixel_selection = valid if isinstance(selection, slice) else valid & selection
                if pixel_selection.all():
                    state.pixels.update(masks, anomaly_maps)
                elif pixel_selection.any():
                    state.pixels.update(masks[pixel_selection], anomaly_maps[pixel_selection])

    def merge(self, other: AnomalyMetricsAccumulator) -> AnomalyMetricsAccumulator:
        """Add the state of `other` (e.g. another process's) into this accumulator; returns `self`."""
        if (other.num_bins, other.fpr_limit) != (self.num_bins, self.fpr_limit):
            raise ValueError(
                f"cannot merge an accumulator with num_bins={other.num_bins}, fpr_limit={other.fpr_limit} into one "
                f"with num_bins={self.num_bins}, fpr_limit={self.fpr_limit}"
            )
        for name, other_state in other._states.items():
            state = self._state(name)
            state.labels.extend(other_state.labels)
            state.scores.extend(other_state.scores)
            state.pixels.merge(other_state.pixels)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The whole state as plain numpy arrays and numbers (picklable, for gathering across processes).

        Returns:
            `{"num_bins": int, "fpr_limit": float, "categories": {name: {"labels": bool [N], "scores": float [N],
            "positive_counts": int64 [num_bins], "negative_counts": int64 [num_bins], "region_overlap": float64
            [num_bins], "num_regions": int, "num_pixel_images": int}}}`.
        """
        categories = {}
        for name, state in self._states.items():
            categories[name] = {
                "labels": np.concatenate(state.labels),
                "scores": np.concatenate(state.scores),
                "positive_counts": state.pixels.positive_counts.copy(),
                "negative_counts": state.pixels.negative_counts.copy(),
                "region_overlap": state.pixels.region_overlap.copy(),
                "num_regions": state.pixels.num_regions,
                "num_pixel_images": state.pixels.num_images,
            }
        return {"num_bins": self.num_bins, "fpr_limit": self.fpr_limit, "categories": categories}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AnomalyMetricsAccumulator:
        """Rebuild an accumulator from `state_dict()` output."""
        accumulator = cls(num_bins=int(state["num_bins"]), fpr_limit=float(state["fpr_limit"]))
        for name, category in state["categories"].items():
            pixels = PixelScoreHistograms(
                positive_counts=np.asarray(category["positive_counts"], dtype=np.int64).copy(),
                negative_counts=np.asarray(category["negative_counts"], dtype=np.int64).copy(),
                region_overlap=np.asarray(category["region_overlap"], dtype=np.float64).copy(),
                num_regions=int(category["num_regions"]),
                num_images=int(category["num_pixel_images"]),
            )
            if pixels.num_bins != accumulator.num_bins:
                raise ValueError(f"category '{name}' has {pixels.num_bins} bins; expected {accumulator.num_bins}")
            labels, scores = _image_inputs(category["labels"], category["scores"])
            accumulator._state(name).pixels.merge(pixels)
            accumulator._states[name].labels.append(labels)
            accumulator._states[name].scores.append(scores)
        return accumulator

    def reset(self) -> None:
        """Forget everything added so far."""
        self._states = {}

    def _selected_states(self, category: str | None) -> list[_CategoryState]:
        if category is None:
            return list(self._states.values())
        if category not in self._states:
            raise KeyError(f"no data for category {category!r}; categories seen: {self.categories}")
        return [self._states[category]]

    def image_labels_and_scores(self, category: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The image labels (bool [N]) and scores ([N]) of `category`, or of every category when `None`."""
        states = self._selected_states(category)
        labels = [array for state in states for array in state.labels]
        scores = [array for state in states for array in state.scores]
        return np.concatenate(labels or [np.zeros(0, bool)]), np.concatenate(scores or [np.zeros(0, np.float32)])

    def pixel_histograms(self, category: str | None = None) -> PixelScoreHistograms:
        """The pixel histograms of `category`, or their sum over every category when `None` (a copy)."""
        histograms = PixelScoreHistograms.empty(self.num_bins)
        for state in self._selected_states(category):
            histograms.merge(state.pixels)
        return histograms

    def compute(
        self, decision_thresholds: Mapping[str, tuple[float | None, float | None]] | None = None
    ) -> AnomalyDetectionResults:
        """
        Metrics per category (in order of first appearance) and their means over categories.

        Args:
            decision_thresholds (`Mapping[str, tuple[float | None, float | None]]`, *optional*):
                Per category, the `(image, pixel)` thresholds (either may be `None`) at which to report the decisions
                (`CategoryResult.operating_points`), e.g. those of `headclip_hf.evaluation.decision_thresholds`.

        Returns:
            `AnomalyDetectionResults`.
        """
        decision_thresholds = decision_thresholds or {}
        categories = {
            name: self._compute_category(name, state, decision_thresholds.get(name, (None, None)))
            for name, state in self._states.items()
        }
        return AnomalyDetectionResults(
            categories=categories,
            mean=_mean_over_categories(categories),
            num_bins=self.num_bins,
            fpr_limit=self.fpr_limit,
        )

    def _compute_category(
        self, name: str, state: _CategoryState, decision_thresholds: tuple[float | None, float | None]
    ) -> CategoryResult:
        labels, scores, pixels = np.concatenate(state.labels), np.concatenate(state.scores), state.pixels
        image_f1_max_result, image_threshold = _f1_max_results(lambda: image_f1_max_threshold(labels, scores), name)
        pixel_f1_max_result, pixel_threshold = _f1_max_results(pixels.f1_max_threshold, name)
        metrics = {
            "image_auroc": _metric_result(lambda: image_auroc(labels, scores), name),
            "image_ap": _metric_result(lambda: image_ap(labels, scores), name),
            "image_f1_max": image_f1_max_result,
            "pixel_auroc": _metric_result(pixels.auroc, name),
            "pixel_ap": _metric_result(pixels.average_precision, name),
            "pixel_f1_max": pixel_f1_max_result,
            "pixel_aupro": _metric_result(lambda: pixels.aupro(self.fpr_limit), name),
        }
        metrics["mad_image"] = _mean_of_parts([metrics[metric] for metric in IMAGE_METRICS])
        metrics["mad_pixel"] = _mean_of_parts([metrics[metric] for metric in PIXEL_METRICS])

        curves = {}
        if metrics["image_auroc"].is_defined:
            fpr, tpr, _ = roc_curve(labels, scores)
            precision, recall, _ = precision_recall_curve(labels, scores)  # recall descending: flip to ascending
            curves["image_roc"], curves["image_pr"] = (fpr, tpr), (recall[::-1], precision[::-1])
        if metrics["pixel_auroc"].is_defined:
            curves["pixel_roc"] = pixels.roc_curve()
            curves["pixel_pr"] = pixels.precision_recall_curve()
            curves["pixel_pro"] = pixels.pro_curve()

        num_anomalous = int(labels.sum())
        counts = {
            "num_images": int(labels.size),
            "num_normal_images": int(labels.size) - num_anomalous,
            "num_anomalous_images": num_anomalous,
            "num_pixel_images": pixels.num_images,
            "num_normal_pixels": pixels.num_negative,
            "num_anomalous_pixels": pixels.num_positive,
            "num_regions": pixels.num_regions,
        }
        image_decision, pixel_decision = decision_thresholds
        operating_points = {}
        if image_decision is not None:
            operating_points["image"] = image_operating_point(labels, scores, image_decision)
        if pixel_decision is not None and pixels.num_images:
            operating_points["pixel"] = pixels.operating_point(pixel_decision)
        return CategoryResult(
            name=name,
            metrics={metric: metrics[metric] for metric in METRIC_NAMES},
            counts=counts,
            curves=curves,
            image_labels=labels,
            image_scores=scores,
            f1_max_thresholds={"image": image_threshold, "pixel": pixel_threshold},
            operating_points=operating_points,
        )
