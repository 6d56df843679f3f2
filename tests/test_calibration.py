"""Calibrated thresholds: the two methods on real images, F1 thresholds equal to what `headclip evaluate` reports, the
round trip through save_pretrained / adapters / remote code / Hub folders, the commands that use them, bad input."""

import json
import logging
import types

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from sklearn.metrics import f1_score
from transformers import pipeline

from headclip_hf import AnomalyMetricsAccumulator, HeadCLIPModel, HeadCLIPProcessor, load_anomaly_dataset, save_results
from headclip_hf.adapters import load_headclip_model, save_headclip_adapter
from headclip_hf.calibration import calibrate, check_calibration_data
from headclip_hf.cli import main
from headclip_hf.cli.calibrate import CALIBRATED_ADAPTER_OUTPUT, CALIBRATED_MODEL_OUTPUT
from headclip_hf.data import AnomalyCollator
from headclip_hf.files import OUTPUT_MARKER
from headclip_hf.hub import render_model_card, save_hub_folder
from headclip_hf.pipeline_headclip import TASK, resolve_thresholds

CALIBRATED_FIELDS = ("image_threshold", "pixel_threshold", "image_thresholds", "pixel_thresholds", "calibration")


@pytest.fixture(scope="module")
def bottle(test_data_dir, tmp_path_factory):
    """The 83 real MVTec AD bottle test images (20 normal, 63 anomalous, with masks)."""
    return load_anomaly_dataset(test_data_dir / "mvtec_ad" / "bottle", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture
def processor(clip_tokenizer):
    return HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64)


def indices(dataset, label, count=None):
    """The indices of the first `count` rows of `dataset` with `label`."""
    return [index for index, value in enumerate(dataset["label"]) if value == label][:count]


def rows(dataset, label, count=None):
    """The first `count` rows of `dataset` with `label`."""
    return dataset.select(indices(dataset, label, count))


def both_classes(dataset, count):
    """The first `count` normal and the first `count` anomalous rows of `dataset`."""
    return dataset.select(indices(dataset, 0, count) + indices(dataset, 1, count))


def model_outputs(model, processor, dataset, batch_size):
    """Labels, masks, scores and maps of `dataset`, computed in the batches `headclip evaluate` uses."""
    collate = AnomalyCollator(processor)
    labels, masks, scores, maps = [], [], [], []
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])
            outputs = model(pixel_values=batch["pixel_values"])
            labels.append(batch["labels"].numpy())
            masks.append(batch["masks"].numpy().astype(bool))
            scores.append(outputs.image_score.numpy())
            maps.append(outputs.anomaly_map.numpy())
    return np.concatenate(labels), np.concatenate(masks), np.concatenate(scores), np.concatenate(maps)


def pixel_f1(masks, maps, threshold):
    flagged = maps >= threshold
    true_positives = (flagged & masks).sum()
    return 2 * true_positives / (2 * true_positives + (flagged & ~masks).sum() + (~flagged & masks).sum())


# ---------------------------------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------------------------------


def test_normal_quantile_flags_at_most_the_target_share_through_the_pipeline(tiny_model, processor, bottle, caplog):
    normals = rows(bottle, label=0)
    assert len(normals) == 20
    result = calibrate(tiny_model, processor, normals, method="normal_quantile", target_fpr=0.1, batch_size=20)
    result.apply(tiny_model)
    assert tiny_model.config.image_threshold == result.image_threshold
    image = result.calibration["image"]
    assert (image["method"], image["num_normal_images"], image["num_anomalous_images"]) == ("normal_quantile", 20, 0)

    detector = pipeline(TASK, model=tiny_model, processor=processor, device="cpu")
    with caplog.at_level("WARNING"):
        results = detector(list(normals["path"]))
    flagged = sum(output["label"] == "anomaly" for output in results)
    assert flagged <= 2 and flagged == image["achieved"]["false_positives"]
    assert "uncalibrated" not in caplog.text
    # The pixel threshold flags at most 1% of the normal images' pixels (at the working size, same batch).
    _, _, scores, maps = model_outputs(tiny_model, processor, normals, batch_size=20)
    assert (maps >= result.pixel_threshold).mean() <= 0.01
    assert result.calibration["pixel"]["achieved"]["false_positives"] == (maps >= result.pixel_threshold).sum()
    # The image threshold lies between the third and second highest normal scores.
    highest = np.sort(scores)[::-1]
    assert highest[2] < result.image_threshold <= highest[1]

    # On normal images it has not seen, the flagged share is reported, not asserted.
    half = calibrate(tiny_model, processor, normals.select(range(10)), "normal_quantile", 0.1, show_progress=False)
    half.apply(tiny_model)
    unseen = detector(list(normals.select(range(10, 20))["path"]))
    share = sum(output["label"] == "anomaly" for output in unseen) / len(unseen)
    print(f"calibrated on 10 normal bottle images at target_fpr=0.1: {share:.0%} of 10 other normal images flagged")


def test_too_few_normal_images_for_the_rate_are_warned_about(tiny_model, processor, bottle, caplog):
    normals = rows(bottle, label=0)
    with caplog.at_level("WARNING", logger="headclip_hf.calibration"):
        result = calibrate(tiny_model, processor, normals, method="normal_quantile", target_fpr=0.01)
    assert "Only 20 normal images in the data set: the smallest false-positive rate they resolve is 1/20 = 0.05" in (
        caplog.text
    )
    assert "A rate of 0.01 needs at least 100 normal images." in caplog.text
    # It flags none of them: the threshold lies just above the highest normal score.
    achieved = result.calibration["image"]["achieved"]
    assert (achieved["false_positives"], achieved["true_negatives"]) == (0, 20)


def test_f1_thresholds_are_the_operating_points_of_evaluates_f1_max(
    headclip_checkpoint, test_data_dir, bottle, tmp_path, capsys
):
    data = test_data_dir / "mvtec_ad" / "bottle"
    calibrated = tmp_path / "calibrated"
    common = ("--model", str(headclip_checkpoint), "--batch_size", "16", "--device", "cpu")
    assert main(["calibrate", str(data), "--method", "f1", "--out", str(calibrated), *common]) == 0
    printed = capsys.readouterr().out
    record = json.loads((calibrated / "calibration.json").read_text())
    assert {path.name for path in calibrated.iterdir()} <= CALIBRATED_MODEL_OUTPUT.entries | {OUTPUT_MARKER}
    assert {"config.json", "model.safetensors", "processor_config.json", "calibration.json"} <= {
        path.name for path in calibrated.iterdir()
    }
    image_threshold, pixel_threshold = record["image_threshold"], record["pixel_threshold"]
    assert f"image threshold {image_threshold:.4f} (f1)" in printed
    assert f"pixel threshold {pixel_threshold:.4f} (f1)" in printed

    evaluation = tmp_path / "evaluation"
    assert main(["evaluate", str(data), "--model", str(calibrated), "--out", str(evaluation), *common[2:]]) == 0
    results = json.loads((evaluation / "results.json").read_text())["categories"]["bottle"]
    image_f1_max = results["metrics"]["image_f1_max"]["value"]
    pixel_f1_max = results["metrics"]["pixel_f1_max"]["value"]

    # The thresholds evaluate reports for its F1-max are the calibrated ones, and F1 there is the F1-max.
    assert results["f1_max_thresholds"]["image"]["value"] == image_threshold
    assert results["f1_max_thresholds"]["pixel"]["value"] == pixel_threshold
    assert results["operating_points"]["image"]["f1"] == pytest.approx(image_f1_max, abs=1e-9)
    assert results["operating_points"]["pixel"]["f1"] == pytest.approx(pixel_f1_max, abs=1e-9)
    # Independently, from the model's own outputs.
    model = HeadCLIPModel.from_pretrained(headclip_checkpoint).eval()
    processor = HeadCLIPProcessor.from_pretrained(headclip_checkpoint)
    labels, masks, scores, maps = model_outputs(model, processor, bottle, batch_size=16)
    assert f1_score(labels, scores >= image_threshold) == pytest.approx(image_f1_max, abs=1e-9)
    assert pixel_f1(masks, maps, pixel_threshold) == pytest.approx(pixel_f1_max, abs=1e-9)
    # The decisions a line would see, at the model's thresholds.
    decisions = results["operating_points"]["image"]
    flagged = scores >= image_threshold
    assert decisions["true_positives"] == (flagged & (labels == 1)).sum()
    assert decisions["false_positives"] == (flagged & (labels == 0)).sum()
    assert decisions["true_negatives"] + decisions["false_positives"] == 20
    table = (evaluation / "results.md").read_text()
    assert "| bottle | image | " + f"{image_threshold:.4f}" in table
    assert "Decisions at the model's calibrated thresholds" in table


# ---------------------------------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------------------------------

REMOTE_CONFIG_SCRIPT = """
import json
from transformers import AutoConfig

folder, output_file = sys.argv[1:3]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
assert "transformers_modules" in type(config).__module__
fields = ("image_threshold", "pixel_threshold", "image_thresholds", "pixel_thresholds", "calibration")
json.dump({name: getattr(config, name) for name in fields}, open(output_file, "w"))
"""


@pytest.fixture
def calibrated_model(tiny_model, processor, bottle):
    """`tiny_model` calibrated per category on four normal bottle images, to flag at most one of them."""
    normals = rows(bottle, label=0, count=4)
    result = calibrate(tiny_model, processor, normals, "normal_quantile", 0.25, per_category=True, show_progress=False)
    result.apply(tiny_model)
    return tiny_model


def calibrated_fields(config):
    return {name: getattr(config, name) for name in CALIBRATED_FIELDS}


def test_round_trip_full_model_adapter_and_remote_code(
    calibrated_model, clip_checkpoint, tmp_path, run_without_headclip
):
    expected = calibrated_fields(calibrated_model.config)
    assert expected["image_thresholds"] == {"bottle": expected["image_threshold"]}
    assert expected["calibration"]["categories"]["bottle"]["image"]["method"] == "normal_quantile"

    full = tmp_path / "full"
    calibrated_model.save_pretrained(full)
    assert calibrated_fields(HeadCLIPModel.from_pretrained(full).config) == expected

    adapter = tmp_path / "adapter"
    save_headclip_adapter(calibrated_model, adapter, base_model_name_or_path=str(clip_checkpoint))
    assert calibrated_fields(load_headclip_model(adapter).config) == expected

    run_without_headclip(REMOTE_CONFIG_SCRIPT, full, tmp_path / "remote.json")
    assert json.loads((tmp_path / "remote.json").read_text()) == expected


REMOTE_PIPELINE_SCRIPT = """
import json

import numpy as np
from transformers import pipeline

folder, output_file, *images = sys.argv[1:]
detector = pipeline("zero-shot-anomaly-detection", model=folder, trust_remote_code=True, device="cpu")
assert "transformers_modules" in type(detector).__module__
config = detector.model.config
outputs = [
    {
        "score": result["score"],
        "label": result["label"],
        "mask": int((np.asarray(result["mask"]) > 0).sum()),
        "map_at_threshold": int((result["anomaly_map"] >= config.pixel_threshold).sum()),
    }
    for result in detector(images)
]
thresholds = {"image_threshold": config.image_threshold, "pixel_threshold": config.pixel_threshold}
json.dump({**thresholds, "outputs": outputs}, open(output_file, "w"))
"""


def test_hub_folders_published_from_a_calibrated_model_load_with_its_thresholds(
    calibrated_model, processor, clip_checkpoint, bottle, tmp_path, run_without_headclip
):
    accumulator = AnomalyMetricsAccumulator(num_bins=16)
    accumulator.update(categories="bottle", labels=[0, 1], scores=[0.2, 0.9])
    results_dir = tmp_path / "eval"
    save_results(accumulator.compute(), results_dir, plots=False)
    card_arguments = dict(repo_id="someone/calibrated", train_dataset="MVTec AD", eval_dataset="VisA")
    expected = calibrated_fields(calibrated_model.config)

    full = tmp_path / "hub-full"
    card = render_model_card(calibrated_model, results_dir, **card_arguments)
    save_hub_folder(calibrated_model, processor, full, card, results_dir)
    text = ModelCard.load(full / "README.md").text
    assert "## Calibration" in text and f"| image | {expected['image_threshold']:.4f} | normal_quantile |" in text
    assert "| bottle |" in text and "The model is not calibrated" not in text
    images = list(both_classes(bottle, 2)["path"])
    run_without_headclip(REMOTE_PIPELINE_SCRIPT, full, tmp_path / "out.json", *images)
    remote = json.loads((tmp_path / "out.json").read_text())
    assert (remote["image_threshold"], remote["pixel_threshold"]) == (
        expected["image_threshold"],
        expected["pixel_threshold"],
    )
    for output in remote["outputs"]:
        assert output["label"] == ("anomaly" if output["score"] >= expected["image_threshold"] else "normal")
        assert output["mask"] == output["map_at_threshold"]
    # The calibrated threshold decides differently from the uncalibrated 0.5 on at least one of these images.
    assert any((output["score"] >= 0.5) != (output["label"] == "anomaly") for output in remote["outputs"])

    adapter_only = tmp_path / "hub-adapter"
    card = render_model_card(calibrated_model, results_dir, adapter_only=True, **card_arguments)
    save_hub_folder(
        calibrated_model,
        processor,
        adapter_only,
        card,
        results_dir,
        adapter_only=True,
        base_model=str(clip_checkpoint),
    )
    assert calibrated_fields(load_headclip_model(adapter_only).config) == expected


# ---------------------------------------------------------------------------------------------------------------------
# Where the thresholds are used
# ---------------------------------------------------------------------------------------------------------------------


def test_pipeline_defaults_sources_and_category(tiny_model, processor, bottle, caplog):
    config = tiny_model.config
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once logs once per process and message
    with caplog.at_level("WARNING"):
        assert resolve_thresholds(config) == {
            "threshold": 0.5,
            "threshold_source": "default",
            "pixel_threshold": 0.5,
            "pixel_threshold_source": "threshold",
        }
        resolve_thresholds(config)
    assert caplog.text.count("This HeadCLIP model is uncalibrated") == 1

    detector = pipeline(TASK, model=tiny_model, processor=processor, device="cpu")
    path = bottle[0]["path"]
    score = detector(path)["score"]
    config.image_threshold, config.pixel_threshold = score, 0.25
    config.image_thresholds, config.pixel_thresholds = {"bottle": float(np.nextafter(score, 1.0))}, {"bottle": 1.0}
    assert resolve_thresholds(config, pixel_threshold=0.3) == {
        "threshold": score,
        "threshold_source": "calibrated",
        "pixel_threshold": 0.3,
        "pixel_threshold_source": "given",
    }
    model_wide, bottle_thresholds = detector(path), detector(path, category="bottle")
    assert model_wide["label"] == "anomaly" and bottle_thresholds["label"] == "normal"
    assert np.array_equal(np.asarray(model_wide["mask"]) > 0, model_wide["anomaly_map"] >= 0.25)
    assert np.asarray(bottle_thresholds["mask"]).max() == 0  # no map value reaches 1.0
    assert detector(path, category="bottle", threshold=0.0)["label"] == "anomaly"
    with caplog.at_level("WARNING"):
        assert detector(path, category="screw")["label"] == "anomaly"  # no screw thresholds: the model-wide ones
    assert "no thresholds calibrated for category 'screw'" in caplog.text
    with pytest.raises(ValueError, match="category must be a category name"):
        detector(path, category=3)


def test_detect_records_the_thresholds_it_used(calibrated_model, processor, bottle, tmp_path):
    model_dir = tmp_path / "model"
    calibrated_model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    images = list(both_classes(bottle, 1)["path"])
    base = ["detect", *images, "--model", str(model_dir), "--device", "cpu"]
    threshold = calibrated_model.config.image_threshold
    pixel_threshold = calibrated_model.config.pixel_threshold

    for extra, expected in (
        ((), (threshold, "calibrated", pixel_threshold, "calibrated", None)),
        (("--threshold", "0.7"), (0.7, "given", pixel_threshold, "calibrated", None)),
        (("--category", "bottle", "--pixel_threshold", "0.2"), (threshold, "calibrated", 0.2, "given", "bottle")),
    ):
        out = tmp_path / f"detections{len(extra)}"
        assert main([*base, "--out", str(out), *extra]) == 0
        summary = json.loads((out / "scores.json").read_text())
        keys = ("threshold", "threshold_source", "pixel_threshold", "pixel_threshold_source", "category")
        assert tuple(summary[key] for key in keys) == expected
        for row in summary["images"]:
            assert row["label"] == ("anomaly" if row["score"] >= summary["threshold"] else "normal")


def test_calibrate_writes_an_adapter_for_an_adapter(headclip_checkpoint, test_data_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    save_headclip_adapter(HeadCLIPModel.from_pretrained(headclip_checkpoint), adapter)
    out = tmp_path / "calibrated"
    good = test_data_dir / "mvtec_ad" / "bottle"
    arguments = ["calibrate", str(good), "--model", str(adapter), "--out", str(out), "--device", "cpu"]
    assert main([*arguments, "--method", "normal_quantile", "--target_fpr", "0.1", "--per_category"]) == 0
    assert {path.name for path in out.iterdir()} == CALIBRATED_ADAPTER_OUTPUT.entries | {OUTPUT_MARKER}
    record = json.loads((out / "calibration.json").read_text())
    assert record["model"] == str(adapter) and record["calibration"]["target_fpr"] == 0.1
    loaded = load_headclip_model(out)
    assert loaded.config.image_threshold == record["image_threshold"]
    assert loaded.config.image_thresholds == {"bottle": record["image_thresholds"]["bottle"]}
    assert "category bottle:" in capsys.readouterr().out
    # A second run replaces its own output; other files there need --overwrite.
    (out / "notes.txt").write_text("mine")
    assert main([*arguments, "--method", "normal_quantile"]) == 1
    assert "notes.txt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


def constant_forward(value):
    """A stand-in for the model's forward: every score and map value is `value`."""

    def forward(pixel_values, **kwargs):
        size = pixel_values.shape[-1]
        batch = pixel_values.shape[0]
        return types.SimpleNamespace(
            image_score=torch.full((batch,), value), anomaly_map=torch.full((batch, size, size), value)
        )

    return forward


@pytest.mark.parametrize("name", ["target_fpr", "pixel_target_fpr"])
@pytest.mark.parametrize("value", [0, 1, -0.1, 1.5, float("nan"), True])
def test_target_rates_outside_the_open_unit_interval(tiny_model, processor, bottle, name, value):
    with pytest.raises(ValueError, match=rf"{name}={value!r} is invalid: .* strictly between 0 and 1"):
        calibrate(tiny_model, processor, bottle, **{name: value})


def test_bad_data_is_refused_before_the_model_runs(tiny_model, processor, bottle, monkeypatch):
    monkeypatch.setattr(tiny_model, "forward", lambda **kwargs: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match="The calibration data set is empty"):
        calibrate(tiny_model, processor, bottle.select([]))
    with pytest.raises(ValueError, match="Calibration needs a datasets.Dataset, got IterableDataset"):
        calibrate(tiny_model, processor, bottle.to_iterable_dataset())
    anomalous = rows(bottle, label=1, count=4)
    for method in ("normal_quantile", "auto", "f1"):
        with pytest.raises(ValueError, match=rf"method='{method}' needs .*the data set has no normal images \(all 4"):
            calibrate(tiny_model, processor, anomalous, method=method)
    with pytest.raises(ValueError, match="method='f1' needs normal and anomalous images, .* only normal ones \\(4\\)"):
        calibrate(tiny_model, processor, rows(bottle, label=0, count=4), method="f1")
    unknown_masks = bottle.map(lambda label: {"mask_valid": label == 0}, input_columns="label")
    with pytest.raises(ValueError, match="method='f1' needs masks of anomalous images .* Use method='auto'"):
        calibrate(tiny_model, processor, unknown_masks, method="f1")
    with pytest.raises(ValueError, match="Unknown calibration method 'best': choose one of auto, f1, normal_quantile"):
        calibrate(tiny_model, processor, bottle, method="best")
    split = both_classes(bottle, 2).map(lambda label: {"category": ["good", "broken"][label]}, input_columns="label")
    with pytest.raises(ValueError, match="category 'broken' has no normal images .* or leave this category out"):
        calibrate(tiny_model, processor, split, per_category=True)
    numbered = both_classes(bottle, 2).cast_column("label", datasets.Value("int64"))
    numbered = numbered.map(lambda label: {"label": 2 * label}, input_columns="label")  # 2 is not "anomalous"
    with pytest.raises(
        ValueError, match=r"labels must be 0 \(normal\) or 1 \(anomalous\), but its label column also holds 2"
    ):
        calibrate(tiny_model, processor, numbered)
    with pytest.raises(
        ValueError, match=r"has no column 'mask_valid', 'category': calibrating needs the columns image"
    ):
        calibrate(tiny_model, processor, both_classes(bottle, 2).remove_columns(["mask_valid", "category"]))


def test_target_rates_may_be_numpy_numbers(bottle):
    check_calibration_data(
        rows(bottle, label=0, count=4), target_fpr=np.float32(0.5), pixel_target_fpr=np.float64(0.1)
    )


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0.5, r"All 4 image scores of the data set are equal \(0.5\): the model does not tell these images apart"),
        (
            float("nan"),
            r"non-finite scores or maps \(NaN or infinity\) for 4 of the 4 images .*categories \['bottle'\]",
        ),
        (float("inf"), r"non-finite scores or maps"),
    ],
)
def test_scores_no_threshold_can_separate(tiny_model, processor, bottle, monkeypatch, value, error):
    monkeypatch.setattr(tiny_model, "forward", constant_forward(value))
    with pytest.raises(ValueError, match=error):
        calibrate(tiny_model, processor, both_classes(bottle, 2), show_progress=False)


def test_calibrate_command_checks_the_data_before_loading_the_model(test_data_dir, tmp_path, capsys):
    out = tmp_path / "calibrated"
    polyps = test_data_dir / "kvasir_seg"  # polyp images only: no normal ones
    assert main(["calibrate", str(polyps), "--model", str(tmp_path / "no-model"), "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert "headclip: error: Calibration with method='auto' needs normal images" in error
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(polyps), "--out", str(out), "--target_fpr", "1"])
    assert exit_info.value.code == 2 and "1 is not strictly between 0 and 1" in capsys.readouterr().err


def test_calibrate_takes_the_shared_data_flags(test_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("headclip_hf.cli.calibrate.load_model_and_processor", lambda *a: pytest.fail("model loaded"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    bottle = test_data_dir / "mvtec_ad" / "bottle"

    def calibrate_error(*flags) -> str:
        assert main(["calibrate", str(bottle), "--out", str(tmp_path / "out"), *map(str, flags)]) == 1
        return capsys.readouterr().err

    error = calibrate_error("--image_column", "picture")
    assert f"headclip: error: Cannot load the data set {bottle}: image_column name columns of a table" in error
    assert "has only a test split, not 'validation'" in calibrate_error("--split", "validation")
    assert "could be decompression bomb" in calibrate_error("--max_image_pixels", 100)  # the images are larger
    assert not (tmp_path / "out").exists()
