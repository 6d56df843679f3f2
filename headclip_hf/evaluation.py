# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Zero-shot evaluation: run a HeadCLIP over an anomaly data set and compute the field's metrics per category.

Maps and masks are compared at the model's working size (the processor resizes both, 518 x 518 by default), as the
AnomalyCLIP protocol does. Under `accelerate`, each process evaluates a contiguous shard of the data set (no sample
is duplicated to even out batches) and the metric states are gathered and merged, so every process returns the
same results. A calibrated model's decisions are reported at its thresholds (`HeadCLIPConfig.calibrated_thresholds`).

`iterate_model_outputs` is the loop itself (batches, categories and model outputs of this process's shard), shared
with `headclip_hf.calibration`; `gather_accumulator` brings the processes' metric states together.
"""

import logging
from collections.abc import Iterator
from typing import Any

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import AnomalyCollator
from .metrics import DEFAULT_NUM_BINS, AnomalyDetectionResults, AnomalyMetricsAccumulator
from .modeling_headclip import HeadCLIPModel, HeadCLIPOutput

logger = logging.getLogger(__name__)


def warn_if_sizes_differ(model: HeadCLIPModel, processor: Any) -> None:
    """Log a warning when the processor prepares images at another size than the model's configured working size."""
    if processor.image_size != model.config.image_size:
        logger.warning(
            f"The processor prepares {processor.image_size} px images but the model's working size is "
            f"{model.config.image_size} px: the model runs at {processor.image_size} px (its positional embeddings "
            "are interpolated to it). Load both at one size to compare with results at the model's size."
        )


def _collate_with_categories(collator: AnomalyCollator):
    def collate(rows: list[dict[str, Any]]) -> tuple[dict, list[str]]:
        return collator(rows), [row["category"] for row in rows]

    return collate


@torch.inference_mode()
def iterate_model_outputs(
    model: HeadCLIPModel,
    processor: Any,
    dataset: datasets.Dataset,
    batch_size: int = 8,
    num_workers: int = 0,
    show_progress: bool = True,
    description: str = "Evaluating",
) -> Iterator[tuple[dict[str, torch.Tensor], list[str], HeadCLIPOutput]]:
    """
    Run `model` over this process's contiguous shard of `dataset` (all of it in a single process), in eval mode (its
    training mode is restored afterwards), on its device and dtype.

    Args:
        model, processor, dataset: as in `evaluate_model`.
        batch_size, num_workers: the `DataLoader` settings.
        show_progress: show a progress bar titled `description` (on the main process only).

    Yields:
        Per batch of B images: the inputs of `AnomalyCollator` (`pixel_values`, `masks` [B, S, S], `labels` [B],
        `mask_valid` [B], on the CPU), the B categories, and the model's outputs.
    """
    state = PartialState()
    shard = dataset.shard(num_shards=state.num_processes, index=state.process_index, contiguous=True)
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_with_categories(AnomalyCollator(processor)),
    )
    was_training = model.training
    model.eval()
    device, dtype = model.device, model.dtype
    try:
        for batch, categories in tqdm(
            loader, desc=description, unit="batch", disable=not (show_progress and state.is_main_process)
        ):
            yield batch, categories, model(pixel_values=batch["pixel_values"].to(device=device, dtype=dtype))
    finally:
        model.train(was_training)


def gather_accumulator(accumulator: AnomalyMetricsAccumulator) -> AnomalyMetricsAccumulator:
    """Every process's `accumulator` merged into one, the same on every process (`accumulator` itself in one)."""
    if PartialState().num_processes == 1:
        return accumulator
    merged = AnomalyMetricsAccumulator(num_bins=accumulator.num_bins, fpr_limit=accumulator.fpr_limit)
    for process_state in gather_object([accumulator.state_dict()]):
        merged.merge(AnomalyMetricsAccumulator.from_state_dict(process_state))
    return merged


def evaluate_model(
    model: HeadCLIPModel,
    processor: Any,
    dataset: datasets.Dataset,
    batch_size: int = 8,
    num_workers: int = 0,
    num_bins: int = DEFAULT_NUM_BINS,
    show_progress: bool = True,
) -> AnomalyDetectionResults:
    """
    Evaluate `model` on `dataset` (rows of `load_anomaly_dataset`).

    Args:
        model: a HeadCLIP (put in eval mode here; its training mode is restored afterwards).
        processor: the `HeadCLIPProcessor` that prepares images and masks.
        dataset: the data set; pixel metrics use the rows whose `mask_valid` is true.
        batch_size, num_workers: the `DataLoader` settings.
        num_bins: score histogram bins of the streaming pixel metrics.
        show_progress: show a progress bar (on the main process only).

    Returns:
        Per-category and mean metrics (`AnomalyDetectionResults`), identical on every process; for a calibrated model
        also the decisions at its thresholds (`CategoryResult.operating_points`).
    """
    warn_if_sizes_differ(model, processor)
    accumulator = AnomalyMetricsAccumulator(num_bins=num_bins)
    for batch, categories, outputs in iterate_model_outputs(
        model, processor, dataset, batch_size, num_workers, show_progress
    ):
        accumulator.update(
            category=categories,
            labels=batch["labels"],
            scores=outputs.image_score.float().cpu(),
            masks=batch["masks"],
            maps=outputs.anomaly_map.float().cpu(),
            mask_valid=batch["mask_valid"],
        )
    accumulator = gather_accumulator(accumulator)
    thresholds = {name: model.config.calibrated_thresholds(name) for name in accumulator.categories}
    return accumulator.compute(decision_thresholds=thresholds)


__all__ = ["evaluate_model", "gather_accumulator", "iterate_model_outputs"]
