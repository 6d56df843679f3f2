"""Tests of `headclip_hf.data`: every layout, every bad-input rule, caching, the collator, and the real data sets."""

import csv
import json
import logging
import os
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets.packaged_modules.parquet.parquet import Parquet as ParquetBuilder
from PIL import Image

from headclip_hf.data import (
    ANOMALY_FEATURES,
    LAYOUTS,
    AnomalyCollator,
    image_files,
    load_anomaly_dataset,
    make_transform,
)

LOGGER = "headclip_hf.data"
SIZE = (32, 32)  # width, height of the synthetic images


def save_image(path: Path, size: tuple[int, int] = SIZE, seed: int = 0) -> Path:
    """A random RGB image (noise, so that PNG and JPEG files have real content to truncate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def save_mask(path: Path, size: tuple[int, int] = SIZE, value: int = 255, mode: str = "L") -> Path:
    """A mask whose top-left quarter has `value` (the anomalous region of `expected_mask`), zero elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.zeros((size[1], size[0]), dtype=np.uint8)
    values[: size[1] // 2, : size[0] // 2] = value
    Image.fromarray(values).convert(mode).save(path)
    return path


def expected_mask(size: tuple[int, int] = SIZE) -> np.ndarray:
    values = np.zeros((size[1], size[0]), dtype=np.uint8)
    values[: size[1] // 2, : size[0] // 2] = 255
    return values


def make_mvtec_tree(root: Path, category: str = "widget") -> Path:
    """MVTec AD: train/good (3), test/good (2), test/crack (2), test/scratch (1), ground_truth/<defect>/<stem>_mask."""
    for index in range(3):
        save_image(root / category / "train" / "good" / f"{index:03d}.png", seed=index)
    for index in range(2):
        save_image(root / category / "test" / "good" / f"{index:03d}.png", seed=10 + index)
    for defect, count in (("crack", 2), ("scratch", 1)):
        for index in range(count):
            save_image(root / category / "test" / defect / f"{index:03d}.png", seed=20 + index)
            save_mask(root / category / "ground_truth" / defect / f"{index:03d}_mask.png")
    return root


def make_generic_tree(root: Path, normal: int = 2, defects: dict[str, int] | None = None, masks: bool = True) -> Path:
    """The shared test data layout: <root>/good, <root>/<defect>, <root>/ground_truth/<defect>/<stem>_mask.png."""
    for index in range(normal):
        save_image(root / "good" / f"{index:03d}.png", seed=index)
    for defect, count in (defects or {"dent": 2}).items():
        for index in range(count):
            save_image(root / defect / f"{index:03d}.png", seed=30 + index)
            if masks:
                save_mask(root / "ground_truth" / defect / f"{index:03d}_mask.png")
    return root


def make_visa_raw_tree(root: Path) -> Path:
    """Raw VisA: <category>/Data/{Images,Masks}, split_csv/1cls.csv; masks are label maps (region numbers 1, 2)."""
    rows = []
    for index in range(2):
        image = f"candle/Data/Images/Anomaly/{index:03d}.JPG"
        mask = f"candle/Data/Masks/Anomaly/{index:03d}.png"
        save_image(root / image, seed=10 + index)
        save_mask(root / mask, value=index + 1)
        rows.append(["candle", "test", "anomaly", image, mask])
    for index in range(3):
        image = f"candle/Data/Images/Normal/{index:04d}.JPG"
        save_image(root / image, seed=index)
        rows.append(["candle", "train" if index < 2 else "test", "normal", image, ""])
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def make_meta_json_tree(root: Path, with_masks: bool = True) -> Path:
    """AnomalyCLIP / APRIL-GAN meta.json over an MVTec-like tree, paths relative to the root."""
    make_mvtec_tree(root, "widget")
    test = []
    for image in sorted((root / "widget" / "test").rglob("*.png")):
        defect = image.parent.name
        anomalous = defect != "good"
        mask = f"widget/ground_truth/{defect}/{image.stem}_mask.png" if anomalous and with_masks else ""
        test.append(
            {
                "img_path": str(image.relative_to(root)),
                "mask_path": mask,
                "cls_name": "widget",
                "specie_name": defect,
                "anomaly": int(anomalous),
            }
        )
    (root / "meta.json").write_text(json.dumps({"train": {}, "test": {"widget": test}}))
    return root


def masks_of(dataset) -> list[np.ndarray | None]:
    return [None if mask is None else np.asarray(mask) for mask in dataset["mask"]]


# Layouts


def test_mvtec_layout_loads_the_test_split_of_every_category(tmp_path):
    root = make_mvtec_tree(tmp_path / "mvtec", "widget")
    make_mvtec_tree(root, "gadget")

    dataset = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")

    assert dataset.split == "test"
    assert len(dataset) == 10
    assert Counter(dataset["category"]) == {"gadget": 5, "widget": 5}
    assert Counter(zip(dataset["category"], dataset["defect_type"], strict=True))[("widget", "crack")] == 2
    assert dataset.features["label"].names == ["normal", "anomaly"]
    assert all(valid for valid in dataset["mask_valid"])
    for row in dataset:
        assert row["path"].startswith(str(root))
        assert row["image"].size == SIZE
        if row["label"] == 0:
            assert row["defect_type"] == "good" and row["mask"] is None
        else:
            assert row["mask"].mode == "L"
            np.testing.assert_array_equal(np.asarray(row["mask"]), expected_mask())
    assert "layout mvtec" in dataset.info.description


def test_mvtec_train_split_and_category_selection(tmp_path):
    root = make_mvtec_tree(tmp_path / "mvtec", "widget")
    make_mvtec_tree(root, "gadget")

    dataset = load_anomaly_dataset(root, split="train", categories=["widget"], cache_dir=tmp_path / "cache")

    assert dataset.split == "train"
    assert len(dataset) == 3
    assert set(dataset["category"]) == {"widget"}
    assert set(dataset["label"]) == {0}
    assert all(mask is None for mask in dataset["mask"])
    assert all(dataset["mask_valid"])  # normal images of a category with masks: their all-zero mask is known


def test_a_single_category_folder_is_one_category_named_after_it(tmp_path):
    root = make_mvtec_tree(tmp_path / "mvtec", "widget")

    dataset = load_anomaly_dataset(root / "widget", cache_dir=tmp_path / "cache")

    assert set(dataset["category"]) == {"widget"}
    assert len(dataset) == 5


def test_converted_visa_is_the_mvtec_layout_with_jpg_images_and_stem_named_masks(tmp_path):
    root = tmp_path / "visa_pytorch"
    save_image(root / "candle" / "train" / "good" / "0000.JPG")
    save_image(root / "candle" / "test" / "good" / "0001.JPG")
    save_image(root / "candle" / "test" / "bad" / "000.JPG")
    save_mask(root / "candle" / "ground_truth" / "bad" / "000.png")

    dataset = load_anomaly_dataset(root, layout="mvtec", cache_dir=tmp_path / "cache")

    assert dataset["defect_type"] == ["bad", "good"]
    assert dataset["label"] == [1, 0]
    np.testing.assert_array_equal(masks_of(dataset)[0], expected_mask())


def test_visa_raw_layout_reads_the_split_csv_and_binarises_label_map_masks(tmp_path):
    root = make_visa_raw_tree(tmp_path / "VisA")

    test = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")
    train = load_anomaly_dataset(root, split="train", cache_dir=tmp_path / "cache")

    assert "layout visa" in test.info.description
    assert test["label"] == [1, 1, 0]
    assert test["defect_type"] == ["anomaly", "anomaly", "good"]
    assert set(test["category"]) == {"candle"}
    assert all(test["mask_valid"])
    # Region numbers 1 and 2 would vanish under the 0/255 convention's threshold of 127: stored as 0/255.
    for mask in masks_of(test)[:2]:
        np.testing.assert_array_equal(mask, expected_mask())
    assert len(train) == 2 and set(train["label"]) == {0} and all(train["mask_valid"])


def test_meta_json_layout(tmp_path):
    root = make_meta_json_tree(tmp_path / "mvtec")

    dataset = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")

    assert "layout meta_json" in dataset.info.description
    assert Counter(dataset["defect_type"]) == {"good": 2, "crack": 2, "scratch": 1}
    assert Counter(dataset["label"]) == {0: 2, 1: 3}
    assert all(dataset["mask_valid"])
    for label, mask in zip(dataset["label"], masks_of(dataset), strict=True):
        if label == 1:
            np.testing.assert_array_equal(mask, expected_mask())
        else:
            assert mask is None
    with pytest.raises(ValueError, match=r"meta\.json has no split 'validation'.*\['test', 'train'\]"):
        load_anomaly_dataset(root, split="validation", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("layout", ["generic", "meta_json"])
def test_image_label_only_data_sets_load_and_say_so(tmp_path, caplog, layout):
    if layout == "generic":
        root = make_generic_tree(tmp_path / "brain_mri", normal=2, defects={"tumor": 3}, masks=False)
        category = "brain_mri"
    else:
        root = make_meta_json_tree(tmp_path / "head_ct", with_masks=False)
        category = "widget"

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")

    assert Counter(dataset["label"]) == {0: 2, 1: 3}
    assert all(mask is None for mask in dataset["mask"])
    assert not any(dataset["mask_valid"])
    assert f"Category '{category}' has no pixel labels" in caplog.text
    assert "have no mask" not in caplog.text  # no masks at all is not "missing masks"


def test_data_sets_without_normal_images_load_and_say_so(tmp_path, caplog):
    root = make_generic_tree(tmp_path / "polyps" / "colon", normal=0, defects={"polyp": 3})

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")

    assert dataset["label"] == [1, 1, 1]
    assert all(dataset["mask_valid"])
    assert "Category 'colon' has no normal images" in caplog.text


def test_generic_layout_is_the_mvtec_test_split_without_test_level(tmp_path):
    root = make_generic_tree(tmp_path / "data" / "things", normal=2, defects={"dent": 2, "hole": 1})

    single = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")
    several = load_anomaly_dataset(tmp_path / "data", layout="generic", cache_dir=tmp_path / "cache")

    assert "layout generic" in single.info.description
    assert Counter(single["defect_type"]) == {"good": 2, "dent": 2, "hole": 1}
    assert set(several["category"]) == {"things"} and len(several) == 5
    with pytest.raises(ValueError, match="generic layout .* has only a test split"):
        load_anomaly_dataset(root, split="train", cache_dir=tmp_path / "cache")


def test_masks_in_any_format_and_either_convention(tmp_path):
    root = tmp_path / "things"
    for index in range(4):
        save_image(root / "dent" / f"{index:03d}.png", seed=index)
    save_mask(root / "ground_truth" / "dent" / "000_mask.jpg", mode="RGB")  # 0/255 with JPEG noise
    save_mask(root / "ground_truth" / "dent" / "001_mask.bmp", value=1)  # 0/1 label map
    save_mask(root / "ground_truth" / "dent" / "002_mask.tif", value=255, mode="1")  # bilevel
    save_mask(root / "ground_truth" / "dent" / "003.png", value=200)  # BTAD naming, no "_mask"

    dataset = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")

    assert len(dataset) == 4
    for mask in masks_of(dataset):
        np.testing.assert_array_equal(mask, expected_mask())


# Bad input


def test_unknown_layout_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown layout 'mvtec_ad'; valid layouts: " + ", ".join(LAYOUTS)):
        load_anomaly_dataset(tmp_path, layout="mvtec_ad")


def test_missing_root_names_the_root_and_the_layouts_tried(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        load_anomaly_dataset(root)
    message = str(error.value)
    assert str(root) in message
    assert all(name in message for name in ("meta_json", "visa", "mvtec", "generic"))


def test_root_without_images_names_the_root_and_the_layouts_tried(tmp_path):
    root = tmp_path / "empty"
    (root / "widget" / "good").mkdir(parents=True)
    (root / "widget" / "good" / "notes.txt").write_text("not an image")

    with pytest.raises(ValueError, match="No images found") as error:
        load_anomaly_dataset(root)
    message = str(error.value)
    assert str(root) in message
    assert all(name in message for name in ("meta_json", "visa", "mvtec", "generic"))

    make_mvtec_tree(tmp_path / "mvtec")
    with pytest.raises(ValueError, match=r"No images found .*Layouts tried: visa: <root>/split_csv/1cls\.csv"):
        load_anomaly_dataset(tmp_path / "mvtec", layout="visa")


def test_unknown_category_lists_the_available_ones(tmp_path):
    root = make_mvtec_tree(tmp_path / "mvtec")
    with pytest.raises(ValueError, match=r"Unknown categories \['bottle'\].*available categories: \['widget'\]"):
        load_anomaly_dataset(root, categories=["bottle"], cache_dir=tmp_path / "cache")


def test_anomalous_images_without_masks_are_listed_and_get_an_unknown_mask(tmp_path, caplog):
    root = make_mvtec_tree(tmp_path / "mvtec")
    (root / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    orphan = root / "widget" / "test" / "crack" / "001.png"

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")

    assert "1 anomalous images have no mask" in caplog.text
    assert str(orphan) in caplog.text
    row = dataset[dataset["path"].index(str(orphan))]
    assert row["label"] == 1 and row["mask"] is None and row["mask_valid"] is False
    assert sum(dataset["mask_valid"]) == len(dataset) - 1  # the other rows keep their known masks


def test_meta_json_mask_that_does_not_exist_is_listed(tmp_path, caplog):
    root = make_meta_json_tree(tmp_path / "mvtec")
    missing = root / "widget" / "ground_truth" / "scratch" / "000_mask.png"
    missing.unlink()

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")

    assert f"(mask {missing} not found)" in caplog.text
    assert sum(dataset["mask_valid"]) == len(dataset) - 1


def test_mask_of_another_size_is_an_error_naming_both_files_and_sizes(tmp_path):
    root = make_generic_tree(tmp_path / "things")
    mask = save_mask(root / "ground_truth" / "dent" / "001_mask.png", size=(16, 24))
    image = root / "dent" / "001.png"

    with pytest.raises(ValueError) as error:
        load_anomaly_dataset(root, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert f"Mask {mask} is 16x24" in message
    assert f"image {image} is 32x32" in message


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_an_error_or_with_skip_a_warning_and_a_count(tmp_path, caplog, suffix):
    root = make_generic_tree(tmp_path / "things")
    broken = save_image(root / "good" / f"002{suffix}", seed=5)
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) * 3 // 4])
    with Image.open(broken) as image:  # the header is intact: only reading the whole stream finds the damage
        assert image.size == SIZE

    with pytest.raises(
        OSError,
        match=f"Cannot read image file {broken}.*skip_unreadable=True \\(--skip_unreadable on the command line\\)",
    ):
        load_anomaly_dataset(root, cache_dir=tmp_path / "cache")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_anomaly_dataset(root, skip_unreadable=True, cache_dir=tmp_path / "cache")
    assert len(dataset) == 4
    assert str(broken) not in dataset["path"]
    assert "Skipped 1 of 5 rows with unreadable files" in caplog.text and str(broken) in caplog.text
    assert f"Skipped 1 rows with unreadable files: image file {broken}" in dataset.info.description


def test_unreadable_mask_is_an_error_naming_it(tmp_path):
    root = make_generic_tree(tmp_path / "things")
    mask = root / "ground_truth" / "dent" / "000_mask.png"
    mask.write_bytes(b"not a png")

    with pytest.raises(OSError, match=f"Cannot read image file {mask}"):
        load_anomaly_dataset(root, cache_dir=tmp_path / "cache")


def test_nothing_readable_is_an_error(tmp_path):
    root = tmp_path / "things"
    (root / "good").mkdir(parents=True)
    (root / "good" / "000.png").write_bytes(b"garbage")

    with pytest.raises(ValueError, match="Every image in .* is unreadable"):
        load_anomaly_dataset(root, skip_unreadable=True, cache_dir=tmp_path / "cache")


def test_listed_image_that_does_not_exist_is_an_error(tmp_path):
    root = make_visa_raw_tree(tmp_path / "VisA")
    missing = root / "candle" / "Data" / "Images" / "Anomaly" / "001.JPG"
    missing.unlink()

    with pytest.raises(FileNotFoundError, match=f"Image {missing}, listed in .*1cls.csv, does not exist"):
        load_anomaly_dataset(root, cache_dir=tmp_path / "cache")


def save_decompression_bomb(path: Path, size: int = 20000) -> Path:
    """A tiny PNG (one empty IDAT) whose header claims `size` x `size` grey pixels: PIL refuses it as a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_decompression_bomb_is_an_unreadable_image(tmp_path, caplog):
    root = make_generic_tree(tmp_path / "things")
    bomb = save_decompression_bomb(root / "good" / "002.png")

    with pytest.raises(
        OSError, match=f"Cannot read image file {bomb} \\(DecompressionBombError: .*skip_unreadable=True"
    ):
        load_anomaly_dataset(root, cache_dir=tmp_path / "cache")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_anomaly_dataset(root, skip_unreadable=True, cache_dir=tmp_path / "cache")
    assert len(dataset) == 4 and str(bomb) not in dataset["path"]
    assert "Skipped 1 of 5 rows with unreadable files" in caplog.text and str(bomb) in caplog.text


def test_broken_symbolic_link_is_named_and_counted_like_an_unreadable_file(tmp_path, caplog):
    root = make_generic_tree(tmp_path / "things")
    link = root / "good" / "002.png"
    link.symlink_to(tmp_path / "moved_away.png")

    with pytest.raises(OSError, match=f"Cannot read image file {link} \\(broken symbolic link to .*moved_away.png\\)"):
        load_anomaly_dataset(root, cache_dir=tmp_path / "cache")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_anomaly_dataset(root, skip_unreadable=True, cache_dir=tmp_path / "cache")
    assert len(dataset) == 4
    assert "Skipped 1 of 5 rows with unreadable files" in caplog.text and str(link) in caplog.text
    assert image_files(root / "good") == [root / "good" / "000.png", root / "good" / "001.png", link]


def test_broken_symbolic_link_as_mask_is_an_error_naming_it(tmp_path):
    root = make_generic_tree(tmp_path / "things")
    mask = root / "ground_truth" / "dent" / "001_mask.png"
    mask.unlink()
    mask.symlink_to(tmp_path / "nowhere.png")

    with pytest.raises(OSError, match=f"Cannot read image file {mask} \\(broken symbolic link"):
        load_anomaly_dataset(root, cache_dir=tmp_path / "cache")


def write_meta(root: Path, meta) -> Path:
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def meta_item(image: str, anomaly=1, mask: object = "") -> dict:
    return {"img_path": image, "mask_path": mask, "cls_name": "widget", "specie_name": "crack", "anomaly": anomaly}


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"test": []}, r"meta\.json: split 'test' must map category names to lists of entries, not list"),
        ({"test": {"widget": None}}, r"meta\.json: test/widget must be a list of entries, not None"),
        ({"test": {"widget": [None]}}, r"meta\.json: entry test/widget\[0\] must be an object .* not None"),
        (
            {"test": {"widget": [meta_item("widget/test/crack/000.png", mask=5)]}},
            r"entry test/widget\[0\] \(widget/test/crack/000\.png\): mask_path must be a path .* not 5",
        ),
        (
            {"test": {"widget": [meta_item("widget/test/crack/000.png", anomaly=0.7)]}},
            r"entry test/widget\[0\] \(widget/test/crack/000\.png\): anomaly must be 0 or 1, not 0\.7",
        ),
        (
            {"test": {"widget": [meta_item("widget/test/crack/000.png", anomaly=2)]}},
            r"entry test/widget\[0\] \(widget/test/crack/000\.png\): anomaly must be 0 or 1, not 2",
        ),
        (
            {"test": {"widget": [{"mask_path": "", "anomaly": 0}]}},
            r"entry test/widget\[0\]: img_path must be a path .* not None",
        ),
        ({"test": {"widget": []}, "train": 3}, r"meta\.json: split 'train' must map category names"),
        ([], r"meta\.json must hold an object \{split: \{category: \[entries\]\}\}, not list"),
    ],
)
def test_malformed_meta_json_entries_are_named(tmp_path, meta, message):
    root = write_meta(make_mvtec_tree(tmp_path / "mvtec"), meta)

    with pytest.raises(ValueError, match=message):
        load_anomaly_dataset(root, cache_dir=tmp_path / "cache")


def test_listed_paths_that_leave_the_root_are_refused_unless_allowed(tmp_path):
    outside = save_image(tmp_path / "elsewhere" / "000.png")
    root = make_mvtec_tree(tmp_path / "mvtec")
    write_meta(root, {"test": {"widget": [meta_item("../elsewhere/000.png", anomaly=0)]}})

    with pytest.raises(
        ValueError, match=r"entry test/widget\[0\] .*: img_path '\.\./elsewhere/000\.png' leaves the data set root"
    ):
        load_anomaly_dataset(root, cache_dir=tmp_path / "cache")
    write_meta(root, {"test": {"widget": [meta_item(str(outside), anomaly=0)]}})
    with pytest.raises(
        ValueError, match=r"root .*allow_outside_root=True \(--allow_outside_root on the command line\)"
    ):
        load_anomaly_dataset(root, cache_dir=tmp_path / "cache")

    dataset = load_anomaly_dataset(root, allow_outside_root=True, cache_dir=tmp_path / "cache")
    assert dataset["path"] == [str(outside)]


def test_visa_csv_paths_that_leave_the_root_are_refused(tmp_path):
    root = make_visa_raw_tree(tmp_path / "VisA")
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text().replace("candle/Data/Images/Normal/0002.JPG", "../0002.JPG"))
    save_image(tmp_path / "0002.JPG")

    with pytest.raises(ValueError, match=r"1cls\.csv, line 6: image '\.\./0002\.JPG' leaves the data set root"):
        load_anomaly_dataset(root, cache_dir=tmp_path / "cache")


# Caching


def test_cache_is_reused_and_keyed_on_the_files(tmp_path):
    cache = tmp_path / "cache"
    first_root = make_generic_tree(tmp_path / "first")
    second_root = make_generic_tree(tmp_path / "second")

    first = load_anomaly_dataset(first_root, cache_dir=cache)
    again = load_anomaly_dataset(first_root, cache_dir=cache)
    second = load_anomaly_dataset(second_root, cache_dir=cache)

    assert first.cache_files and first.cache_files == again.cache_files
    assert first.cache_files != second.cache_files  # same generator, same file names, other root
    assert all(path.startswith(str(second_root)) for path in second["path"])

    mask = first_root / "ground_truth" / "dent" / "000_mask.png"
    Image.fromarray(np.full((SIZE[1], SIZE[0]), 255, dtype=np.uint8)).save(mask)
    os.utime(mask, ns=(1, 1))  # a new modification time, whatever the file system's clock resolution
    changed = load_anomaly_dataset(first_root, cache_dir=cache)
    assert changed.cache_files != first.cache_files
    assert np.asarray(changed[changed["path"].index(str(first_root / "dent" / "000.png"))]["mask"]).min() == 255


def test_rows_generated_in_several_processes_are_the_same(tmp_path):
    root = make_mvtec_tree(tmp_path / "mvtec")

    serial = load_anomaly_dataset(root, cache_dir=tmp_path / "serial")
    parallel = load_anomaly_dataset(root, num_proc=2, cache_dir=tmp_path / "parallel")

    assert parallel["path"] == serial["path"]
    assert parallel["mask_valid"] == serial["mask_valid"]
    for left, right in zip(masks_of(parallel), masks_of(serial), strict=True):
        assert (left is None and right is None) or np.array_equal(left, right)


# Collator


@pytest.fixture
def processor(clip_tokenizer_dir):
    from transformers import CLIPTokenizer

    from headclip_hf.processing_headclip import HeadCLIPProcessor

    return HeadCLIPProcessor(tokenizer=CLIPTokenizer.from_pretrained(clip_tokenizer_dir), image_size=16)


def test_collator_and_transform_make_model_inputs(tmp_path, processor):
    root = make_mvtec_tree(tmp_path / "mvtec")
    (root / "widget" / "ground_truth" / "scratch" / "000_mask.png").unlink()  # one unknown mask
    dataset = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")

    batch = AnomalyCollator(processor)(list(dataset))

    assert batch["pixel_values"].shape == (5, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["masks"].shape == (5, 16, 16)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == dataset["label"]
    assert batch["mask_valid"].dtype == torch.bool and batch["mask_valid"].tolist() == dataset["mask_valid"]
    quarter = torch.zeros(16, 16)
    quarter[:8, :8] = 1
    for masks, label, valid in zip(batch["masks"], dataset["label"], dataset["mask_valid"], strict=True):
        torch.testing.assert_close(masks, quarter if label == 1 and valid else torch.zeros(16, 16))

    loader = torch.utils.data.DataLoader(dataset.with_transform(make_transform(processor)), batch_size=5)
    streamed = next(iter(loader))
    assert set(streamed) == {"pixel_values", "masks", "labels", "mask_valid"}
    for key in streamed:
        torch.testing.assert_close(streamed[key], batch[key])


# Real data (../shared/data)


def test_real_mvtec_bottle(test_data_dir, tmp_path):
    dataset = load_anomaly_dataset(test_data_dir / "mvtec_ad" / "bottle", cache_dir=tmp_path / "cache")

    assert len(dataset) == 83
    assert Counter(dataset["label"]) == {0: 20, 1: 63}
    assert Counter(dataset["defect_type"]) == {"good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}
    assert set(dataset["category"]) == {"bottle"}
    assert all(dataset["mask_valid"])
    anomalous = dataset.filter(lambda label: label == 1, input_columns="label")
    for row in anomalous.cast_column("image", datasets.Image(decode=False)):  # image sizes from the file headers
        with Image.open(row["image"]["path"]) as image:
            assert row["mask"] is not None and row["mask"].size == image.size
        assert set(np.unique(np.asarray(row["mask"]))) == {0, 255}


def test_real_kvasir_seg_colon(test_data_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = load_anomaly_dataset(test_data_dir / "kvasir_seg" / "colon", cache_dir=tmp_path / "cache")

    assert len(dataset) == 120
    assert set(dataset["label"]) == {1}
    assert all(dataset["mask_valid"])
    assert "Category 'colon' has no normal images" in caplog.text
    for row in dataset.select(range(0, 120, 10)):
        assert row["mask"].size == row["image"].size
        assert np.asarray(row["mask"]).max() == 255


# Tables: `datasets` data sets, save_to_disk, Parquet, imagefolder, Hub ids


def table_rows(root: Path) -> list[dict]:
    """The rows of `make_generic_tree(root, normal=2, defects={"dent": 2})` as plain values: files and labels."""
    rows = [
        {"file": f"dent/{index:03d}.png", "mask_file": f"ground_truth/dent/{index:03d}_mask.png", "state": "dent"}
        for index in range(2)
    ]
    rows += [{"file": f"good/{index:03d}.png", "mask_file": None, "state": "good"} for index in range(2)]
    assert all((root / row["file"]).is_file() for row in rows)
    return rows


def assert_same_rows(converted, expected, keys=("label", "category", "defect_type", "mask_valid")) -> None:
    """The features of an anomaly data set; the same `keys`, images and masks (pixel for pixel), row by row."""
    assert converted.features == ANOMALY_FEATURES
    for key in keys:
        assert list(converted[key]) == list(expected[key]), key
    for left, right in zip(converted, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(left["image"]), np.asarray(right["image"]))
        assert (left["mask"] is None) == (right["mask"] is None)
        if left["mask"] is not None:
            np.testing.assert_array_equal(np.asarray(left["mask"]), np.asarray(right["mask"]))


def test_in_memory_dataset_with_other_column_names(tmp_path):
    root = make_generic_tree(tmp_path / "things")
    folder = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")
    table = datasets.Dataset.from_dict(
        {
            "img": [str(root / row["file"]) for row in table_rows(root)],
            "gt": [str(root / row["mask_file"]) if row["mask_file"] else None for row in table_rows(root)],
            "is_defective": [row["state"] != "good" for row in table_rows(root)],
            "object": ["things"] * 4,
        },
        features=datasets.Features(
            {"img": datasets.Image(), "gt": datasets.Image(), "is_defective": datasets.Value("bool")}
            | {"object": datasets.Value("string")}
        ),
    )

    converted = load_anomaly_dataset(table, label_column="is_defective")

    assert list(converted["defect_type"]) == ["anomaly", "anomaly", "good", "good"]  # booleans name no defect
    assert list(converted["path"]) == list(folder["path"])  # the image files
    assert "an in-memory data set, split test: 4 images (2 normal, 2 anomalous)" in converted.info.description
    assert_same_rows(converted, folder, keys=("label", "category", "mask_valid"))


@pytest.mark.parametrize(
    ("values", "feature", "labels", "defect_types"),
    [
        ([0, 1, 1], datasets.Value("int64"), [0, 1, 1], ["good", "anomaly", "anomaly"]),
        ([0.0, 1.0, 0.0], datasets.Value("float32"), [0, 1, 0], ["good", "anomaly", "good"]),
        ([False, True, True], datasets.Value("bool"), [0, 1, 1], ["good", "anomaly", "anomaly"]),
        (["good", "crack", "Normal"], datasets.Value("string"), [0, 1, 0], ["good", "crack", "good"]),
        (["OK", "anomaly", "1"], datasets.Value("string"), [0, 1, 1], ["good", "anomaly", "anomaly"]),
        ([0, 2, 1], datasets.ClassLabel(names=["good", "crack", "hole"]), [0, 1, 1], ["good", "hole", "crack"]),
        ([1, 0, 0], datasets.ClassLabel(names=["anomaly", "normal"]), [0, 1, 1], ["good", "anomaly", "anomaly"]),
    ],
)
def test_label_conventions(tmp_path, values, feature, labels, defect_types):
    images = [str(save_image(tmp_path / f"{index}.png", seed=index)) for index in range(3)]
    table = datasets.Dataset.from_dict(
        {"image": images, "label": values},
        features=datasets.Features({"image": datasets.Image(), "label": feature}),
    )

    converted = load_anomaly_dataset(table)

    assert list(converted["label"]) == labels
    assert list(converted["defect_type"]) == defect_types
    assert list(converted["category"]) == ["default"] * 3
    assert not any(converted["mask_valid"])  # no mask column: no pixel labels


def test_labels_from_the_defect_type_when_there_is_no_label_column(tmp_path):
    images = [str(save_image(tmp_path / f"{index}.png", seed=index)) for index in range(2)]
    table = datasets.Dataset.from_dict({"img_path": images, "specie_name": ["good", "scratch"]})

    converted = load_anomaly_dataset(table)

    assert list(converted["label"]) == [0, 1]
    assert list(converted["defect_type"]) == ["good", "scratch"]
    assert list(converted["path"]) == images


def test_parquet_file_with_path_columns_relative_to_its_folder(tmp_path):
    root = make_generic_tree(tmp_path / "things")
    folder = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")
    rows = table_rows(root)
    table = datasets.Dataset.from_list([{**row, "cls": "things"} for row in rows])
    table.to_parquet(root / "labels.parquet")

    converted = load_anomaly_dataset(
        root / "labels.parquet",
        image_column="file",
        mask_column="mask_file",
        label_column="state",
        category_column="cls",
        cache_dir=tmp_path / "cache",
    )

    assert list(converted["path"]) == [str(root / row["file"]) for row in rows]
    assert_same_rows(converted, folder)


def test_save_to_disk_folder_takes_the_split(tmp_path):
    root = make_mvtec_tree(tmp_path / "mvtec")
    test = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")
    train = load_anomaly_dataset(root, split="train", cache_dir=tmp_path / "cache")
    datasets.DatasetDict({"test": test, "train": train}).save_to_disk(tmp_path / "saved")

    loaded = load_anomaly_dataset(tmp_path / "saved", split="train")

    assert "layout save_to_disk" in loaded.info.description
    assert_same_rows(loaded, train)
    with pytest.raises(ValueError, match=r"has no split 'validation'; its splits are \['test', 'train'\]"):
        load_anomaly_dataset(tmp_path / "saved", split="validation")


def test_imagefolder_with_a_metadata_file(tmp_path):
    root = make_generic_tree(tmp_path / "things")
    folder = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")
    lines = ["file_name,mask_file_name,label"] + [
        f"{row['file']},{row['mask_file'] or ''},{int(row['state'] != 'good')}" for row in table_rows(root)
    ]
    # imagefolder: `file_name` becomes the `image` column, `mask_file_name` a `mask` Image column (empty: no mask).
    export = tmp_path / "imagefolder"
    shutil.copytree(root, export)
    (export / "metadata.csv").write_text("\n".join(lines) + "\n")

    converted = load_anomaly_dataset(export, split="train", cache_dir=tmp_path / "cache")

    assert "layout imagefolder" in converted.info.description
    assert set(converted["category"]) == {"imagefolder"}  # the folder's name
    assert_same_rows(converted, folder, keys=("label", "mask_valid"))


def test_streaming_gives_the_rows_of_the_data_set(tmp_path):
    root = make_mvtec_tree(tmp_path / "mvtec")
    materialised = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")
    table = materialised.rename_columns({"image": "img", "mask": "gt"}).remove_columns("mask_valid")
    table = table.cast_column("label", datasets.Value("int64"))

    for source in (root, table):
        streamed = load_anomaly_dataset(source, streaming=True)
        assert isinstance(streamed, datasets.IterableDataset)
        assert streamed.features == ANOMALY_FEATURES
        rows = list(streamed)
        assert [row["path"] for row in rows] == list(materialised["path"])
        assert [row["mask_valid"] for row in rows] == list(materialised["mask_valid"])
        assert_same_rows(datasets.Dataset.from_list(rows, features=ANOMALY_FEATURES), materialised)


def test_categories_of_a_table(tmp_path):
    images = [str(save_image(tmp_path / f"{index}.png", seed=index)) for index in range(4)]
    table = datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1, 0, 1], "category": ["cup", "cup", "pen", "pen"]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.Value("int8"),
                "category": datasets.ClassLabel(names=["cup", "pen"]),
            }
        ),
    )

    assert list(load_anomaly_dataset(table, categories=["pen"])["path"]) == images[2:]
    assert len(list(load_anomaly_dataset(table, categories=["pen"], streaming=True))) == 2
    with pytest.raises(
        ValueError, match=r"Unknown categories \['bottle'\] in an in-memory .*available categories: \['cup', 'pen'\]"
    ):
        load_anomaly_dataset(table, categories=["bottle"])


def cache_hub_dataset(repo_id: str, split_files: dict[str, list[Path]], cache_dir: Path, commit: str) -> Path:
    """
    Put Parquet files in the `datasets` cache as an online `load_dataset(repo_id)` leaves them there, in
    `<cache>/<namespace>___<name>/default/0.0.0/<commit>/` (the Parquet builder, prepared as for a Hub repository).
    """
    namespace, name = repo_id.split("/")
    builder = ParquetBuilder(
        cache_dir=str(cache_dir / "staging"),
        dataset_name=name,
        hash=commit,
        config_id="default",
        data_files={split: [str(path) for path in paths] for split, paths in split_files.items()},
    )
    builder.download_and_prepare()
    cached = cache_dir / f"{namespace}___{name}"
    (cache_dir / "staging" / name).rename(cached)
    return cached / "default" / "0.0.0" / commit


def test_hub_id_offline_from_the_datasets_cache(tmp_path):
    """The code path of a real id: `datasets.load_dataset("someone/widgets")`, offline, finds the cached copy."""
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" or os.environ["HF_HUB_OFFLINE"] == "1"
    root = make_mvtec_tree(tmp_path / "mvtec")
    folder = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")
    folder.to_parquet(tmp_path / "test.parquet")  # images as paths: the cached Arrow rows point at the files
    cache_hub_dataset("someone/widgets", {"test": [tmp_path / "test.parquet"]}, tmp_path / "hub_cache", "0" * 40)

    loaded = load_anomaly_dataset("someone/widgets", split="test", cache_dir=tmp_path / "hub_cache")
    streamed = load_anomaly_dataset("someone/widgets", streaming=True, cache_dir=tmp_path / "hub_cache")

    assert "from the Hub data set someone/widgets, split test: 5 images" in loaded.info.description
    assert_same_rows(loaded, folder)
    assert [row["path"] for row in streamed] == list(folder["path"])
    with pytest.raises(
        ValueError, match=r"Cannot load split 'train' of the Hub data set someone/widgets: .*\['test'\]"
    ):
        load_anomaly_dataset("someone/widgets", split="train", cache_dir=tmp_path / "hub_cache")


def test_hub_id_that_cannot_be_reached_offline(tmp_path):
    with pytest.raises(ConnectionError) as error:
        load_anomaly_dataset("someone/not-cached", cache_dir=tmp_path / "hub_cache")
    message = str(error.value)
    assert "Cannot load the Hub data set someone/not-cached" in message
    assert "'someone/not-cached' is not a local file or folder either" in message
    assert "hf download someone/not-cached --repo-type dataset --local-dir DIR" in message


# Tables: bad input


def small_table(tmp_path: Path, **columns) -> datasets.Dataset:
    images = [str(save_image(tmp_path / f"{index}.png", seed=index)) for index in range(2)]
    return datasets.Dataset.from_dict({"image": images, **columns}).cast_column("image", datasets.Image())


def test_a_column_that_does_not_exist_lists_the_columns(tmp_path):
    table = small_table(tmp_path, label=[0, 1])

    with pytest.raises(
        ValueError, match=r"mask_column='gt' is not a column of .*; its columns are \['image', 'label'\]"
    ):
        load_anomaly_dataset(table, mask_column="gt")
    with pytest.raises(
        ValueError, match=r"No label column in .* its columns are \['image', 'other'\]\. .*label_column="
    ):
        load_anomaly_dataset(small_table(tmp_path, other=[0, 1]))
    with pytest.raises(ValueError, match=r"No image column .* its columns are \['picture', 'label'\]"):
        load_anomaly_dataset(datasets.Dataset.from_dict({"picture": ["a.png"], "label": [0]}))
    with pytest.raises(ValueError, match=r"Column 'label' \(label\) of .* holds List\(Value\('int64'\)\), not labels"):
        load_anomaly_dataset(small_table(tmp_path, label=[[0], [1]]))


@pytest.mark.parametrize("labels", [[0, 2], [0, -1], [0.0, 0.7], [0, None], ["good", ""], ["good", "2"]])
def test_labels_outside_the_known_conventions(tmp_path, labels):
    table = small_table(tmp_path, label=labels)
    with pytest.raises(
        ValueError, match=r"row 1 \(.*1\.png\) of .*, column 'label': label .* is outside the known convent"
    ):
        load_anomaly_dataset(table)


def test_table_mask_of_another_size(tmp_path):
    mask = save_mask(tmp_path / "mask.png", size=(16, 24))
    table = small_table(tmp_path, label=[0, 1], mask=[None, str(mask)]).cast_column("mask", datasets.Image())

    for streaming in (False, True):
        with pytest.raises(
            ValueError, match=r"Mask .*mask\.png of row 1 .* is 16x24 but its image .*1\.png .* is 32x32"
        ):
            list(load_anomaly_dataset(table, streaming=streaming))


def test_table_with_unreadable_image_bytes(tmp_path, caplog):
    images = [
        {"bytes": save_image(tmp_path / f"{index}.png").read_bytes(), "path": f"{index}.png"} for index in range(3)
    ]
    images[1]["bytes"] = images[1]["bytes"][:40]
    table = datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1, 0]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )

    with pytest.raises(OSError, match=r"Cannot read image 1\.png of row 1 .*skip_unreadable=True"):
        load_anomaly_dataset(table)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        kept = load_anomaly_dataset(table, skip_unreadable=True)
        streamed = list(load_anomaly_dataset(table, skip_unreadable=True, streaming=True))
    assert list(kept["path"]) == ["0.png", "2.png"] and [row["path"] for row in streamed] == ["0.png", "2.png"]
    assert "Skipped 1 of 3 rows with unreadable files" in caplog.text
    assert (
        "Skipped a row with unreadable files (skip_unreadable=True, --skip_unreadable): image 1.png of row 1"
        in caplog.text
    )
    assert "Skipped 1 rows with unreadable files: image 1.png of row 1" in kept.info.description


def test_table_paths_that_leave_the_folder_are_refused_unless_allowed(tmp_path):
    outside = save_image(tmp_path / "outside.png")
    root = tmp_path / "table"
    root.mkdir()
    datasets.Dataset.from_dict({"image_path": ["../outside.png"], "label": [0]}).to_parquet(root / "rows.parquet")

    with pytest.raises(
        ValueError, match=r"image '\.\./outside\.png' leaves the data set root .*allow_outside_root=True"
    ):
        load_anomaly_dataset(root / "rows.parquet", cache_dir=tmp_path / "cache")
    loaded = load_anomaly_dataset(root / "rows.parquet", allow_outside_root=True, cache_dir=tmp_path / "cache")
    assert list(loaded["path"]) == [str(outside)]


def test_options_that_do_not_apply_to_the_source_are_refused(tmp_path):
    root = make_mvtec_tree(tmp_path / "mvtec")
    table = small_table(tmp_path, label=[0, 1])

    with pytest.raises(ValueError, match=r"image_column name columns of a table; .* is a folder in the mvtec layout"):
        load_anomaly_dataset(root, image_column="img")
    with pytest.raises(ValueError, match=r"revision='v1' applies to Hub data set ids; the source is the folder"):
        load_anomaly_dataset(root, revision="v1")
    with pytest.raises(ValueError, match=r"layout='mvtec' applies to folders; the source is an in-memory data set"):
        load_anomaly_dataset(table, layout="mvtec")
    with pytest.raises(ValueError, match=r"notes\.txt is a file but not a Parquet file"):
        (tmp_path / "notes.txt").write_text("x")
        load_anomaly_dataset(tmp_path / "notes.txt")
