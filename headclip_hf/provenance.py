# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Provenance of evaluation results: which model produced them, on which data, at which size, with which version.

`headclip evaluate` writes `evaluation_provenance(...)` into `results.json` under "provenance". Its key is
`headclip_parameters_hash(model)`, the SHA-256 of what makes this HeadCLIP's scores and maps its own: the HeadCLIP
parameters (the prompt learner and the head weights, what training changes) and the HeadCLIP settings of its config
(`joint_alpha`, `map_sigma`, `feature_layers`, `few_shot_weight`, ...; not the calibrated thresholds, which change no
score). `headclip push --results` publishes a run only when this hash equals the pushed model's
(`check_results_provenance`), so that numbers on the Hub are the model's own. During LoRA training the model is a PEFT
model whose HeadCLIP modules are trained copies (`modules_to_save`): the hash reads those copies, so it equals the
hash of the merged model that is published. LoRA weights of the backbone are not part of the hash.

`tensors_sha256` is the one way this package fingerprints weights (also `references.reference_model_identity`).
"""

import hashlib
import json
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configuration_headclip import CALIBRATION_FIELDS
from .modeling_headclip import HEADCLIP_MODULES, HeadCLIPModel
from .reporting import PROVENANCE_KEY


def tensors_sha256(named_tensors: Iterable[tuple[str, torch.Tensor]], settings: dict[str, Any]) -> str:
    """
    The SHA-256 hex digest of `settings` (as JSON with sorted keys) and then of each tensor's name, shape and float32
    values, in the given order. It does not depend on the device, nor on the dtype of float32 values cast back to
    float32.

    Args:
        named_tensors (`Iterable[tuple[str, torch.Tensor]]`): `(name, tensor)` pairs, e.g. `named_parameters()`.
        settings (`dict[str, Any]`): JSON-ready values the fingerprinted computation also depends on.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in named_tensors:
        values = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def headclip_parameters_hash(model: nn.Module) -> str:
    """
    The SHA-256 hex digest (`tensors_sha256`) of the HeadCLIP parameters of `model` (a `HeadCLIPModel`, or a PEFT
    model wrapping one), each tensor by its name as in `headclip_hf.adapters.headclip_state_dict`, in name order, and
    of the HeadCLIP fields of its config except the calibrated thresholds (`CALIBRATION_FIELDS`). It changes when a
    HeadCLIP parameter or a setting of the scores and maps changes, not when the model is calibrated, moved or saved
    and loaded.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tensors = {}
    for module_name in HEADCLIP_MODULES:
        module = _module_in_use(getattr(base, module_name))
        tensors.update({f"{module_name}.{name}": tensor for name, tensor in module.state_dict().items()})
    settings = {name: value for name, value in base.config.headclip_fields().items() if name not in CALIBRATION_FIELDS}
    return tensors_sha256(sorted(tensors.items()), settings)


def _module_in_use(module: nn.Module) -> nn.Module:
    """The module that computes: the active trained copy of a PEFT `ModulesToSaveWrapper`, else `module` itself."""
    copies = getattr(module, "modules_to_save", None)
    if copies is None:
        return module
    active = module.active_adapter
    return copies[active if isinstance(active, str) else active[0]]


def evaluation_provenance(
    model: nn.Module,
    processor: Any,
    *,
    data_source: str | os.PathLike,
    model_name_or_path: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """
    The provenance record of an evaluation run of `model`.

    Args:
        model (`HeadCLIPModel`):
            The evaluated model (or a PEFT model wrapping one, during LoRA training).
        processor (`HeadCLIPProcessor`):
            The processor that prepared the images; its size is the run's image size.
        data_source (`str` or `os.PathLike`):
            Where the data came from: a folder, a file or a Hub id.
        model_name_or_path (`str` or `os.PathLike`, *optional*):
            The checkpoint or adapter folder as the user named it; by default the one `model` was loaded from.
        adapter (`str` or `os.PathLike`, *optional*):
            The adapter loaded on top of `model_name_or_path`, if any.

    Returns:
        `dict`: `{"model": {"name_or_path", "adapter", "headclip_parameters_sha256"}, "image_size", "data_source",
        "headclip_hf_version", "date"}` (the date in UTC, ISO 8601).
    """
    from . import __version__

    return {
        "model": {
            "name_or_path": str(model_name_or_path or model.config.name_or_path),
            "adapter": None if adapter is None else str(adapter),
            "headclip_parameters_sha256": headclip_parameters_hash(model),
        },
        "image_size": processor.image_size,
        "data_source": str(data_source),
        "headclip_hf_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def check_results_provenance(results_file: str | os.PathLike, model: HeadCLIPModel) -> None:
    """
    Check that the evaluation run in `results_file` (a `results.json`) was computed with the HeadCLIP parameters of
    `model`.

    Raises:
        `FileNotFoundError`: no file at `results_file`.
        `ValueError`: naming the file, when it is not JSON, is not a JSON object, records no provenance, or records
            another parameter hash than `model`'s.
    """
    results_file = Path(results_file)
    rerun = "evaluate this model (`headclip evaluate DATA --model ... --output_dir DIR`) and pass that DIR instead."
    try:
        results = json.loads(results_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{results_file} is not a JSON file ({error}): {rerun}") from None
    if not isinstance(results, dict):
        raise ValueError(
            f"{results_file} holds a JSON {type(results).__name__}, not the object `headclip evaluate` writes: {rerun}"
        )
    provenance = results.get(PROVENANCE_KEY)
    recorded = provenance.get("model") if isinstance(provenance, dict) else None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("headclip_parameters_sha256"), str):
        raise ValueError(f"{results_file} does not say which model produced it (no {PROVENANCE_KEY!r}): {rerun}")
    expected = headclip_parameters_hash(model)
    if recorded["headclip_parameters_sha256"] != expected:
        adapter = f" with adapter {recorded['adapter']}" if recorded.get("adapter") else ""
        raise ValueError(
            f"{results_file} was computed by another model ({recorded.get('name_or_path')}{adapter}, HeadCLIP "
            f"parameters and settings sha256 {recorded['headclip_parameters_sha256'][:12]}...) than the one being "
            f"pushed (sha256 {expected[:12]}...: other HeadCLIP parameters, or other settings such as joint_alpha or "
            f"map_sigma): {rerun}"
        )


__all__ = ["check_results_provenance", "evaluation_provenance", "headclip_parameters_hash", "tensors_sha256"]
