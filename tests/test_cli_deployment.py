"""The deployment side of the `headclip` command: `headclip export`, `headclip detect` on an export folder, the
`--dtype` / `--compile` speed options, and detection sharded over two CPU processes under `accelerate launch`
(byte-identical outputs to one process)."""

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from test_cli import run

from headclip_hf.cli import build_parser, main
from headclip_hf.export import EXPORT_CONFIG_NAME, read_export_config
from headclip_hf.files import OUTPUT_MARKER


def read_scores(folder):
    with open(folder / "scores.csv", newline="") as file:
        return {row["path"]: row for row in csv.DictReader(file)}


def test_export_then_detect_with_the_export_folder(headclip_checkpoint, image_folder, tmp_path, capsys):
    export_dir = tmp_path / "export"
    status, stdout, _ = run(
        capsys, "export", "--model", headclip_checkpoint, "--output_dir", export_dir, "--dynamic_batch"
    )
    assert status == 0 and f"Exported {headclip_checkpoint} (onnx) to {export_dir}" in stdout
    config = read_export_config(export_dir)
    assert (
        config["format"] == "onnx" and config["dynamic_batch"] and config["source_model"] == str(headclip_checkpoint)
    )

    reference, exported = tmp_path / "reference", tmp_path / "exported"
    assert run(capsys, "detect", image_folder, "--model", headclip_checkpoint, "--output_dir", reference)[0] == 1
    status, stdout, stderr = run(capsys, "detect", image_folder, "--model", export_dir, "--output_dir", exported)
    assert status == 1 and "3 of 4 images processed" in stdout and "corrupt.png" in stderr
    expected, rows = read_scores(reference), read_scores(exported)
    assert list(rows) == list(expected)
    for path, row in rows.items():
        if row["error"]:
            assert row["error"] == expected[path]["error"]
            continue
        assert abs(float(row["score"]) - float(expected[path]["score"])) <= 1e-5
        assert (row["label"], row["heatmap"], row["mask"]) == tuple(
            expected[path][k] for k in ("label", "heatmap", "mask")
        )
        assert (exported / row["heatmap"]).is_file() and (exported / row["mask"]).is_file()
    assert json.loads((exported / "scores.json").read_text())["threshold"] == 0.5

    options = ("--dtype", "bfloat16", "--image_size", 32)
    status, _, stderr = run(capsys, "detect", image_folder, "--model", export_dir, "--output_dir", exported, *options)
    assert status == 1
    assert f"--image_size, --dtype cannot be used with the export folder {export_dir}" in stderr


def test_export_errors(headclip_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    status, _, stderr = run(capsys, "export", "--model", headclip_checkpoint, "--out", out, "--image_size", 60)
    assert status == 1 and "60 is not a multiple of the patch size 8: use 56 or 64" in stderr
    status, _, stderr = run(capsys, "export", "--model", headclip_checkpoint, "--out", out, "--opset", 11)
    assert status == 1 and "opset must be an ONNX opset from 18" in stderr
    args = ("--format", "torchscript", "--opset", 18)
    status, _, stderr = run(capsys, "export", "--model", headclip_checkpoint, "--out", out, *args)
    assert status == 1 and "opset applies to the onnx and openvino formats" in stderr
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--out", str(out), "--format", "tflite"])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    status, _, stderr = run(capsys, "export", "--model", headclip_checkpoint, "--out", other)
    assert status == 1 and "holds files that are not part of a HeadCLIP export (notes.txt)" in stderr
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # the onnx extra is not installed
    status, _, stderr = run(capsys, "export", "--model", headclip_checkpoint, "--out", out)
    assert status == 1 and 'needs onnxscript, which is not installed: pip install "headclip_hf[onnx]"' in stderr
    assert not out.exists() and [path.name for path in other.iterdir()] == ["notes.txt"]


def test_speed_options_on_detect_and_evaluate(headclip_checkpoint, image_folder, tmp_path, capsys):
    args = build_parser().parse_args(["evaluate", "data", "--dtype", "bfloat16", "--compile"])
    assert (args.dtype, args.compile) == ("bfloat16", True)
    reference = tmp_path / "reference"
    run(capsys, "detect", image_folder, "--model", headclip_checkpoint, "--output_dir", reference)
    expected = read_scores(reference)
    for options in (["--dtype", "bfloat16"], ["--compile"]):
        out = tmp_path / options[-1]
        arguments = ("detect", image_folder, "--model", headclip_checkpoint, "--output_dir", out, *options)
        assert run(capsys, *arguments)[0] == 1
        for path, row in read_scores(out).items():
            if not row["error"]:
                difference = abs(float(row["score"]) - float(expected[path]["score"]))
                assert (0 < difference < 0.01) if options[0] == "--dtype" else difference <= 1e-5, (options, path)


def test_detection_sharded_over_two_processes_equals_one_process(headclip_checkpoint, image_folder, tmp_path):
    arguments = ["detect", str(image_folder), "--model", str(headclip_checkpoint), "--batch_size", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    single = subprocess.run(
        [sys.executable, "-m", "headclip_hf.cli", *arguments, "--output_dir", str(tmp_path / "single")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    launch = [
        # accelerate's multi-process launcher (torchrun); without GPUs the processes form a gloo CPU group.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "headclip_hf.cli",
    ]  # fmt: skip
    sharded = subprocess.run(
        [*launch, *arguments, "--output_dir", str(tmp_path / "sharded")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    for result in (single, sharded):  # exit status 1: the corrupt file, reported once
        assert result.returncode == 1, result.stderr[-4000:]
        assert result.stdout.count("3 of 4 images processed") == 1
    single_files, sharded_files = (
        sorted(
            path.relative_to(tmp_path / name)
            for path in (tmp_path / name).rglob("*")
            if path.is_file() and path.name != OUTPUT_MARKER  # the marker records the date
        )
        for name in ("single", "sharded")
    )
    assert len(single_files) == 2 + 2 * 3 and sharded_files == single_files
    for name in single_files:
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert not (tmp_path / "sharded" / EXPORT_CONFIG_NAME).exists()
