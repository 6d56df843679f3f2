# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Publishing a trained HeadCLIP on the Hugging Face Hub: the repository folder, its model card, the upload.

Two kinds of repository (`save_hub_folder`):

- **Full model** (default): the weights saved by `save_pretrained` (backbone included: `AutoModel` needs them all),
  the processor, the remote code (`configuration_headclip.py`, `modeling_headclip.py`, `processing_headclip.py` with
  `image_utils_headclip.py`, `pipeline_headclip.py`) and the `custom_pipelines` declaration in `config.json`. It
  loads without this package:
  `AutoModel.from_pretrained(repo, trust_remote_code=True)` or
  `pipeline("zero-shot-anomaly-detection", model=repo, trust_remote_code=True)`.
- **Adapter only** (`adapter_only=True`): the HeadCLIP parameters alone (`headclip_adapter.safetensors`, ~170 KB for
  ViT-L/14) with the Hub id of their base CLIP, and the processor. Loading needs this package:
  `load_headclip_model(snapshot_download(repo))` downloads the base from its own repository.

Both carry the model card (`README.md`, rendered from the `model_card.md` template with the metrics of an evaluation
run in its table and in the `model-index` metadata, and the model's calibrated thresholds when it has them) and that
run's `results.json`, `results.md` and plots under `evaluation/` (only these: not the run's HTML report, its pictures
of the evaluation images, its per-image table of local paths, or other files of the folder).
`headclip push --dry_run` writes exactly the folder
that `upload_hub_folder` would upload.

Card metadata: `pipeline_tag` (the Hub task, `HUB_PIPELINE_TAG`), `library_name` true for the published form
(`transformers` for a full model with remote code, `headclip_hf` for an adapter, which needs this package),
`base_model`, `datasets` (the training data when named by its Hub id) and the `model-index` of the evaluation run.
Repository ids are checked with huggingface_hub's own validator (`check_repo_id`) before anything is written.
"""

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.dynamic_module_utils import custom_object_save

from .adapters import ADAPTER_OUTPUT, write_headclip_adapter
from .conversion import HEADCLIP_MODEL_OUTPUT
from .files import OUTPUT_MARKER, OutputKind, output_folder
from .metrics import METRIC_NAMES
from .modeling_headclip import HeadCLIPModel
from .pipeline_headclip import TASK, ZeroShotAnomalyDetectionPipeline
from .processing_headclip import HeadCLIPProcessor
from .reporting import METRIC_TITLES, PLOTS_DIR, RESULTS_JSON, RESULTS_MARKDOWN

MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card.md")
EVALUATION_FOLDER = "evaluation"
DEFAULT_LICENSE = "cc-by-nc-sa-4.0"  # MVTec AD's licence, inherited by models trained on it
CARD_TAGS = ["anomaly-detection", "zero-shot-anomaly-detection", "headclip", "clip", "vision"]
MODEL_CARD_NAME = "README.md"
# What `save_hub_folder` writes (either kind of repository): an earlier Hub folder is replaced, other files are kept.
HUB_FOLDER_OUTPUT = OutputKind(
    "Hub repository folder",
    HEADCLIP_MODEL_OUTPUT.entries
    | ADAPTER_OUTPUT.entries
    | {f"{ZeroShotAnomalyDetectionPipeline.__module__.rsplit('.', 1)[-1]}.py", MODEL_CARD_NAME, EVALUATION_FOLDER},
    HEADCLIP_MODEL_OUTPUT.patterns,
)
# The Hub's task list has no anomaly detection: the pipeline's output per image, a pixel map and mask of the defects
# (plus a score), is an image segmentation. The package's own task name is in the tags and the model-index.
HUB_PIPELINE_TAG = "image-segmentation"
# `library_name` of each published form: a full model loads with transformers alone (remote code); an adapter needs
# this package.
FULL_MODEL_LIBRARY = "transformers"
ADAPTER_LIBRARY = "headclip_hf"


def check_repo_id(repo_id: str) -> None:
    """
    Check a Hub repository id with huggingface_hub's own validator (`validate_repo_id`).

    Raises:
        `ValueError`: naming the id and what a valid one looks like.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is not a valid Hub repository id ({error}): use 'user/name' or 'organisation/name', with "
            "letters, digits, '-', '_' and '.'."
        ) from None


def hub_dataset_id(name: str) -> str | None:
    """`name` when it is a Hub dataset id (`owner/name`), else `None` (a display name such as "MVTec AD")."""
    if name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def custom_pipeline_declaration() -> dict[str, dict]:
    """The `custom_pipelines` entry of `config.json`: `pipeline(..., trust_remote_code=True)` finds the task there."""
    module_name = ZeroShotAnomalyDetectionPipeline.__module__.rsplit(".", 1)[-1]
    implementation = f"{module_name}.{ZeroShotAnomalyDetectionPipeline.__name__}"
    return {TASK: {"impl": implementation, "pt": ["AutoModel"], "type": "image"}}


def eval_results_from_json(results: dict, dataset_name: str, dataset_type: str | None = None) -> list[EvalResult]:
    """
    `model-index` entries for the mean metrics of an evaluation run (the dict of `results.json`, written by
    `save_results`): one `EvalResult` per defined metric, its value in percent rounded to one decimal like the results
    table, its name saying over how many categories it is averaged; undefined metrics are left out.

    Args:
        results (`dict`):
            `AnomalyDetectionResults.to_dict()`.
        dataset_name (`str`):
            The evaluation data set, e.g. "VisA".
        dataset_type (`str`, *optional*):
            Its identifier; by default `dataset_name` in lower case with `_` for other characters.

    Returns:
        `list[EvalResult]`: one entry per defined mean metric.
    """
    dataset_type = dataset_type or re.sub(r"[^a-z0-9]+", "_", dataset_name.lower()).strip("_")
    total = results["num_categories"]

    def averaged_over(count: int) -> str:
        return f"mean of {count} categories" if count == total else f"mean of {count} of {total} categories"

    return [
        EvalResult(
            task_type=TASK,
            task_name="Zero-shot anomaly detection",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split="test",
            metric_type=name,
            metric_name=f"{METRIC_TITLES[name]} ({averaged_over(results['mean'][name]['num_categories'])})",
            metric_value=round(100 * results["mean"][name]["value"], 1),
        )
        for name in METRIC_NAMES
        if results["mean"][name]["value"] is not None
    ]


def calibration_table(config: Any) -> str | None:
    """
    A markdown table of the calibrated thresholds of a model's config and what they achieved on the calibration data
    (the record of `headclip_hf.calibration`), then its per-category thresholds; `None` for an uncalibrated model.
    """
    record = config.calibration
    if config.image_threshold is None or not record:
        return None

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = [
        "| Level | Threshold | Method | Normal / anomalous used | Precision | Recall | FPR | Accuracy |",
        "|:---|---:|:---|---:|---:|---:|---:|---:|",
    ]
    for level, unit in (("image", "images"), ("pixel", "pixels")):
        entry = record[level]
        achieved = entry["achieved"]
        used = f"{entry[f'num_normal_{unit}']:,} / {entry[f'num_anomalous_{unit}']:,} {unit}"
        rates = [percent(achieved[key]) for key in ("precision", "recall", "false_positive_rate", "accuracy")]
        lines.append("| " + " | ".join([level, f"{entry['threshold']:.4f}", entry["method"], used, *rates]) + " |")
    if config.image_thresholds:
        lines += ["", "| Category | Image threshold | Pixel threshold |", "|:---|---:|---:|"]
        for category, threshold in config.image_thresholds.items():
            pixel_threshold = (config.pixel_thresholds or {}).get(category)
            pixel_text = "-" if pixel_threshold is None else f"{pixel_threshold:.4f}"
            lines.append(f"| {category} | {threshold:.4f} | {pixel_text} |")
    return "\n".join(lines)


def render_model_card(
    model: HeadCLIPModel,
    results_dir: str | os.PathLike,
    *,
    repo_id: str,
    train_dataset: str,
    eval_dataset: str,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    adapter_only: bool = False,
    template_path: str | os.PathLike = MODEL_CARD_TEMPLATE,
) -> ModelCard:
    """
    The model card of a published HeadCLIP, from the `model_card.md` template (a Jinja template rendered by
    `ModelCard.from_template`).

    Args:
        model (`HeadCLIPModel`):
            The model to publish (its config fills the method settings).
        results_dir (`str` or `os.PathLike`):
            The output folder of `headclip evaluate` / `save_results`: `results.json` fills the `model-index`
            metadata, `results.md` the results table.
        repo_id (`str`):
            The Hub repository, `user/name`.
        train_dataset (`str`):
            The auxiliary data set the model was trained on, e.g. "MVTec AD"; a Hub dataset id (`owner/name`) also
            fills the `datasets` metadata.
        eval_dataset (`str`):
            The data set of the evaluation run, e.g. "VisA".
        license (`str`, *optional*, defaults to `DEFAULT_LICENSE`):
            A Hub licence id; the default is MVTec AD's (CC BY-NC-SA 4.0).
        base_model (`str`, *optional*):
            The Hub id of the CLIP checkpoint the model adapts (metadata `base_model`).
        adapter_only (`bool`, *optional*, defaults to `False`):
            Whether the repository holds the adapter only (changes the usage section and `library_name`).
        template_path (`str` or `os.PathLike`, *optional*, defaults to `MODEL_CARD_TEMPLATE`):
            The card template.

    Returns:
        `ModelCard`: the rendered card.

    Raises:
        `ValueError`: for an invalid `repo_id`.
    """
    check_repo_id(repo_id)
    results_dir = Path(results_dir)
    results = json.loads((results_dir / RESULTS_JSON).read_text())
    train_dataset_id = hub_dataset_id(train_dataset)
    card_data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        license=license,
        library_name=ADAPTER_LIBRARY if adapter_only else FULL_MODEL_LIBRARY,
        pipeline_tag=HUB_PIPELINE_TAG,
        base_model=base_model,
        datasets=[train_dataset_id] if train_dataset_id else None,
        tags=CARD_TAGS,
        eval_results=eval_results_from_json(results, eval_dataset) or None,
    )
    config = model.config
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=repo_id,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        results_table=(results_dir / RESULTS_MARKDOWN).read_text().strip(),
        adapter_only=adapter_only,
        task=TASK,
        image_size=config.image_size,
        feature_layers=config.feature_layers,
        joint_alpha=config.joint_alpha,
        calibration=config.calibration,
        calibration_table=calibration_table(config),
    )


def save_hub_folder(
    model: HeadCLIPModel,
    processor: HeadCLIPProcessor,
    folder: str | os.PathLike,
    card: ModelCard,
    results_dir: str | os.PathLike,
    *,
    adapter_only: bool = False,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """
    Write the folder of a Hub repository (see the module docstring for its two kinds), atomically
    (`headclip_hf.files.output_folder`, kind `HUB_FOLDER_OUTPUT`): an earlier Hub folder there is replaced; a folder
    holding other files is refused unless `overwrite` (those files stay, and [`upload_hub_folder`] leaves them out).

    Args:
        model (`HeadCLIPModel`):
            What to publish. For a full model, `model.config` gains the `custom_pipelines` entry.
        processor (`HeadCLIPProcessor`):
            Its processor, saved with it.
        folder (`str` or `os.PathLike`):
            The folder to write.
        card (`ModelCard`):
            The model card (`render_model_card`), saved as `README.md`.
        results_dir (`str` or `os.PathLike`):
            The evaluation run, whose `results.json`, `results.md` and `plots/` are copied to `evaluation/`
            ([`copy_published_results`]).
        adapter_only (`bool`, *optional*, defaults to `False`):
            Publish the HeadCLIP parameters only.
        base_model (`str`, *optional*):
            For `adapter_only`, the Hub id of the base CLIP checkpoint the adapter names.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace the Hub folder's files in a folder that also holds other files (those stay).

    Returns:
        `Path`: the folder.
    """
    if adapter_only and base_model is None:
        raise ValueError("An adapter-only repository must name its base CLIP on the Hub: pass base_model.")
    folder = Path(folder)
    with output_folder(folder, HUB_FOLDER_OUTPUT, overwrite) as staging:
        if adapter_only:
            write_headclip_adapter(model, staging, base_model_name_or_path=base_model)
        else:
            model.config.custom_pipelines = custom_pipeline_declaration()
            model.save_pretrained(staging)
            custom_object_save(ZeroShotAnomalyDetectionPipeline, staging)
        processor.save_pretrained(staging)
        card.save(staging / MODEL_CARD_NAME)
        copy_published_results(results_dir, staging / EVALUATION_FOLDER)
    return folder


def copy_published_results(results_dir: str | os.PathLike, destination: str | os.PathLike) -> None:
    """
    Copy what is published of the evaluation run `results_dir` (`save_results`' folder) into the new folder
    `destination`: `results.json`, `results.md` and the curve plots `plots/*.png`, those it has. Nothing else of the
    folder is published: not `headclip evaluate --report`'s HTML report and its pictures of the evaluation images, not
    its per-image table of local paths, not the user's other files.
    """
    results_dir, destination = Path(results_dir), Path(destination)
    destination.mkdir()
    for name in (RESULTS_JSON, RESULTS_MARKDOWN):
        if (results_dir / name).is_file():
            shutil.copyfile(results_dir / name, destination / name)
    plots = sorted(path for path in (results_dir / PLOTS_DIR).glob("*.png") if path.is_file())
    if plots:
        (destination / PLOTS_DIR).mkdir()
        for path in plots:
            shutil.copyfile(path, destination / PLOTS_DIR / path.name)


def check_upload_access(
    token: str | None = None, token_flag: str = "--token", without_upload: str = "use --dry_run --output_dir DIR"
) -> str:
    """
    Check, before any work, that an upload can happen: the Hub is reachable (not `HF_HUB_OFFLINE=1`) and the token
    (`token`, else the one of `hf auth login` or `HF_TOKEN`) is valid.

    Args:
        token (`str`, *optional*): The token given on the command line.
        token_flag (`str`, *optional*, defaults to `"--token"`): The command's flag for the token, for the message.
        without_upload (`str`, *optional*): How to run the command without uploading, for the message.

    Returns:
        The name of the account the token belongs to.

    Raises:
        `OSError`: offline, no network, no token or an invalid one; the message says what to do.
    """
    try:
        return HfApi(token=token).whoami()["name"]
    except OSError as error:  # huggingface_hub's offline, missing-token and HTTP errors are OSErrors
        raise OSError(
            f"Cannot upload to the Hugging Face Hub: {str(error).rstrip('.')}. Uploading needs the network "
            "(HF_HUB_OFFLINE unset) and a token with write access: log in with `hf auth login` or pass "
            f"{token_flag}. To work without uploading, {without_upload}."
        ) from error


def upload_hub_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    output_kind: OutputKind,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload HeadCLIP",
    repo_type: str = "model",
) -> str:
    """
    Upload `folder` to the repository `repo_id` (a model; with `repo_type="dataset"` a data set, with "space" a Gradio
    Space, `headclip_hf.space`), creating the repository (and the branch `revision`) when missing. Only the entries of
    `output_kind` are uploaded: other files there, and the output markers of `headclip_hf.files`, stay local.

    Args:
        folder (`str` or `os.PathLike`):
            The folder to upload (`save_hub_folder`'s, an exported data set or a Space folder).
        repo_id (`str`):
            The Hub repository, `user/name`.
        output_kind (`OutputKind`):
            What the folder holds (`HUB_FOLDER_OUTPUT` for a folder `save_hub_folder` wrote): only its entries are
            uploaded.
        private (`bool`, *optional*, defaults to `False`):
            Create the repository as private (applies when it is created).
        revision (`str`, *optional*):
            The branch to push to, created if missing; the default branch when `None`.
        token (`str`, *optional*):
            A Hub token; by default the one of `hf auth login` or `HF_TOKEN`.
        commit_message (`str`, *optional*, defaults to `"Upload HeadCLIP"`):
            The commit message.
        repo_type (`str`, *optional*, defaults to `"model"`):
            `"model"`, `"dataset"` or `"space"`.

    Returns:
        `str`: the URL of the commit.

    Raises:
        `ValueError`: for an invalid `repo_id`, before anything is sent.
    """
    check_repo_id(repo_id)
    api = HfApi(token=token)
    space_options = {"space_sdk": "gradio"} if repo_type == "space" else {}
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, **space_options)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    own_entries = [pattern for entry in sorted(output_kind.entries) for pattern in (entry, f"{entry}/*")]
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type=repo_type,
        revision=revision,
        commit_message=commit_message,
        allow_patterns=own_entries + list(output_kind.patterns),
        ignore_patterns=[OUTPUT_MARKER, f"*/{OUTPUT_MARKER}"],
    )
    return commit.commit_url


__all__ = [
    "HUB_FOLDER_OUTPUT",
    "HUB_PIPELINE_TAG",
    "MODEL_CARD_TEMPLATE",
    "calibration_table",
    "check_repo_id",
    "check_upload_access",
    "copy_published_results",
    "custom_pipeline_declaration",
    "eval_results_from_json",
    "hub_dataset_id",
    "render_model_card",
    "save_hub_folder",
    "upload_hub_folder",
]
