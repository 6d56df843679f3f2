"""The zero-shot-anomaly-detection pipeline: outputs at each image's own size, scores equal to the model's on the same
preprocessed input, thresholds, heatmaps, adapters and input errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, pipeline

from headclip_hf import HeadCLIPModel, HeadCLIPProcessor
from headclip_hf.adapters import load_headclip_model, save_headclip_adapter
from headclip_hf.image_utils_headclip import anomaly_heatmap, jet_colormap
from headclip_hf.pipeline_headclip import TASK, ZeroShotAnomalyDetectionPipeline


@pytest.fixture
def real_images(test_data_dir):
    """Three real images of three sizes: a 900 x 900 MVTec AD bottle and two Kvasir-SEG polyps (not square)."""
    polyps = sorted((test_data_dir / "kvasir_seg" / "colon" / "polyp").iterdir())
    paths = [test_data_dir / "mvtec_ad" / "bottle" / "broken_large" / "000.png", polyps[0], polyps[1]]
    sizes = [Image.open(path).size for path in paths]
    assert len(set(sizes)) == 3 and any(width != height for width, height in sizes)
    return paths


@pytest.fixture
def detector(headclip_checkpoint):
    return pipeline(TASK, model=str(headclip_checkpoint), device="cpu")


@pytest.fixture
def reference(headclip_checkpoint):
    """`reference(images)`: the model's outputs, with the model and processor loaded on their own from the folder."""
    model = HeadCLIPModel.from_pretrained(headclip_checkpoint).eval()
    processor = HeadCLIPProcessor.from_pretrained(headclip_checkpoint)

    def outputs(images):
        with torch.no_grad():
            return model(**processor(images=images, return_tensors="pt"))

    return outputs


def test_outputs_at_each_images_own_size(detector, reference, real_images):
    assert isinstance(detector, ZeroShotAnomalyDetectionPipeline)
    results = detector([str(path) for path in real_images])
    assert len(results) == len(real_images)
    for path, result in zip(real_images, results, strict=True):
        width, height = Image.open(path).size
        anomaly_map = result["anomaly_map"]
        assert isinstance(anomaly_map, np.ndarray) and anomaly_map.dtype == np.float32
        assert anomaly_map.shape == (height, width)
        assert 0.0 <= anomaly_map.min() <= anomaly_map.max() <= 1.0
        assert result["mask"].mode == "L" and result["mask"].size == (width, height)
        assert result["heatmap"].mode == "RGB" and result["heatmap"].size == (width, height)
        assert result["label"] == ("anomaly" if result["score"] >= 0.5 else "normal")
        assert isinstance(result["score"], float)
        # The map is the model's working-size map, bilinearly resized to the image.
        working_map = reference(path).anomaly_map
        expected = F.interpolate(working_map[:, None], size=(height, width), mode="bilinear", align_corners=False)
        np.testing.assert_array_equal(anomaly_map, expected[0, 0].clamp(0, 1).numpy())


def test_score_equals_model_score_on_same_preprocessed_input(detector, reference, real_images):
    single = detector(real_images, batch_size=1)
    for path, result in zip(real_images, single, strict=True):
        assert result["score"] == reference(path).image_score.item()
    # Batched: the pipeline's batches are [image 0, image 1] and [image 2].
    batched = detector(real_images, batch_size=2)
    expected = reference(real_images[:2]).image_score.tolist()
    expected += reference(real_images[2:]).image_score.tolist()
    assert [result["score"] for result in batched] == expected


def test_map_at_working_size_is_the_models_map(detector, reference):
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)  # 64 px = working size
    result = detector(image)
    outputs = reference(image)
    np.testing.assert_array_equal(result["anomaly_map"], outputs.anomaly_map[0].numpy())
    assert result["score"] == outputs.image_score.item()


def test_input_types_give_the_same_result(detector, real_images):
    path = real_images[1]
    pil_image = Image.open(path)
    results = [detector(str(path)), detector(path), detector(pil_image), detector(np.asarray(pil_image))]
    for result in results[1:]:
        assert result["score"] == results[0]["score"]
        np.testing.assert_array_equal(result["anomaly_map"], results[0]["anomaly_map"])
    assert isinstance(detector([pil_image]), list)


def test_thresholds(detector, real_images):
    image = Image.open(real_images[1]).resize((96, 80))
    result = detector(image)
    score, anomaly_map = result["score"], result["anomaly_map"]
    assert detector(image, threshold=score)["label"] == "anomaly"
    assert detector(image, threshold=float(np.nextafter(score, 1.0)))["label"] == "normal"
    # The mask is anomaly_map >= pixel_threshold, which defaults to the threshold.
    pixel_threshold = float(np.median(anomaly_map))
    for kwargs in ({"threshold": pixel_threshold}, {"threshold": 1.0, "pixel_threshold": pixel_threshold}):
        mask = np.asarray(detector(image, **kwargs)["mask"])
        np.testing.assert_array_equal(mask, np.where(anomaly_map >= pixel_threshold, 255, 0))
    assert 0 < (anomaly_map >= pixel_threshold).sum() < anomaly_map.size
    # numpy scalars are numbers too: decisions at np.float32 thresholds as at the same Python floats.
    assert detector(image, threshold=np.float32(1.0))["label"] == "normal"
    mask = np.asarray(
        detector(image, pixel_threshold=np.float32(pixel_threshold), heatmap_alpha=np.float64(0.5))["mask"]
    )
    np.testing.assert_array_equal(mask, np.where(anomaly_map >= np.float32(pixel_threshold), 255, 0))
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\], got 1.5"):
        detector(image, threshold=1.5)
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\], got np.float32\(nan\)"):
        detector(image, threshold=np.float32("nan"))
    with pytest.raises(ValueError, match="pixel_threshold must be a number"):
        detector(image, pixel_threshold=-0.1)


def test_thresholds_are_resolved_once_per_call_with_the_constructions_defaults(headclip_checkpoint, monkeypatch):
    from headclip_hf import pipeline_headclip

    calls = []
    resolve = pipeline_headclip.resolve_thresholds
    monkeypatch.setattr(
        pipeline_headclip,
        "resolve_thresholds",
        lambda *args, **kwargs: calls.append(kwargs) or resolve(*args, **kwargs),
    )
    images = [Image.new("RGB", (40, 30), color) for color in ("red", "green", "blue", "white")]
    strict = pipeline(TASK, model=str(headclip_checkpoint), device="cpu", threshold=1.0, category="bottle")
    assert calls == []  # nothing is resolved before a call
    assert [result["label"] for result in strict(images, batch_size=2)] == ["normal"] * 4
    assert calls == [{"threshold": 1.0, "category": "bottle"}]  # once for the four images
    assert [result["label"] for result in strict(images, threshold=0.0)] == ["anomaly"] * 4  # the call's own wins
    assert calls[1:] == [{"threshold": 0.0, "category": "bottle"}]
    assert strict(images[0])["label"] == "normal"  # and the construction's default holds again
    assert len(calls) == 3


def test_jet_colormap_and_heatmap():
    np.testing.assert_array_equal(jet_colormap(np.array([0.0, 0.5, 1.0])), [[0, 0, 128], [128, 255, 128], [128, 0, 0]])
    np.testing.assert_array_equal(jet_colormap(np.array([-1.0, 2.0])), jet_colormap(np.array([0.0, 1.0])))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8))
    anomaly_map = np.linspace(0, 1, 35, dtype=np.float32).reshape(5, 7)
    assert np.array_equal(np.asarray(anomaly_heatmap(image, anomaly_map, alpha=0.0)), np.asarray(image))
    assert np.array_equal(np.asarray(anomaly_heatmap(image, anomaly_map, alpha=1.0)), jet_colormap(anomaly_map))
    blended = np.asarray(anomaly_heatmap(image, anomaly_map)).astype(int)
    halfway = (np.asarray(image).astype(int) + jet_colormap(anomaly_map)) / 2
    assert np.abs(blended - halfway).max() <= 1
    with pytest.raises(ValueError, match=r"the image is 7x5 .* the map must have the image's size"):
        anomaly_heatmap(image, anomaly_map.T)


def test_model_with_adapter(tiny_model, clip_checkpoint, clip_tokenizer, tmp_path, real_images):
    with torch.no_grad():
        tiny_model.head_weights.uniform_(0.5, 1.5)
        tiny_model.prompt_learner.normal_context.add_(0.1)
    adapter = save_headclip_adapter(tiny_model, tmp_path / "adapter", base_model_name_or_path=str(clip_checkpoint))
    model = load_headclip_model(adapter).eval()
    processor = HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64)
    detector = pipeline(TASK, model=model, processor=processor, device="cpu")
    with torch.no_grad():
        expected = tiny_model(**processor(images=real_images[1])).image_score.item()
        untrained = HeadCLIPModel.from_pretrained(clip_checkpoint, image_size=64).eval()
        untrained_score = untrained(**processor(images=real_images[1])).image_score.item()
    assert detector(real_images[1])["score"] == expected != untrained_score


def test_unreadable_input_is_named(detector, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=r"Cannot read image file '.*corrupt\.png'"):
        detector(str(corrupt))
    with pytest.raises(ValueError, match=r"Cannot read image file '.*missing\.png'"):
        detector([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="Expected a PIL image, a numpy array or a file path, got int"):
        detector(42)


def test_rejects_models_and_processors_that_are_not_headclip(tiny_model, clip_checkpoint, clip_tokenizer):
    processor = HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64)
    with pytest.raises(ValueError, match="needs a HeadCLIP model, got CLIPModel"):
        pipeline(TASK, model=CLIPModel.from_pretrained(clip_checkpoint), processor=processor, device="cpu")
    with pytest.raises(ValueError, match="needs a HeadCLIPProcessor, got CLIPTokenizer"):
        ZeroShotAnomalyDetectionPipeline(model=tiny_model, processor=clip_tokenizer, device="cpu")
