"""Issue 9 (reliability) and issue 10's command side: nothing the user had is lost, non-finite weights and outputs are
refused, unreadable inputs (decompression bombs, broken links) are reported while the rest is processed, every user
mistake is one `headclip: error:` line checked before the model loads, and the pipeline's edge cases.
(Conversion output folders: tests/test_conversion.py.)"""

import csv
import importlib.util
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors.torch import load_file, save_file

from headclip_hf import HeadCLIPProcessor
from headclip_hf.adapters import ADAPTER_CONFIG_NAME, load_headclip_model, save_headclip_adapter
from headclip_hf.cli import detect as detect_command
from headclip_hf.cli import main
from headclip_hf.cli.detect import collect_images
from headclip_hf.pipeline_headclip import TASK, NonFiniteOutputError, ZeroShotAnomalyDetectionPipeline

REPO_ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv) -> tuple[int, str, str]:
    """`headclip argv...` in-process: exit status, stdout, stderr; a user error never shows a traceback."""
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.out, captured.err


def decompression_bomb(path: Path) -> Path:
    """A 45-byte PNG whose header claims 20000 x 20000 RGB pixels (PIL refuses it: more than 2 x MAX_IMAGE_PIXELS)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder with two small random RGB images of different sizes."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (height, width) in (("a.png", (40, 30)), ("b.png", (48, 64))):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def detector(headclip_checkpoint):
    return ZeroShotAnomalyDetectionPipeline(
        model=load_headclip_model(headclip_checkpoint).eval(),
        processor=HeadCLIPProcessor.from_pretrained(headclip_checkpoint),
        task=TASK,
        device="cpu",
    )


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a command loads a model: its errors must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    for command in ("detect", "evaluate", "push"):
        monkeypatch.setattr(f"headclip_hf.cli.{command}.load_model_and_processor", refuse)


def listing(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


# 1. Writers never delete the user's files (adapters and converted models: tests/test_files.py, test_conversion.py).


def test_push_output_dir_keeps_the_users_files_and_never_uploads_them(
    headclip_checkpoint, tmp_path, capsys, monkeypatch
):
    results = tmp_path / "eval"
    results.mkdir()
    (results / "results.json").write_text(json.dumps({"num_categories": 1, "mean": {}}))
    (results / "results.md").write_text("| Category |\n")
    monkeypatch.setattr("headclip_hf.hub.eval_results_from_json", lambda *args: [])
    monkeypatch.setattr("headclip_hf.cli.push.check_results_provenance", lambda *args: None)  # not what is tested
    out = tmp_path / "repo"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "data.csv").write_text("a,b\n")
    push = ["push", "--model", headclip_checkpoint, "--results", results, "--train_dataset", "MVTec AD"]
    push += ["--eval_dataset", "VisA", "--repo_id", "someone/tiny", "--device", "cpu", "--output_dir", out]
    status, _, stderr = run(capsys, *push, "--dry_run")
    assert status == 1 and f"headclip: error: {out} holds files that are not part of a Hub repository folder" in stderr
    assert set(listing(out)) == {"notes.txt", "sub/data.csv"}

    uploaded = {}

    class HfApi:
        def __init__(self, token=None):
            pass

        def whoami(self):
            return {"name": "someone"}

        def create_repo(self, *args, **kwargs):
            pass

        def upload_folder(self, folder_path, allow_patterns, **kwargs):
            files = [path for path in listing(Path(folder_path))]
            uploaded["files"] = set(filter_repo_objects(files, allow_patterns=allow_patterns))

            class Commit:
                commit_url = "https://huggingface.co/someone/tiny/commit/1"

            return Commit()

    monkeypatch.setattr("headclip_hf.hub.HfApi", HfApi)
    status, _, _ = run(capsys, *push, "--overwrite")
    assert status == 0
    assert listing(out)["notes.txt"] == b"mine" and listing(out)["sub/data.csv"] == b"a,b\n"
    assert "config.json" in uploaded["files"] and "evaluation/results.md" in uploaded["files"]
    assert not {"notes.txt", "sub/data.csv"} & uploaded["files"]


@pytest.mark.usefixtures("no_model_loading")
def test_folders_of_user_files_named_like_an_output_are_not_replaced(headclip_checkpoint, tmp_path, capsys):
    """Only a folder with the writer's marker is an earlier output; a user's README.md, data/, app.py, ... are not."""
    data = tmp_path / "data"
    (data / "widget" / "good").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(data / "widget" / "good" / "000.png")

    def make_user_folder(name: str, files: list[str]) -> Path:
        folder = tmp_path / name
        for file in files:
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            (folder / file).write_text(f"the user's {file}")
        return folder

    export_dir = make_user_folder("proj", ["README.md", "data/raw.csv"])
    status, _, stderr = run(capsys, "dataset", "export", data, "--layout", "generic", "--output_dir", export_dir)
    assert status == 1 and f"{export_dir} holds files that are not part of a HeadCLIP data set export" in stderr
    assert "(README.md, data); it is not an earlier output (it has no .headclip_output.json marker)" in stderr

    results = make_user_folder("eval", ["results.json", "results.md"])
    push = ["push", "--model", headclip_checkpoint, "--results", results, "--train_dataset", "MVTec AD"]
    push += ["--eval_dataset", "VisA", "--repo_id", "someone/tiny", "--device", "cpu", "--dry_run"]
    repo_dir = make_user_folder("site", ["README.md", "config.json", "evaluation/notes.md"])
    status, _, stderr = run(capsys, *push, "--output_dir", repo_dir)
    assert status == 1 and f"{repo_dir} holds files that are not part of a Hub repository folder" in stderr
    space_dir = make_user_folder("app", ["README.md", "app.py", "requirements.txt", "examples/a.txt"])
    status, _, stderr = run(
        capsys, *push, "--output_dir", tmp_path / "repo", "--space", "a/b", "--space_dir", space_dir
    )
    assert status == 1 and f"{space_dir} holds files that are not part of a HeadCLIP Space folder" in stderr

    for folder in (export_dir, repo_dir, space_dir):
        assert all(content == f"the user's {name}".encode() for name, content in listing(folder).items())
    assert not (tmp_path / "repo").exists()  # refused before anything was written
    # An export written by the command is its earlier output: exported again there without --overwrite.
    again = ["dataset", "export", data, "--layout", "generic", "--output_dir", tmp_path / "export"]
    assert run(capsys, *again)[0] == 0 and run(capsys, *again)[0] == 0


@pytest.mark.parametrize("spelling", ["runs/mvtec/adapter", "./adapter", "~/no-such-headclip-folder", "runs/x"])
def test_a_missing_model_folder_is_named_before_anything_loads(images, tmp_path, capsys, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr("headclip_hf.cli._common.load_headclip_model_and_processor", lambda *a: pytest.fail("loaded"))
    for flag in ("--model", "--adapter"):
        status, _, stderr = run(capsys, "detect", images, flag, spelling, "--output_dir", tmp_path / "out")
        missing = Path(spelling).expanduser().resolve()
        assert status == 1 and stderr.startswith(f"headclip: error: {flag} {spelling}: no such folder ({missing} ")
        if spelling.startswith("runs/"):
            assert f"runs exists, but holds no {spelling.removeprefix('runs/')})" in stderr
        assert "Repo id" not in stderr and "HF_HUB_OFFLINE" not in stderr
    status, _, stderr = run(
        capsys, "train", "--model_name_or_path", spelling, "--train_data", images, "--output_dir", "o"
    )
    assert status == 1 and f"--model_name_or_path {spelling}: no such folder" in stderr
    assert not (tmp_path / "out").exists()


# 3. Non-finite weights are refused when loading; non-finite outputs are errors, never labels.


def test_adapter_with_nan_head_weights_is_refused(
    tiny_model, clip_checkpoint, clip_tokenizer, images, tmp_path, capsys
):
    HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64).save_pretrained(clip_checkpoint)
    with torch.no_grad():
        tiny_model.head_weights[1, 2] = float("nan")
    adapter = save_headclip_adapter(tiny_model, tmp_path / "adapter", base_model_name_or_path=str(clip_checkpoint))
    message = r"Refused to load the adapter .*headclip_adapter.safetensors: the tensors attention_head_weights.weight"
    with pytest.raises(ValueError, match=message + " hold NaN or infinite values"):
        load_headclip_model(adapter)
    status, _, stderr = run(capsys, "detect", images, "--model", adapter, "--output_dir", tmp_path / "out")
    assert status == 1 and "headclip: error: Cannot load the model from" in stderr
    assert "attention_head_weights.weight hold NaN or infinite values" in stderr
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_infinite_weights_is_refused(headclip_checkpoint):
    weights = load_file(headclip_checkpoint / "model.safetensors")
    name = "vision_model.encoder.layers.0.mlp.fc1.weight"
    weights[name][0, 0] = float("inf")
    save_file(weights, headclip_checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"Refused to load the checkpoint .*headclip: the tensors {name} hold NaN"):
        load_headclip_model(headclip_checkpoint)


def nan_for_width(width: int):
    """A `_forward` replacement that makes the score and map NaN for images `width` pixels wide."""
    forward = ZeroShotAnomalyDetectionPipeline._forward

    def patched(self, model_inputs, **forward_params):
        outputs = forward(self, model_inputs, **forward_params)
        images = model_inputs["image"] if isinstance(model_inputs["image"], list) else [model_inputs["image"]]
        for index, image in enumerate(images):
            if image.width == width:
                outputs["image_score"][index] = float("nan")
                outputs["anomaly_map"][index] = float("nan")
        return outputs

    return patched


def test_non_finite_outputs_are_errors_naming_the_image(detector, images, monkeypatch):
    monkeypatch.setattr(ZeroShotAnomalyDetectionPipeline, "_forward", nan_for_width(64))
    assert math.isfinite(detector(str(images / "a.png"))["score"])
    with pytest.raises(NonFiniteOutputError, match=r"anomaly score \(nan\) or map for '.*b\.png' holds NaN"):
        detector(str(images / "b.png"))
    with pytest.raises(ValueError, match=r"for inputs\[1\] \('.*b\.png'\) holds NaN or infinite values"):
        detector([str(images / "a.png"), str(images / "b.png")], batch_size=2)


def test_detect_reports_an_image_with_a_non_finite_score_as_failed(
    headclip_checkpoint, images, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(ZeroShotAnomalyDetectionPipeline, "_forward", nan_for_width(64))
    argv = ["detect", images, "--model", headclip_checkpoint, "--output_dir", tmp_path / "out", "--batch_size", 2]
    status, stdout, stderr = run(capsys, *argv)
    assert status == 1 and "1 of 2 images processed" in stdout
    assert f"{images / 'b.png'}: The model's anomaly score (nan) or map" in stderr
    with open(tmp_path / "out" / "scores.csv", newline="") as file:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(file)}
    assert rows["a.png"]["label"] in ("normal", "anomaly") and rows["b.png"]["label"] == ""
    assert "NaN or infinite" in rows["b.png"]["error"]
    assert sorted(listing(tmp_path / "out" / "heatmaps")) == ["a.png"]


# 4. A decompression bomb is an unreadable image: named, counted, the rest processed.


def test_decompression_bomb_is_an_unreadable_image(headclip_checkpoint, images, detector, tmp_path, capsys):
    bomb = decompression_bomb(images / "bomb.png")
    status, stdout, stderr = run(capsys, "detect", images, "--model", headclip_checkpoint, "--out", tmp_path / "out")
    assert status == 1 and "2 of 3 images processed" in stdout and "1 failed" in stderr
    assert f"{bomb}: Cannot read image file '{bomb}': Image size (400000000 pixels) exceeds limit" in stderr
    assert "--max_image_pixels" in stderr
    summary = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert [Path(entry["path"]).name for entry in summary["images"]] == ["a.png", "b.png"]

    with pytest.raises(ValueError, match=rf"inputs\[1\] \('{bomb}'\): Cannot read image file .*decompression bomb"):
        detector([str(images / "a.png"), str(bomb)])
    with pytest.raises(ValueError, match=r"Cannot read image file .*bomb\.png.*exceeds limit"):
        detector.processor(images=str(bomb))


def test_max_image_pixels_sets_the_limit_for_the_run(headclip_checkpoint, images, tmp_path, capsys):
    default = Image.MAX_IMAGE_PIXELS
    argv = ["detect", images, "--model", headclip_checkpoint, "--out", tmp_path / "out", "--max_image_pixels", 700]
    status, stdout, stderr = run(capsys, *argv)
    # b.png (3072 pixels) is above twice the limit, a.png (1200) below: PIL refuses only b.png.
    assert status == 1 and "1 of 2 images processed" in stdout and "b.png': Image size (3072 pixels)" in stderr
    assert Image.MAX_IMAGE_PIXELS == default
    with pytest.raises(SystemExit):
        main(["detect", "--help"])
    assert "--max_image_pixels" in capsys.readouterr().out


# 5. Detect outputs appear together or not at all.


def test_detect_failing_midway_leaves_the_earlier_output_intact(
    headclip_checkpoint, images, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    argv = ["detect", images, "--model", headclip_checkpoint, "--out", out, "--batch_size", 1]
    assert run(capsys, *argv)[0] == 0
    earlier = listing(out)
    assert {"scores.csv", "scores.json", "heatmaps/a.png", "masks/b.png"} <= set(earlier)

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(images / "c.png")
    detect_batch = detect_command._detect_batch
    calls = []

    def interrupted_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return detect_batch(*args, **kwargs)

    monkeypatch.setattr(detect_command, "_detect_batch", interrupted_on_the_second_batch)
    assert run(capsys, *argv)[0] == 130
    assert listing(out) == earlier
    assert sorted(path.name for path in tmp_path.iterdir()) == ["headclip", "images", "out"]  # no staging left


def test_detect_refuses_a_folder_that_is_not_a_detect_output(headclip_checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["detect", images, "--model", headclip_checkpoint, "--out", out]
    status, _, stderr = run(capsys, *argv)
    assert status == 1 and f"headclip: error: {out} holds files that are not part of a headclip detect" in stderr
    assert listing(out) == {"notes.txt": b"mine"}
    assert run(capsys, *argv, "--overwrite")[0] == 0
    assert listing(out)["notes.txt"] == b"mine" and "scores.csv" in listing(out)


# 6. User mistakes: one `headclip: error:` line, checked before any work.


@pytest.mark.parametrize("command", ["detect", "evaluate", "push"])
def test_output_dir_that_cannot_be_written_is_refused_before_the_model_loads(
    command, images, tmp_path, capsys, no_model_loading, monkeypatch
):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    arguments = {
        "detect": [images],
        "evaluate": [images],
        "push": ["--results", images, "--train_dataset", "x", "--eval_dataset", "y", "--repo_id", "a/b", "--dry_run"],
    }[command]
    if command == "push":
        for name in ("results.json", "results.md"):
            (images / name).write_text("{}")
    status, _, stderr = run(capsys, command, *arguments, "--output_dir", a_file)
    assert status == 1 and f"headclip: error: {a_file} is a file, not a folder" in stderr
    status, _, stderr = run(capsys, command, *arguments, "--output_dir", a_file / "out")
    assert status == 1 and f"headclip: error: Cannot write {a_file / 'out'}: {a_file} is a file" in stderr

    writable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path and writable(path, mode))
    status, _, stderr = run(capsys, command, *arguments, "--output_dir", tmp_path / "out")
    assert status == 1 and f"headclip: error: Cannot write {tmp_path / 'out'}: the folder {tmp_path} is not" in stderr


@pytest.mark.parametrize("command", ["detect", "evaluate"])
def test_devices_are_checked_before_the_model_loads(command, images, tmp_path, capsys, no_model_loading):
    status, _, stderr = run(capsys, command, images, "--out", tmp_path / "out", "--device", "nonsense")
    assert status == 1 and "headclip: error: --device 'nonsense' is not a device: use cpu, cuda" in stderr
    assert "This machine has: cpu" in stderr
    if not torch.cuda.is_available():
        status, _, stderr = run(capsys, command, images, "--out", tmp_path / "out", "--device", "cuda")
        assert status == 1 and "headclip: error: --device 'cuda': cuda is not available on this machine" in stderr
    assert not (tmp_path / "out").exists()


def test_truncated_weights_are_named(headclip_checkpoint, images, tmp_path, capsys):
    weights = headclip_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=rf"Cannot read the weights {weights}: the file is truncated or damaged"):
        load_headclip_model(headclip_checkpoint)
    status, _, stderr = run(capsys, "detect", images, "--model", headclip_checkpoint, "--out", tmp_path / "out")
    assert status == 1 and f"headclip: error: Cannot load the model from '{headclip_checkpoint}': " in stderr
    assert f"Cannot read the weights {weights}: the file is truncated" in stderr


def test_adapter_config_without_base_is_named(tiny_model, clip_checkpoint, images, tmp_path, capsys):
    adapter = save_headclip_adapter(tiny_model, tmp_path / "adapter", base_model_name_or_path=str(clip_checkpoint))
    config = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())
    del config["base_model_name_or_path"]
    (adapter / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    message = rf"{adapter / ADAPTER_CONFIG_NAME} is not a valid HeadCLIP adapter config: it lacks 'base_model_name"
    with pytest.raises(ValueError, match=message):
        load_headclip_model(adapter)
    status, _, stderr = run(capsys, "detect", images, "--model", adapter, "--out", tmp_path / "out")
    assert status == 1 and "headclip: error: " in stderr and "lacks 'base_model_name_or_path'" in stderr

    (adapter / ADAPTER_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"is not a valid HeadCLIP adapter config \(not JSON"):
        load_headclip_model(adapter)


def test_push_refuses_an_invalid_space_id_before_the_model_loads(images, tmp_path, capsys, no_model_loading):
    for name in ("results.json", "results.md"):
        (images / name).write_text("{}")
    argv = ["push", "--results", images, "--train_dataset", "x", "--eval_dataset", "y", "--repo_id", "a/b"]
    status, _, stderr = run(capsys, *argv, "--dry_run", "--output_dir", tmp_path / "repo", "--space", "a/b/c")
    assert status == 1 and "headclip: error: 'a/b/c' is not a valid Hub repository id" in stderr
    assert not (tmp_path / "repo").exists()


def test_push_offline_is_refused_before_the_model_loads(images, tmp_path, capsys, no_model_loading):
    for name in ("results.json", "results.md"):
        (images / name).write_text("{}")
    argv = ["push", "--results", images, "--train_dataset", "x", "--eval_dataset", "y", "--repo_id", "a/b"]
    status, _, stderr = run(capsys, *argv, "--output_dir", tmp_path / "repo", "--token", "hf_x")  # HF_HUB_OFFLINE=1
    assert status == 1 and "headclip: error: Cannot upload to the Hugging Face Hub" in stderr
    assert "--dry_run --output_dir DIR" in stderr
    assert not (tmp_path / "repo").exists()


# 11. Pipeline edge cases: checked before any forward pass.


@pytest.fixture
def counted_forward(detector, monkeypatch):
    """Counts the model's forward passes."""
    calls = []
    forward = detector.model.forward
    monkeypatch.setattr(detector.model, "forward", lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs))
    return calls


def test_empty_list_gives_an_empty_list(detector, counted_forward):
    assert detector([]) == [] and counted_forward == []


def test_one_unreadable_item_is_named_before_any_forward_pass(detector, images, counted_forward):
    corrupt = images / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    inputs = [str(images / "a.png"), Image.open(images / "b.png"), str(corrupt)]
    with pytest.raises(ValueError, match=rf"^inputs\[2\] \('{corrupt}'\): Cannot read image file '{corrupt}'"):
        detector(inputs, batch_size=1)
    with pytest.raises(ValueError, match=r"^inputs\[1\] \(a value of type int\): Expected a PIL image"):
        detector([str(images / "a.png"), 3])
    with pytest.raises(ValueError, match=rf"^reference_images\[1\] \('{corrupt}'\): Cannot read image file"):
        detector(str(images / "a.png"), reference_images=[str(images / "b.png"), str(corrupt)])
    assert counted_forward == []
    assert len(detector(inputs[:2])) == 2 and len(counted_forward) == 2


@pytest.mark.parametrize("shape", [(0, 0), (0, 7, 3), (5, 0, 3)])
def test_empty_arrays_are_refused_up_front(detector, counted_forward, shape):
    with pytest.raises(ValueError, match=rf"a numpy array of shape \({shape[0]}, {shape[1]}.* is an empty image"):
        detector(np.zeros(shape, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"^inputs\[1\] \(a numpy array .* is an empty image"):
        detector([np.zeros((4, 4, 3), dtype=np.uint8), np.zeros(shape, dtype=np.uint8)])
    assert counted_forward == []


# Issue 10: one image-listing implementation; broken links reported, hidden files skipped.


def test_collect_images_skips_hidden_files_and_reports_broken_links(headclip_checkpoint, images, tmp_path, capsys):
    (images / ".hidden.png").write_bytes((images / "a.png").read_bytes())
    (images / "gone.png").symlink_to(tmp_path / "nowhere.png")
    files, problems = collect_images([str(images)])
    assert [file.name for file in files] == ["a.png", "b.png", "gone.png"] and problems == []
    status, stdout, stderr = run(capsys, "detect", images, "--model", headclip_checkpoint, "--out", tmp_path / "out")
    assert status == 1 and "2 of 3 images processed" in stdout
    assert f"gone.png': it is a broken symbolic link (its target {tmp_path / 'nowhere.png'} does not exist)" in stderr


def test_evaluate_example_is_headclip_evaluate_per_data_set(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_headclip", REPO_ROOT / "examples" / "evaluate_headclip.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    calls = []
    monkeypatch.setattr(example, "headclip", lambda argv: calls.append(argv) or 0)
    argv = ["--data", "data/visa", "data/mpdd", "--output-dir", str(tmp_path / "eval"), "--model", "m", "--batch_size"]
    assert example.main([*argv, "4"]) == 0
    passed_on = ["--model", "m", "--batch_size", "4"]
    assert calls == [
        ["evaluate", f"data/{name}", "--output_dir", str(tmp_path / "eval" / name), *passed_on]
        for name in ("visa", "mpdd")
    ]
    calls.clear()
    assert example.main([*argv, "4", "--k_shot", "2"]) == 0
    assert calls[0][:6] == ["evaluate", "data/visa", "--output_dir", str(tmp_path / "eval" / "visa"), "--k_shot", "2"]
    calls.clear()
    (tmp_path / "eval" / "mpdd").mkdir(parents=True)
    (tmp_path / "eval" / "mpdd" / "notes.txt").write_text("mine")
    assert example.main([*argv, "4"]) == 1 and calls == []  # every output folder is checked before the first run
    assert "holds files that are not part of a headclip evaluate output" in capsys.readouterr().err
