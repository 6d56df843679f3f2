"""`headclip evaluate --report`: per_image.csv against the model, thresholds, the gallery, report.html in Chromium."""

import csv
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headclip_hf import HeadCLIPModel, HeadCLIPProcessor, load_anomaly_dataset
from headclip_hf.cli import main
from headclip_hf.demo import SAMPLE_IMAGES_DIR
from headclip_hf.evaluation import evaluate_model
from headclip_hf.evaluation_report import (
    PER_IMAGE_COLUMNS,
    ImageScore,
    per_image_scores,
    report_thresholds,
    select_gallery,
)
from headclip_hf.files import OUTPUT_MARKER
from headclip_hf.metrics import AnomalyMetricsAccumulator
from headclip_hf.pipeline_headclip import TASK, ZeroShotAnomalyDetectionPipeline

# The sample images as a data set in the generic layout: category/<defect>/image, category/ground_truth/<defect>/mask.
SAMPLE_LAYOUT = {
    "bottle_good_000.png": ("bottle", "good"),
    "bottle_good_001.png": ("bottle", "good"),
    "bottle_broken_large_000.png": ("bottle", "broken_large"),
    "bottle_contamination_000.png": ("bottle", "contamination"),
    "colon_polyp_cju1d31sp4d4k0878r3fr02ul.jpg": ("colon", "polyp"),
}


@pytest.fixture
def sample_data(tmp_path) -> Path:
    root = tmp_path / "samples"
    for name, (category, defect) in SAMPLE_LAYOUT.items():
        (root / category / defect).mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLE_IMAGES_DIR / name, root / category / defect / name)
        mask = SAMPLE_IMAGES_DIR / "ground_truth" / f"{Path(name).stem}_mask.png"
        if mask.exists():
            (root / category / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            shutil.copy(mask, root / category / "ground_truth" / defect / mask.name)
    return root


def best_f1(labels, scores):
    """The best F1 of `scores >= t` over every score t (brute force)."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores)
    return max(f1_at(labels, scores, threshold) for threshold in scores)


def f1_at(labels, scores, threshold):
    predicted = np.asarray(scores) >= threshold
    return 2 * np.sum(predicted & labels) / (predicted.sum() + labels.sum())


def test_report_in_a_browser(sample_data, headclip_checkpoint, tmp_path, browser):
    from selenium.webdriver.common.by import By

    out = tmp_path / "eval"
    args = ["evaluate", str(sample_data), "--model", str(headclip_checkpoint), "--output_dir", str(out)]
    assert main([*args, "--report", "--gallery_size", "1", "--batch_size", "1", "--device", "cpu"]) == 0
    written = {"report.html", "per_image.csv", "report_files", "plots", "results.json", "results.md", OUTPUT_MARKER}
    assert written == {path.name for path in out.iterdir()}

    # per_image.csv: every image, its score as the model computes it, the decision at the category's threshold.
    model = HeadCLIPModel.from_pretrained(headclip_checkpoint).eval()
    processor = HeadCLIPProcessor.from_pretrained(headclip_checkpoint)
    with open(out / "per_image.csv", newline="") as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames) == PER_IMAGE_COLUMNS
        rows = list(reader)
    assert sorted(Path(row["path"]).name for row in rows) == sorted(SAMPLE_LAYOUT)
    for row in rows:
        with torch.no_grad():
            expected = model(**processor(images=row["path"], return_tensors="pt")).image_score.item()
        assert float(row["score"]) == pytest.approx(expected, abs=1e-6)
        assert row["category"] == SAMPLE_LAYOUT[Path(row["path"]).name][0]
        assert row["label"] == ("normal" if "good" in row["path"] else "anomaly")
        assert row["predicted_label"] == ("anomaly" if float(row["score"]) >= float(row["threshold"]) else "normal")
    bottle = [row for row in rows if row["category"] == "bottle"]
    labels = np.array([row["label"] == "anomaly" for row in bottle])
    scores = np.array([float(row["score"]) for row in bottle])
    assert len({row["threshold"] for row in bottle}) == 1  # one threshold per category: the F1-optimal one
    assert f1_at(labels, scores, float(bottle[0]["threshold"])) == pytest.approx(best_f1(labels, scores))
    colon = [row for row in rows if row["category"] == "colon"]
    assert [row["threshold"] for row in colon] == ["0.5"]  # no normal colon image: image F1 undefined, the default

    # The page, from disk: metrics table, plots, 1 image per gallery section (bottle: 1 + 1 + 1, colon: 0 + 1 + 0).
    browser.get((out / "report.html").as_uri())
    assert browser.title.startswith("HeadCLIP evaluation report")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#metrics tbody tr")) == 3  # bottle, colon, mean
    categories = browser.find_elements(By.CSS_SELECTOR, "section.category")
    assert [section.find_element(By.TAG_NAME, "h2").text for section in categories] == ["bottle", "colon"]
    items = [len(section.find_elements(By.CSS_SELECTOR, "tr.gallery-item")) for section in categories]
    assert items == [3, 1]
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 2 + 4 * 4  # two plots, four pictures per gallery item
    loaded = browser.execute_script("return Array.from(document.images).map(image => image.naturalWidth > 0)")
    assert all(loaded), "every picture of the report opens from disk"
    assert "no mask" not in browser.find_element(By.TAG_NAME, "body").text
    browser.set_window_size(1400, browser.execute_script("return document.documentElement.scrollHeight") + 120)
    browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 0

    # A gallery's predicted mask is the pipeline's at the report's thresholds.
    miss = categories[1].find_element(By.CSS_SELECTOR, "tr.gallery-item img[alt^='mask']").get_attribute("src")
    stated = categories[1].find_element(By.CSS_SELECTOR, ".thresholds")
    thresholds = {level: float(stated.get_attribute(f"data-{level}-threshold")) for level in ("image", "pixel")}
    assert f"Image threshold {thresholds['image']:.4f}" in stated.text
    detector = ZeroShotAnomalyDetectionPipeline(model=model, processor=processor, task=TASK, device="cpu")
    polyp = sample_data / "colon" / "polyp" / "colon_polyp_cju1d31sp4d4k0878r3fr02ul.jpg"
    result = detector(str(polyp), threshold=thresholds["image"], pixel_threshold=thresholds["pixel"])
    shown = np.asarray(Image.open(urllib.request.url2pathname(urllib.parse.urlparse(miss).path)))
    expected_mask = result["mask"].resize((256, 218), Image.Resampling.NEAREST)
    assert shown.shape == (218, 256) and np.array_equal(shown, np.asarray(expected_mask))


def test_per_image_scores_follow_the_data_set(sample_data, tiny_model, clip_tokenizer):
    processor = HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=tiny_model.config.image_size)
    dataset = load_anomaly_dataset(sample_data)
    results = evaluate_model(tiny_model, processor, dataset, batch_size=2, show_progress=False)
    images = per_image_scores(dataset, results)
    assert sorted(image.index for image in images) == list(range(len(dataset)))
    for image in images:
        row = dataset[image.index]
        assert (image.path, image.category, image.label) == (row["path"], row["category"], row["label"])
        with torch.no_grad():
            expected = tiny_model(**processor(images=row["image"], return_tensors="pt")).image_score.item()
        assert image.score == pytest.approx(expected, abs=1e-6)

    other = AnomalyMetricsAccumulator(num_bins=16)
    other.update(categories="bottle", labels=[1, 0], scores=[0.2, 0.3])
    with pytest.raises(ValueError, match=r"The results of category 'bottle' \(2 images\) do not come from this data"):
        per_image_scores(dataset, other.compute())


def test_gallery_sections():
    images = [ImageScore(i, f"n{i}.png", "c", 0, score) for i, score in enumerate([0.1, 0.9, 0.5])]
    images += [ImageScore(10 + i, f"a{i}.png", "c", 1, score) for i, score in enumerate([0.2, 0.8, 0.6, 0.4, 0.7])]
    gallery = select_gallery(images, 2)
    assert [image.score for image in gallery["false_alarms"]] == [0.9, 0.5]
    assert [image.score for image in gallery["misses"]] == [0.2, 0.4]
    assert [image.score for image in gallery["detections"]] == [0.8, 0.7]
    small = select_gallery(images[3:5], 3)  # two anomalous images: both are misses, none left for detections
    assert (len(small["false_alarms"]), len(small["misses"]), len(small["detections"])) == (0, 2, 0)


def test_report_thresholds_prefer_calibrated_thresholds(tiny_model):
    accumulator = AnomalyMetricsAccumulator(num_bins=16)
    masks = torch.zeros(4, 4, 4)
    masks[2:, :2] = 1
    maps = masks * 0.5 + 0.25
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.6, 0.2])
    accumulator.update(categories="c", labels=labels, scores=scores, masks=masks, anomaly_maps=maps)
    category = accumulator.compute().categories["c"]
    thresholds = report_thresholds(category, tiny_model)
    assert thresholds.image_source == thresholds.pixel_source == "F1-optimal on this category"
    assert f1_at(labels.astype(bool), scores, thresholds.image_threshold) == pytest.approx(0.8)  # the best F1
    assert thresholds.pixel_threshold == 0.75  # the bin edge at which the maps separate the masks exactly
    tiny_model.config.image_threshold = 0.45
    thresholds = report_thresholds(category, tiny_model)
    assert (thresholds.image_threshold, thresholds.image_source, thresholds.pixel_threshold) == (
        0.45,
        "calibrated",
        0.75,
    )
    tiny_model.config.pixel_threshold = 0.3
    assert report_thresholds(category, tiny_model).pixel_threshold == 0.3

    colon = AnomalyMetricsAccumulator(num_bins=16)
    colon.update(categories="colon", labels=[1], scores=[0.7])  # one class, no masks: no F1-optimal threshold
    tiny_model.config.image_threshold = tiny_model.config.pixel_threshold = None  # uncalibrated
    thresholds = report_thresholds(colon.compute().categories["colon"], tiny_model)
    assert (thresholds.image_threshold, thresholds.pixel_threshold) == (0.5, 0.5)
    assert thresholds.image_source == "the default: image F1 is undefined on this category"


def test_report_needs_a_zero_shot_evaluation_of_a_data_set_in_hand(sample_data, tmp_path, capsys):
    args = [
        "evaluate",
        str(sample_data),
        "--model",
        str(tmp_path / "never-loaded"),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--report", "--k_shot", "1"]) == 1
    assert "--report shows a zero-shot evaluation: leave out --k_shot" in capsys.readouterr().err
    assert main([*args, "--report", "--streaming"]) == 1
    assert "--report shows the gallery images again, which a stream cannot" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
