"""`evaluate` module for zero-shot anomaly detection: image AUROC / AP / F1-max, pixel AUROC / AP / F1-max / AUPRO.

Load it from the repository root, also offline (`HF_HUB_OFFLINE=1`): evaluate resolves a local folder holding a
script of the same name before it ever asks the Hub.

    >>> import evaluate
    >>> metric = evaluate.load("metrics/anomaly_detection")

The math lives in `headclip_hf.metrics` (this script only delegates, so the numbers are those of
`AnomalyMetricsAccumulator` and of the `image_*` / `pixel_*` functions); `headclip_hf` must be importable.

Storage. A stock evaluate metric writes every example it is given to an Arrow cache, which for anomaly maps would
be every pixel (463 M for MVTec AD at 518 x 518). Here `add_batch` instead folds the batch into an in-memory
`AnomalyMetricsAccumulator` (fixed-size histograms per category), and `compute` hands evaluate one row of these
sufficient statistics per category. evaluate's own machinery then does the rest unchanged, including distributed
evaluation: with `num_process` / `process_id` each process writes its rows to the shared cache and process 0 merges
the rows of all processes (histograms add, image scores concatenate) before computing.
"""

import datasets
import evaluate

from headclip_hf.metrics import DEFAULT_FPR_LIMIT, DEFAULT_NUM_BINS, AnomalyMetricsAccumulator

_DESCRIPTION = """
Anomaly detection metrics, per category and averaged over categories. Image level (from one score per image):
AUROC, AP, F1-max and their mean mAD image. Pixel level (from anomaly maps in [0, 1] and binary masks): AUROC, AP,
F1-max, AUPRO (mean per-region overlap integrated up to a false positive rate of 0.3, divided by 0.3) and their mean
mAD pixel. Pixel metrics are computed in bounded memory from per-category score histograms (2**16 bins by default).
A metric that is undefined on a category (only one class of images, no masks) is returned as `None` with a reason,
never as a number; means skip undefined categories and say how many they cover.
"""

_CITATION = """
@article{bergmann2021mvtec,
  title={The MVTec Anomaly Detection Dataset: A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author={Bergmann, Paul and Batzner, Kilian and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  journal={International Journal of Computer Vision},
  volume={129},
  number={4},
  pages={1038--1059},
  year={2021}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    categories (`str` or `list[str]`): the category of every image of the batch, or of each image ([B]).
    labels (`list[int]` or array [B]): 0 = normal image, 1 = anomalous image.
    scores (`list[float]` or array [B]): image anomaly scores, higher = more anomalous.
    masks (array [B, H, W], *optional*): binary ground-truth masks (1 = anomalous pixel); numpy or torch.
    anomaly_maps (array [B, H, W], *optional*): anomaly maps in [0, 1]; required with `masks`.
    mask_valid (array [B] of bool, *optional*): False for images whose mask is unknown (left out of pixel metrics).
Load-time options (`evaluate.load("metrics/anomaly_detection", num_bins=..., fpr_limit=...)`):
    num_bins (`int`, defaults to 2**16): resolution of the pixel score histograms.
    fpr_limit (`float`, defaults to 0.3): FPR up to which AUPRO integrates the per-region overlap curve.
Returns:
    `dict`: `AnomalyDetectionResults.to_dict()`: "categories" -> name -> {"metrics": {metric: {"value", "reason"}},
    "counts": {...}, "f1_max_thresholds": {"image", "pixel"} (each {"value", "reason"}), "operating_points": {}},
    "mean" -> metric -> {"value", "reason", "num_categories"}, "num_categories", "settings".
    Metric names: image_auroc, image_ap, image_f1_max, mad_image, pixel_auroc, pixel_ap, pixel_f1_max,
    pixel_aupro, mad_pixel. Values are fractions in [0, 1], or None with a reason when undefined.
Examples:
    >>> metric = evaluate.load("metrics/anomaly_detection")
    >>> metric.add_batch(categories="bottle", labels=[0, 1], scores=[0.2, 0.9], masks=masks, anomaly_maps=maps)
    >>> results = metric.compute()
    >>> results["mean"]["pixel_aupro"]["value"]
"""

# The per-category statistics of `AnomalyMetricsAccumulator.state_dict()`, in the order of `_compute`'s arguments.
_STATISTICS = (
    "labels",
    "scores",
    "positive_counts",
    "negative_counts",
    "region_overlap",
    "num_regions",
    "num_pixel_images",
)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AnomalyDetection(evaluate.Metric):
    """Streaming anomaly detection metrics; see the module docstring for how the data is stored."""

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, fpr_limit: float = DEFAULT_FPR_LIMIT, **kwargs):
        self.num_bins = num_bins
        self.fpr_limit = fpr_limit
        self._accumulator = AnomalyMetricsAccumulator(num_bins=num_bins, fpr_limit=fpr_limit)
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        # The features are the per-category statistics `compute` writes to evaluate's cache (one row per category
        # per process), i.e. the arrays of `AnomalyMetricsAccumulator.state_dict()`, not the per-image inputs.
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "category": datasets.Value("string"),
                    "labels": datasets.List(datasets.Value("bool")),
                    "scores": datasets.List(datasets.Value("float64")),
                    "positive_counts": datasets.List(datasets.Value("int64")),
                    "negative_counts": datasets.List(datasets.Value("int64")),
                    "region_overlap": datasets.List(datasets.Value("float64")),
                    "num_regions": datasets.Value("int64"),
                    "num_pixel_images": datasets.Value("int64"),
                }
            ),
            reference_urls=[
                "https://www.mvtec.com/company/research/datasets/mvtec-ad",
                "https://arxiv.org/abs/2505.22259",
            ],
        )

    def add_batch(self, *, categories, labels, scores, masks=None, anomaly_maps=None, mask_valid=None):
        """Add a batch of B images (arguments below); only fixed-size per-category statistics are kept."""
        self._accumulator.update(
            categories=categories,
            labels=labels,
            scores=scores,
            masks=masks,
            anomaly_maps=anomaly_maps,
            mask_valid=mask_valid,
        )

    def add(self, *, category, label, score, mask=None, anomaly_map=None):
        """Add one image: `label` 0 / 1, `score` a float, `mask` / `anomaly_map` [H, W] or None."""
        self.add_batch(
            categories=[category],
            labels=[label],
            scores=[score],
            masks=None if mask is None else mask[None],
            anomaly_maps=None if anomaly_map is None else anomaly_map[None],
        )

    def compute(
        self, *, categories=None, labels=None, scores=None, masks=None, anomaly_maps=None, mask_valid=None, **kwargs
    ):
        """Compute the metrics of everything added (plus the batch given here, if any); returns a `dict`."""
        if labels is not None or scores is not None:
            self.add_batch(
                categories=categories,
                labels=labels,
                scores=scores,
                masks=masks,
                anomaly_maps=anomaly_maps,
                mask_valid=mask_valid,
            )
        state = self._accumulator.state_dict()
        self._accumulator.reset()
        if not state["categories"] and self.writer is None:
            raise ValueError("nothing to compute: add images with `add_batch` (or pass them to `compute`) first")
        if state["categories"]:
            rows = [{"category": name, **statistics} for name, statistics in state["categories"].items()]
            super().add_batch(**{column: [row[column] for row in rows] for column in rows[0]})
        return super().compute(**kwargs)

    def _compute(
        self,
        category,
        labels,
        scores,
        positive_counts,
        negative_counts,
        region_overlap,
        num_regions,
        num_pixel_images,
    ):
        accumulator = AnomalyMetricsAccumulator(num_bins=self.num_bins, fpr_limit=self.fpr_limit)
        columns = (labels, scores, positive_counts, negative_counts, region_overlap, num_regions, num_pixel_images)
        # One row per category per process: rows of the same category (from several processes) merge here.
        for name, *values in zip(category, *columns, strict=True):
            statistics = dict(zip(_STATISTICS, values, strict=True))
            state = {"num_bins": self.num_bins, "fpr_limit": self.fpr_limit, "categories": {name: statistics}}
            accumulator.merge(AnomalyMetricsAccumulator.from_state_dict(state))
        return accumulator.compute().to_dict()
