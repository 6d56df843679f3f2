"""Deployment exports: ONNX Runtime, OpenVINO and TorchScript against PyTorch eager float32 on real images, dynamic
batches, the runner where PyTorch cannot be imported, its preprocessing and map resizing against the processor and
the pipeline, calibrated thresholds, and the errors of bad exports and bad folders."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_config
from PIL import Image

from headclip_hf import HeadCLIPModel, HeadCLIPProcessor
from headclip_hf.export import (
    EXPORT_CONFIG_NAME,
    EXPORT_FORMAT_VERSION,
    ExportedDetector,
    export_model,
    read_export_config,
    resize_bilinear,
)
from headclip_hf.files import OUTPUT_MARKER
from headclip_hf.image_utils_headclip import anomaly_heatmap
from headclip_hf.pipeline_headclip import TASK, ZeroShotAnomalyDetectionPipeline, resolve_thresholds

FORMATS = ("onnx", "openvino", "torchscript")
# The bounds against PyTorch eager float32: (max |map difference|, max |score difference|).
TOLERANCES = {"onnx": (1e-4, 1e-5), "openvino": (1e-3, 1e-3), "torchscript": (1e-6, 1e-6)}


@pytest.fixture(scope="module")
def model_and_processor(clip_tokenizer):
    """A tiny HeadCLIP (head weights off 1, 64 px) in eval mode and its processor."""
    torch.manual_seed(0)
    model = HeadCLIPModel(build_tiny_config()).eval()
    with torch.no_grad():
        model.head_weights.uniform_(0.5, 1.5)
    return model, HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=model.config.image_size)


@pytest.fixture(scope="module")
def exports(model_and_processor, tmp_path_factory):
    """`exports(format, dynamic_batch=True)`: an export folder of the tiny model, written once per combination."""
    folders = {}

    def get(format: str, dynamic_batch: bool = True):
        if (format, dynamic_batch) not in folders:
            model, processor = model_and_processor
            folder = tmp_path_factory.mktemp(f"{format}_{dynamic_batch}") / "export"
            folders[format, dynamic_batch] = export_model(
                model, processor, folder, format=format, dynamic_batch=dynamic_batch
            )
        return folders[format, dynamic_batch]

    return get


@pytest.fixture(scope="module")
def real_images(test_data_dir):
    """A 900 x 900 MVTec AD bottle (PNG) and two Kvasir-SEG polyps (JPEG, not square, of two other sizes)."""
    polyps = sorted((test_data_dir / "kvasir_seg" / "colon" / "polyp").iterdir())[:2]
    paths = [test_data_dir / "mvtec_ad" / "bottle" / "broken_large" / "000.png", *polyps]
    assert len({Image.open(path).size for path in paths}) == 3
    return paths


@pytest.fixture(scope="module")
def pipeline_results(model_and_processor, real_images):
    """The PyTorch pipeline's results (eager float32) on `real_images`."""
    model, processor = model_and_processor
    detector = ZeroShotAnomalyDetectionPipeline(model=model, processor=processor, task=TASK, device="cpu")
    return detector([str(path) for path in real_images])


@pytest.mark.parametrize("format", FORMATS)
def test_graph_outputs_match_pytorch_eager(format, exports, model_and_processor, real_images):
    model, processor = model_and_processor
    map_tolerance, score_tolerance = TOLERANCES[format]
    detector = ExportedDetector(exports(format))
    pixel_values = processor(images=[str(path) for path in real_images])["pixel_values"]
    for batch in (pixel_values[:1], pixel_values):  # the dynamic batch: B = 1 and B = 3
        with torch.no_grad():
            expected = model(pixel_values=batch)
        outputs = detector.run(batch.numpy())
        assert outputs["anomaly_map"].shape == (len(batch), 64, 64) and outputs["anomaly_map"].dtype == np.float32
        assert np.abs(outputs["anomaly_map"] - expected.anomaly_map.numpy()).max() <= map_tolerance
        assert np.abs(outputs["image_score"] - expected.image_score.numpy()).max() <= score_tolerance
        assert np.abs(outputs["global_score"] - expected.global_score.numpy()).max() <= score_tolerance


@pytest.mark.parametrize("format", FORMATS)
def test_results_match_the_pipeline(format, exports, real_images, pipeline_results):
    map_tolerance, score_tolerance = TOLERANCES[format]
    results = ExportedDetector(exports(format))(real_images, batch_size=3)
    assert len(results) == len(real_images)
    for path, result, reference in zip(real_images, results, pipeline_results, strict=True):
        width, height = Image.open(path).size
        anomaly_map = result["anomaly_map"]
        assert anomaly_map.dtype == np.float32 and anomaly_map.shape == (height, width)
        assert np.abs(anomaly_map - reference["anomaly_map"]).max() <= map_tolerance
        assert isinstance(result["score"], float) and abs(result["score"] - reference["score"]) <= score_tolerance
        assert result["label"] == ("anomaly" if result["score"] >= 0.5 else "normal")
        assert result["mask"].mode == "L" and result["mask"].size == (width, height)
        np.testing.assert_array_equal(np.asarray(result["mask"]), np.where(anomaly_map >= 0.5, 255, 0))
        expected_heatmap = anomaly_heatmap(Image.open(path).convert("RGB"), anomaly_map, 0.5)
        np.testing.assert_array_equal(np.asarray(result["heatmap"]), np.asarray(expected_heatmap))


def test_preprocessing_matches_the_processor(exports, model_and_processor, real_images):
    _, processor = model_and_processor
    detector = ExportedDetector(exports("torchscript"))
    bottle = Image.open(real_images[0])
    rng = np.random.default_rng(0)
    images = [
        *real_images,  # RGB PNG and JPEG files
        bottle.convert("L"),
        bottle.convert("RGBA"),
        rng.integers(0, 65536, size=(37, 53), dtype=np.uint16),
        rng.random((20, 30, 3)),
    ]
    expected = processor(images=images)["pixel_values"].numpy()
    pixel_values = detector.preprocess(images)
    assert pixel_values.dtype == np.float32 and pixel_values.shape == expected.shape == (len(images), 3, 64, 64)
    assert np.abs(pixel_values - expected).max() <= 1e-6


@pytest.mark.parametrize("source, target", [((64, 64), (900, 900)), ((64, 64), (531, 622)), ((9, 14), (5, 31))])
def test_resize_bilinear_matches_torch_interpolate(source, target):
    values = np.random.default_rng(0).random(source, dtype=np.float32)
    expected = F.interpolate(torch.from_numpy(values)[None, None], size=target, mode="bilinear", align_corners=False)
    resized = resize_bilinear(values, *target)
    assert resized.dtype == np.float32 and resized.shape == target
    assert np.abs(resized - expected[0, 0].numpy()).max() <= 1e-5


RUN_WITHOUT_TORCH = """
import json

import numpy as np

import headclip_hf
from headclip_hf.export import ExportedDetector

export_dir, output_file, *images = sys.argv[1:]
results = ExportedDetector(export_dir)(images, batch_size=len(images))
assert "torch" not in sys.modules and "transformers" not in sys.modules, "the runner imported torch or transformers"
np.savez(output_file, scores=[result["score"] for result in results], **{
    f"map{index}": result["anomaly_map"] for index, result in enumerate(results)
})
try:
    headclip_hf.HeadCLIPModel
except ImportError as error:
    assert "needs PyTorch" in str(error), error
else:
    raise SystemExit("HeadCLIPModel should not be available without torch")
"""


@pytest.mark.parametrize("format", ["onnx", "openvino"])
def test_runner_works_where_torch_cannot_be_imported(format, exports, real_images, run_without_torch, tmp_path):
    folder = exports(format)
    run_without_torch(RUN_WITHOUT_TORCH, folder, tmp_path / "results.npz", *real_images)
    remote = np.load(tmp_path / "results.npz")
    local = ExportedDetector(folder)(real_images, batch_size=len(real_images))
    np.testing.assert_allclose(remote["scores"], [result["score"] for result in local], rtol=0, atol=1e-6)
    for index, result in enumerate(local):
        np.testing.assert_allclose(remote[f"map{index}"], result["anomaly_map"], rtol=0, atol=1e-6)


def test_export_folder_contents(exports, model_and_processor):
    folder = exports("onnx", dynamic_batch=False)
    expected = [OUTPUT_MARKER, EXPORT_CONFIG_NAME, "model.onnx", "model.onnx.data"]
    assert sorted(path.name for path in folder.iterdir()) == expected
    config = json.loads((folder / EXPORT_CONFIG_NAME).read_text())
    assert config["format_version"] == EXPORT_FORMAT_VERSION and config["format"] == "onnx"
    assert config["image_size"] == 64 and config["dynamic_batch"] is False and config["opset"] >= 18
    assert config["inputs"] == [{"name": "pixel_values", "shape": [1, 3, 64, 64], "dtype": "float32"}]
    assert [(port["name"], port["shape"]) for port in config["outputs"]] == [
        ("anomaly_map", [1, 64, 64]),
        ("image_score", [1]),
        ("global_score", [1]),
    ]
    image_processor = model_and_processor[1].image_processor
    assert config["preprocessing"] == {
        "size": 64,
        "resample": "bicubic",
        "do_rescale": True,
        "rescale_factor": image_processor.rescale_factor,
        "do_normalize": True,
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
    }
    assert (
        config["thresholds"] == {} and config["headclip_hf_version"] and config["torch_version"] == torch.__version__
    )


def test_export_leaves_the_model_as_it_was(model_and_processor, tmp_path):
    model, processor = model_and_processor
    model.train()
    try:
        export_model(model, processor, tmp_path / "export", format="torchscript")
        assert model.training and model.dtype == torch.float32
    finally:
        model.eval()


def test_fixed_batch_export_runs_one_image_at_a_time(exports, real_images, pipeline_results):
    detector = ExportedDetector(exports("onnx", dynamic_batch=False))
    results = detector(real_images)  # batch_size 1
    for result, reference in zip(results, pipeline_results, strict=True):
        assert abs(result["score"] - reference["score"]) <= 1e-5
    with pytest.raises(ValueError, match="takes one image per run .* dynamic_batch=True"):
        detector(real_images, batch_size=3)


def test_calibrated_thresholds_travel_with_the_export(model_and_processor, real_images, tmp_path):
    model, processor = model_and_processor
    calibrated = {
        "image_threshold": 0.0,
        "pixel_threshold": 1.0,
        "image_thresholds": {"bottle": 1.0},
        "pixel_thresholds": {"bottle": 0.0},
        "calibration": {"method": "f1", "dataset": "mvtec_ad"},
    }
    for name, value in calibrated.items():
        setattr(model.config, name, value)
    try:
        detector = ExportedDetector(export_model(model, processor, tmp_path / "export", format="torchscript"))
        assert detector.thresholds == calibrated
        # The same decisions as the pipeline's for the model itself.
        for threshold, pixel_threshold, category in [
            (None, None, None),
            (None, None, "bottle"),
            (None, None, "screw"),
            (0.3, None, None),
            (None, 0.4, "bottle"),
        ]:
            expected = resolve_thresholds(model.config, threshold, pixel_threshold, category)
            assert detector.decision_thresholds(threshold, pixel_threshold, category) == expected
    finally:
        for name in calibrated:
            setattr(model.config, name, None)
    result = detector(real_images[0])  # the calibrated model-wide thresholds are the defaults
    assert result["label"] == "anomaly" and result["anomaly_map"].max() < 1.0 and not np.asarray(result["mask"]).any()
    bottle = detector(real_images[0], category="bottle")  # then the category's
    assert bottle["label"] == "normal" and np.asarray(bottle["mask"]).all()
    overridden = detector(real_images[0], threshold=1.0, pixel_threshold=0.0)
    assert overridden["label"] == "normal" and np.asarray(overridden["mask"]).all()


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_format_and_bad_sizes_are_refused_before_exporting(model_and_processor, tmp_path):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="Unknown export format 'tflite': use one of onnx, openvino, torchscript"):
        export_model(model, processor, tmp_path / "a", format="tflite")
    with pytest.raises(ValueError, match="image_size 60 is not a multiple of the patch size 8: use 56 or 64"):
        export_model(model, processor, tmp_path / "a", image_size=60)
    with pytest.raises(ValueError, match="opset applies to the onnx and openvino formats"):
        export_model(model, processor, tmp_path / "a", format="torchscript", opset=18)
    with pytest.raises(ValueError, match="opset must be an ONNX opset from 18"):
        export_model(model, processor, tmp_path / "a", opset=11)
    assert not (tmp_path / "a").exists()


def test_earlier_exports_are_replaced_and_other_files_kept(exports, model_and_processor, tmp_path):
    model, processor = model_and_processor
    earlier = shutil.copytree(exports("onnx"), tmp_path / "earlier")
    export_model(model, processor, earlier, format="torchscript")  # an earlier export alone is replaced whole
    assert read_export_config(earlier)["format"] == "torchscript"
    assert sorted(path.name for path in earlier.iterdir()) == [OUTPUT_MARKER, EXPORT_CONFIG_NAME, "model.pt"]

    shared = shutil.copytree(exports("onnx"), tmp_path / "shared")
    (shared / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files that are not part of a HeadCLIP export \(notes.txt\)"):
        export_model(model, processor, shared, format="torchscript")
    assert read_export_config(shared)["format"] == "onnx"
    export_model(model, processor, shared, format="torchscript", overwrite=True)
    expected = [OUTPUT_MARKER, EXPORT_CONFIG_NAME, "model.pt", "notes.txt"]
    assert sorted(path.name for path in shared.iterdir()) == expected
    assert (shared / "notes.txt").read_text() == "mine" and ExportedDetector(shared).config["format"] == "torchscript"


def test_bad_export_folders(exports, tmp_path):
    with pytest.raises(FileNotFoundError, match="No export folder at"):
        ExportedDetector(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"is not a HeadCLIP export: {EXPORT_CONFIG_NAME} is missing"):
        ExportedDetector(tmp_path)

    newer = shutil.copytree(exports("onnx"), tmp_path / "newer")
    config = json.loads((newer / EXPORT_CONFIG_NAME).read_text())
    (newer / EXPORT_CONFIG_NAME).write_text(json.dumps({**config, "format_version": EXPORT_FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=f"format version {EXPORT_FORMAT_VERSION + 1}, and this headclip_hf reads"):
        ExportedDetector(newer)

    incomplete = shutil.copytree(exports("onnx"), tmp_path / "incomplete")
    (incomplete / "model.onnx.data").unlink()
    with pytest.raises(FileNotFoundError, match="is incomplete: model.onnx.data is missing"):
        ExportedDetector(incomplete)


@pytest.mark.parametrize("format", ["onnx", "openvino"])
def test_graph_that_does_not_match_its_json(format, exports, tmp_path):
    folder = shutil.copytree(exports(format), tmp_path / "export")
    config = json.loads((folder / EXPORT_CONFIG_NAME).read_text())
    config["inputs"][0]["shape"] = ["batch", 3, 32, 32]
    (folder / EXPORT_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"does not match {EXPORT_CONFIG_NAME}: its inputs are .*64, 64.* the JSON"):
        ExportedDetector(folder)


def test_missing_extras_name_the_extra_to_install(exports, model_and_processor, monkeypatch, tmp_path):
    model, processor = model_and_processor
    folder = exports("onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    with pytest.raises(
        ImportError, match=r'needs onnxruntime, which is not installed: pip install "headclip_hf\[onnx\]"'
    ):
        ExportedDetector(folder)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match=r'needs openvino, .*: pip install "headclip_hf\[openvino\]"'):
        export_model(model, processor, tmp_path / "a", format="openvino")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r'Exporting to onnx needs onnxscript, .*"headclip_hf\[onnx\]"'):
        export_model(model, processor, tmp_path / "a", format="onnx")
