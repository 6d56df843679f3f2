"""Hub publishing: the dry-run folder (full model and adapter only), its model card and metadata, loading it without
the package (AutoModel and the pipeline through remote code), and the upload calls."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, SpaceCard
from huggingface_hub.utils import filter_repo_objects
from packaging.requirements import Requirement
from PIL import Image

from headclip_hf import HeadCLIPModel, HeadCLIPProcessor, save_results
from headclip_hf.cli import main
from headclip_hf.demo import sample_images
from headclip_hf.files import OUTPUT_MARKER
from headclip_hf.hub import HUB_PIPELINE_TAG, custom_pipeline_declaration
from headclip_hf.metrics import AnomalyMetricsAccumulator
from headclip_hf.provenance import evaluation_provenance
from headclip_hf.space import SPACE_APP_SOURCE, space_model, space_requirements

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_ID = "someone/headclip-tiny"
BASE_MODEL = "openai/clip-vit-large-patch14-336"
# Every published folder: the card, the processor (with its remote code: it reads the working size from the config)
# and the evaluation run.
COMMON_FILES = {
    "README.md",
    "configuration_headclip.py",
    "processing_headclip.py",
    "image_utils_headclip.py",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "evaluation/results.json",
    "evaluation/results.md",
}
FULL_MODEL_FILES = COMMON_FILES | {
    "config.json",
    "model.safetensors",
    "modeling_headclip.py",
    "pipeline_headclip.py",
}
ADAPTER_FILES = COMMON_FILES | {"headclip_adapter.safetensors", "headclip_adapter_config.json"}


def provenance_of(checkpoint) -> dict:
    """The provenance an evaluation of `checkpoint` records (what `headclip push --results` checks)."""
    model = HeadCLIPModel.from_pretrained(checkpoint)
    processor = HeadCLIPProcessor.from_pretrained(checkpoint)
    return evaluation_provenance(model, processor, data_source="synthetic", model_name_or_path=checkpoint)


@pytest.fixture
def results_dir(tmp_path, headclip_checkpoint):
    """
    An evaluation run of `headclip_checkpoint` written by `save_results`: "bottle" with masks, "screw" without (pixel
    metrics undefined).
    """
    rng = np.random.default_rng(0)
    accumulator = AnomalyMetricsAccumulator(num_bins=256)
    labels = torch.tensor([0, 0, 1, 1, 1])
    masks = torch.zeros(5, 8, 8)
    masks[2:, 2:5, 2:5] = 1
    maps = torch.from_numpy(rng.random((5, 8, 8), dtype=np.float32))
    maps[2:, 2:5, 2:5] += 0.5
    accumulator.update(
        categories=["bottle"] * 5,
        labels=labels,
        scores=torch.tensor([0.1, 0.4, 0.3, 0.8, 0.9]),
        masks=masks,
        anomaly_maps=maps.clamp(0, 1),
        mask_valid=torch.ones(5, dtype=torch.bool),
    )
    accumulator.update(
        categories=["screw"] * 4,
        labels=torch.tensor([0, 1, 0, 1]),
        scores=torch.tensor([0.2, 0.7, 0.6, 0.5]),
        masks=torch.zeros(4, 8, 8),
        anomaly_maps=torch.full((4, 8, 8), 0.5),
        mask_valid=torch.zeros(4, dtype=torch.bool),
    )
    path = tmp_path / "eval"
    save_results(accumulator.compute(), path, plots=False, provenance=provenance_of(headclip_checkpoint))
    return path


def push(checkpoint, results_dir, *extra):
    return main(
        [
            "push",
            "--model",
            str(checkpoint),
            "--results",
            str(results_dir),
            "--train-dataset",
            "MVTec AD",
            "--eval-dataset",
            "VisA",
            "--repo-id",
            REPO_ID,
            "--device",
            "cpu",
            *map(str, extra),
        ]
    )


def listing(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def test_dry_run_folder_of_full_model(headclip_checkpoint, results_dir, tmp_path):
    folder = tmp_path / "repo"
    assert push(headclip_checkpoint, results_dir, "--base-model", BASE_MODEL, "--dry-run", "--output-dir", folder) == 0
    assert listing(folder) == FULL_MODEL_FILES | {OUTPUT_MARKER}  # the marker is never uploaded (see below)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"] == {
        "zero-shot-anomaly-detection": {
            "impl": "pipeline_headclip.ZeroShotAnomalyDetectionPipeline",
            "pt": ["AutoModel"],
            "type": "image",
        }
    }
    assert config["custom_pipelines"] == custom_pipeline_declaration()
    assert config["auto_map"] == {
        "AutoConfig": "configuration_headclip.HeadCLIPConfig",
        "AutoModel": "modeling_headclip.HeadCLIPModel",
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_headclip.HeadCLIPProcessor"}
    # The shipped code is the package's own, and the pipeline file imports nothing from the package.
    package = Path(sys.modules["headclip_hf"].__file__).parent
    for name in (
        "configuration_headclip.py",
        "modeling_headclip.py",
        "processing_headclip.py",
        "image_utils_headclip.py",
        "pipeline_headclip.py",
    ):
        assert (folder / name).read_text() == (package / name).read_text()
    code = (folder / "pipeline_headclip.py").read_text().splitlines()
    imports = [line for line in code if line.startswith(("import ", "from "))]
    assert imports and not any("headclip_hf" in line or line.startswith("from .") for line in imports)
    assert (folder / "evaluation" / "results.json").read_text() == (results_dir / "results.json").read_text()
    # The weights are the model's.
    loaded = HeadCLIPModel.from_pretrained(folder)
    original = HeadCLIPModel.from_pretrained(headclip_checkpoint)
    assert torch.equal(loaded.head_weights, original.head_weights)


def test_only_the_results_and_plots_of_the_evaluation_are_published(headclip_checkpoint, results_dir, tmp_path):
    (results_dir / "plots").mkdir()
    Image.new("RGB", (4, 4)).save(results_dir / "plots" / "bottle.png")
    (results_dir / "report.html").write_text("<html>the evaluation images</html>")
    (results_dir / "report_files").mkdir()
    Image.new("RGB", (4, 4)).save(results_dir / "report_files" / "bottle_000.png")
    (results_dir / "per_image.csv").write_text("path\n/home/someone/private/bottle/000.png\n")
    (results_dir / "notes.txt").write_text("mine")
    folder = tmp_path / "repo"
    assert push(headclip_checkpoint, results_dir, "--dry-run", "--output-dir", folder) == 0
    assert listing(folder / "evaluation") == {"results.json", "results.md", "plots/bottle.png"}
    assert (folder / "evaluation" / "plots" / "bottle.png").read_bytes() == (
        results_dir / "plots" / "bottle.png"
    ).read_bytes()


def test_model_card_metadata_and_text(headclip_checkpoint, results_dir, tmp_path):
    folder = tmp_path / "repo"
    assert push(headclip_checkpoint, results_dir, "--base-model", BASE_MODEL, "--dry-run", "--output-dir", folder) == 0
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.license == "cc-by-nc-sa-4.0"
    assert data.base_model == BASE_MODEL
    assert data.library_name == "transformers"  # the full model loads with transformers alone (remote code)
    assert data.pipeline_tag == HUB_PIPELINE_TAG == "image-segmentation"
    assert data.datasets is None  # "MVTec AD" is a display name, not a Hub id
    assert {"anomaly-detection", "zero-shot-anomaly-detection", "headclip"} <= set(data.tags)
    assert data.model_name == "headclip-tiny"

    results = json.loads((results_dir / "results.json").read_text())
    defined = {name: metric["value"] for name, metric in results["mean"].items() if metric["value"] is not None}
    assert set(defined) == {"image_auroc", "image_ap", "image_f1_max", "mad_image"} | {
        "pixel_auroc",
        "pixel_ap",
        "pixel_f1_max",
        "pixel_aupro",
        "mad_pixel",
    }
    eval_results = {result.metric_type: result for result in data.eval_results}
    assert set(eval_results) == set(defined)
    for name, value in defined.items():
        result = eval_results[name]
        assert result.metric_value == round(100 * value, 1)
        assert (result.task_type, result.dataset_name, result.dataset_type) == (
            "zero-shot-anomaly-detection",
            "VisA",
            "visa",
        )
        assert result.dataset_split == "test"
    assert eval_results["image_auroc"].metric_name == "Image AUROC (mean of 2 categories)"
    assert eval_results["pixel_aupro"].metric_name == "Pixel AUPRO (mean of 1 of 2 categories)"  # screw has no masks
    model_index = data.to_dict()["model-index"]
    assert model_index[0]["name"] == "headclip-tiny" and len(model_index[0]["results"]) == 1  # one task and data set
    assert len(model_index[0]["results"][0]["metrics"]) == len(defined)

    text = card.text
    assert (results_dir / "results.md").read_text().strip() in text
    assert "{{" not in text and "{%" not in text
    assert "trust_remote_code=True" in text and f'model="{REPO_ID}"' in text
    assert "CC BY-NC-SA 4.0" in text and "non-commercial" in text
    for citation in (
        "arXiv:2505.22259",
        "AnomalyCLIP: Object-agnostic Prompt Learning",
        "Learning Transferable Visual",
    ):
        assert citation in text
    assert "trained on the labelled test split of **MVTec AD**" in text and "**VisA**" in text


def test_card_without_defined_metrics_has_no_model_index(headclip_checkpoint, tmp_path):
    accumulator = AnomalyMetricsAccumulator(num_bins=16)
    accumulator.update(categories=["pcb"], labels=torch.tensor([1]), scores=torch.tensor([0.9]))
    results_dir = tmp_path / "eval"
    save_results(accumulator.compute(), results_dir, plots=False, provenance=provenance_of(headclip_checkpoint))
    folder = tmp_path / "repo"
    assert push(headclip_checkpoint, results_dir, "--dry-run", "--output-dir", folder) == 0
    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert card.data.base_model is None  # the model came from a local folder and no --base-model was given


REMOTE_PIPELINE_SCRIPT = """
import json

from transformers import AutoModel, pipeline

folder, output_file, *images = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
assert type(model).__name__ == "HeadCLIPModel" and "transformers_modules" in type(model).__module__
detector = pipeline("zero-shot-anomaly-detection", model=folder, trust_remote_code=True, device="cpu")
assert "transformers_modules" in type(detector).__module__, type(detector).__module__
assert "transformers_modules" in type(detector.processor).__module__, type(detector.processor).__module__
results = detector(images)
json.dump(
    [
        {
            "score": result["score"],
            "label": result["label"],
            "map_shape": list(result["anomaly_map"].shape),
            "mask_size": list(result["mask"].size),
            "heatmap": [result["heatmap"].mode, *result["heatmap"].size],
        }
        for result in results
    ],
    open(output_file, "w"),
)
"""


def test_remote_code_pipeline_from_dry_run_folder(
    headclip_checkpoint, results_dir, tmp_path, test_data_dir, run_without_headclip
):
    folder = tmp_path / "repo"
    assert push(headclip_checkpoint, results_dir, "--dry-run", "--output-dir", folder) == 0
    polyps = sorted((test_data_dir / "kvasir_seg" / "colon" / "polyp").iterdir())[:2]
    images = [str(path) for path in polyps]
    run_without_headclip(REMOTE_PIPELINE_SCRIPT, folder, tmp_path / "out.json", *images)
    remote = json.loads((tmp_path / "out.json").read_text())

    model = HeadCLIPModel.from_pretrained(headclip_checkpoint).eval()
    processor = HeadCLIPProcessor.from_pretrained(headclip_checkpoint)
    for path, output in zip(images, remote, strict=True):
        width, height = Image.open(path).size
        with torch.no_grad():
            assert output["score"] == model(**processor(images=path)).image_score.item()
        assert output["map_shape"] == [height, width] and output["mask_size"] == [width, height]
        assert output["heatmap"] == ["RGB", width, height]
        assert output["label"] in ("normal", "anomaly")


def test_dry_run_folder_of_adapter_only(headclip_checkpoint, results_dir, tmp_path):
    folder = tmp_path / "repo"
    args = ("--adapter-only", "--base-model", BASE_MODEL, "--dry-run", "--output-dir", folder)
    assert push(headclip_checkpoint, results_dir, *args) == 0
    assert listing(folder) == ADAPTER_FILES | {OUTPUT_MARKER}
    adapter_config = json.loads((folder / "headclip_adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == BASE_MODEL
    card = ModelCard.load(folder / "README.md")
    assert "load_headclip_model(adapter)" in card.text and "trust_remote_code" not in card.text
    assert card.data.library_name == "headclip_hf"  # an adapter needs this package


def test_training_data_given_as_a_hub_id_fills_the_datasets_metadata(headclip_checkpoint, results_dir, tmp_path):
    folder = tmp_path / "repo"
    args = ("--train-dataset", "someone/mvtec-ad", "--dry-run", "--output-dir", folder)
    assert push(headclip_checkpoint, results_dir, *args) == 0
    assert ModelCard.load(folder / "README.md").data.datasets == ["someone/mvtec-ad"]


@pytest.mark.parametrize("repo_id", ["not a valid id!!", "a/b/c", "", "user/na--me"])
def test_invalid_repo_ids_are_refused_before_the_model_loads(
    headclip_checkpoint, results_dir, tmp_path, repo_id, monkeypatch, capsys
):
    monkeypatch.setattr("headclip_hf.cli.push.load_model_and_processor", lambda *args: pytest.fail("model loaded"))
    folder = tmp_path / "repo"
    assert push(headclip_checkpoint, results_dir, "--repo-id", repo_id, "--dry-run", "--output-dir", folder) == 1
    assert f"headclip: error: {repo_id!r} is not a valid Hub repository id" in capsys.readouterr().err
    assert not folder.exists()


def test_results_of_another_model_are_refused(headclip_checkpoint, results_dir, tmp_path, capsys):
    other = HeadCLIPModel.from_pretrained(headclip_checkpoint)
    with torch.no_grad():
        other.head_weights.mul_(2.0)
    other.save_pretrained(tmp_path / "other")
    HeadCLIPProcessor.from_pretrained(headclip_checkpoint).save_pretrained(tmp_path / "other")
    folder = tmp_path / "repo"
    assert push(tmp_path / "other", results_dir, "--dry-run", "--output-dir", folder) == 1
    error = capsys.readouterr().err
    assert (
        f"headclip: error: {results_dir / 'results.json'} was computed by another model ({headclip_checkpoint}"
        in error
    )
    assert "than the one being pushed" in error and "headclip evaluate" in error
    assert not folder.exists()
    # Results that do not say which model produced them are refused too.
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    payload = json.loads((results_dir / "results.json").read_text())
    del payload["provenance"]
    (unknown / "results.json").write_text(json.dumps(payload))
    (unknown / "results.md").write_text((results_dir / "results.md").read_text())
    assert push(headclip_checkpoint, unknown, "--dry-run", "--output-dir", folder) == 1
    assert "does not say which model produced it (no 'provenance')" in capsys.readouterr().err


def test_adapter_only_needs_a_hub_base(headclip_checkpoint, results_dir, tmp_path, capsys):
    folder = tmp_path / "repo"
    assert push(headclip_checkpoint, results_dir, "--adapter-only", "--dry-run", "--output-dir", folder) == 1
    assert "pass --base_model" in capsys.readouterr().err
    assert not folder.exists()


def test_dry_run_errors(headclip_checkpoint, results_dir, tmp_path, capsys):
    assert push(headclip_checkpoint, results_dir, "--dry-run") == 1
    assert "--dry_run writes the repository folder to --output_dir" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "old.txt").write_text("old")
    assert push(headclip_checkpoint, results_dir, "--dry-run", "--output-dir", occupied) == 1
    assert f"{occupied} holds files that are not part of a Hub repository folder (old.txt)" in capsys.readouterr().err
    assert [path.name for path in occupied.iterdir()] == ["old.txt"]
    assert push(headclip_checkpoint, tmp_path, "--dry-run", "--output-dir", tmp_path / "repo") == 1
    assert "holds no evaluation results (results.json, results.md)" in capsys.readouterr().err
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")  # a PEFT adapter folder
    args = ("--adapter", lora, "--adapter-only", "--base-model", BASE_MODEL, "--dry-run", "--output-dir", tmp_path)
    assert push(headclip_checkpoint, results_dir, *args) == 1
    assert "A LoRA (PEFT) adapter changes the CLIP backbone" in capsys.readouterr().err


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls, and the files of the uploaded folder."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def whoami(self):
        self.calls.append(("whoami", {}))
        return {"name": "someone"}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        # The files `HfApi.upload_folder` would send: the folder's files filtered by its patterns, as it filters them.
        files = filter_repo_objects(
            sorted(listing(Path(kwargs["folder_path"]))),
            allow_patterns=kwargs.get("allow_patterns"),
            ignore_patterns=kwargs.get("ignore_patterns"),
        )
        self.calls.append(("upload_folder", {**kwargs, "files": set(files)}))

        class Commit:
            commit_url = "https://huggingface.co/someone/headclip-tiny/commit/abc"

        return Commit()


def test_push_creates_the_repository_and_uploads_the_folder(headclip_checkpoint, results_dir, monkeypatch, capsys):
    RecordingHfApi.calls = []
    monkeypatch.setattr("headclip_hf.hub.HfApi", RecordingHfApi)
    args = ("--private", "--revision", "v1", "--token", "hf_test", "--commit-message", "First HeadCLIP")
    assert push(headclip_checkpoint, results_dir, *args) == 0
    names = [name for name, _ in RecordingHfApi.calls]
    assert names == ["init", "whoami", "init", "create_repo", "create_branch", "upload_folder"]  # login checked first
    calls = dict(RecordingHfApi.calls)
    assert calls["init"] == {"token": "hf_test"}
    assert calls["create_repo"] == {"repo_id": REPO_ID, "repo_type": "model", "private": True, "exist_ok": True}
    assert calls["create_branch"] == {"repo_id": REPO_ID, "branch": "v1", "repo_type": "model", "exist_ok": True}
    upload = calls["upload_folder"]
    assert (upload["repo_id"], upload["revision"], upload["commit_message"]) == (REPO_ID, "v1", "First HeadCLIP")
    assert upload["files"] == FULL_MODEL_FILES
    assert "commit/abc" in capsys.readouterr().out
    assert not Path(upload["folder_path"]).exists()  # the staging folder is removed


def test_push_to_main_of_a_public_repository(headclip_checkpoint, results_dir, monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr("headclip_hf.hub.HfApi", RecordingHfApi)
    assert push(headclip_checkpoint, results_dir) == 0
    calls = dict(RecordingHfApi.calls)
    assert "create_branch" not in calls
    assert calls["create_repo"]["private"] is False and calls["upload_folder"]["revision"] is None


# ---------------------------------------------------------------------------------------------------------------------
# The demo as a Space (--space)
# ---------------------------------------------------------------------------------------------------------------------

SPACE_ID = "someone/headclip-demo"


def test_dry_run_space_folder(headclip_checkpoint, results_dir, tmp_path, capsys):
    space = tmp_path / "space"
    args = ("--dry-run", "--output-dir", tmp_path / "repo", "--space", SPACE_ID, "--space-dir", space)
    assert push(headclip_checkpoint, results_dir, *args) == 0
    assert f"wrote the Space folder for {SPACE_ID} to {space}; nothing was uploaded" in capsys.readouterr().out
    assert listing(tmp_path / "repo") == FULL_MODEL_FILES | {OUTPUT_MARKER}  # the model's folder: nothing of the Space
    files = listing(space)
    assert {"app.py", "README.md", "requirements.txt", "headclip_hf/sample_images/README.md"} <= files
    assert not any("__pycache__" in name for name in files)
    # The app is the package's space_app.py; the package's source travels with it, unchanged.
    package = Path(sys.modules["headclip_hf"].__file__).parent
    assert SPACE_APP_SOURCE == package / "space_app.py"
    assert (space / "app.py").read_text() == SPACE_APP_SOURCE.read_text()
    sources = {path.relative_to(package).as_posix() for path in package.rglob("*.py")}
    assert {f"headclip_hf/{name}" for name in sources} <= files
    for name in ("demo.py", "space.py", "pipeline_headclip.py", "cli/demo.py"):
        assert (space / "headclip_hf" / name).read_text() == (package / name).read_text()
    examples = sorted(path.name for path in sample_images(space / "headclip_hf" / "sample_images"))
    assert examples == sorted(path.name for path in sample_images()) and examples
    # Space metadata: Gradio, the app file, the model it shows.
    card = SpaceCard.load(space / "README.md")
    assert (card.data.sdk, card.data.app_file, card.data.models) == ("gradio", "app.py", [REPO_ID])
    assert card.data.sdk_version == importlib.metadata.version("gradio")
    assert card.data.license == "cc-by-nc-sa-4.0" and card.data.get("headclip_model_revision") is None
    assert f"https://huggingface.co/{REPO_ID}" in card.text
    requirements = (space / "requirements.txt").read_text().splitlines()
    assert requirements == space_requirements()
    names = {Requirement(line).name for line in requirements}
    assert {"torch", "transformers", "huggingface_hub"} <= names and not names & {"pytest", "gradio", "selenium"}
    assert space_model(space) == (REPO_ID, None)


def test_space_app_runs_from_its_folder(headclip_checkpoint, results_dir, tmp_path):
    pytest.importorskip("gradio", reason="gradio is not installed: pip install -e '.[dev]'")
    space = tmp_path / "space"
    args = ("--dry-run", "--output-dir", tmp_path / "repo", "--space", SPACE_ID, "--space-dir", space)
    assert push(headclip_checkpoint, results_dir, *args) == 0
    script = (
        "import json, app, headclip_hf\n"
        "print(json.dumps([headclip_hf.__file__, type(app.demo).__name__, app.demo.title]))\n"
    )
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "HEADCLIP_MODEL": str(headclip_checkpoint)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=space, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    package_file, demo_type, title = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(package_file).parent == space / "headclip_hf"  # the Space's own copy of the package
    assert (demo_type, title) == ("Blocks", "HeadCLIP zero-shot anomaly detection")


def test_space_model_and_revision(headclip_checkpoint, results_dir, tmp_path, monkeypatch):
    space = tmp_path / "space"
    args = ("--dry-run", "--output-dir", tmp_path / "repo", "--space", SPACE_ID, "--space-dir", space)
    assert push(headclip_checkpoint, results_dir, *args, "--revision", "v1") == 0
    assert space_model(space) == (REPO_ID, "v1")
    assert "(branch `v1`)" in SpaceCard.load(space / "README.md").text
    monkeypatch.setenv("HEADCLIP_MODEL", "local/model")
    assert space_model(space) == ("local/model", None)
    monkeypatch.delenv("HEADCLIP_MODEL")
    with pytest.raises(ValueError, match="No model to show: set HEADCLIP_MODEL to a HeadCLIP"):
        space_model(tmp_path)


def test_space_errors(headclip_checkpoint, results_dir, tmp_path, capsys):
    space_args = ("--space", SPACE_ID)
    assert push(headclip_checkpoint, results_dir, "--dry-run", "--output-dir", tmp_path / "repo", *space_args) == 1
    assert "--dry_run writes the Space folder to --space_dir: pass --space_dir DIR." in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    args = ("--dry-run", "--output-dir", tmp_path / "repo", *space_args, "--space-dir", occupied)
    assert push(headclip_checkpoint, results_dir, *args) == 1
    assert "holds files that are not part of a HeadCLIP Space folder (notes.txt)" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()  # refused before anything was written
    assert listing(occupied) == {"notes.txt"}
    assert push(headclip_checkpoint, results_dir, *args, "--overwrite") == 0  # --overwrite applies to it too
    assert (occupied / "notes.txt").read_text() == "mine" and (occupied / "app.py").is_file()


def test_push_uploads_the_space_after_the_model(headclip_checkpoint, results_dir, monkeypatch, capsys):
    RecordingHfApi.calls = []
    monkeypatch.setattr("headclip_hf.hub.HfApi", RecordingHfApi)
    assert push(headclip_checkpoint, results_dir, "--private", "--token", "hf_test", "--space", SPACE_ID) == 0
    names = [name for name, _ in RecordingHfApi.calls]
    assert names == ["init", "whoami", "init", "create_repo", "upload_folder", "init", "create_repo", "upload_folder"]
    model_upload, space_create, space_upload = (RecordingHfApi.calls[i][1] for i in (4, 6, 7))
    assert model_upload["repo_id"] == REPO_ID and model_upload["files"] == FULL_MODEL_FILES
    assert RecordingHfApi.calls[5][1] == {"token": "hf_test"}
    assert space_create == {
        "repo_id": SPACE_ID,
        "repo_type": "space",
        "private": True,
        "exist_ok": True,
        "space_sdk": "gradio",
    }
    assert (space_upload["repo_id"], space_upload["repo_type"], space_upload["revision"]) == (SPACE_ID, "space", None)
    assert {"app.py", "README.md", "requirements.txt", "headclip_hf/demo.py"} <= space_upload["files"]
    assert not Path(space_upload["folder_path"]).exists()  # the temporary Space folder is removed
    assert f"Uploaded the Space {SPACE_ID}: https://huggingface.co/" in capsys.readouterr().out
