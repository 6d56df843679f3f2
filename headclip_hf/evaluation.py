# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Zero-shot evaluation: run a HeadCLIP over an anomaly data set and compute the field's metrics per category.

Maps and masks are compared at the model's working size, `HeadCLIPConfig.image_size` (the processor resizes both), as
the AnomalyCLIP protocol does; a processor at another size is refused, so that results always say at which size they
were computed. Under `accelerate`, each process evaluates a contiguous shard of the data set (no sample
is duplicated to even out batches) and the metric states are gathered and merged, so every process returns the
same results.
"""

from typing import Any

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import AnomalyCollator
from .metrics import DEFAULT_NUM_BINS, AnomalyDetectionResults, AnomalyMetricsAccumulator
from .modeling_headclip import HeadCLIPModel


def check_working_size(model: HeadCLIPModel, processor: Any) -> None:
    """
    The one rule for the working size: evaluation and training run at the model's `config.image_size`.

    Raises:
        `ValueError`: when the processor prepares images at another size, saying how to load both at one size.
    """
    if processor.image_size != model.config.image_size:
        raise ValueError(
            f"The processor prepares {processor.image_size} px images but the model's working size "
            f"(HeadCLIPConfig.image_size) is {model.config.image_size} px: load both at one size, e.g. "
            f"load_headclip_model_and_processor(..., image_size={processor.image_size}) or "
            f"HeadCLIPProcessor.from_pretrained(..., size={model.config.image_size})."
        )


def _collate_with_categories(collator: AnomalyCollator):
    def collate(rows: list[dict[str, Any]]) -> tuple[dict, list[str]]:
        return collator(rows), [row["category"] for row in rows]

    return collate


@torch.inference_mode()
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
        model (`HeadCLIPModel`):
            The model (put in eval mode here; its training mode is restored afterwards).
        processor (`HeadCLIPProcessor`):
            Prepares images and masks, at the model's working size.
        dataset (`datasets.Dataset`):
            The data set; pixel metrics use the rows whose `mask_valid` is true.
        batch_size (`int`, *optional*, defaults to 8):
            Images per forward pass.
        num_workers (`int`, *optional*, defaults to 0):
            Data loading processes of the `DataLoader`.
        num_bins (`int`, *optional*, defaults to `DEFAULT_NUM_BINS`):
            Score histogram bins of the streaming pixel metrics.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar (on the main process only).

    Returns:
        `AnomalyDetectionResults`: per-category and mean metrics, identical on every process.

    Raises:
        `ValueError`: when `processor` prepares images at another size than the model's working size.
    """
    check_working_size(model, processor)
    state = PartialState()
    shard = dataset.shard(num_shards=state.num_processes, index=state.process_index, contiguous=True)
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
            categories=categories,
            labels=batch["labels"],
            scores=outputs.image_score.float().cpu(),
            masks=batch["masks"],
            anomaly_maps=outputs.anomaly_map.float().cpu(),
            mask_valid=batch["mask_valid"],
        )
    model.train(was_training)
    if state.num_processes > 1:
        merged = AnomalyMetricsAccumulator(num_bins=num_bins)
        for process_state in gather_object([accumulator.state_dict()]):
            merged.merge(AnomalyMetricsAccumulator.from_state_dict(process_state))
        accumulator = merged
    return accumulator.compute()


__all__ = ["check_working_size", "evaluate_model"]
