# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""The demo as a Hugging Face Space: the Space folder `headclip push --space` writes, and what its app runs.

The Space folder (`save_space_folder`):

- `app.py`: the Space's entry, a copy of `headclip_hf/space_app.py` (`SPACE_APP_SOURCE`): `build_space_demo` and
  `launch`.
- `README.md`: the Space card; its metadata says `sdk: gradio`, `app_file: app.py`, the Gradio version
  (`sdk_version`, when Gradio is installed where the folder is written) and `models: [<model repository>]`, which
  both links the Space to the model on the Hub and tells the app which model to load (`headclip_model_revision` names
  a branch other than main).
- `requirements.txt`: this package's dependencies (the Space installs Gradio itself, from `sdk_version`).
- `headclip_hf/`: this package's source, so the Space runs exactly the code that published it, without a package
  index, with its sample images and their licences (`headclip_hf/sample_images/`), offered as examples on the page.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import PartialState
from huggingface_hub import SpaceCard, SpaceCardData, snapshot_download
from packaging.requirements import Requirement

from .adapters import load_headclip_model_and_processor
from .demo import build_demo
from .files import OutputKind, output_folder
from .hub import upload_hub_folder

if TYPE_CHECKING:
    import gradio

PACKAGE_DIR = Path(__file__).resolve().parent
SPACE_APP_FILE = "app.py"
SPACE_OUTPUT = OutputKind(
    "HeadCLIP Space folder",
    frozenset({SPACE_APP_FILE, "README.md", "requirements.txt", PACKAGE_DIR.name}),
)
# Overrides the model of the Space card, e.g. to run the app locally: HEADCLIP_MODEL=runs/mvtec/adapter python app.py
MODEL_ENVIRONMENT_VARIABLE = "HEADCLIP_MODEL"
REVISION_METADATA = "headclip_model_revision"

# The Space's app.py, shipped as it is.
SPACE_APP_SOURCE = PACKAGE_DIR / "space_app.py"


def space_requirements() -> list[str]:
    """This package's own dependencies (not those of its extras), from its installed metadata."""
    requirements = [Requirement(text) for text in importlib.metadata.requires(PACKAGE_DIR.name) or []]
    return [str(requirement) for requirement in requirements if not _needs_an_extra(requirement)]


def _needs_an_extra(requirement: Requirement) -> bool:
    return requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})


def _gradio_version() -> str | None:
    try:
        return importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        return None


def render_space_card(
    space_id: str, model_repo_id: str, *, model_revision: str | None = None, license: str | None = None
) -> SpaceCard:
    """
    The Space's `README.md`.

    Args:
        space_id (`str`): The Space, `user/name`.
        model_repo_id (`str`): The model repository the Space shows.
        model_revision (`str`, *optional*): The model's branch, if not main.
        license (`str`, *optional*): A Hub licence id (the model's).
    """
    extra_metadata = {REVISION_METADATA: model_revision} if model_revision else {}
    card_data = SpaceCardData(
        title=space_id.split("/")[-1],
        sdk="gradio",
        sdk_version=_gradio_version(),
        app_file=SPACE_APP_FILE,
        models=[model_repo_id],
        license=license,
        tags=["anomaly-detection", "zero-shot-anomaly-detection", "headclip"],
        emoji="🔍",
        colorFrom="blue",
        colorTo="red",
        pinned=False,
        short_description="Zero-shot anomaly detection with HeadCLIP",
        **extra_metadata,
    )
    revision_note = f" (branch `{model_revision}`)" if model_revision else ""
    text = f"""
# HeadCLIP zero-shot anomaly detection

Upload an image (or pick a sample image) to see where
[{model_repo_id}](https://huggingface.co/{model_repo_id}){revision_note} finds anomalies: the heatmap, the predicted
mask, the anomaly score and the decision. The sliders set the image and pixel thresholds; they start at the model's
calibrated thresholds when it has them.

This Space runs the `headclip_hf` package (its source is in `headclip_hf/`) and was written by
`headclip push --space`. To run the same app on your own machine: `pip install "headclip_hf[demo]"` in a clone of
the project, then `headclip demo --model {model_repo_id}`.

The sample images in `headclip_hf/sample_images/` keep their own licences (MVTec AD: CC BY-NC-SA 4.0; Kvasir-SEG:
research and education); `headclip_hf/sample_images/README.md` gives their sources, the changes made and the
citations.
"""
    return SpaceCard(f"---\n{card_data.to_yaml()}\n---\n{text}")


def save_space_folder(
    folder: str | os.PathLike,
    space_id: str,
    model_repo_id: str,
    *,
    model_revision: str | None = None,
    license: str | None = None,
    overwrite: bool = False,
) -> Path:
    """
    Write the Space folder (see the module docstring) through `headclip_hf.files.output_folder`: an earlier Space
    folder there is replaced, a folder with other files is refused unless `overwrite`.

    Args:
        folder (`str` or `os.PathLike`): Where to write it.
        space_id (`str`): The Space, `user/name`.
        model_repo_id (`str`): The model repository the Space shows.
        model_revision (`str`, *optional*): The model's branch, if not main.
        license (`str`, *optional*): A Hub licence id (the model's).
        overwrite (`bool`, *optional*, defaults to `False`): Replace the Space's files in a folder that also holds
            other files (those stay, and are not uploaded).

    Returns:
        `Path`: The folder.
    """
    with output_folder(folder, SPACE_OUTPUT, overwrite) as staging:
        shutil.copyfile(SPACE_APP_SOURCE, staging / SPACE_APP_FILE)
        (staging / "requirements.txt").write_text("\n".join(space_requirements()) + "\n")
        card = render_space_card(space_id, model_repo_id, model_revision=model_revision, license=license)
        card.save(staging / "README.md")
        shutil.copytree(PACKAGE_DIR, staging / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__"))
    return Path(folder)


def publish_space(
    space_id: str,
    model_repo_id: str,
    *,
    folder: str | os.PathLike | None = None,
    upload: bool = True,
    model_revision: str | None = None,
    license: str | None = None,
    private: bool = False,
    token: str | None = None,
    overwrite: bool = False,
) -> str | None:
    """
    Write the Space folder of `model_repo_id` ([`save_space_folder`]) and upload it to the Gradio Space `space_id`,
    created when missing (`headclip push --space`).

    Args:
        space_id (`str`): The Space, `user/name`.
        model_repo_id (`str`): The model repository the Space shows.
        folder (`str` or `os.PathLike`, *optional*): Where to write the folder (default: a temporary folder, removed
            after the upload).
        upload (`bool`, *optional*, defaults to `True`): Upload it; `False` only writes it (a dry run).
        model_revision (`str`, *optional*): The model's branch, if not main.
        license (`str`, *optional*): A Hub licence id (the model's).
        private (`bool`, *optional*, defaults to `False`): Create the Space as private.
        token (`str`, *optional*): A Hub token (default: the one of `hf auth login`).
        overwrite (`bool`, *optional*, defaults to `False`): As for [`save_space_folder`].

    Returns:
        The URL of the upload's commit, `None` without `upload`.
    """
    with tempfile.TemporaryDirectory(prefix="headclip-space-") as staging:
        folder = save_space_folder(
            folder or Path(staging) / "space",
            space_id,
            model_repo_id,
            model_revision=model_revision,
            license=license,
            overwrite=overwrite,
        )
        if not upload:
            return None
        return upload_hub_folder(
            folder,
            space_id,
            private=private,
            token=token,
            commit_message="Upload the HeadCLIP demo",
            repo_type="space",
            output_kind=SPACE_OUTPUT,
        )


def space_model(app_dir: str | os.PathLike) -> tuple[str, str | None]:
    """
    The model a Space app shows: `$HEADCLIP_MODEL` (a Hub id or a folder) if set, else the first entry of `models` in
    the Space card `app_dir/README.md`, with its `headclip_model_revision`.

    Returns:
        `(model, revision)`.

    Raises:
        `ValueError`: neither names a model.
    """
    if os.environ.get(MODEL_ENVIRONMENT_VARIABLE):
        return os.environ[MODEL_ENVIRONMENT_VARIABLE], None
    readme = Path(app_dir) / "README.md"
    if readme.is_file():
        card_data = SpaceCard.load(readme).data
        if card_data.models:
            return card_data.models[0], card_data.get(REVISION_METADATA)
    raise ValueError(
        f"No model to show: set {MODEL_ENVIRONMENT_VARIABLE} to a HeadCLIP (Hub id or local folder), or list the "
        f"model under `models:` in the metadata of {readme}."
    )


def build_space_demo(app_dir: str | os.PathLike) -> gradio.Blocks:
    """
    The demo of a Space (or of `python -m headclip_hf.space_app` run locally): the model of [`space_model`] (a Hub
    repository is downloaded whole, so that full models and adapter-only repositories load alike), on the first
    accelerator if any, with the package's sample images as examples.
    """
    model_name, revision = space_model(app_dir)
    local = model_name if Path(model_name).exists() else snapshot_download(model_name, revision=revision)
    model, processor = load_headclip_model_and_processor(local)
    model = model.to(PartialState().device).eval()
    return build_demo(model, processor, model_name=model_name)


__all__ = [
    "MODEL_ENVIRONMENT_VARIABLE",
    "SPACE_APP_SOURCE",
    "SPACE_OUTPUT",
    "build_space_demo",
    "publish_space",
    "render_space_card",
    "save_space_folder",
    "space_model",
    "space_requirements",
]
