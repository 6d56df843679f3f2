"""Metrics: values against independent computations, undefined cases, streaming, reports and the evaluate module.

The references are written here, independently of `headclip_hf.metrics`: scikit-learn on all pixels for AUROC / AP /
F1-max, brute force over thresholds for image F1-max, and `direct_aupro`, the textbook per-threshold, per-region PRO
computation over every distinct score.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from headclip_hf.metrics import (
    METRIC_NAMES,
    AnomalyMetricsAccumulator,
    PixelScoreHistograms,
    UndefinedMetricError,
    image_ap,
    image_auroc,
    image_f1_max,
    image_f1_max_threshold,
    pixel_ap,
    pixel_aupro,
    pixel_auroc,
    pixel_f1_max,
    threshold_between,
)
from headclip_hf.reporting import category_file_names, results_to_markdown, save_results

REPO_ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------------------------------


def brute_force_f1_max(labels, scores):
    """max over every distinct threshold t of F1 of the prediction `scores >= t`."""
    labels, scores = np.asarray(labels).ravel().astype(bool), np.asarray(scores).ravel()
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        true_positives = np.sum(predicted & labels)
        best = max(best, 2 * true_positives / (predicted.sum() + labels.sum()))
    return best


def sklearn_f1_max(labels, scores):
    precision, recall, _ = precision_recall_curve(np.ravel(labels), np.ravel(scores))
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    return f1.max()


def direct_aupro(masks, maps, fpr_limit=0.3):
    """AUPRO by its definition: at every distinct score t (highest first), threshold every image at `map >= t`,
    FPR = predicted normal pixels / normal pixels, PRO = mean over the 8-connected regions of every mask of the
    fraction of the region predicted; trapezoidal area of (FPR, PRO) from (0, 0) up to FPR = fpr_limit (linearly
    interpolated there), divided by fpr_limit."""
    regions = []
    for index, mask in enumerate(masks):
        labelled, num_regions = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == region) for region in range(1, num_regions + 1)]
    normal = ~masks.astype(bool)
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append(np.sum(predicted & normal) / normal.sum())
        pros.append(np.mean([predicted[index][region].mean() for index, region in regions]))
        if fprs[-1] > fpr_limit:
            break
    fprs, pros = np.array(fprs), np.array(pros)
    inside = fprs <= fpr_limit
    x, y = list(fprs[inside]), list(pros[inside])
    if x[-1] < fpr_limit:  # the last point computed is the first one past the limit
        x.append(fpr_limit)
        y.append(np.interp(fpr_limit, fprs[-2:], pros[-2:]))
    area = sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))
    return area / fpr_limit


# ---------------------------------------------------------------------------------------------------------------------
# Test data
# ---------------------------------------------------------------------------------------------------------------------


def blob_masks(rng, num_images=6, size=32):
    """Masks with 0 to 3 ellipses of varied sizes each; the first image stays normal."""
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((num_images, size, size), dtype=bool)
    for image in range(1, num_images):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(1, size / 5, 2)
            masks[image] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return masks


def structured_maps(masks, rng, noise=0.15):
    """Blurred masks plus smooth noise: what a detector produces, with spatially correlated scores."""
    signal = ndimage.gaussian_filter(masks.astype(np.float64), sigma=(0, 2, 2))
    background = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 1.5, 1.5))
    return np.clip(0.3 + 0.6 * signal + noise * background / background.std(), 0, 1)


def map_cases():
    rng = np.random.default_rng(0)
    masks = blob_masks(rng)
    yield "uniform random", masks, rng.random(masks.shape)
    yield "structured", masks, structured_maps(masks, rng)
    yield "structured, many ties", masks, np.round(structured_maps(masks, rng) * 20) / 20
    yield "inverted", masks, 1 - structured_maps(masks, rng)
    yield "perfect", masks, masks.astype(np.float32)
    yield "constant", masks, np.full(masks.shape, 0.5)
    yield "float32 with a score of 1.0", masks, np.where(masks, 1.0, rng.random(masks.shape)).astype(np.float32)


MAP_CASES = list(map_cases())
CASE_IDS = [case[0] for case in MAP_CASES]


# ---------------------------------------------------------------------------------------------------------------------
# Values against independent computations
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = np.round(rng.random(60) + 0.4 * labels, 2)  # rounded: ties included
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert image_f1_max(labels, scores) == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-12)


@pytest.mark.parametrize("name, masks, maps", MAP_CASES, ids=CASE_IDS)
def test_pixel_metrics_match_independent_computations(name, masks, maps):
    labels, scores = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(labels, scores), abs=TOLERANCE)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(labels, scores), abs=TOLERANCE)
    assert pixel_f1_max(masks, maps) == pytest.approx(sklearn_f1_max(labels, scores), abs=TOLERANCE)
    assert pixel_aupro(masks, maps) == pytest.approx(direct_aupro(masks, maps), abs=TOLERANCE)


def f1_at(labels, scores, threshold):
    """F1 of the prediction `scores >= threshold`, computed directly."""
    labels, predicted = np.ravel(labels).astype(bool), np.ravel(scores) >= threshold
    return 2 * np.sum(predicted & labels) / (predicted.sum() + labels.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_f1_max_threshold_reaches_f1_max(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    scores = np.round(np.clip(0.3 * labels + rng.normal(0.4, 0.2, 40), 0, 1), 2)  # rounded: ties
    f1, threshold = image_f1_max_threshold(labels, scores)
    assert f1 == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-12)
    assert f1_at(labels, scores, threshold) == pytest.approx(f1, abs=1e-12)


@pytest.mark.parametrize("name, masks, maps", MAP_CASES, ids=CASE_IDS)
def test_pixel_f1_max_threshold_reaches_f1_max(name, masks, maps):
    accumulator = AnomalyMetricsAccumulator()
    accumulator.update(
        categories="c", labels=masks.any(axis=(1, 2)), scores=maps.max(axis=(1, 2)), masks=masks, anomaly_maps=maps
    )
    category = accumulator.compute().categories["c"]
    threshold = category.f1_max_thresholds["pixel"].value
    assert f1_at(masks, maps.astype(np.float32), threshold) == pytest.approx(category.metrics["pixel_f1_max"].value)
    assert threshold * 2**16 == int(threshold * 2**16)  # a bin edge


def test_f1_ties_go_to_the_lowest_threshold_at_both_levels():
    # Flagging the top score or the top four gives the same F1, 2/3, at both levels: the lower threshold wins.
    labels, scores = np.array([1, 1, 0, 0, 0]), np.array([0.9, 0.6, 0.6, 0.6, 0.1])
    f1, threshold = image_f1_max_threshold(labels, scores)
    assert (f1, threshold) == (pytest.approx(2 / 3), threshold_between(0.1, 0.6))
    assert f1_at(labels, scores, threshold) == f1_at(labels, scores, 0.9) == pytest.approx(2 / 3)
    pixels = PixelScoreHistograms.empty(num_bins=4)
    pixels.update(labels.reshape(1, 1, 5).astype(bool), scores.reshape(1, 1, 5))
    f1, threshold = pixels.f1_max_threshold()
    assert (f1, threshold) == (pytest.approx(2 / 3), 0.5)  # bin edge 0.5 (with 0.6), not 0.75 (0.9 alone)
    assert f1_at(labels, scores, 0.5) == f1_at(labels, scores, 0.75) == pytest.approx(2 / 3)


def test_pixel_metrics_on_known_values():
    masks, maps = MAP_CASES[CASE_IDS.index("perfect")][1:]
    for metric in (pixel_auroc, pixel_ap, pixel_f1_max, pixel_aupro):
        assert metric(masks, maps) == pytest.approx(1.0, abs=1e-12)
    # Constant map: one threshold, the PRO curve is the diagonal, so AUPRO = (0.3 * 0.3 / 2) / 0.3 = 0.15.
    constant = np.full(masks.shape, 0.5)
    assert pixel_auroc(masks, constant) == pytest.approx(0.5, abs=1e-12)
    assert pixel_aupro(masks, constant) == pytest.approx(0.15, abs=1e-12)


def test_aupro_averages_regions_not_pixels_and_uses_8_connectivity():
    # Region A: 1 pixel scored 0.9. Region B: 2 pixels touching only diagonally (one 8-connected region), scored 0.8
    # and 0.2. Normal pixels: 0.5. PRO is (1 + 0) / 2, then (1 + 1/2) / 2 = 3/4 at FPR 0 and stays 3/4 up to FPR 1:
    # AUPRO = 3/4. Splitting B into 4-connected parts, or weighting pixels instead of regions, gives 2/3.
    mask = np.zeros((1, 4, 4), dtype=bool)
    maps = np.full((1, 4, 4), 0.5)
    mask[0, 0, 0], maps[0, 0, 0] = True, 0.9
    mask[0, 2, 1], maps[0, 2, 1] = True, 0.8
    mask[0, 3, 2], maps[0, 3, 2] = True, 0.2  # touches (2, 1) diagonally
    assert pixel_aupro(mask, maps) == pytest.approx(3 / 4, abs=1e-12)
    assert direct_aupro(mask, maps) == pytest.approx(3 / 4, abs=1e-12)


def test_binned_metrics_are_exactly_those_of_quantised_scores():
    """The only approximation is the binning (module docstring): on quantised scores, sklearn agrees to 1e-12."""
    rng = np.random.default_rng(3)
    masks = blob_masks(rng)
    maps = structured_maps(masks, rng)
    num_bins = 64
    quantised = np.minimum(np.floor(maps * num_bins), num_bins - 1) / num_bins
    labels = masks.ravel()
    assert pixel_auroc(masks, maps, num_bins=num_bins) == pytest.approx(roc_auc_score(labels, quantised.ravel()))
    assert pixel_ap(masks, maps, num_bins=num_bins) == pytest.approx(
        average_precision_score(labels, quantised.ravel())
    )
    assert pixel_aupro(masks, maps, num_bins=num_bins) == pytest.approx(direct_aupro(masks, quantised), abs=1e-12)
    # ... and a coarse histogram really is coarser, so the exactness tests above can fail.
    assert abs(pixel_aupro(masks, maps, num_bins=4) - direct_aupro(masks, maps)) > TOLERANCE


def test_kvasir_masks_image_metrics_undefined_pixel_metrics_defined(test_data_dir):
    """Kvasir-SEG has no normal image: image-level metrics are undefined with a reason, pixel-level ones defined."""
    from PIL import Image

    mask_files = sorted((test_data_dir / "kvasir_seg" / "colon" / "ground_truth" / "polyp").glob("*"))[:4]
    assert mask_files, "no Kvasir-SEG masks found"
    masks = np.stack(
        [np.asarray(Image.open(path).convert("L").resize((48, 48), Image.NEAREST)) > 127 for path in mask_files]
    )
    maps = structured_maps(masks, np.random.default_rng(0))
    accumulator = AnomalyMetricsAccumulator()
    accumulator.update(
        categories="colon", labels=np.ones(len(masks)), scores=maps.max(axis=(1, 2)), masks=masks, anomaly_maps=maps
    )
    colon = accumulator.compute().categories["colon"]

    for name in ("image_auroc", "image_ap", "image_f1_max", "mad_image"):
        assert colon.metrics[name].value is None
        assert (
            colon.metrics[name].reason == f"category 'colon': no normal images (all {len(masks)} images are anomalous)"
        )
    assert colon.metrics["pixel_auroc"].value == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()), abs=TOLERANCE
    )
    assert colon.metrics["pixel_aupro"].value == pytest.approx(direct_aupro(masks, maps), abs=TOLERANCE)
    assert all(colon.metrics[name].reason is None for name in ("pixel_ap", "pixel_f1_max", "mad_pixel"))


# ---------------------------------------------------------------------------------------------------------------------
# Undefined metrics
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, reason",
    [
        ([1, 1, 1], "no normal images (all 3 images are anomalous)"),
        ([0, 0], "no anomalous images (all 2 images are normal)"),
    ],
)
def test_image_metric_functions_raise_with_reason_on_one_class(labels, reason):
    for metric in (image_auroc, image_ap, image_f1_max):
        with pytest.raises(UndefinedMetricError) as error:
            metric(labels, np.linspace(0, 1, len(labels)))
        assert error.value.reason == reason


@pytest.mark.parametrize(
    "mask_value, reason",
    [
        (False, "no anomalous pixels (all 2 masks are empty)"),
        (True, "no normal pixels (all 2 masks are fully anomalous)"),
    ],
)
def test_pixel_metric_functions_raise_with_reason_on_one_class(mask_value, reason):
    masks = np.full((2, 8, 8), mask_value)
    for metric in (pixel_auroc, pixel_ap, pixel_f1_max, pixel_aupro):
        with pytest.raises(UndefinedMetricError) as error:
            metric(masks, np.random.default_rng(0).random(masks.shape))
        assert error.value.reason == reason


def test_undefined_categories_are_reported_as_none_with_reason_and_skipped_by_means():
    rng = np.random.default_rng(0)
    masks = blob_masks(rng, num_images=4)
    maps = structured_maps(masks, rng)
    accumulator = AnomalyMetricsAccumulator()
    accumulator.update(
        categories="bottle", labels=[0, 1, 1, 1], scores=[0.1, 0.8, 0.4, 0.9], masks=masks, anomaly_maps=maps
    )
    accumulator.update(categories="no_masks", labels=[0, 1], scores=[0.2, 0.7])  # image level only
    accumulator.update(
        categories="unknown_masks",
        labels=[0, 1],
        scores=[0.2, 0.7],
        masks=masks[:2],
        anomaly_maps=maps[:2],
        mask_valid=[False, False],
    )
    results = accumulator.compute()

    for category in ("no_masks", "unknown_masks"):
        for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro", "mad_pixel"):
            result = results.categories[category].metrics[name]
            assert result.value is None
            assert result.reason == f"category '{category}': no pixel-level ground truth (no image has a mask)"
        assert results.categories[category].metrics["image_auroc"].value == 1.0

    bottle = results.categories["bottle"].metrics
    assert results.mean["pixel_aupro"].value == bottle["pixel_aupro"].value
    assert results.mean["pixel_aupro"].num_categories == 1
    assert results.mean["image_auroc"].num_categories == 3
    assert results.mean["mad_image"].value == pytest.approx(np.mean([bottle["mad_image"].value, 1.0, 1.0]))
    assert bottle["mad_pixel"].value == pytest.approx(
        np.mean([bottle[name].value for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")])
    )
    # Nothing undefined is smuggled in as a number: JSON without NaN, null next to each reason.
    payload = json.loads(json.dumps(results.to_dict(), allow_nan=False))
    entry = payload["categories"]["no_masks"]["metrics"]["pixel_aupro"]
    assert entry == {"value": None, "reason": "category 'no_masks': no pixel-level ground truth (no image has a mask)"}


def test_metric_undefined_on_every_category_has_undefined_mean():
    accumulator = AnomalyMetricsAccumulator()
    accumulator.update(categories="colon", labels=[1, 1], scores=[0.3, 0.6])
    mean = accumulator.compute().mean["image_auroc"]
    assert mean.value is None and mean.num_categories == 0
    assert (
        mean.reason
        == "undefined on all 1 categories, e.g. category 'colon': no normal images (all 2 images are anomalous)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Streaming, merging, inputs
# ---------------------------------------------------------------------------------------------------------------------


def two_category_data():
    rng = np.random.default_rng(5)
    masks = blob_masks(rng, num_images=10)
    masks[:4] = False  # two normal images per category
    maps = structured_maps(masks, rng)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    categories = ["bottle", "cable"] * 5
    return categories, labels, scores, masks, maps


def test_streaming_batches_and_merge_match_one_shot_and_functions():
    categories, labels, scores, masks, maps = two_category_data()
    one_shot = AnomalyMetricsAccumulator()
    one_shot.update(categories=categories, labels=labels, scores=scores, masks=masks, anomaly_maps=maps)
    expected = one_shot.compute().to_dict()

    first, second = AnomalyMetricsAccumulator(), AnomalyMetricsAccumulator()
    for start, stop, accumulator in ((0, 3, first), (3, 4, first), (4, 10, second)):
        accumulator.update(
            categories=categories[start:stop],
            labels=labels[start:stop],
            scores=scores[start:stop],
            masks=masks[start:stop],
            anomaly_maps=maps[start:stop],
        )
    first.merge(AnomalyMetricsAccumulator.from_state_dict(second.state_dict()))
    streamed = first.compute().to_dict()
    for category in ("bottle", "cable"):
        for name in METRIC_NAMES:
            assert streamed["categories"][category]["metrics"][name]["value"] == pytest.approx(
                expected["categories"][category]["metrics"][name]["value"], abs=1e-12
            )
        selection = np.array(categories) == category
        values = expected["categories"][category]["metrics"]
        assert values["image_auroc"]["value"] == image_auroc(labels[selection], scores[selection])
        assert values["pixel_aupro"]["value"] == pixel_aupro(masks[selection], maps[selection])
        assert values["pixel_ap"]["value"] == pixel_ap(masks[selection], maps[selection])


def test_torch_inputs_and_mask_valid():
    categories, labels, scores, masks, maps = two_category_data()
    from_numpy, from_torch = AnomalyMetricsAccumulator(), AnomalyMetricsAccumulator()
    valid = np.arange(10) != 3
    from_numpy.update(
        categories="all", labels=labels[valid], scores=scores[valid], masks=masks[valid], anomaly_maps=maps[valid]
    )
    from_torch.update(
        categories="all",
        labels=torch.tensor(labels),
        scores=torch.tensor(scores),
        masks=torch.tensor(masks),
        anomaly_maps=torch.tensor(maps),
        mask_valid=torch.tensor(valid),
    )
    numpy_metrics = from_numpy.compute().categories["all"].metrics
    torch_metrics = from_torch.compute().categories["all"].metrics
    for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"):
        assert torch_metrics[name] == numpy_metrics[name]
    assert from_torch.compute().categories["all"].counts["num_images"] == 10  # image level keeps every image


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (
            {"masks": np.zeros((2, 8, 8)), "anomaly_maps": np.zeros((2, 8, 9))},
            r"got masks \(2, 8, 8\) and anomaly_maps \(2, 8, 9\)",
        ),
        ({"masks": np.zeros((2, 8, 8)), "anomaly_maps": np.full((2, 8, 8), 1.5)}, r"must lie in \[0, 1\]"),
        ({"masks": np.zeros((2, 8, 8)), "anomaly_maps": np.full((2, 8, 8), np.nan)}, "contains NaN"),
        ({"masks": np.full((2, 8, 8), 255), "anomaly_maps": np.zeros((2, 8, 8))}, "must be binary.*divided by 255"),
        ({"masks": np.zeros((2, 8, 8))}, "`masks` and `anomaly_maps` go together"),
        ({"masks": np.zeros((3, 8, 8)), "anomaly_maps": np.zeros((3, 8, 8))}, r"labels \(2,\) and masks \(3, 8, 8\)"),
        ({"labels": [0, 2]}, "`labels` must be binary"),
        ({"labels": [0, 1, 1]}, r"got labels \(3,\) and scores \(2,\)"),
        ({"scores": [0.1, np.inf]}, "infinite"),
        ({"categories": ["a", "b", "c"]}, "one string or"),
    ],
)
def test_invalid_inputs_raise_clear_errors(kwargs, error):
    arguments = {"categories": "bottle", "labels": [0, 1], "scores": [0.1, 0.9], **kwargs}
    with pytest.raises(ValueError, match=error):
        AnomalyMetricsAccumulator().update(**arguments)


# ---------------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------------


def test_markdown_json_and_png_report(tmp_path):
    categories, labels, scores, masks, maps = two_category_data()
    accumulator = AnomalyMetricsAccumulator()
    perfect_masks = np.stack([np.zeros_like(masks[5]), masks[5]])
    accumulator.update(
        categories="bottle",
        labels=[0, 1],
        scores=[0.1, 0.9],
        masks=perfect_masks,
        anomaly_maps=perfect_masks.astype(float),
    )
    accumulator.update(
        categories="colon", labels=[1, 1, 1], scores=scores[5:8], masks=masks[5:8], anomaly_maps=maps[5:8]
    )
    results = accumulator.compute()

    markdown = results_to_markdown(results)
    bottle_row = next(line for line in markdown.splitlines() if line.startswith("| bottle"))
    assert bottle_row == "| bottle | " + " | ".join(["100.0"] * 9) + " |"
    colon_row = next(line for line in markdown.splitlines() if line.startswith("| colon"))
    assert colon_row.count("n/a [1]") == 4
    assert "- [1] undefined: category 'colon': no normal images (all 3 images are anomalous)" in markdown
    assert "100.0 (1/2)" in markdown  # the mean of image AUROC covers 1 of 2 categories

    paths = save_results(results, tmp_path)
    payload = json.loads(paths["json"].read_text())
    assert payload["categories"]["colon"]["metrics"]["image_ap"]["value"] is None
    assert payload["mean"]["pixel_aupro"]["num_categories"] == 2
    assert paths["markdown"].read_text() == markdown
    for category in ("bottle", "colon"):
        assert paths[f"plot/{category}"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saving_results_keeps_the_users_files_and_gives_each_category_its_own_plot(tmp_path):
    accumulator = AnomalyMetricsAccumulator()
    for category in ("a b", "a_b", "Screw", "screw", "bottle"):
        accumulator.update(categories=category, labels=[0, 1], scores=[0.2, 0.7])
    results = accumulator.compute()
    names = category_file_names(results.categories)
    assert names["bottle"] == "bottle" and len({name.lower() for name in names.values()}) == 5
    assert names["a b"].startswith("a_b-") and names["Screw"].startswith("Screw-")

    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "results.json").write_text("the user's own results")
    (folder / "notes.txt").write_text("notes")
    with pytest.raises(FileExistsError, match=r"eval holds files that are not part of a headclip evaluate output "):
        save_results(results, folder)
    assert (folder / "results.json").read_text() == "the user's own results"  # nothing was written
    assert sorted(entry.name for entry in folder.iterdir()) == ["notes.txt", "results.json"]
    paths = save_results(results, folder, overwrite=True)
    assert json.loads((folder / "results.json").read_text())["categories"].keys() == set(names)
    assert (folder / "notes.txt").read_text() == "notes"  # the flag replaces only the evaluation's files
    plots = {paths[f"plot/{name}"] for name in names}
    assert plots == {folder / "plots" / f"{name}.png" for name in names.values()} and all(p.is_file() for p in plots)

    earlier = tmp_path / "earlier"  # an earlier evaluation output is replaced as a whole, without the flag
    save_results(results, earlier)
    single = AnomalyMetricsAccumulator()
    single.update(categories="bottle", labels=[0, 1], scores=[0.2, 0.7])
    save_results(single.compute(), earlier, plots=True)
    assert sorted(path.name for path in (earlier / "plots").iterdir()) == ["bottle.png"]


# ---------------------------------------------------------------------------------------------------------------------
# evaluate module
# ---------------------------------------------------------------------------------------------------------------------


def test_accumulator_and_evaluate_module_take_the_same_keyword_names():
    import inspect

    import evaluate

    metric = evaluate.load(str(REPO_ROOT / "metrics" / "anomaly_detection"), keep_in_memory=True)
    accumulator_names = list(inspect.signature(AnomalyMetricsAccumulator.update).parameters)[1:]
    assert accumulator_names == list(inspect.signature(metric.add_batch).parameters)
    assert accumulator_names == ["categories", "labels", "scores", "masks", "anomaly_maps", "mask_valid"]


def test_evaluate_module_gives_the_same_numbers_as_the_functions():
    import evaluate

    categories, labels, scores, masks, maps = two_category_data()
    metric = evaluate.load(str(REPO_ROOT / "metrics" / "anomaly_detection"), keep_in_memory=True)
    metric.add_batch(
        categories=categories[:6], labels=labels[:6], scores=scores[:6], masks=masks[:6], anomaly_maps=maps[:6]
    )
    metric.add_batch(
        categories=categories[6:],
        labels=torch.tensor(labels[6:]),
        scores=torch.tensor(scores[6:]),
        masks=torch.tensor(masks[6:]),
        anomaly_maps=torch.tensor(maps[6:]),
    )
    results = metric.compute()

    accumulator = AnomalyMetricsAccumulator()
    accumulator.update(categories=categories, labels=labels, scores=scores, masks=masks, anomaly_maps=maps)
    assert results == accumulator.compute().to_dict()
    functions = {"image_auroc": image_auroc, "image_ap": image_ap, "image_f1_max": image_f1_max}
    pixel_functions = {
        "pixel_auroc": pixel_auroc,
        "pixel_ap": pixel_ap,
        "pixel_f1_max": pixel_f1_max,
        "pixel_aupro": pixel_aupro,
    }
    for category in ("bottle", "cable"):
        selection = np.array(categories) == category
        values = results["categories"][category]["metrics"]
        for name, function in functions.items():
            assert values[name]["value"] == pytest.approx(function(labels[selection], scores[selection]), abs=1e-12)
        for name, function in pixel_functions.items():
            assert values[name]["value"] == pytest.approx(function(masks[selection], maps[selection]), abs=1e-12)

    # compute() with the data passed directly, and the undefined case through evaluate.
    direct = metric.compute(
        categories="colon", labels=[1, 1], scores=[0.2, 0.4], masks=masks[5:7], anomaly_maps=maps[5:7]
    )
    colon = direct["categories"]["colon"]["metrics"]
    assert colon["image_auroc"] == {
        "value": None,
        "reason": "category 'colon': no normal images (all 2 images are anomalous)",
    }
    assert colon["pixel_aupro"]["value"] == pytest.approx(pixel_aupro(masks[5:7], maps[5:7]), abs=1e-12)
    with pytest.raises(ValueError, match="nothing to compute"):
        metric.compute()
