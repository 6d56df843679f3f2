# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Zero-shot evaluation: run a HeadCLIP over an anomaly data set and compute the field's metrics per category.

Maps and masks are compared at the model's working size (the processor resizes both, 518 x 518 by default), as the
AnomalyCLIP protocol does. Under `accelerate`, each process evaluates its part of the data set
(`datasets.distributed.split_dataset_by_node`: a contiguous shard of a `Dataset`; whole shards, or every n-th row, of
a streaming `IterableDataset`; no sample is duplicated to even out batches) and the metric states are gathered and
merged, so every process returns the same results. A streaming data set is evaluated in constant memory: rows are
read batch by batch and the metrics are histograms.
"""

import logging
from typing import Any

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import AnomalyCollator
from .metrics import DEFAULT_NUM_BINS, AnomalyDetectionResults, AnomalyMetricsAccumulator
from .modeling_headclip import HeadCLIPModel

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
def evaluate_model(
    model: HeadCLIPModel,
    processor: Any,
    dataset: datasets.Dataset | datasets.IterableDataset,
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
        dataset: the data set, or a streaming one (`load_anomaly_dataset(..., streaming=True)`, never materialised);
            pixel metrics use the rows whose `mask_valid` is true.
        batch_size, num_workers: the `DataLoader` settings.
        num_bins: score histogram bins of the streaming pixel metrics.
        show_progress: show a progress bar (on the main process only).

    Returns:
        Per-category and mean metrics (`AnomalyDetectionResults`), identical on every process.
    """
    warn_if_sizes_differ(model, processor)
    state = PartialState()
    shard = split_dataset_by_node(dataset, rank=state.process_index, world_size=state.num_processes)
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_with_categories(AnomalyCollator(processor)),
    )
    accumulator = AnomalyMetricsAccumulator(num_bins=num_bins)
    was_training = model.training
    model.eval()
    device, dtype = model.device, model.dtype
    for batch, categories in tqdm(
        loader, desc="Evaluating", unit="batch", disable=not (show_progress and state.is_main_process)
    ):
        outputs = model(pixel_values=batch["pixel_values"].to(device=device, dtype=dtype))
        accumulator.update(
            category=categories,
            labels=batch["labels"],
            scores=outputs.image_score.float().cpu(),
            masks=batch["masks"],
            maps=outputs.anomaly_map.float().cpu(),
            mask_valid=batch["mask_valid"],
        )
    model.train(was_training)
    if state.num_processes > 1:
        merged = AnomalyMetricsAccumulator(num_bins=num_bins)
        for process_state in gather_object([accumulator.state_dict()]):
            merged.merge(AnomalyMetricsAccumulator.from_state_dict(process_state))
        accumulator = merged
    return accumulator.compute()


__all__ = ["evaluate_model"]
