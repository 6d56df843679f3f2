"""evaluate_model: the metrics of a whole data set equal the metric functions applied to the model's own outputs."""

import numpy as np
import pytest
import torch

from headclip_hf import HeadCLIPProcessor, load_anomaly_dataset
from headclip_hf.evaluation import evaluate_model
from headclip_hf.metrics import image_ap, image_auroc, pixel_aupro, pixel_auroc
from headclip_hf.pipeline_headclip import resolve_thresholds


def test_evaluate_model_on_bottle_matches_direct_metrics(tiny_model, clip_tokenizer, test_data_dir, tmp_path):
    processor = HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64)
    dataset = load_anomaly_dataset(test_data_dir / "mvtec_ad" / "bottle", cache_dir=str(tmp_path))
    dataset = dataset.select(range(0, len(dataset), 4))  # 21 images, both classes
    results = evaluate_model(tiny_model, processor, dataset, batch_size=5, show_progress=False)

    inputs = processor(images=list(dataset["image"]), masks=list(dataset["mask"]))
    with torch.no_grad():
        outputs = tiny_model(pixel_values=inputs["pixel_values"])
    labels = np.array(dataset["label"])
    masks, maps = inputs["masks"].numpy(), outputs.anomaly_map.numpy()
    bottle = results.categories["bottle"].metrics
    assert bottle["image_auroc"].value == pytest.approx(image_auroc(labels, outputs.image_score.numpy()), abs=1e-9)
    assert bottle["image_ap"].value == pytest.approx(image_ap(labels, outputs.image_score.numpy()), abs=1e-9)
    assert bottle["pixel_auroc"].value == pytest.approx(pixel_auroc(masks, maps), abs=1e-9)
    assert bottle["pixel_aupro"].value == pytest.approx(pixel_aupro(masks, maps), abs=1e-9)
    assert results.mean["image_auroc"].value == bottle["image_auroc"].value


def test_evaluate_model_leaves_unknown_masks_out_and_restores_training_mode(
    tiny_model, clip_tokenizer, test_data_dir, tmp_path
):
    processor = HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64)
    dataset = load_anomaly_dataset(test_data_dir / "kvasir_seg" / "colon", cache_dir=str(tmp_path)).select(range(6))
    unknown_first = dataset.map(lambda row, index: {"mask_valid": index > 0}, with_indices=True)
    tiny_model.train()
    results = evaluate_model(tiny_model, processor, unknown_first, batch_size=4, show_progress=False)
    assert tiny_model.training is True
    colon = results.categories["colon"]
    assert colon.metrics["image_auroc"].value is None and "no normal images" in colon.metrics["image_auroc"].reason
    inputs = processor(images=list(dataset["image"])[1:], masks=list(dataset["mask"])[1:])
    with torch.no_grad():
        maps = tiny_model.eval()(pixel_values=inputs["pixel_values"]).anomaly_map.numpy()
    assert colon.metrics["pixel_auroc"].value == pytest.approx(pixel_auroc(inputs["masks"].numpy(), maps), abs=1e-9)


def test_processor_size_other_than_the_models_is_refused_before_any_forward_pass(
    tiny_model, clip_tokenizer, test_data_dir, tmp_path, monkeypatch
):
    processor = HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=32)
    dataset = load_anomaly_dataset(test_data_dir / "mvtec_ad" / "bottle", cache_dir=str(tmp_path)).select(range(2))
    monkeypatch.setattr(tiny_model, "forward", lambda **kwargs: pytest.fail("no forward pass"))
    message = (
        r"The processor prepares 32 px images but the model's working size \(HeadCLIPConfig.image_size\) is 64 px: "
        r"load both at one size, e.g. load_headclip_model_and_processor\(..., image_size=32\)"
    )
    with pytest.raises(ValueError, match=message):
        evaluate_model(tiny_model, processor, dataset, batch_size=2, show_progress=False)


def test_decisions_are_reported_at_the_thresholds_the_pipeline_uses(
    tiny_model, clip_tokenizer, test_data_dir, tmp_path
):
    processor = HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64)
    dataset = load_anomaly_dataset(test_data_dir / "mvtec_ad" / "bottle", cache_dir=str(tmp_path))
    dataset = dataset.select(range(0, len(dataset), 8))
    config = tiny_model.config
    cases = [
        # (image_threshold, pixel_threshold, pixel_thresholds) -> the thresholds of the reported decisions
        ((None, None, None), {}),  # uncalibrated: the pipeline's 0.5 fits no category, no decisions
        ((0.4, None, None), {"image": 0.4, "pixel": 0.4}),  # the masks use the image threshold, as in the pipeline
        ((0.4, 0.6, None), {"image": 0.4, "pixel": 0.6}),
        ((0.4, 0.6, {"bottle": 0.7}), {"image": 0.4, "pixel": 0.7}),  # the category's own
        ((None, 0.6, None), {"pixel": 0.6}),  # the image level is uncalibrated
    ]
    for (image, pixel, per_category), expected in cases:
        config.image_threshold, config.pixel_threshold, config.pixel_thresholds = image, pixel, per_category
        results = evaluate_model(tiny_model, processor, dataset, batch_size=8, show_progress=False)
        points = results.categories["bottle"].operating_points
        assert {level: point.threshold for level, point in points.items()} == expected
        for level, threshold in expected.items():
            pipeline_side = resolve_thresholds(config, category="bottle")
            assert pipeline_side["threshold" if level == "image" else "pixel_threshold"] == threshold
