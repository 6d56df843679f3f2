# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Deployment: export a HeadCLIP to ONNX, OpenVINO or TorchScript, and run an export without PyTorch.

`export_model(model, processor, "exports/headclip")` writes a folder holding:

- the graph: `model.onnx` + `model.onnx.data` (ONNX), `model.xml` + `model.bin` (OpenVINO IR) or `model.pt`
  (TorchScript). It takes `pixel_values` `(B, 3, S, S)` float32 and returns `anomaly_map` `(B, S, S)` (smoothed, as
  the model's eval-mode forward), `image_score` `(B,)` and `global_score` `(B,)`. The prompt embeddings are computed
  once and baked in as constants: the graph holds no text encoder.
- `export_config.json`: the format version, the graph's inputs and outputs (names, shapes, dtypes; a dynamic batch
  dimension is `"batch"`), the image size, the preprocessing settings (size, resample, rescale factor, mean, std),
  the calibrated thresholds when the model's config has them, the source model and the package version.

`ExportedDetector(folder)` runs an export with ONNX Runtime, OpenVINO (or, for TorchScript, PyTorch) and returns
what the "zero-shot-anomaly-detection" pipeline returns. It preprocesses with numpy and PIL exactly as
`HeadCLIPProcessor` does, and this module imports neither PyTorch nor transformers (the export functions import them
when called), so the runner works on a machine where `import torch` fails.
"""

import importlib
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .files import OutputKind, check_output_folder, output_folder
from .image_utils_headclip import DEFAULT_HEATMAP_ALPHA, ImageLike, anomaly_heatmap, check_unit_interval, to_rgb_image

EXPORT_CONFIG_NAME = "export_config.json"
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("anomaly_map", "image_score", "global_score")
ONNX_FILES = ("model.onnx", "model.onnx.data")
OPENVINO_FILES = ("model.xml", "model.bin")
TORCHSCRIPT_FILES = ("model.pt",)
EXPORT_OUTPUT = OutputKind(
    "HeadCLIP export", frozenset({EXPORT_CONFIG_NAME, *ONNX_FILES, *OPENVINO_FILES, *TORCHSCRIPT_FILES})
)
EXPORT_FORMAT_VERSION = 1
EXPORT_FORMATS = ("onnx", "openvino", "torchscript")
# The package extra that installs what each format needs to export and to run.
FORMAT_EXTRAS = {"onnx": "onnx", "openvino": "openvino", "torchscript": None}
# The decision fields of a calibrated model's config, copied into the export when set.
THRESHOLD_FIELDS = ("image_threshold", "pixel_threshold", "image_thresholds", "pixel_thresholds", "calibration")
DEFAULT_THRESHOLD = 0.5
LABELS = ("normal", "anomaly")
DYNAMIC_DIM = "batch"


class NonFiniteOutputError(ValueError):
    """
    An exported graph gave a NaN or infinite anomaly score or map for an image, so no label or mask can be given (the
    runner's counterpart of the pipeline's error of this name).
    """


def _missing_extra_error(module: str, extra: str, purpose: str) -> ImportError:
    return ImportError(f'{purpose} needs {module}, which is not installed: pip install "headclip_hf[{extra}]"')


def _import_extra(module: str, extra: str, purpose: str) -> Any:
    """Import the runtime `module`; `ImportError` naming `extra` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise _missing_extra_error(module, extra, purpose) from error


def _require_modules(modules: Sequence[str], extra: str, purpose: str) -> None:
    """Raise `ImportError` naming `extra` when one of `modules` is not installed."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise _missing_extra_error(module, extra, purpose)


# ---------------------------------------------------------------------------------------------------------------------
# Export (PyTorch)
# ---------------------------------------------------------------------------------------------------------------------


def check_export_arguments(
    format: str,
    opset: int | None,
    output_dir: str | os.PathLike,
    overwrite: bool,
    image_size: int | None = None,
    patch_size: int | None = None,
) -> None:
    """
    Check what `export_model` is asked before any model work (the image size when `patch_size` is given).

    Raises:
        `ValueError`: an unknown format, an image size that is not a positive multiple of `patch_size`, an opset for
            TorchScript or outside the range the ONNX exporter supports.
        `FileExistsError`, `NotADirectoryError`, `PermissionError`: `output_dir` cannot take the export (see
            `headclip_hf.files.check_output_folder`: a folder holding other files needs `overwrite`).
        `ImportError`: a package the format needs is missing (the message names the extra to install).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {format!r}: use one of {', '.join(EXPORT_FORMATS)}.")
    if patch_size is not None:
        from .configuration_headclip import check_image_size

        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise ValueError(f"image_size must be an integer, got {image_size!r}.")
        try:
            check_image_size(image_size, patch_size)
        except ValueError as error:
            raise ValueError(f"image_size {error}.") from error
    extra = FORMAT_EXTRAS[format]
    if extra is not None:
        # OpenVINO IR is converted from the ONNX graph, so both need torch's ONNX exporter (onnx, onnxscript).
        modules = ["onnx", "onnxscript"] + (["openvino"] if format == "openvino" else [])
        _require_modules(modules, extra, f"Exporting to {format}")
    if opset is not None:
        if format == "torchscript":
            raise ValueError("opset applies to the onnx and openvino formats, not to torchscript.")
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= newest:
            raise ValueError(f"opset must be an ONNX opset from 18 (torch's exporter) to {newest}, got {opset!r}.")
    check_output_folder(output_dir, EXPORT_OUTPUT, overwrite)


def _preprocessing_settings(processor: Any, image_size: int) -> dict[str, Any]:
    """The settings of `processor`'s image processor that `ExportedDetector` applies, at `image_size`."""
    image_processor = processor.image_processor
    return {
        "size": image_size,
        "resample": Image.Resampling(int(image_processor.resample)).name.lower(),
        "do_rescale": bool(image_processor.do_rescale),
        "rescale_factor": float(image_processor.rescale_factor),
        "do_normalize": bool(image_processor.do_normalize),
        "image_mean": [float(value) for value in image_processor.image_mean],
        "image_std": [float(value) for value in image_processor.image_std],
    }


def _graph_signature(image_size: int, dynamic_batch: bool) -> dict[str, list[dict[str, Any]]]:
    batch = DYNAMIC_DIM if dynamic_batch else 1
    shapes = {"anomaly_map": [batch, image_size, image_size], "image_score": [batch], "global_score": [batch]}
    return {
        "inputs": [{"name": INPUT_NAME, "shape": [batch, 3, image_size, image_size], "dtype": "float32"}],
        "outputs": [{"name": name, "shape": shapes[name], "dtype": "float32"} for name in OUTPUT_NAMES],
    }


def export_model(
    model: Any,
    processor: Any,
    output_dir: str | os.PathLike,
    format: str = "onnx",
    image_size: int | None = None,
    dynamic_batch: bool = False,
    opset: int | None = None,
    overwrite: bool = False,
) -> Path:
    """
    Export `model` with its preprocessing to a folder that `ExportedDetector` (and ONNX Runtime / OpenVINO / PyTorch
    directly) can run.

    Args:
        model ([`HeadCLIPModel`]):
            The model; it is not modified (a float32 CPU copy in eval mode is exported).
        processor ([`HeadCLIPProcessor`]):
            Its preprocessing settings (resample, rescale, mean, std) go into the export.
        output_dir (`str` or `os.PathLike`):
            The export folder, written atomically (`headclip_hf.files.output_folder`): an earlier export there is
            replaced; a folder holding other files is refused unless `overwrite`.
        format (`str`, *optional*, defaults to `"onnx"`):
            `"onnx"` (needs the `onnx` extra), `"openvino"` (the `openvino` extra) or `"torchscript"`.
        image_size (`int`, *optional*):
            The graph's input size S, a multiple of the patch size; defaults to the processor's (the size the pipeline
            runs at).
        dynamic_batch (`bool`, *optional*, defaults to `False`):
            Whether the graph takes any batch size B; otherwise B is 1.
        opset (`int`, *optional*):
            ONNX opset (onnx and openvino formats; default: torch's exporter's choice).
        overwrite (`bool`, *optional*, defaults to `False`):
            Write into a folder that also holds other files (they stay; only export files are replaced).

    Returns:
        `Path`: the export folder.

    Raises:
        `ValueError`, `OSError`, `ImportError`: see `check_export_arguments`; raised before any model work.
    """
    import copy

    import torch

    from . import __version__
    from .export_graph import HeadCLIPExportModule, write_onnx, write_openvino, write_torchscript

    image_size = processor.image_size if image_size is None else image_size
    check_export_arguments(format, opset, output_dir, overwrite, image_size, model.config.vision_config.patch_size)

    graph_model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    module = HeadCLIPExportModule(graph_model)
    example = torch.zeros(2 if dynamic_batch else 1, 3, image_size, image_size)
    with output_folder(output_dir, EXPORT_OUTPUT, overwrite) as staging:
        if format == "torchscript":
            files, opset = write_torchscript(module, example, staging), None
        else:
            write = write_onnx if format == "onnx" else write_openvino
            files, opset = write(module, example, staging, dynamic_batch, opset)
        config = model.config
        export_config = {
            "format_version": EXPORT_FORMAT_VERSION,
            "format": format,
            "files": files,
            "image_size": image_size,
            "dynamic_batch": dynamic_batch,
            "opset": opset,
            **_graph_signature(image_size, dynamic_batch),
            "preprocessing": _preprocessing_settings(processor, image_size),
            "thresholds": {
                name: getattr(config, name) for name in THRESHOLD_FIELDS if getattr(config, name, None) is not None
            },
            "source_model": config._name_or_path or None,
            "headclip_hf_version": __version__,
            "torch_version": torch.__version__,
        }
        (staging / EXPORT_CONFIG_NAME).write_text(json.dumps(export_config, indent=2) + "\n")
    return Path(output_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Running an export (numpy, PIL and the format's runtime; no PyTorch except for TorchScript)
# ---------------------------------------------------------------------------------------------------------------------


def is_export_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `export_model` (it holds `export_config.json`)."""
    return (Path(path) / EXPORT_CONFIG_NAME).is_file()


def read_export_config(export_dir: str | os.PathLike) -> dict[str, Any]:
    """
    Read and check `export_config.json` of an export folder.

    Raises:
        `FileNotFoundError`: the folder, its `export_config.json` or a graph file it names is missing.
        `ValueError`: the folder was written by a newer format version, or names an unknown format.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise FileNotFoundError(f"No export folder at {export_dir}: write one with export_model or `headclip export`.")
    config_file = export_dir / EXPORT_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{export_dir} is not a HeadCLIP export: {EXPORT_CONFIG_NAME} is missing (write one with export_model or "
            "`headclip export`)."
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}): export the model again.") from error
    version = config.get("format_version")
    if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{config_file} has format version {version!r}, and this headclip_hf reads versions up to "
            f"{EXPORT_FORMAT_VERSION}: upgrade headclip_hf (pip install -U headclip_hf) or export with this version."
        )
    if config.get("format") not in EXPORT_FORMATS:
        raise ValueError(f"{config_file} names format {config.get('format')!r}: expected one of {EXPORT_FORMATS}.")
    for name in config["files"]:
        if not (export_dir / name).is_file():
            raise FileNotFoundError(
                f"The export {export_dir} is incomplete: {name} is missing (copy the whole folder, or export again)."
            )
    return config


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _normalise_signature(ports: list[tuple[str, Sequence[Any], str]]) -> list[dict[str, Any]]:
    """(name, shape, dtype) per port -> the JSON form: integer dimensions kept, dynamic ones as `"batch"`."""
    return [
        {
            "name": name,
            "shape": [dim if isinstance(dim, int) and dim >= 0 else DYNAMIC_DIM for dim in shape],
            "dtype": dtype,
        }
        for name, shape, dtype in ports
    ]


class _OnnxRuntimeGraph:
    """An ONNX export run by ONNX Runtime (its available execution providers, in its order of preference)."""

    def __init__(self, export_dir: Path, config: dict[str, Any], num_threads: int | None):
        onnxruntime = _import_extra("onnxruntime", "onnx", "Running an ONNX export")
        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        self.session = onnxruntime.InferenceSession(
            str(export_dir / config["files"][0]), options, providers=onnxruntime.get_available_providers()
        )
        dtypes = {"tensor(float)": "float32"}

        def ports(args):
            return _normalise_signature([(arg.name, arg.shape, dtypes.get(arg.type, arg.type)) for arg in args])

        self.signature = {"inputs": ports(self.session.get_inputs()), "outputs": ports(self.session.get_outputs())}

    def __call__(self, pixel_values: np.ndarray, output_names: list[str]) -> list[np.ndarray]:
        return self.session.run(output_names, {self.signature["inputs"][0]["name"]: pixel_values})


class _OpenVINOGraph:
    """An OpenVINO IR export compiled for the CPU at float32 precision (as exported; no bfloat16 inference hint)."""

    def __init__(self, export_dir: Path, config: dict[str, Any], num_threads: int | None):
        openvino = _import_extra("openvino", "openvino", "Running an OpenVINO export")
        core = openvino.Core()
        model = core.read_model(str(export_dir / config["files"][0]))

        def ports(nodes):
            return _normalise_signature(
                [
                    (
                        node.get_any_name(),
                        [dim.get_length() if dim.is_static else -1 for dim in node.get_partial_shape()],
                        node.get_element_type().to_dtype().name,
                    )
                    for node in nodes
                ]
            )

        self.signature = {"inputs": ports(model.inputs), "outputs": ports(model.outputs)}
        properties = {"INFERENCE_PRECISION_HINT": "f32"}
        if num_threads is not None:
            properties["INFERENCE_NUM_THREADS"] = num_threads
        self.compiled = core.compile_model(model, "CPU", properties)

    def __call__(self, pixel_values: np.ndarray, output_names: list[str]) -> list[np.ndarray]:
        results = self.compiled(pixel_values)
        return [results[name] for name in output_names]


class _TorchScriptGraph:
    """A TorchScript export run by PyTorch (its signature is not stored in the graph, so it is taken as written)."""

    def __init__(self, export_dir: Path, config: dict[str, Any], num_threads: int | None):
        import torch

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.module = torch.jit.load(str(export_dir / config["files"][0]), map_location="cpu")
        self.signature = {"inputs": config["inputs"], "outputs": config["outputs"]}
        self.output_index = {port["name"]: index for index, port in enumerate(config["outputs"])}

    def __call__(self, pixel_values: np.ndarray, output_names: list[str]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            outputs = self.module(torch.from_numpy(pixel_values))
        return [outputs[self.output_index[name]].numpy() for name in output_names]


GRAPH_RUNNERS = {"onnx": _OnnxRuntimeGraph, "openvino": _OpenVINOGraph, "torchscript": _TorchScriptGraph}


def _linear_source_indices(input_size: int, output_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    For each output position: the two input positions and the weight of the second, as PyTorch's bilinear
    `F.interpolate(..., align_corners=False)` computes them (half-pixel centres, clamped at 0, no antialiasing).
    """
    scale = input_size / output_size
    source = np.maximum((np.arange(output_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    first = np.minimum(np.floor(source).astype(np.int64), input_size - 1)
    second = np.minimum(first + 1, input_size - 1)
    return first, second, source - first


def resize_bilinear(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """
    Resize a map `(h, w)` to `(height, width)` by bilinear interpolation, as `F.interpolate(map[None, None],
    (height, width), mode="bilinear", align_corners=False)` does (what the pipeline uses); float32 result.
    """
    rows_first, rows_second, row_weights = _linear_source_indices(values.shape[0], height)
    cols_first, cols_second, col_weights = _linear_source_indices(values.shape[1], width)
    values = values.astype(np.float64)
    rows = values[rows_first] * (1.0 - row_weights)[:, None] + values[rows_second] * row_weights[:, None]
    resized = rows[:, cols_first] * (1.0 - col_weights) + rows[:, cols_second] * col_weights
    return resized.astype(np.float32)


class ExportedDetector:
    """
    Run a HeadCLIP export (`export_model`, `headclip export`): per image the anomaly score, label, map, mask and
    heatmap, as the "zero-shot-anomaly-detection" pipeline returns them.

    ONNX exports run with ONNX Runtime (`pip install "headclip_hf[onnx]"`), OpenVINO exports with OpenVINO (the
    `openvino` extra), both without PyTorch; TorchScript exports need PyTorch.

    Args:
        export_dir (`str` or `os.PathLike`): the export folder.
        num_threads (`int`, *optional*): CPU threads of the runtime (default: the runtime's choice; for TorchScript
            this sets PyTorch's process-wide thread count).

    Raises:
        `FileNotFoundError`, `ValueError`: see `read_export_config`; also `ValueError` when the graph's inputs or
            outputs differ from those `export_config.json` describes.
        `ImportError`: the format's runtime is not installed (the message names the extra).

    Example:

    ```python
    >>> from headclip_hf.export import ExportedDetector

    >>> detector = ExportedDetector("exports/headclip-onnx")
    >>> result = detector("bottle.png")
    >>> result["score"], result["label"], result["anomaly_map"].shape  # map at the image's (height, width)
    ```
    """

    def __init__(self, export_dir: str | os.PathLike, num_threads: int | None = None):
        if num_threads is not None:
            _check_positive_int("num_threads", num_threads)
        self.export_dir = Path(export_dir)
        self.config = read_export_config(self.export_dir)
        self.graph = GRAPH_RUNNERS[self.config["format"]](self.export_dir, self.config, num_threads)
        for kind in ("inputs", "outputs"):
            if self.graph.signature[kind] != self.config[kind]:
                raise ValueError(
                    f"The graph in {self.export_dir} does not match {EXPORT_CONFIG_NAME}: its {kind} are "
                    f"{self.graph.signature[kind]}, the JSON says {self.config[kind]}. Export the model again."
                )
        self.image_size = self.config["image_size"]
        preprocessing = self.config["preprocessing"]
        self.resample = Image.Resampling[preprocessing["resample"].upper()]
        self.image_mean = np.array(preprocessing["image_mean"], dtype=np.float32)
        self.image_std = np.array(preprocessing["image_std"], dtype=np.float32)

    @property
    def thresholds(self) -> dict[str, Any]:
        """The calibrated thresholds the export carries (the model's config fields `image_threshold`,
        `pixel_threshold`, per-category `image_thresholds` and `pixel_thresholds`, and `calibration`), where set."""
        return self.config["thresholds"]

    def decision_thresholds(
        self, threshold: float | None = None, pixel_threshold: float | None = None, category: str | None = None
    ) -> dict[str, Any]:
        """
        The thresholds a call uses and where each comes from, as the pipeline's `resolve_thresholds` decides them for
        the model: the given ones, else the calibrated ones (`category`'s where the export has them), else 0.5 for the
        image threshold and the image threshold for the pixel one.

        Returns:
            `dict`: `threshold`, `threshold_source` ("given", "calibrated" or "default"), `pixel_threshold`,
            `pixel_threshold_source` ("given", "calibrated" or "threshold").

        Raises:
            `ValueError`: a threshold outside [0, 1].
        """
        calibrated = self.thresholds
        calibrated_image = calibrated.get("image_thresholds", {}).get(category, calibrated.get("image_threshold"))
        calibrated_pixel = calibrated.get("pixel_thresholds", {}).get(category, calibrated.get("pixel_threshold"))
        if threshold is not None:
            threshold_source = "given"
        elif calibrated_image is not None:
            threshold, threshold_source = calibrated_image, "calibrated"
        else:
            threshold, threshold_source = DEFAULT_THRESHOLD, "default"
        if pixel_threshold is not None:
            pixel_threshold_source = "given"
        elif calibrated_pixel is not None:
            pixel_threshold, pixel_threshold_source = calibrated_pixel, "calibrated"
        else:
            pixel_threshold, pixel_threshold_source = threshold, "threshold"
        return {
            "threshold": check_unit_interval("threshold", threshold),
            "threshold_source": threshold_source,
            "pixel_threshold": check_unit_interval("pixel_threshold", pixel_threshold),
            "pixel_threshold_source": pixel_threshold_source,
        }

    def preprocess(self, images: Sequence[ImageLike]) -> np.ndarray:
        """
        Images -> `pixel_values` `(B, 3, S, S)` float32, as `HeadCLIPProcessor` computes them: RGB, PIL resize to
        S x S (no crop), rescale (in float64, then float32), then `(x - mean) / std` in float32.
        """
        preprocessing = self.config["preprocessing"]
        size = (self.image_size, self.image_size)
        batch = []
        for image in images:
            pixels = np.asarray(to_rgb_image(image).resize(size, resample=self.resample))
            if preprocessing["do_rescale"]:
                pixels = pixels.astype(np.float64) * preprocessing["rescale_factor"]
            pixels = pixels.astype(np.float32)
            if preprocessing["do_normalize"]:
                pixels = (pixels - self.image_mean) / self.image_std
            batch.append(pixels.transpose(2, 0, 1))
        return np.ascontiguousarray(np.stack(batch))

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs for `pixel_values` `(B, 3, S, S)`: `anomaly_map` `(B, S, S)`, `image_score` and
        `global_score` `(B,)`."""
        names = [port["name"] for port in self.config["outputs"]]
        return dict(zip(names, self.graph(np.ascontiguousarray(pixel_values, dtype=np.float32), names), strict=True))

    def __call__(
        self,
        inputs: ImageLike | Sequence[ImageLike],
        batch_size: int = 1,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        heatmap_alpha: float = DEFAULT_HEATMAP_ALPHA,
        category: str | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """
        Detect anomalies in one image or a list of images.

        Args:
            inputs (`str`, `os.PathLike`, `PIL.Image.Image`, `np.ndarray` or a list of them): Image file paths, PIL
                images in any mode or numpy arrays (as the pipeline takes them), or a list.
            batch_size (`int`, *optional*, defaults to 1): images per graph run (more than 1 needs an export with a
                dynamic batch).
            threshold (`float`, *optional*): `label` is "anomaly" when `score >= threshold`. Defaults to the export's
                calibrated image threshold, else 0.5 (`decision_thresholds`).
            pixel_threshold (`float`, *optional*): a pixel is in `mask` when its map value is `>= pixel_threshold`.
                Defaults to the calibrated pixel threshold, else the image threshold.
            heatmap_alpha (`float`, *optional*, defaults to 0.5): weight of the colour map in `heatmap`.
            category (`str`, *optional*): use this category's calibrated thresholds where the export has them.

        Returns:
            A dict per image (a list of dicts for a list input), as the pipeline returns: `score` (`float`), `label`,
            `anomaly_map` (float32 `(height, width)` at the image's own size, in [0, 1]), `mask` (PIL "L", 0/255) and
            `heatmap` (PIL RGB).

        Raises:
            `ValueError`: an unreadable image, a bad threshold or batch size; [`NonFiniteOutputError`] (a `ValueError`)
                when the graph's score or map for an image is not finite.
        """
        single = not isinstance(inputs, (list, tuple))
        images = [inputs] if single else list(inputs)
        if _check_positive_int("batch_size", batch_size) > 1 and not self.config["dynamic_batch"]:
            raise ValueError(
                f"The export {self.export_dir} takes one image per run (it was exported without a dynamic batch): "
                "use batch_size=1, or export with dynamic_batch=True (--dynamic_batch)."
            )
        thresholds = self.decision_thresholds(threshold, pixel_threshold, category)
        heatmap_alpha = check_unit_interval("heatmap_alpha", heatmap_alpha)
        results = []
        for start in range(0, len(images), batch_size):
            rgb_images = [to_rgb_image(image) for image in images[start : start + batch_size]]
            outputs = self.run(self.preprocess(rgb_images))
            for index, image in enumerate(rgb_images):
                score = float(outputs["image_score"][index])
                if not np.isfinite(score) or not np.isfinite(outputs["anomaly_map"][index]).all():
                    raise NonFiniteOutputError(
                        f"The export's anomaly score ({score}) or map for image {start + index} holds NaN or infinite "
                        "values, so it gets no label: the exported weights are not finite. Export the model again "
                        "from weights that load with headclip_hf's load_headclip_model."
                    )
                anomaly_map = np.clip(resize_bilinear(outputs["anomaly_map"][index], image.height, image.width), 0, 1)
                mask = np.where(anomaly_map >= thresholds["pixel_threshold"], 255, 0).astype(np.uint8)
                results.append(
                    {
                        "score": score,
                        "label": LABELS[int(score >= thresholds["threshold"])],
                        "anomaly_map": anomaly_map,
                        "mask": Image.fromarray(mask),
                        "heatmap": anomaly_heatmap(image, anomaly_map, heatmap_alpha),
                    }
                )
        return results[0] if single else results


__all__ = [
    "EXPORT_CONFIG_NAME",
    "EXPORT_FORMATS",
    "EXPORT_FORMAT_VERSION",
    "ExportedDetector",
    "NonFiniteOutputError",
    "check_export_arguments",
    "export_model",
    "is_export_folder",
    "read_export_config",
    "resize_bilinear",
]
