"""The `headclip` command: help and examples, detect (files, folders, globs, corrupt files), evaluate on real data,
the offline error, and the train / convert delegation."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image

from headclip_hf import HeadCLIPModel, HeadCLIPProcessor
from headclip_hf.adapters import save_headclip_adapter
from headclip_hf.cli import build_parser, main
from headclip_hf.cli import convert as convert_command
from headclip_hf.cli import train as train_command
from headclip_hf.cli.detect import collect_images
from headclip_hf.configuration_headclip import DEFAULT_CLIP_CHECKPOINT


def run(capsys, *argv):
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_help_lists_commands_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    overview = capsys.readouterr().out
    for command in ("detect", "evaluate", "train", "push", "convert"):
        assert command in overview
    for command, options in {
        "detect": ("--model", "--adapter", "--output_dir", "--threshold", "--pixel_threshold", "--batch_size"),
        "evaluate": ("--layout", "--model", "--adapter", "--output_dir", "--categories", "--image_size"),
        "push": ("--repo_id", "--results", "--dry_run", "--private", "--revision", "--adapter_only"),
    }.items():
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and f"headclip {command} " in text
        for option in options:
            assert option in text
            if "_" in option:  # help shows one spelling: transformers' underscore one
                assert option.replace("_", "-") not in text
    default_model = build_parser().parse_args(["detect", "a.png"]).model
    assert default_model == DEFAULT_CLIP_CHECKPOINT == "openai/clip-vit-large-patch14-336"


@pytest.mark.parametrize(
    "argv",
    [
        [
            "detect",
            "a.png",
            "--output_dir",
            "x",
            "--batch_size",
            "3",
            "--pixel_threshold",
            "0.4",
            "--image_size",
            "64",
        ],
        [
            "detect",
            "a.png",
            "--output-dir",
            "x",
            "--batch-size",
            "3",
            "--pixel-threshold",
            "0.4",
            "--image-size",
            "64",
        ],
        ["detect", "a.png", "--out", "x", "--batch_size", "3", "--pixel-threshold", "0.4", "--image_size", "64"],
    ],
    ids=["underscore", "dash", "mixed"],
)
def test_every_flag_accepts_both_spellings(argv):
    args = build_parser().parse_args(argv)
    assert (args.output_dir, args.batch_size, args.pixel_threshold, args.image_size) == ("x", 3, 0.4, 64)


def test_train_shows_one_spelling(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--per_device_train_batch_size" in text and "--per-device-train-batch-size" not in text


def test_detect_folder_with_a_corrupt_file(image_folder, headclip_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    status, stdout, stderr = run(
        capsys,
        "detect",
        image_folder,
        "--model",
        headclip_checkpoint,
        "--out",
        out,
        "--batch-size",
        2,
        "--device",
        "cpu",
    )
    assert status == 1
    assert "1 failed" in stderr and "corrupt.png" in stderr and "Cannot read image file" in stderr
    assert "3 of 4 images processed" in stdout
    with open(out / "scores.csv", newline="") as file:
        rows = {row["path"]: row for row in csv.DictReader(file)}
    assert set(rows) == {
        str(image_folder / name) for name in ("bottle_broken.png", "bottle_good.png", "polyp.jpg", "corrupt.png")
    }
    assert rows[str(image_folder / "corrupt.png")]["score"] == "" and rows[str(image_folder / "corrupt.png")]["error"]
    summary = json.loads((out / "scores.json").read_text())
    assert [entry["path"] for entry in summary["failed"]] == [str(image_folder / "corrupt.png")]
    assert summary["threshold"] == summary["pixel_threshold"] == 0.5

    model = HeadCLIPModel.from_pretrained(headclip_checkpoint).eval()
    processor = HeadCLIPProcessor.from_pretrained(headclip_checkpoint)
    for entry in summary["images"]:
        image = Image.open(entry["path"])
        with torch.no_grad():
            expected = model(**processor(images=image)).image_score.item()
        assert entry["score"] == pytest.approx(expected, abs=1e-6)
        assert entry["label"] == ("anomaly" if entry["score"] >= 0.5 else "normal")
        assert float(rows[entry["path"]]["score"]) == entry["score"] and rows[entry["path"]]["label"] == entry["label"]
        heatmap, mask = Image.open(out / entry["heatmap"]), Image.open(out / entry["mask"])
        assert heatmap.format == mask.format == "PNG"
        assert heatmap.mode == "RGB" and heatmap.size == mask.size == image.size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert sorted(entry["heatmap"] for entry in summary["images"]) == [
        "heatmaps/bottle_broken.png",
        "heatmaps/bottle_good.png",
        "heatmaps/polyp.png",
    ]


def test_detect_globs_missing_paths_and_adapters(
    image_folder, tiny_model, clip_checkpoint, clip_tokenizer, tmp_path, capsys
):
    # A CLIP checkpoint with its processor, and an adapter on it.
    HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64).save_pretrained(clip_checkpoint)
    with torch.no_grad():
        tiny_model.head_weights.uniform_(0.5, 1.5)
    adapter = save_headclip_adapter(tiny_model, tmp_path / "adapter", base_model_name_or_path=str(clip_checkpoint))
    out = tmp_path / "out"
    missing = tmp_path / "missing.png"
    status, _, stderr = run(
        capsys, "detect", image_folder / "bottle_*.png", missing, "--model", adapter, "--out", out, "--device", "cpu"
    )
    assert status == 1 and f"{missing}: no such file or folder" in stderr
    summary = json.loads((out / "scores.json").read_text())
    paths = [entry["path"] for entry in summary["images"]]
    assert paths == [str(image_folder / "bottle_broken.png"), str(image_folder / "bottle_good.png")]
    processor = HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64)
    with torch.no_grad():
        expected = tiny_model(**processor(images=paths[0])).image_score.item()
    assert summary["images"][0]["score"] == pytest.approx(expected, abs=1e-6)


def test_collect_images(image_folder, tmp_path):
    (image_folder / "nested").mkdir()
    shutil.copy(image_folder / "polyp.jpg", image_folder / "nested" / "polyp.jpg")
    files, problems = collect_images([str(image_folder), str(image_folder / "**" / "*.jpg"), str(tmp_path / "x.png")])
    assert [file.name for file in files] == [
        "bottle_broken.png",
        "bottle_good.png",
        "corrupt.png",
        "polyp.jpg",
        "polyp.jpg",
    ]
    assert files[-1] == image_folder / "nested" / "polyp.jpg"  # the folder's own polyp.jpg is listed once
    assert problems == [(str(tmp_path / "x.png"), "no such file or folder")]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert collect_images([str(empty)])[1][0][1].startswith("no image files")


def test_detect_without_any_image(tmp_path, capsys):
    status, _, stderr = run(capsys, "detect", tmp_path / "nothing*.png", "--out", tmp_path / "out")
    assert status == 1 and "no images to process" in stderr and "no file matches this pattern" in stderr
    assert not (tmp_path / "out").exists()


def test_offline_error_names_the_way_out(image_folder, tmp_path, capsys):
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # set by conftest before huggingface_hub is imported
    status, _, stderr = run(
        capsys, "detect", image_folder / "polyp.jpg", "--model", "no-such-org/no-such-model", "--out", tmp_path / "out"
    )
    assert status == 1
    assert "Cannot load the model or processor from 'no-such-org/no-such-model'" in stderr
    assert "--model /path/to/local/folder" in stderr and "HF_HUB_OFFLINE=1 is honoured" in stderr


def test_invalid_arguments_exit_with_usage_errors(capsys):
    for argv in (["detect", "a.png", "--threshold", "1.5"], ["detect", "a.png", "--batch-size", "0"], ["detect"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "1.5 is not in [0, 1]" in capsys.readouterr().err


def test_counts_and_devices_are_checked_by_the_parser(capsys):
    for argv in (["evaluate", "data"], ["calibrate", "data", "--out", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--num_workers", "-1"])
        assert exit_info.value.code == 2
        assert ": -1 is negative: give 0 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["push", "--help"])
    assert "(default: cpu: publishing only loads and saves the model, no accelerator needed)" in " ".join(
        capsys.readouterr().out.split()
    )
    args = build_parser().parse_args(["push", "--repo_id", "a/b", "--results", "r", "--train_dataset", "t"]
                                     + ["--eval_dataset", "e"])  # fmt: skip
    assert args.device == "cpu"


def test_evaluate_bottle(test_data_dir, headclip_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    bottle = test_data_dir / "mvtec_ad" / "bottle"
    status, stdout, _ = run(
        capsys, "evaluate", bottle, "--layout", "generic", "--model", headclip_checkpoint, "--out", out,
        "--batch-size", 32, "--device", "cpu",
    )  # fmt: skip
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["categories"]) == ["bottle"]
    counts = results["categories"]["bottle"]["counts"]
    assert (counts["num_images"], counts["num_normal_images"], counts["num_anomalous_images"]) == (83, 20, 63)
    assert all(0.0 <= results["mean"][name]["value"] <= 1.0 for name in ("image_auroc", "pixel_aupro", "mad_pixel"))
    table = (out / "results.md").read_text()
    assert table.startswith("| Category | Image AUROC") and "| bottle |" in table and table in stdout
    assert Image.open(out / "plots" / "bottle.png").format == "PNG"


def test_evaluate_reports_a_bad_data_folder(tmp_path, capsys):
    status, _, stderr = run(capsys, "evaluate", tmp_path / "nowhere", "--out", tmp_path / "eval")
    assert status == 1 and "Cannot load the data set" in stderr and "does not exist" in stderr


def test_train_hands_its_arguments_to_the_training_entry_point(monkeypatch):
    received = []
    monkeypatch.setattr(train_command, "main", received.append)
    assert main(["train", "--train_data", "data/mvtec_ad", "--output_dir", "runs/x"]) == 0
    assert received == [["--train_data", "data/mvtec_ad", "--output_dir", "runs/x"]]


def test_train_help_is_the_training_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--train_data" in capsys.readouterr().out


def test_convert_anomalyclip(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0 and "anomalyclip" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "anomalyclip", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "examples:" in text and "--adapter_only" in text
    received = []
    monkeypatch.setattr(convert_command, "run", lambda args: received.append(args) or 0)
    assert main(["convert", "anomalyclip", "epoch_15.pth", "--out", "converted", "--adapter_only"]) == 0
    (args,) = received
    assert (args.checkpoint, args.output_dir, args.adapter_only, args.model) == (
        "epoch_15.pth",
        "converted",
        True,
        "openai/clip-vit-large-patch14-336",
    )


@pytest.mark.parametrize("script, command", [("hub/app.py", "demo"), ("hub/publish.py", "push")])
def test_hub_scripts_run_their_commands(script, command):
    """`python hub/app.py` is `headclip demo` and `python hub/publish.py` is `headclip push`, with the same options."""
    path = Path(__file__).resolve().parents[1] / script
    result = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith(f"usage: headclip {command} ") and f"headclip {command} --model" in result.stdout
