# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Evaluation: run a HeadCLIP over an anomaly data set and compute the field's metrics per category.

Maps and masks are compared at the model's working size, `HeadCLIPConfig.image_size` (the processor resizes both), as
the AnomalyCLIP protocol does; a processor at another size is refused, so that results always say at which size they
were computed. Under `accelerate`, each process evaluates its part of the data set
(`datasets.distributed.split_dataset_by_node`: a contiguous shard of a `Dataset`; whole shards, or every n-th row, of
a streaming `IterableDataset`; no sample is duplicated to even out batches) and the metric states are gathered and
merged, so every process returns the same results. A streaming data set is evaluated in constant memory: rows are
read batch by batch and the metrics are histograms.

Zero-shot: `evaluate_model`. Few-shot: `evaluate_model(..., reference_embeds=...)` with given references, or the
k-shot protocol `evaluate_k_shot`, which draws K normal references per category and seed (from the layout's training
normals, `load_training_normals`, else from the test normals, which are then left out of that category's evaluation)
and reports the mean and standard deviation over the seeds. A calibrated model's decisions are reported at its
thresholds, as the pipeline decides (`decision_thresholds`).

`iterate_model_outputs` is the loop itself (batches, categories and model outputs of this process's shard), shared
with `headclip_hf.calibration`; `gather_accumulator` brings the processes' metric states together.
"""

import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .configuration_headclip import HeadCLIPConfig
from .data import AnomalyCollator, SplitNotFoundError, load_anomaly_dataset
from .metrics import DEFAULT_NUM_BINS, METRIC_NAMES, AnomalyDetectionResults, AnomalyMetricsAccumulator
from .modeling_headclip import HeadCLIPModel, HeadCLIPOutput
from .pipeline_headclip import resolve_thresholds
from .processing_headclip import check_working_size
from .references import encode_reference_images, select_k_shot

logger = logging.getLogger(__name__)


@contextmanager
def _eval_mode(model: HeadCLIPModel) -> Iterator[HeadCLIPModel]:
    """Put `model` in eval mode for the block and restore its training mode afterwards, also after an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _collate_with_categories(collator: AnomalyCollator):
    def collate(rows: list[dict[str, Any]]) -> tuple[dict, list[str]]:
        return collator(rows), [row["category"] for row in rows]

    return collate


@torch.inference_mode()
def iterate_model_outputs(
    model: HeadCLIPModel,
    processor: Any,
    dataset: datasets.Dataset | datasets.IterableDataset,
    batch_size: int = 8,
    num_workers: int = 0,
    show_progress: bool = True,
    description: str = "Evaluating",
    reference_embeds: torch.Tensor | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], list[str], HeadCLIPOutput]]:
    """
    Run `model` over this process's part of `dataset` (`split_dataset_by_node`; all of it in a single process), in eval
    mode (its training mode is restored afterwards), on its device and dtype.

    Args:
        model (`HeadCLIPModel`):
            The model.
        processor (`HeadCLIPProcessor`):
            Prepares images and masks, at the model's working size.
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            Rows of `load_anomaly_dataset`.
        batch_size (`int`, *optional*, defaults to 8):
            Images per forward pass (the `DataLoader`'s batch size).
        num_workers (`int`, *optional*, defaults to 0):
            Data loading processes of the `DataLoader`.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar titled `description` (on the main process only).
        description (`str`, *optional*, defaults to `"Evaluating"`):
            The progress bar's title.
        reference_embeds (`torch.FloatTensor` of shape `(L, M, P)`, *optional*):
            Few-shot references for every image, on the model's device (`evaluate_model`).

    Yields:
        `tuple`: per batch of B images, the inputs of `AnomalyCollator` (`pixel_values` `(B, 3, S, S)`, `masks`
        `(B, S, S)`, `labels` `(B,)`, `mask_valid` `(B,)`, on the CPU), the B categories, and the model's
        `HeadCLIPOutput`.
    """
    state = PartialState()
    shard = split_dataset_by_node(dataset, rank=state.process_index, world_size=state.num_processes)
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_with_categories(AnomalyCollator(processor)),
    )
    device, dtype = model.device, model.dtype
    with _eval_mode(model):
        for batch, categories in tqdm(
            loader, desc=description, unit="batch", disable=not (show_progress and state.is_main_process)
        ):
            pixel_values = batch["pixel_values"].to(device=device, dtype=dtype)
            yield batch, categories, model(pixel_values=pixel_values, reference_embeds=reference_embeds)


def _accumulate(
    model: HeadCLIPModel,
    processor: Any,
    dataset: datasets.Dataset | datasets.IterableDataset,
    accumulator: AnomalyMetricsAccumulator,
    batch_size: int,
    num_workers: int,
    show_progress: bool,
    reference_embeds: torch.Tensor | None = None,
    description: str = "Evaluating",
) -> None:
    """Run `model` over this process's shard of `dataset` and add its scores and maps to `accumulator`."""
    for batch, categories, outputs in iterate_model_outputs(
        model, processor, dataset, batch_size, num_workers, show_progress, description, reference_embeds
    ):
        accumulator.update(
            categories=categories,
            labels=batch["labels"],
            scores=outputs.image_score.float().cpu(),
            masks=batch["masks"],
            anomaly_maps=outputs.anomaly_map.float().cpu(),
            mask_valid=batch["mask_valid"],
        )


def gather_accumulator(accumulator: AnomalyMetricsAccumulator) -> AnomalyMetricsAccumulator:
    """Every process's `accumulator` merged into one, the same on every process (`accumulator` itself in one)."""
    if PartialState().num_processes == 1:
        return accumulator
    merged = AnomalyMetricsAccumulator(num_bins=accumulator.num_bins, fpr_limit=accumulator.fpr_limit)
    for process_state in gather_object([accumulator.state_dict()]):
        merged.merge(AnomalyMetricsAccumulator.from_state_dict(process_state))
    return merged


def decision_thresholds(config: HeadCLIPConfig, category: str | None = None) -> tuple[float | None, float | None]:
    """
    The `(image, pixel)` thresholds at which the pipeline decides for `category` (`resolve_thresholds`, the one rule),
    without its 0.5 default: both `None` for an uncalibrated model, whose decisions fit no category; with only an
    image threshold calibrated, the masks use it, as in the pipeline.
    """
    if config.calibrated_thresholds(category) == (None, None):
        return None, None
    resolved = resolve_thresholds(config, category=category)
    image = None if resolved["threshold_source"] == "default" else resolved["threshold"]
    from_default = resolved["pixel_threshold_source"] == "threshold" and image is None
    return image, None if from_default else resolved["pixel_threshold"]


def _gathered_results(accumulator: AnomalyMetricsAccumulator, model: HeadCLIPModel) -> AnomalyDetectionResults:
    """
    The metrics of every process's accumulated data, identical on every process, with the decisions at the
    thresholds the pipeline would use (`decision_thresholds`; none for an uncalibrated model).
    """
    accumulator = gather_accumulator(accumulator)
    thresholds = {name: decision_thresholds(model.config, name) for name in accumulator.categories}
    return accumulator.compute(decision_thresholds=thresholds)


@torch.inference_mode()
def evaluate_model(
    model: HeadCLIPModel,
    processor: Any,
    dataset: datasets.Dataset | datasets.IterableDataset,
    batch_size: int = 8,
    num_workers: int = 0,
    num_bins: int = DEFAULT_NUM_BINS,
    show_progress: bool = True,
    reference_embeds: torch.Tensor | None = None,
) -> AnomalyDetectionResults:
    """
    Evaluate `model` on `dataset` (rows of `load_anomaly_dataset`).

    Args:
        model (`HeadCLIPModel`):
            The model (put in eval mode here; its training mode is restored afterwards).
        processor (`HeadCLIPProcessor`):
            Prepares images and masks, at the model's working size.
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            The data set, or a streaming one (`load_anomaly_dataset(..., streaming=True)`, never materialised); pixel
            metrics use the rows whose `mask_valid` is true.
        batch_size (`int`, *optional*, defaults to 8):
            Images per forward pass.
        num_workers (`int`, *optional*, defaults to 0):
            Data loading processes of the `DataLoader`.
        num_bins (`int`, *optional*, defaults to `DEFAULT_NUM_BINS`):
            Score histogram bins of the streaming pixel metrics.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar (on the main process only).
        reference_embeds (`torch.FloatTensor` of shape `(L, M, P)`, *optional*):
            Few-shot mode: references for every image (`model.encode_references` or `load_reference_embeds`, at the
            processor's size); zero-shot without them. `evaluate_k_shot` gives each category its own.

    Returns:
        `AnomalyDetectionResults`: per-category and mean metrics, identical on every process; for a calibrated
        model also the decisions at its thresholds (`CategoryResult.operating_points`).

    Raises:
        `ValueError`: when `processor` prepares images at another size than the model's working size, or
            `reference_embeds` does not have the model's `(L, M, P)` shape.
    """
    check_working_size(model, processor)
    if reference_embeds is not None:
        model.check_reference_embeds(reference_embeds)
        reference_embeds = reference_embeds.to(model.device)
    accumulator = AnomalyMetricsAccumulator(num_bins=num_bins)
    _accumulate(model, processor, dataset, accumulator, batch_size, num_workers, show_progress, reference_embeds)
    return _gathered_results(accumulator, model)


# ---------------------------------------------------------------------------------------------------------------------
# The k-shot protocol
# ---------------------------------------------------------------------------------------------------------------------

REFERENCE_SOURCE_TRAIN = "train"
REFERENCE_SOURCE_TEST = "test"


def load_training_normals(
    root: str | os.PathLike | datasets.Dataset | datasets.DatasetDict, **load_arguments: Any
) -> datasets.Dataset | None:
    """
    The normal training images of a data set (`load_anomaly_dataset(root, split="train")`, normal rows: MVTec AD and
    VisA `train/good`), the k-shot protocol's reference pool.

    Args:
        root (`str`, `os.PathLike`, `datasets.Dataset` or `datasets.DatasetDict`):
            The data set, as `load_anomaly_dataset` takes it.
        load_arguments:
            The other keyword arguments of `load_anomaly_dataset` (`layout`, `categories`, `revision`, the column
            names, `skip_unreadable`, `allow_outside_root`, `cache_dir`, ...), as the test data was loaded with, so
            that both splits come from the same source, revision and columns; not `split` or `streaming` (the
            references are drawn from the whole split).

    Returns:
        `datasets.Dataset` or `None`: the normal training rows; `None` when the source has no training split (then
        the protocol draws references from the test normals): a layout or table without a "train" split
        (`SplitNotFoundError`), or a source that is one table, used whole as the test data (Parquet files, a
        `datasets.Dataset`), whose rows are the test rows themselves.

    Raises:
        `ValueError`: a `split` or `streaming=True` in `load_arguments`.
        Every error of `load_anomaly_dataset` other than a missing split (an unreadable meta file or image, ...).
    """
    for argument in ("split", "streaming"):
        value = load_arguments.get(argument)
        if value:
            raise ValueError(f"load_training_normals reads the whole 'train' split: leave out {argument}={value!r}")
    load_arguments.pop("streaming", None)
    one_table = isinstance(root, (datasets.Dataset, datasets.IterableDataset, list, tuple))
    if one_table or (isinstance(root, (str, os.PathLike)) and Path(root).expanduser().is_file()):
        logger.info(f"{root} is one table (the test data): k-shot references come from the test normals.")
        return None
    try:
        train = load_anomaly_dataset(root, split="train", **load_arguments)
    except SplitNotFoundError as error:
        logger.info(f"No training normals in {root} ({error}); k-shot references come from the test normals.")
        return None
    return train.select([index for index, label in enumerate(train["label"]) if label == 0])


@dataclass
class KShotResults:
    """
    Results of the k-shot protocol (`evaluate_k_shot`).

    Args:
        k_shot (`int`):
            Normal reference images per category.
        runs (`dict[int, AnomalyDetectionResults]`):
            Per seed, the evaluation with that seed's references.
        references (`dict[int, dict[str, list[str]]]`):
            Per seed and category, the reference images used, by their `path` (`reference_names`: a file, or for
            table sources whatever the `path` column holds; `"<path> (row i)"` where a path is not unique).
        reference_sources (`dict[str, str]`):
            Per category, where its references came from: "train" (the layout's training normals) or "test" (test
            normals, left out of that category's evaluation).
    """

    k_shot: int
    runs: dict[int, AnomalyDetectionResults]
    references: dict[int, dict[str, list[str]]]
    reference_sources: dict[str, str]

    @property
    def seeds(self) -> list[int]:
        return list(self.runs)

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """
        Per category (and "mean", the mean over categories) and metric: the `mean` and standard deviation `std`
        (numpy's, ddof 0) over the seeds where it is defined, how many seeds that is (`num_seeds`) and the values per
        seed (`None` where undefined); `mean` and `std` are `None` with the `reason` when no seed defines it.
        """
        runs = list(self.runs.values())
        rows = {name: [run.categories[name].metrics for run in runs] for name in runs[0].categories}
        rows["mean"] = [run.mean for run in runs]
        summary = {}
        for row, per_seed in rows.items():
            summary[row] = {}
            for metric in METRIC_NAMES:
                results = [metrics[metric] for metrics in per_seed]
                values = [result.value for result in results if result.is_defined]
                summary[row][metric] = {
                    "mean": float(np.mean(values)) if values else None,
                    "std": float(np.std(values)) if values else None,
                    "num_seeds": len(values),
                    "values": [result.value for result in results],
                    "reason": None if values else results[0].reason,
                }
        return summary

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: k, seeds, the summary, the references per seed and category, and each seed's full results."""
        return {
            "k_shot": self.k_shot,
            "seeds": self.seeds,
            "reference_sources": self.reference_sources,
            "summary": self.summary(),
            "references": {str(seed): files for seed, files in self.references.items()},
            "runs": {str(seed): run.to_dict() for seed, run in self.runs.items()},
        }


def draw_k_shot_references(
    dataset: datasets.Dataset,
    k_shot: int,
    seeds: Sequence[int] = (0,),
    reference_dataset: datasets.Dataset | None = None,
) -> tuple[dict[int, dict[str, list[int]]], dict[str, str]]:
    """
    The references of the k-shot protocol (see `evaluate_k_shot`), without running a model: per seed and category of
    `dataset`, `k_shot` normal rows drawn from `reference_dataset`'s normals of that category, or from the category's
    test normals in `dataset` where `reference_dataset` has none. Cheap (no image is decoded): call it to check a run's
    inputs before loading a model.

    Args:
        dataset (`datasets.Dataset`):
            The test rows (`load_anomaly_dataset`).
        k_shot (`int`):
            Normal references per category.
        seeds (`Sequence[int]`, *optional*, defaults to `(0,)`):
            One draw per seed (distinct).
        reference_dataset (`datasets.Dataset`, *optional*):
            The training normals (`load_training_normals`).

    Returns:
        `tuple`: the draws, seed -> category -> row indices (ascending) into the data set the category's references
        come from, and that source per category: "train" (`reference_dataset`) or "test" (`dataset`).

    Raises:
        `ValueError`: no seeds or repeated seeds, `k_shot` not a whole number or below 1, or a category with fewer
            than `k_shot` normal images to draw from (named, with the count).
    """
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds} is invalid: pass one or more distinct seeds.")
    test_rows = _category_normals(dataset)
    train_rows = _category_normals(reference_dataset) if reference_dataset is not None else {}
    sources = {}
    pools = {}
    for category in dict.fromkeys(dataset["category"]):
        if train_rows.get(category):
            sources[category], pools[category] = REFERENCE_SOURCE_TRAIN, train_rows[category]
        else:
            sources[category], pools[category] = REFERENCE_SOURCE_TEST, test_rows.get(category, [])
    draws = {
        seed: {
            category: select_k_shot(
                pool, k_shot, seed, what=f"normal images of category {category!r} ({sources[category]} split)"
            )
            for category, pool in pools.items()
        }
        for seed in seeds
    }
    return draws, sources


def reference_names(dataset: datasets.Dataset, rows: Sequence[int]) -> list[str]:
    """
    How the k-shot protocol records the references `rows` of `dataset`: their `path` (the image file, or what a table
    source's `path` column holds), followed by " (row i)" where another row of `dataset` has the same path.
    """
    paths = dataset["path"]
    uses = Counter(paths)
    return [paths[row] if uses[paths[row]] == 1 else f"{paths[row]} (row {row})" for row in rows]


@torch.inference_mode()
def evaluate_k_shot(
    model: HeadCLIPModel,
    processor: Any,
    dataset: datasets.Dataset,
    k_shot: int,
    seeds: Sequence[int] = (0,),
    reference_dataset: datasets.Dataset | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    num_bins: int = DEFAULT_NUM_BINS,
    show_progress: bool = True,
) -> KShotResults:
    """
    The k-shot protocol: per seed and category, draw `k_shot` normal reference images of that category, evaluate the
    category with its own references, and report every seed's results and their mean and standard deviation. The
    model is in eval mode throughout (its training mode is restored afterwards); one category's references are held
    at a time.

    References of a category come from `reference_dataset`'s normal rows of that category (the layout's training
    normals, `load_training_normals`) or, where it has none, from the category's test normals in `dataset`, which are
    then left out of that category's evaluation for that seed: a reference is never evaluated. References are rows,
    drawn by index and encoded from the data set's own `image` column, so every source works (folders, Parquet, the
    Hub, in-memory data sets); their `path` is only recorded (`reference_names`). The same seed draws the same rows
    (`draw_k_shot_references`, `select_k_shot`). Every draw is checked before the first forward pass.

    Args:
        model (`HeadCLIPModel`):
            The model.
        processor (`HeadCLIPProcessor`):
            Prepares images and masks, at the model's working size.
        dataset (`datasets.Dataset`):
            The test rows (`load_anomaly_dataset`).
        k_shot (`int`):
            Normal references per category.
        seeds (`Sequence[int]`, *optional*, defaults to `(0,)`):
            One evaluation per seed (distinct).
        reference_dataset (`datasets.Dataset`, *optional*):
            The training normals (`load_training_normals`); `None` draws from the test normals.
        batch_size (`int`, *optional*, defaults to 8):
            Images per forward pass.
        num_workers (`int`, *optional*, defaults to 0):
            Data loading processes of the `DataLoader`.
        num_bins (`int`, *optional*, defaults to `DEFAULT_NUM_BINS`):
            Score histogram bins of the pixel metrics.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show progress bars (on the main process only).

    Returns:
        `KShotResults`.

    Raises:
        `ValueError`: no seeds or repeated seeds, `k_shot` not a whole number or below 1, or a category with fewer
            than `k_shot` normal images to draw from (named, with the count).
    """
    draws, sources = draw_k_shot_references(dataset, k_shot, seeds, reference_dataset)
    check_working_size(model, processor)
    category_rows: dict[str, list[int]] = {}
    for index, category in enumerate(dataset["category"]):
        category_rows.setdefault(category, []).append(index)
    runs = {}
    references = {}
    # In eval mode throughout (not only per category, as `iterate_model_outputs` would): the prompts are encoded once.
    with _eval_mode(model):
        for seed, chosen in draws.items():
            accumulator = AnomalyMetricsAccumulator(num_bins=num_bins)
            references[seed] = {}
            for category, rows in chosen.items():
                source = reference_dataset if sources[category] == REFERENCE_SOURCE_TRAIN else dataset
                references[seed][category] = reference_names(source, rows)
                reference_embeds = encode_reference_images(model, processor, source.select(rows)["image"])
                excluded = set(rows) if sources[category] == REFERENCE_SOURCE_TEST else set()
                evaluated = [index for index in category_rows[category] if index not in excluded]
                _accumulate(
                    model,
                    processor,
                    dataset.select(evaluated),
                    accumulator,
                    batch_size,
                    num_workers,
                    show_progress,
                    reference_embeds,
                    description=f"{k_shot}-shot, seed {seed}, {category}",
                )
            runs[seed] = _gathered_results(accumulator, model)
    return KShotResults(k_shot=k_shot, runs=runs, references=references, reference_sources=sources)


def _category_normals(dataset: datasets.Dataset) -> dict[str, list[int]]:
    """The row indices of the normal rows of `dataset`, per category, in row order."""
    normals: dict[str, list[int]] = {}
    for index, (category, label) in enumerate(zip(dataset["category"], dataset["label"], strict=True)):
        if label == 0:
            normals.setdefault(category, []).append(index)
    return normals


__all__ = [
    "KShotResults",
    "decision_thresholds",
    "draw_k_shot_references",
    "evaluate_k_shot",
    "evaluate_model",
    "gather_accumulator",
    "iterate_model_outputs",
    "load_training_normals",
    "reference_names",
]
