# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""The HeadCLIP demo: a Gradio page over the "zero-shot-anomaly-detection" pipeline.

One app, two ways to run it:

- locally, `headclip demo --model M` (`headclip_hf.cli.demo`), which works offline on a local model folder;
- as a Hugging Face Space, `headclip push ... --space user/name` (`headclip_hf.space`), whose `app.py` (`space_app.py`)
  loads the published model and calls [`build_demo`].

The page: upload an image (or pick a sample image); it shows the image, the heatmap (the anomaly map in jet colours
over the image), the predicted mask, the anomaly score and the decision. Two sliders set the image threshold (score
`>=` threshold: "anomaly") and the pixel threshold (map `>=` threshold: in the mask); they start at the model's
calibrated thresholds (`config.image_threshold`, `config.pixel_threshold`) when it has them, else at the pipeline's
default 0.5. Moving a slider re-applies the thresholds to the last result without running the model again. Normal
reference images of the same object, if given, switch to the few-shot mode (`model.encode_references`).

A file that is not an image gives a message on the page; the app keeps serving. Gradio is an optional dependency:
`pip install "headclip_hf[demo]"`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .data import IMAGE_EXTENSIONS
from .modeling_headclip import HeadCLIPModel
from .pipeline_headclip import DEFAULT_THRESHOLD, LABELS, TASK, ZeroShotAnomalyDetectionPipeline, resolve_thresholds
from .processing_headclip import HeadCLIPProcessor

if TYPE_CHECKING:
    import gradio

DEMO_INSTALL_HINT = 'pip install "headclip_hf[demo]"'
# The sample images, package data (with their licences in README.md): the demo's default examples.
SAMPLE_IMAGES_DIR = Path(__file__).resolve().parent / "sample_images"
# Scores are shown with this many decimals.
SCORE_DECIMALS = 4


def import_gradio():
    """
    The `gradio` module.

    Raises:
        `ImportError`: Gradio is not installed; the message names the extra that installs it.
    """
    try:
        import gradio
    except ImportError as error:
        raise ImportError(f"The demo needs Gradio, which is not installed: {DEMO_INSTALL_HINT}") from error
    return gradio


def model_thresholds(model: HeadCLIPModel) -> tuple[float, float, bool]:
    """
    The thresholds the demo starts with: the model's calibrated `config.image_threshold` and `config.pixel_threshold`
    when it has them, else the pipeline's default (the pixel threshold defaults to the image threshold, as in the
    pipeline).

    Returns:
        `(image_threshold, pixel_threshold, calibrated)`, `calibrated` telling whether the image threshold is the
        model's own.
    """
    thresholds = resolve_thresholds(model.config)
    return thresholds["threshold"], thresholds["pixel_threshold"], thresholds["threshold_source"] == "calibrated"


def sample_images(folder: str | os.PathLike = SAMPLE_IMAGES_DIR) -> list[Path]:
    """The image files directly in `folder` (sorted), the demo's examples; none when the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)


@dataclass
class Detection:
    """
    The last detection of a session, what the sliders re-threshold.

    Attributes:
        name (`str`): The image's file name.
        image (`PIL.Image.Image`): The image in RGB.
        score (`float`): The pipeline's anomaly score.
        anomaly_map (`np.ndarray` float32 of shape (height, width)): The pipeline's map at the image's size.
        heatmap (`PIL.Image.Image`): The pipeline's heatmap.
        num_references (`int`): Normal reference images used (0: zero-shot).
    """

    name: str
    image: Image.Image
    score: float
    anomaly_map: np.ndarray
    heatmap: Image.Image
    num_references: int = 0


@dataclass
class DemoView:
    """What the page shows: one field per output component (`None` / "" clears it)."""

    image: Image.Image | None = None
    heatmap: Image.Image | None = None
    mask: Image.Image | None = None
    score: str = ""
    label: str = ""
    message: str = ""

    def as_tuple(self) -> tuple:
        return self.image, self.heatmap, self.mask, self.score, self.label, self.message


def _file_name(file: Any) -> str:
    return Path(str(file)).name


def _load_image(processor: HeadCLIPProcessor, file: Any, what: str) -> Image.Image:
    """The RGB image of an uploaded `file`; `ValueError` naming the file when it is not an image."""
    try:
        return processor.to_rgb_image(str(file))
    except (OSError, ValueError) as error:
        # Name the file as the user knows it, not by the server's temporary upload path.
        reason = str(error.__cause__ or error).replace(str(file), _file_name(file))
        raise ValueError(
            f"{what} {_file_name(file)!r} is not an image that can be read ({reason}). Upload a PNG, JPEG, BMP, TIFF "
            "or WebP image."
        ) from error


def detect(
    detector: ZeroShotAnomalyDetectionPipeline,
    image_file: str | os.PathLike | None,
    reference_files: Sequence[str | os.PathLike] | None = None,
) -> Detection | None:
    """
    Run the pipeline on one uploaded image file, in few-shot mode when `reference_files` are given.

    Args:
        detector (`ZeroShotAnomalyDetectionPipeline`): The pipeline.
        image_file (`str` or `os.PathLike`, *optional*): The uploaded image; `None` (nothing uploaded) gives `None`.
        reference_files (`Sequence[str | os.PathLike]`, *optional*): Normal images of the same object (few-shot
            mode).

    Raises:
        `ValueError`: the image or a reference is not a readable image (the message names the file).
    """
    if image_file is None:
        return None
    image = _load_image(detector.processor, image_file, "The file")
    references = [_load_image(detector.processor, file, "The reference") for file in reference_files or []]
    result = detector(image, reference_images=references or None)
    return Detection(
        name=_file_name(image_file),
        image=image,
        score=result["score"],
        anomaly_map=result["anomaly_map"],
        heatmap=result["heatmap"],
        num_references=len(references),
    )


def render(detection: Detection | None, threshold: float, pixel_threshold: float) -> DemoView:
    """
    What the page shows for `detection` at the given thresholds, by the pipeline's rules: "anomaly" when
    `score >= threshold`, the mask where `anomaly_map >= pixel_threshold`.
    """
    if detection is None:
        return DemoView()
    label = LABELS[int(detection.score >= threshold)]
    in_mask = detection.anomaly_map >= pixel_threshold
    mask = Image.fromarray(np.where(in_mask, 255, 0).astype(np.uint8))
    mode = f"few-shot with {detection.num_references} normal references" if detection.num_references else "zero-shot"
    comparison = "reaches" if label == LABELS[1] else "is below"
    message = (
        f"**{detection.name}** ({mode}): score {detection.score:.{SCORE_DECIMALS}f} {comparison} the image threshold "
        f"{threshold:.{SCORE_DECIMALS}f}, so **{label}**. The predicted mask marks the {in_mask.mean():.1%} of pixels "
        f"whose map value reaches the pixel threshold {pixel_threshold:.{SCORE_DECIMALS}f}."
    )
    return DemoView(
        image=detection.image,
        heatmap=detection.heatmap,
        mask=mask,
        score=f"{detection.score:.{SCORE_DECIMALS}f}",
        label=label,
        message=message,
    )


def build_demo(
    model: HeadCLIPModel,
    processor: HeadCLIPProcessor,
    examples: Sequence[str | os.PathLike] | None = None,
    model_name: str | None = None,
    title: str = "HeadCLIP zero-shot anomaly detection",
) -> gradio.Blocks:
    """
    The demo app (see the module docstring) over `model` and `processor`.

    Args:
        model (`HeadCLIPModel`): The detector, in eval mode.
        processor (`HeadCLIPProcessor`): Its processor.
        examples (`list` of paths, *optional*, defaults to the sample images of the repository):
            Images offered as examples; an empty list offers none.
        model_name (`str`, *optional*, defaults to `model.config._name_or_path`):
            The model's name on the page (a Hub id or a folder).
        title (`str`, *optional*): The page's title.

    Returns:
        The `gradio.Blocks`; serve it with its `launch` method.

    Raises:
        `ImportError`: Gradio is not installed (the message names the extra to install).
    """
    gr = import_gradio()
    detector = ZeroShotAnomalyDetectionPipeline(model=model, processor=processor, task=TASK, device=model.device)
    start_threshold, start_pixel_threshold, calibrated = model_thresholds(model)
    examples = [str(path) for path in (sample_images() if examples is None else examples)]
    threshold_source = (
        "the model's calibrated values"
        if calibrated
        else f"the default {DEFAULT_THRESHOLD} (the model is not calibrated)"
    )
    description = (
        f"Upload an image, or pick an example: the model `{model_name or model.config._name_or_path}` scores it "
        "(image level) and maps where it looks anomalous (pixel level), without having seen this kind of object in "
        f"training. The thresholds start at {threshold_source}."
    )

    def on_upload(image_file, reference_files, threshold, pixel_threshold) -> tuple:
        try:
            detection = detect(detector, image_file, reference_files)
        except ValueError as error:
            return None, *DemoView(message=f"**Could not process the upload.** {error}").as_tuple()
        return detection, *render(detection, threshold, pixel_threshold).as_tuple()

    def on_threshold(detection, threshold, pixel_threshold) -> tuple:
        return render(detection, threshold, pixel_threshold).as_tuple()

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\n\n{description}")
        detection_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image_file = gr.File(label="Image to inspect", file_count="single", elem_id="image-file")
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=[image_file], label="Sample images")
                threshold = gr.Slider(
                    0.0, 1.0, value=start_threshold, step=0.001, label="Image threshold", elem_id="image-threshold"
                )
                pixel_threshold = gr.Slider(
                    0.0,
                    1.0,
                    value=start_pixel_threshold,
                    step=0.001,
                    label="Pixel threshold",
                    elem_id="pixel-threshold",
                )
                references = gr.File(
                    label="Normal reference images (few-shot mode, optional)",
                    file_count="multiple",
                    elem_id="reference-files",
                )
            with gr.Column(scale=2):
                with gr.Row():
                    image = gr.Image(label="Image", type="pil", format="png", interactive=False, elem_id="image")
                    heatmap = gr.Image(label="Heatmap", type="pil", format="png", interactive=False, elem_id="heatmap")
                    mask = gr.Image(
                        label="Predicted mask", type="pil", format="png", interactive=False, elem_id="mask"
                    )
                with gr.Row():
                    score = gr.Textbox(label="Anomaly score", interactive=False, elem_id="score")
                    label = gr.Textbox(label="Decision", interactive=False, elem_id="label")
                message = gr.Markdown(elem_id="message")
        views = [image, heatmap, mask, score, label, message]
        for trigger in (image_file.change, references.change):
            trigger(
                on_upload,
                inputs=[image_file, references, threshold, pixel_threshold],
                outputs=[detection_state, *views],
            )
        for slider in (threshold, pixel_threshold):
            slider.change(on_threshold, inputs=[detection_state, threshold, pixel_threshold], outputs=views)
    return demo


__all__ = [
    "DEMO_INSTALL_HINT",
    "Detection",
    "DemoView",
    "build_demo",
    "detect",
    "import_gradio",
    "model_thresholds",
    "render",
    "sample_images",
]
