# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""HeadCLIP adapters: the trained HeadCLIP parameters alone, saved apart from the CLIP backbone they adapt.

A trained HeadCLIP differs from its base CLIP only in the prompt learner and the head weights: tens of thousands of
numbers (43,392 for ViT-L/14@336, 170 KB in float32), against 428 M for the backbone. An adapter folder holds:

- `headclip_adapter.safetensors`: those tensors (`prompt_learner.*`, `attention_head_weights.weight`);
- `headclip_adapter_config.json`: the base checkpoint (`base_model_name_or_path`), every HeadCLIP config field (so the
  base is rebuilt as the same HeadCLIP) and a format version.

Saving is atomic: the files are written to a temporary folder next to the target and moved into place, so a crash or
Ctrl-C never leaves a half-written adapter under the final name.

The optional PEFT LoRA path (`headclip_hf.training.add_lora`) saves with PEFT's own `save_pretrained`, where the
HeadCLIP modules travel as `modules_to_save`.
"""

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .configuration_headclip import HeadCLIPConfig
from .files import OutputKind, output_folder
from .modeling_headclip import HEADCLIP_MODULES, HEADCLIP_PARAMETER_PREFIXES, HeadCLIPModel
from .processing_headclip import HeadCLIPProcessor

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "headclip_adapter.safetensors"
ADAPTER_CONFIG_NAME = "headclip_adapter_config.json"
ADAPTER_FORMAT_VERSION = 1
PEFT_CONFIG_NAME = "adapter_config.json"
# Next to a PEFT adapter (LoRA training): the HeadCLIP config fields the model was trained with.
PEFT_HEADCLIP_CONFIG_NAME = "headclip_config.json"
# What the adapter writers put in a folder (see `headclip_hf.files`): an earlier adapter is replaced, other files are
# kept. PEFT's `save_pretrained` writes its weights, config and a model card.
ADAPTER_OUTPUT = OutputKind("HeadCLIP adapter", frozenset({ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME}))
PEFT_ADAPTER_OUTPUT = OutputKind(
    "PEFT adapter",
    frozenset(
        {PEFT_CONFIG_NAME, "adapter_model.safetensors", "adapter_model.bin", "README.md", PEFT_HEADCLIP_CONFIG_NAME}
    ),
)
# from_pretrained arguments that say where and how to fetch files, passed on to the config too.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
# How many tensor names an error about non-finite values lists.
_LISTED_TENSORS = 5


def headclip_state_dict(model: HeadCLIPModel) -> dict[str, torch.Tensor]:
    """The HeadCLIP parameters of `model` (prompt learner and head weights), detached, contiguous, on the CPU."""
    return {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if name.startswith(HEADCLIP_PARAMETER_PREFIXES)
    }


def state_dict_mismatches(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `saved` tensors from loading into `expected` ones: missing and unexpected names, other shapes."""
    problems = [f"missing {name} {tuple(t.shape)}" for name, t in expected.items() if name not in saved]
    problems += [f"unexpected {name}" for name in saved if name not in expected]
    problems += [
        f"{name} has shape {tuple(saved[name].shape)}, the model expects {tuple(t.shape)}"
        for name, t in expected.items()
        if name in saved and saved[name].shape != t.shape
    ]
    return problems


def is_headclip_adapter(path: str | os.PathLike) -> bool:
    """Whether `path` is a local folder holding a HeadCLIP adapter."""
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


def is_peft_adapter(path: str | os.PathLike) -> bool:
    """Whether `path` is a local folder holding a PEFT adapter (HeadCLIP trained with LoRA)."""
    return (Path(path) / PEFT_CONFIG_NAME).is_file()


def save_headclip_adapter(
    model: HeadCLIPModel,
    save_directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """
    Save the HeadCLIP parameters of `model` as an adapter folder, atomically (`headclip_hf.files.output_folder`): an
    earlier adapter there is replaced; a folder holding other files is refused unless `overwrite`.

    Args:
        model ([`HeadCLIPModel`]): The trained model.
        save_directory (`str` or `os.PathLike`): The adapter folder to write.
        base_model_name_or_path (`str`, *optional*): The CLIP checkpoint the adapter applies to; by default the one
            `model` came from.
        overwrite (`bool`, *optional*, defaults to `False`): Replace the adapter files in a folder that also holds
            other files (those stay).

    Returns:
        `Path`: The adapter folder.

    Raises:
        `ValueError`: the base checkpoint is unknown.
        `FileExistsError`, `NotADirectoryError`, `PermissionError`: see [`headclip_hf.files.check_output_folder`].
    """
    save_directory = Path(save_directory)
    with output_folder(save_directory, ADAPTER_OUTPUT, overwrite) as staging:
        write_headclip_adapter(model, staging, base_model_name_or_path)
    return save_directory


def write_headclip_adapter(
    model: HeadCLIPModel, folder: str | os.PathLike, base_model_name_or_path: str | None = None
) -> None:
    """
    Write the adapter files (`ADAPTER_OUTPUT`) of `model` into the existing folder `folder`, for writers that stage
    a folder themselves ([`save_headclip_adapter`], the Hub folder); arguments as [`save_headclip_adapter`].
    """
    base = base_model_name_or_path or model.config._name_or_path
    if not base:
        raise ValueError(
            "The adapter must name its base CLIP checkpoint: pass base_model_name_or_path (the model was not loaded "
            "with from_pretrained, so its origin is unknown)."
        )
    adapter_config = {
        "adapter_format": "headclip",
        "format_version": ADAPTER_FORMAT_VERSION,
        "base_model_name_or_path": str(base),
        "headclip_config": model.config.headclip_fields(),
    }
    folder = Path(folder)
    save_file(headclip_state_dict(model), folder / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def check_finite_tensors(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """
    Raise a `ValueError` naming the floating-point tensors of `tensors` that hold NaN or infinite values, and
    `source` (the file or checkpoint they came from): such a model would give NaN scores and meaningless labels.
    """
    broken = [
        name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if broken:
        listed = ", ".join(broken[:_LISTED_TENSORS])
        more = f" and {len(broken) - _LISTED_TENSORS} more" if len(broken) > _LISTED_TENSORS else ""
        raise ValueError(
            f"Refused to load {source}: the tensors {listed}{more} hold NaN or infinite values, so every score would "
            "be meaningless. The training that wrote them diverged or the file is damaged: use an earlier checkpoint."
        )


def _read_json_object(path: Path, what: str, required: tuple[str, ...] = ()) -> dict:
    """The JSON object in `path`; `ValueError` naming the file when it is not one or lacks a `required` entry."""
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid {what} (not JSON: {error}).") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} is not a valid {what}: expected a JSON object, found {type(content).__name__}.")
    _check_required_entries(content, path, what, required)
    return content


def _check_required_entries(content: dict, path: Path, what: str, required: tuple[str, ...]) -> None:
    missing = [key for key in required if not content.get(key)]
    if missing:
        raise ValueError(
            f"{path} is not a valid {what}: it lacks {', '.join(map(repr, missing))}. Write the adapter again with "
            "headclip_hf (save_headclip_adapter, or training), or add the missing entries."
        )


@contextmanager
def _naming_damaged_weights(source: str | os.PathLike) -> Iterator[None]:
    """Turn safetensors' header errors (a truncated or damaged file) into a `ValueError` naming the file."""
    try:
        yield
    except SafetensorError as error:
        path = Path(source)
        candidates = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
        damaged = [str(file) for file in candidates if not _is_readable_safetensors(file)] or [str(source)]
        raise ValueError(
            f"Cannot read the weights {', '.join(damaged)}: the file is truncated or damaged ({error}). Save or "
            "download it again."
        ) from error


def _is_readable_safetensors(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt"):
            return True
    except SafetensorError:
        return False


def read_adapter_config(adapter_path: str | os.PathLike) -> dict:
    """
    The adapter's JSON config; `ValueError` naming the file when it is missing, not a HeadCLIP adapter config, or
    lacks the base checkpoint (`base_model_name_or_path`) or the HeadCLIP fields (`headclip_config`).
    """
    config_file = Path(adapter_path) / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(f"{adapter_path} is not a HeadCLIP adapter: {ADAPTER_CONFIG_NAME} is missing.")
    what = "HeadCLIP adapter config"
    config = _read_json_object(config_file, what)
    if config.get("adapter_format") != "headclip" or config.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise ValueError(
            f"{config_file} is not a HeadCLIP adapter of format version {ADAPTER_FORMAT_VERSION} "
            f"(adapter_format={config.get('adapter_format')!r}, format_version={config.get('format_version')!r})."
        )
    _check_required_entries(config, config_file, what, ("base_model_name_or_path", "headclip_config"))
    return config


def load_headclip_adapter(model: HeadCLIPModel, adapter_path: str | os.PathLike) -> HeadCLIPModel:
    """
    Load an adapter's tensors into `model` in place. Every HeadCLIP parameter must be in the adapter with the model's
    shape; a missing, unexpected or mis-shaped tensor raises `ValueError` naming it (a model of another shape), and
    so does a tensor holding NaN or infinite values or a truncated weights file.
    """
    read_adapter_config(adapter_path)
    weights_file = Path(adapter_path) / ADAPTER_WEIGHTS_NAME
    with _naming_damaged_weights(weights_file):
        tensors = load_file(weights_file)
    problems = state_dict_mismatches(tensors, headclip_state_dict(model))
    if problems:
        raise ValueError(f"The adapter {weights_file} does not fit this model: " + "; ".join(problems) + ".")
    check_finite_tensors(tensors, f"the adapter {weights_file}")
    model.load_state_dict(tensors, strict=False)
    return model


def load_headclip_model(
    model_name_or_path: str | os.PathLike, adapter: str | os.PathLike | None = None, **kwargs
) -> HeadCLIPModel:
    """
    Load a HeadCLIP in one call. Weights holding NaN or infinite values are refused (`ValueError` naming the tensors),
    and so is a truncated or damaged weights file (`ValueError` naming it).

    Args:
        model_name_or_path (`str` or `os.PathLike`): A CLIP or HeadCLIP checkpoint (Hub id or folder), or an adapter
            folder (its base is then read from the adapter's config).
        adapter (`str` or `os.PathLike`, *optional*): An adapter folder to load on top: a HeadCLIP adapter, or a PEFT
            adapter from LoRA training (its LoRA weights are merged into the backbone, so the result is a plain
            `HeadCLIPModel`).
        kwargs: Passed to `HeadCLIPModel.from_pretrained` (e.g. `local_files_only=True`, `dtype`).

    Returns:
        [`HeadCLIPModel`]: The model.
    """
    if adapter is None and (is_headclip_adapter(model_name_or_path) or is_peft_adapter(model_name_or_path)):
        adapter = model_name_or_path
        model_name_or_path = _adapter_base(adapter)
    if adapter is None:
        return _load_checked_checkpoint(model_name_or_path, **kwargs)
    if is_peft_adapter(adapter):
        fields_file = Path(adapter) / PEFT_HEADCLIP_CONFIG_NAME
        if fields_file.is_file():
            fields = _read_json_object(fields_file, "HeadCLIP config of a PEFT adapter", ("headclip_config",))
            fields = fields["headclip_config"]
        else:
            logger.warning(
                f"{fields_file} is missing (a PEFT adapter not written by headclip_hf training): the model is "
                "rebuilt with the base's HeadCLIP config."
            )
            fields = {}
    else:
        fields = read_adapter_config(adapter)["headclip_config"]
    config = _adapter_model_config(model_name_or_path, fields, kwargs)
    model = _load_checked_checkpoint(model_name_or_path, report_loading=False, config=config, **kwargs)
    if is_peft_adapter(adapter):
        with _naming_damaged_weights(adapter):
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        check_finite_tensors(model.state_dict(), f"the PEFT adapter {adapter} (merged into its base)")
        model.freeze_backbone()
    else:
        load_headclip_adapter(model, adapter)
    logger.info(f"loaded adapter {adapter} onto {model_name_or_path}")
    return model


def _load_checked_checkpoint(
    model_name_or_path: str | os.PathLike, report_loading: bool = True, **kwargs
) -> HeadCLIPModel:
    """
    `HeadCLIPModel.from_pretrained`, naming a damaged weights file and refusing non-finite weights. With
    `report_loading=False`, transformers' report on the (still untrained) HeadCLIP parameters is left out: an adapter
    is loaded next, and `load_headclip_model`'s own line says what the user gets.
    """
    with _naming_damaged_weights(model_name_or_path):
        if report_loading:
            model = HeadCLIPModel.from_pretrained(model_name_or_path, **kwargs)
        else:
            model, _ = HeadCLIPModel.from_pretrained(model_name_or_path, output_loading_info=True, **kwargs)
    check_finite_tensors(model.state_dict(), f"the checkpoint {model_name_or_path}")
    return model


def _adapter_model_config(model_name_or_path: str | os.PathLike, fields: dict, kwargs: dict) -> HeadCLIPConfig:
    """
    The config of the base with the HeadCLIP `fields` an adapter was trained with (so the model is rebuilt as it was
    trained); HeadCLIP fields in `kwargs` (inference choices such as `joint_alpha` or `image_size`) are popped from
    `kwargs` and apply on top.
    """
    known = HeadCLIPConfig.headclip_field_names()
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"The adapter names HeadCLIP config fields this version does not know: {unknown}.")
    fields = {**fields, **{key: kwargs.pop(key) for key in list(kwargs) if key in known}}
    # HeadCLIP fields given to `from_pretrained` are constructor arguments: the config validates them together.
    return HeadCLIPConfig.from_pretrained(
        model_name_or_path, **fields, **{key: value for key, value in kwargs.items() if key in HUB_KWARGS}
    )


def load_headclip_model_and_processor(
    model_name_or_path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    image_size: int | None = None,
    **kwargs,
) -> tuple[HeadCLIPModel, HeadCLIPProcessor]:
    """
    `load_headclip_model` plus the processor of the checkpoint the model came from (the base, for an adapter), at the
    model's working size (`image_size` overrides it for both).
    """
    if image_size is not None:
        kwargs["image_size"] = image_size
    model = load_headclip_model(model_name_or_path, adapter, **kwargs)
    hub_kwargs = {key: value for key, value in kwargs.items() if key in HUB_KWARGS}
    processor = HeadCLIPProcessor.from_pretrained(
        model.config._name_or_path, image_size=model.config.image_size, **hub_kwargs
    )
    return model, processor


def _adapter_base(adapter: str | os.PathLike) -> str:
    if is_peft_adapter(adapter):
        config_file = Path(adapter) / PEFT_CONFIG_NAME
        return _read_json_object(config_file, "PEFT adapter config", ("base_model_name_or_path",))[
            "base_model_name_or_path"
        ]
    return read_adapter_config(adapter)["base_model_name_or_path"]


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_OUTPUT",
    "ADAPTER_WEIGHTS_NAME",
    "HEADCLIP_MODULES",
    "HEADCLIP_PARAMETER_PREFIXES",
    "check_finite_tensors",
    "headclip_state_dict",
    "is_headclip_adapter",
    "is_peft_adapter",
    "load_headclip_adapter",
    "load_headclip_model",
    "load_headclip_model_and_processor",
    "read_adapter_config",
    "save_headclip_adapter",
    "state_dict_mismatches",
    "write_headclip_adapter",
]
