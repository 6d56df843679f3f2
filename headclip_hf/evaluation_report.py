# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""The HTML evaluation report of `headclip evaluate --report`: the metrics, the plots, and the images to look at.

`write_evaluation_report` writes, next to the results of `save_results`:

- `report.html`: one self-contained page that opens from disk without a server (its pictures are files in
  `report_files/`, linked by relative paths; the plots are those of `plots/`): the metrics table, then per category
  its counts, its plot and a gallery in three sections, each image shown as image | ground truth | heatmap |
  predicted mask with its score, the threshold and the outcome:

  - the highest-scoring normal images (false alarms when at or above the threshold),
  - the lowest-scoring anomalous images (misses when below it),
  - the best detections (the highest-scoring anomalous images not already shown as misses);

- `per_image.csv`: every image's path, category, label, score, predicted label and the threshold that decided it.

The threshold of a category is the model's calibrated one (`config.calibrated_thresholds(category)`) when
it has one, else the category's F1-optimal threshold (`CategoryResult.f1_max_thresholds`, from `headclip_hf.metrics`),
else (a category with one class only) the pipeline's default 0.5; the pixel threshold falls back to the image one.

Memory stays bounded: the scores of all images come from the evaluation itself (`CategoryResult.image_scores`, in the
data set's row order), and the pipeline runs again only on the few images of the galleries.
"""

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import jinja2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .metrics import METRIC_NAMES, AnomalyDetectionResults, CategoryResult, MetricResult
from .modeling_headclip import HeadCLIPModel
from .pipeline_headclip import DEFAULT_THRESHOLD, LABELS, TASK, ZeroShotAnomalyDetectionPipeline
from .reporting import METRIC_TITLES, PER_IMAGE_CSV, PLOTS_DIR, REPORT_FILES_DIR, REPORT_HTML, category_file_names

PER_IMAGE_COLUMNS = ("path", "category", "label", "score", "predicted_label", "threshold")
DEFAULT_GALLERY_SIZE = 3
THUMBNAIL_SIZE = 256
TEMPLATE = Path(__file__).with_name("evaluation_report.html.jinja")


@dataclass(frozen=True)
class ImageScore:
    """One evaluated image: its row in the data set, file, category, label (0 normal, 1 anomalous) and score."""

    index: int
    path: str
    category: str
    label: int
    score: float


@dataclass(frozen=True)
class ReportThresholds:
    """The thresholds that turn a category's scores and maps into decisions, and where each comes from."""

    image_threshold: float
    image_source: str
    pixel_threshold: float
    pixel_source: str


@dataclass
class GallerySection:
    """One gallery section of a category: a title, what it shows, and its images with their pictures' files."""

    title: str
    description: str
    items: list[dict[str, Any]] = field(default_factory=list)


def per_image_scores(dataset: datasets.Dataset, results: AnomalyDetectionResults) -> list[ImageScore]:
    """
    Every evaluated image with its score: `results` (of `evaluate_model` on `dataset`) keep each category's scores in
    the data set's row order, which this pairs with the rows.

    Raises:
        `ValueError`: a category's images or labels differ from the data set's (the results come from another one).
    """
    rows: dict[str, list[tuple[int, int, str]]] = {}
    columns = zip(dataset["category"], dataset["label"], dataset["path"], strict=True)
    for index, (category, label, path) in enumerate(columns):
        rows.setdefault(category, []).append((index, int(label), path))
    images = []
    for name, category in results.categories.items():
        category_rows = rows.get(name, [])
        labels = [label for _, label, _ in category_rows]
        if labels != category.image_labels.astype(int).tolist():
            raise ValueError(
                f"The results of category {name!r} ({len(category.image_labels)} images) do not come from this data "
                f"set ({len(category_rows)} images of {name!r}, or other labels): pass the evaluated data set."
            )
        images += [
            ImageScore(index, path, name, label, float(score))
            for (index, label, path), score in zip(category_rows, category.image_scores, strict=True)
        ]
    return images


def report_thresholds(category: CategoryResult, model: HeadCLIPModel) -> ReportThresholds:
    """The thresholds of `category` (see the module docstring for the order of preference)."""
    calibrated_image, calibrated_pixel = model.config.calibrated_thresholds(category.name)
    image = _threshold(
        calibrated_image,
        category.f1_max_thresholds["image"].value,
        (DEFAULT_THRESHOLD, "the default: image F1 is undefined on this category"),
    )
    pixel = _threshold(
        calibrated_pixel,
        category.f1_max_thresholds["pixel"].value,
        (image[0], "the image threshold: pixel F1 is undefined on this category"),
    )
    return ReportThresholds(*image, *pixel)


def _threshold(calibrated: float | None, f1_optimal: float | None, fallback: tuple[float, str]) -> tuple[float, str]:
    """The calibrated threshold if any, else the F1-optimal one if defined, else `fallback`; and its source."""
    if calibrated is not None:
        return float(calibrated), "calibrated"
    if f1_optimal is not None:
        return f1_optimal, "F1-optimal on this category"
    return fallback


def select_gallery(images: list[ImageScore], size: int) -> dict[str, list[ImageScore]]:
    """
    The gallery of one category's images: up to `size` each of the highest-scoring normal images ("false_alarms"),
    the lowest-scoring anomalous images ("misses") and the highest-scoring other anomalous images ("detections").
    """
    normal = sorted((image for image in images if image.label == 0), key=lambda image: -image.score)
    anomalous = sorted((image for image in images if image.label == 1), key=lambda image: image.score)
    misses = anomalous[:size]
    detections = anomalous[len(misses) :][::-1][:size]
    return {"false_alarms": normal[:size], "misses": misses, "detections": detections}


SECTION_TEXT = {
    "false_alarms": ("Highest-scoring normal images", "false alarms when the score reaches the threshold"),
    "misses": ("Lowest-scoring anomalous images", "misses when the score stays below the threshold"),
    "detections": ("Best detections", "the highest-scoring anomalous images"),
}


def write_evaluation_report(
    output_dir: str | os.PathLike,
    results: AnomalyDetectionResults,
    dataset: datasets.Dataset,
    model: HeadCLIPModel,
    processor: Any,
    *,
    gallery_size: int = DEFAULT_GALLERY_SIZE,
    plots: bool = True,
    model_name: str | None = None,
    dataset_name: str | None = None,
) -> dict[str, Path]:
    """
    Write `report.html`, its pictures in `report_files/` and `per_image.csv` into `output_dir` (see the module
    docstring).

    Args:
        output_dir (`str` or `os.PathLike`): The folder of the evaluation's results (`save_results`).
        results (`AnomalyDetectionResults`): The evaluation of `model` on `dataset` (`evaluate_model`).
        dataset (`datasets.Dataset`): The evaluated rows (`load_anomaly_dataset`).
        model (`HeadCLIPModel`), processor (`HeadCLIPProcessor`): The evaluated model, run again on the gallery images.
        gallery_size (`int`, *optional*, defaults to 3): Images per gallery section.
        plots (`bool`, *optional*, defaults to `True`): Whether `save_results` wrote the plots, shown per category.
        model_name (`str`, *optional*): The model's name in the report (default: `model.config._name_or_path`).
        dataset_name (`str`, *optional*): The data set's name in the report.

    Returns:
        The written paths: keys "report" and "per_image".

    Raises:
        `ValueError`: `results` do not come from `dataset`, or `gallery_size` is below 1.
    """
    if gallery_size < 1:
        raise ValueError(f"gallery_size must be at least 1, got {gallery_size}.")
    output_dir = Path(output_dir)
    images = per_image_scores(dataset, results)
    points = {name: report_thresholds(category, model) for name, category in results.categories.items()}
    per_image_path = output_dir / PER_IMAGE_CSV
    with open(per_image_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(PER_IMAGE_COLUMNS)
        for image in images:
            threshold = points[image.category].image_threshold
            writer.writerow(
                [image.path, image.category, LABELS[image.label], image.score, _decision(image, threshold), threshold]
            )

    detector = ZeroShotAnomalyDetectionPipeline(model=model, processor=processor, task=TASK, device=model.device)
    galleries = {name: select_gallery([i for i in images if i.category == name], gallery_size) for name in points}
    num_items = sum(len(selected) for gallery in galleries.values() for selected in gallery.values())
    categories = []
    file_names = category_file_names(results.categories)  # the plots' names too (`write_results`)
    with tqdm(total=num_items, desc="Report gallery", unit="image") as progress:
        for name, category in results.categories.items():
            sections = []
            for key, selected in galleries[name].items():
                section = GallerySection(*SECTION_TEXT[key])
                for rank, image in enumerate(selected):
                    stem = Path(REPORT_FILES_DIR) / file_names[name] / f"{key}_{rank}"
                    section.items.append(_gallery_item(detector, dataset, image, points[name], output_dir, stem))
                    progress.update()
                sections.append(section)
            plot = Path(PLOTS_DIR) / f"{file_names[name]}.png"
            categories.append(
                {
                    "name": name,
                    "counts": category.counts,
                    "plot": plot.as_posix() if plots and (output_dir / plot).is_file() else None,
                    "point": points[name],
                    "sections": sections,
                }
            )

    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = environment.from_string(TEMPLATE.read_text())
    html = template.render(
        model_name=model_name or model.config._name_or_path,
        dataset_name=dataset_name,
        headers=[METRIC_TITLES[name] for name in METRIC_NAMES],
        rows=[(name, _cells(category.metrics)) for name, category in results.categories.items()],
        mean_cells=_cells(results.mean),
        num_images=len(images),
        categories=categories,
        gallery_size=gallery_size,
        fpr_limit=results.fpr_limit,
    )
    report_path = output_dir / REPORT_HTML
    report_path.write_text(html)
    return {"report": report_path, "per_image": per_image_path}


def _decision(image: ImageScore, threshold: float) -> str:
    return LABELS[int(image.score >= threshold)]


def _cells(metrics: dict[str, MetricResult]) -> list[dict[str, str | None]]:
    """Table cells: the value in percent with one decimal, or "n/a" with the reason as a tooltip."""
    return [
        {"text": f"{100 * metrics[name].value:.1f}", "reason": None}
        if metrics[name].is_defined
        else {"text": "n/a", "reason": metrics[name].reason}
        for name in METRIC_NAMES
    ]


def _gallery_item(
    detector: ZeroShotAnomalyDetectionPipeline,
    dataset: datasets.Dataset,
    image: ImageScore,
    point: ReportThresholds,
    output_dir: Path,
    stem: Path,
) -> dict[str, Any]:
    """Run the pipeline on one gallery image and save its four pictures as thumbnails; the template's fields."""
    row = dataset[image.index]
    picture = row["image"].convert("RGB")
    result = detector(picture, threshold=point.image_threshold, pixel_threshold=point.pixel_threshold)
    if row["mask"] is not None:
        truth = row["mask"].convert("L")
    elif row["mask_valid"]:  # a normal image: an all-normal mask
        truth = Image.new("L", picture.size, 0)
    else:
        truth = None
    files = {
        "image": _save_thumbnail(picture, output_dir, stem, "image.jpg", Image.Resampling.BICUBIC),
        "truth": _save_thumbnail(truth, output_dir, stem, "truth.png", Image.Resampling.NEAREST),
        "heatmap": _save_thumbnail(result["heatmap"], output_dir, stem, "heatmap.jpg", Image.Resampling.BICUBIC),
        "mask": _save_thumbnail(result["mask"], output_dir, stem, "mask.png", Image.Resampling.NEAREST),
    }
    predicted = _decision(image, point.image_threshold)
    return {
        "path": image.path,
        "name": Path(image.path).name,
        "label": LABELS[image.label],
        "score": image.score,
        "predicted": predicted,
        "correct": predicted == LABELS[image.label],
        "anomalous_pixels": float(np.mean(np.asarray(result["mask"]) > 0)),
        "files": files,
    }


def _save_thumbnail(
    picture: Image.Image | None, output_dir: Path, stem: Path, suffix: str, resample: Image.Resampling
) -> str | None:
    """Save `picture` scaled to fit THUMBNAIL_SIZE as `stem`_`suffix` under `output_dir`; its relative URL."""
    if picture is None:
        return None
    scale = THUMBNAIL_SIZE / max(picture.size)
    if scale < 1:
        picture = picture.resize(
            (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), resample
        )
    relative = stem.with_name(f"{stem.name}_{suffix}")
    (output_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    picture.save(output_dir / relative, **({"quality": 90} if suffix.endswith(".jpg") else {}))
    return relative.as_posix()


__all__ = [
    "ImageScore",
    "ReportThresholds",
    "report_thresholds",
    "per_image_scores",
    "select_gallery",
    "write_evaluation_report",
]
