# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""What every `headclip` command shares: the flag convention, argument types, model arguments and loading, errors."""

import argparse
import glob
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState
from PIL import Image

from ..adapters import load_headclip_model_and_processor
from ..configuration_headclip import DEFAULT_CLIP_CHECKPOINT, DEFAULT_IMAGE_SIZE
from ..data import IMAGE_EXTENSIONS, LAYOUTS, image_files, load_anomaly_dataset
from ..inference import INFERENCE_DTYPES, prepare_for_inference
from ..modeling_headclip import HeadCLIPModel
from ..processing_headclip import HeadCLIPProcessor


class CommandError(Exception):
    """A failure to report to the user in one message, without a traceback (exit status 1)."""


def dash_spelling(option: str) -> str | None:
    """`--output_dir` -> `--output-dir`; `None` for options without an underscore after the leading dashes."""
    if not option.startswith("--") or "_" not in option[2:]:
        return None
    return "--" + option[2:].replace("_", "-")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """
    Help that shows one spelling per option: transformers' underscore spelling (`--output_dir`), the one
    `headclip train` shares with `TrainingArguments`. The dash spelling (`--output-dir`) and aliases such as `--out`
    are accepted but not listed.
    """

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        short = [option for option in action.option_strings if not option.startswith("--")]
        long = [option for option in action.option_strings if option.startswith("--")][:1]
        shown = short + long
        if action.nargs == 0:
            return ", ".join(shown)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(f"{option} {metavar}" for option in shown)


def apply_flag_convention(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """
    Make `parser` and its sub-command parsers follow the `headclip` flag convention: every `--long_option` also
    accepts its dash spelling (`--long-option`), as transformers' `HfArgumentParser` does, and help shows one
    spelling ([`HelpFormatter`]). Command modules declare the underscore spelling only.
    """
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                apply_flag_convention(subparser)
        for option in list(action.option_strings):
            dashed = dash_spelling(option)
            if dashed is not None and dashed not in parser._option_string_actions:
                add_option_alias(parser, option, dashed)
    return parser


def add_option_alias(parser: argparse.ArgumentParser, option: str, alias: str) -> None:
    """Let `parser` accept `alias` for its existing `option` (e.g. `--out` for `--output_dir`); help shows `option`."""
    action = parser._option_string_actions[option]
    action.option_strings.append(alias)
    parser._option_string_actions[alias] = action


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def probability(text: str) -> float:
    """An argument type: a number in [0, 1]."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1] (scores and maps are probabilities)")
    return value


def rate(text: str) -> float:
    """An argument type: a number strictly between 0 and 1 (a rate, such as a false-positive rate)."""
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not strictly between 0 and 1 (e.g. 0.01 for 1%)")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def non_negative_int(text: str) -> int:
    """An argument type: an integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: give 0 or more")
    return value


def positive_int(text: str) -> int:
    """An argument type: an integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def collect_images(patterns: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """
    Expand `patterns` (image files, folders, glob patterns with `*`, `?`, `[...]` and `**`) into image files.

    A folder contributes its image files (`headclip_hf.data.image_files`: by extension, not recursive, hidden files
    skipped); a glob its matching files. Broken symbolic links are kept, so that reading them fails and they are
    reported. Files keep the order of the patterns, sorted within a folder or glob, without duplicates.

    Returns:
        The files, and `(pattern, reason)` for each pattern that gives no image (missing path, empty folder, no match).
    """
    files: dict[Path, None] = {}
    problems = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = image_files(path)
            reason = f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder"
        elif path.exists() or path.is_symlink():
            found, reason = [path], ""
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if not Path(p).is_dir())
            reason = "no file matches this pattern"
        else:
            found, reason = [], "no such file or folder"
        if not found:
            problems.append((pattern, reason))
        files.update(dict.fromkeys(found))
    return list(files), problems


def add_model_arguments(
    parser: argparse.ArgumentParser, device: bool = True, cpu_default: str | None = None
) -> argparse._ArgumentGroup:
    """
    `--model`, `--adapter`, `--image_size` and (with `device`) `--device`, shared by the commands that run a model.
    Returns the argument group, for a command's own model options.

    Args:
        parser (`argparse.ArgumentParser`): The command's parser.
        device (`bool`, defaults to `True`): Offer `--device`.
        cpu_default (`str`, *optional*): For a command that needs no accelerator, why: `--device` then defaults to
            the CPU and its help says so (by default: the first accelerator, else the CPU).
    """
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_CLIP_CHECKPOINT,
        help=f"CLIP or HeadCLIP checkpoint (Hub id or local folder), or a HeadCLIP adapter folder "
        f"(default: {DEFAULT_CLIP_CHECKPOINT}, an untrained HeadCLIP); offline: a local folder, HF_HUB_OFFLINE=1 is "
        "honoured",
    )
    group.add_argument("--adapter", help="HeadCLIP adapter folder to load on top of --model, e.g. runs/mvtec/adapter")
    group.add_argument(
        "--image_size",
        type=positive_int,
        help=f"working input size in pixels, a multiple of the patch size (default: the model's, {DEFAULT_IMAGE_SIZE} "
        "for ViT-L/14)",
    )
    if device:
        default = "the first accelerator, else the CPU" if cpu_default is None else f"cpu: {cpu_default}"
        group.add_argument(
            "--device",
            default=None if cpu_default is None else "cpu",
            help=f"device, e.g. cpu, cuda, cuda:1, mps (default: {default})",
        )
    return group


def add_speed_arguments(group: argparse._ArgumentGroup) -> None:
    """`--dtype` and `--compile` (`headclip_hf.inference.prepare_for_inference`) for the commands that run a model."""
    group.add_argument(
        "--dtype",
        choices=INFERENCE_DTYPES,
        default="float32",
        help="dtype of the weights and the vision encoder's computation; maps and scores stay float32 "
        "(default: float32)",
    )
    group.add_argument(
        "--compile", action="store_true", help="compile the model with torch.compile (the first batch compiles)"
    )


# The column mapping flags (`--image_column`, ...) and the `load_anomaly_dataset` arguments they set.
DATA_COLUMN_FIELDS = ("image", "mask", "label", "category", "defect_type")


def add_data_arguments(parser: argparse.ArgumentParser, several_splits: bool = False, streaming: bool = True) -> None:
    """
    The positional DATA and the `load_anomaly_dataset` options, shared by the commands that read a labelled data set:
    `--layout`, `--split`, `--categories`, `--revision`, `--streaming`, `--skip_unreadable`, `--allow_outside_root`
    and the column mapping flags `--image_column`, `--mask_column`, `--label_column`, `--category_column`,
    `--defect_type_column`. Read them back with [`data_arguments`] or load the data with [`load_data`].

    Args:
        parser (`argparse.ArgumentParser`): The command's parser.
        several_splits (`bool`, defaults to `False`): `--split` takes several names (a list).
        streaming (`bool`, defaults to `True`): Offer `--streaming` (for commands that can work on a stream).
    """
    parser.add_argument(
        "data",
        help="data set: a folder (MVTec AD, VisA, meta.json, generic; an export, Parquet, imagefolder or save_to_disk "
        "folder), a Parquet file, or a Hub data set id such as user/mvtec-ad",
    )
    group = parser.add_argument_group("data")
    group.add_argument("--layout", default="auto", choices=LAYOUTS, help="folder layout (default: auto-detect)")
    if several_splits:
        group.add_argument("--split", nargs="+", default=["test"], help="splits (default: test)")
    else:
        group.add_argument("--split", default="test", help="split (default: test; train: normal training images)")
    group.add_argument("--categories", nargs="+", help="only these categories")
    group.add_argument("--revision", help="branch, tag or commit of a Hub data set (default: main)")
    if streaming:
        group.add_argument(
            "--streaming",
            action="store_true",
            help="read rows as they are used: constant memory, nothing downloaded or converted up front",
        )
    group.add_argument(
        "--skip_unreadable", action="store_true", help="skip (and list) unreadable images instead of stopping"
    )
    group.add_argument(
        "--allow_outside_root",
        action="store_true",
        help="read files that a meta file, CSV or table lists outside the data folder (refused by default)",
    )
    for field_name in DATA_COLUMN_FIELDS:
        group.add_argument(
            f"--{field_name}_column",
            metavar="COLUMN",
            help=f"table column of the {field_name.replace('_', ' ')} (default: found by its name)",
        )


def data_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The `load_anomaly_dataset` keyword arguments set by [`add_data_arguments`]'s flags, `split` left out."""
    return {
        "layout": args.layout,
        "categories": args.categories,
        "revision": args.revision,
        "streaming": getattr(args, "streaming", False),
        "skip_unreadable": args.skip_unreadable,
        "allow_outside_root": args.allow_outside_root,
        **{f"{name}_column": getattr(args, f"{name}_column") for name in DATA_COLUMN_FIELDS},
    }


def load_data(args: argparse.Namespace) -> datasets.Dataset | datasets.IterableDataset:
    """
    `load_anomaly_dataset(args.data, split=args.split, ...)` with [`add_data_arguments`]'s flags.

    Raises:
        `CommandError`: the data set cannot be loaded; the message names it and says why.
    """
    return load_data_set(args.data, split=args.split, **data_arguments(args))


def load_data_set(source: str, **load_arguments: Any) -> datasets.Dataset | datasets.IterableDataset:
    """
    `load_anomaly_dataset(source, **load_arguments)` for a command: its errors become one `CommandError`.

    Raises:
        `CommandError`: the data set cannot be loaded; the message names it and says why.
    """
    try:
        return load_anomaly_dataset(source, **load_arguments)
    except (OSError, ValueError) as error:
        message = str(error)  # named once: some messages already say "Cannot load <the source>: ..."
        raise CommandError(
            message if message.startswith("Cannot load") else f"Cannot load the data set {source}: {message}"
        ) from error


def add_output_dir_argument(
    parser: argparse.ArgumentParser, default: str | None, what: str, required: bool | None = None
) -> None:
    """
    `--output_dir` (also `--out`) and `--overwrite` for a command that writes a folder; `--output_dir` is required
    when there is no `default`, unless `required=False`.
    """
    parser.add_argument(
        "--output_dir",
        "--out",
        default=default,
        required=default is None if required is None else required,
        help=f"output folder for {what}" + (f" (default: {default})" if default else ""),
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace this command's own files in an output folder that also holds other files (they are kept)",
    )


def process_state(device: str | torch.device | None = None) -> PartialState:
    """
    accelerate's state of this process (the first call creates it). Under a multi-process launch (`accelerate launch
    --multi_gpu --num_processes N ...`, torchrun) the processes form a CPU (gloo) group when `device` is the CPU or
    the machine has no CUDA or XPU device, as `--use_cpu` does for `headclip train`; otherwise accelerate decides.
    """
    on_cpu = device is not None and torch.device(device).type == "cpu"
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=on_cpu or (launched and not (torch.cuda.is_available() or torch.xpu.is_available())))


def add_max_image_pixels_argument(parser: argparse.ArgumentParser) -> None:
    """`--max_image_pixels`, for the commands that read image files (see [`image_pixel_limit`])."""
    parser.add_argument(
        "--max_image_pixels",
        type=positive_int,
        help="largest image, in pixels, that is read (PIL.Image.MAX_IMAGE_PIXELS; default PIL's, "
        f"{Image.MAX_IMAGE_PIXELS}: PIL refuses images of more than twice this as decompression bombs, and such files "
        "are reported as unreadable); raise it for huge images you trust",
    )


@contextmanager
def image_pixel_limit(max_image_pixels: int | None) -> Iterator[None]:
    """Set `PIL.Image.MAX_IMAGE_PIXELS` to `max_image_pixels` (unless `None`) for the block, then restore it."""
    previous = Image.MAX_IMAGE_PIXELS
    if max_image_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _available_devices() -> list[str]:
    devices = ["cpu"]
    for device_type in ("cuda", "mps", "xpu"):
        backend = getattr(torch, device_type, None)
        if backend is not None and backend.is_available():
            count = backend.device_count()
            devices += [device_type] if count <= 1 else [f"{device_type}:{index}" for index in range(count)]
    return devices


def resolve_device(name: str | None) -> torch.device:
    """
    The device `--device name` names, checked before any model is loaded; by default the first accelerator, else the
    CPU (accelerate's choice, which `accelerate launch` sets per process; see [`process_state`]).

    Raises:
        `CommandError`: `name` is not a device, or names one this machine does not have (e.g. `cuda` without CUDA);
            the message lists the devices there are.
    """
    if name is None:
        return process_state().device
    available = ", ".join(_available_devices())
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(
            f"--device {name!r} is not a device: use cpu, cuda, cuda:N, mps or xpu. This machine has: {available}."
        ) from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available"):
        raise CommandError(
            f"--device {name!r}: {device.type} devices cannot run a model here; this machine has: {available}."
        )
    if not backend.is_available():
        raise CommandError(
            f"--device {name!r}: {device.type} is not available on this machine (this PyTorch {torch.__version__} "
            f"build or its drivers do not provide it). This machine has: {available}."
        )
    if device.index is not None and device.index >= backend.device_count():
        raise CommandError(
            f"--device {name!r}: there are {backend.device_count()} {device.type} devices, numbered from 0. This "
            f"machine has: {available}."
        )
    return device


def add_output_file_argument(parser: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """`--output_file` (also `--out`) and `--overwrite` for a command that writes a single file."""
    parser.add_argument(
        "--output_file",
        "--out",
        default=default,
        required=default is None,
        help=f"output file for {what}" + (f" (default: {default})" if default else ""),
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing file that is not an earlier output of this command",
    )


def check_model_location(name: str | None, flag: str = "--model") -> None:
    """
    Refuse a `--model` / `--adapter` value that names a local path which does not exist, before anything loads (else
    it would be taken for a Hub id and fail with the Hub's id rules and offline advice). A value is a local path when
    it starts with `.`, `/` or `~`, holds a backslash or more than one `/`, or a folder on its way exists (`runs/x`
    with `runs/` here).

    Raises:
        `CommandError`: naming the flag, the path and the part of it that exists.
    """
    if name is None:
        return
    path = Path(name).expanduser()
    if path.exists():
        return
    existing_parent = next((parent for parent in path.parents if parent != Path(".") and parent.is_dir()), None)
    looks_local = (
        name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or existing_parent is not None
    )
    if looks_local:
        found = ""
        if existing_parent is not None:
            found = f"; {existing_parent} exists, but holds no {path.relative_to(existing_parent)}"
        raise CommandError(
            f"{flag} {name}: no such folder ({path.resolve()} does not exist{found}). Pass an existing model or "
            "adapter folder, or a Hub repository id (user/name)."
        )


def load_model_and_processor(
    model_name_or_path: str,
    adapter: str | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    compile: bool = False,
) -> tuple[HeadCLIPModel, HeadCLIPProcessor]:
    """
    Load a HeadCLIP (`load_headclip_model`: a checkpoint, an adapter folder, or a checkpoint plus `adapter`) in eval
    mode on `device` with its weights in `dtype`, optionally compiled (`prepare_for_inference`), and the processor of
    the checkpoint it came from, at the model's working size. A device name (`--device`) is checked with
    [`resolve_device`] before anything loads; commands that do other work first check it earlier themselves.

    Raises:
        `CommandError`: a local path that does not exist ([`check_model_location`]), the device is not available, or
            the model or processor cannot be loaded (no network and no local copy, ...); the message says how to work
            offline.
    """
    check_model_location(model_name_or_path, "--model")
    check_model_location(adapter, "--adapter")
    if not isinstance(device, torch.device):
        device = resolve_device(device)
    try:
        model, processor = load_headclip_model_and_processor(model_name_or_path, adapter, image_size)
    except ValueError as error:  # e.g. a malformed adapter folder
        raise CommandError(f"Cannot load the model from {model_name_or_path!r}: {error}") from error
    except OSError as error:  # includes huggingface_hub's offline, not-found and HTTP errors
        raise CommandError(
            f"Cannot load the model or processor from {model_name_or_path!r}: {error}\n"
            "Without network access, point --model at a local folder holding the checkpoint (config.json, "
            "model.safetensors, preprocessor and tokenizer files; e.g. one written by `save_pretrained` or downloaded "
            "with `hf download` on a connected machine): --model /path/to/local/folder. HF_HUB_OFFLINE=1 is "
            "honoured: the Hub is then not contacted and only local folders and the local Hugging Face cache are used."
        ) from error
    return prepare_for_inference(model, device, dtype, compile), processor
