# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Anomaly-detection data sets as `datasets.Dataset`s, and the collator that turns their rows into model inputs.

[`load_anomaly_dataset`] reads the folder layouts of the zero-shot anomaly detection literature, and the tables that
data sets are shared as on the Hugging Face Hub (Hub ids, Parquet, `save_to_disk` folders, `imagefolder` folders,
in-memory `datasets.Dataset`s, with their columns mapped), into one table with the columns of [`ANOMALY_FEATURES`]:

- `image` (`Image`): the image, stored as its file path (folders) or bytes (tables) and decoded to a PIL image on
  access.
- `mask` (`Image`, or None): the pixel labels as a grey 0/255 image (255 = anomalous pixel), `None` where no mask file
  is used: normal images (their mask is all zero, the collator makes it) and images whose mask is unknown.
- `label` (`ClassLabel` ["normal", "anomaly"]), `category` (object class, e.g. "bottle"), `defect_type` ("good" for
  every normal image, the defect folder or the data set's defect name otherwise), `path` (the image file; relative to
  the source folder in an export).
- `mask_valid` (`bool`): True when the row's pixel labels are known: an anomalous image with its mask, or a normal
  image of a category that has masks (its mask is known to be all zero). False for an anomalous image whose mask is
  missing and for every row of a category without pixel labels (image-label-only sets such as Brain MRI or Head CT).
  Pixel metrics use only the `mask_valid` rows; `mask is None` alone cannot tell "normal" from "unknown".

Mask convention. Data sets store masks as 8-bit 0/255 pictures (MVTec AD; Kvasir-SEG JPEGs), label maps with small
values (VisA's raw masks number the defect regions 1, 2, ...), 0/1 or 16-bit images; `to_binary_mask` of the processor
module reads them all. The loader decodes every mask once, while the data set is generated (so the result is cached),
and stores it as a 0/255 grey PNG: everything downstream (the processor, the metrics, plots) sees one convention.

Nothing is dropped silently: a missing mask is a warning that lists the images, an unreadable file (also a broken
symbolic link, or an image beyond PIL's decompression-bomb limit) an error (or, with `skip_unreadable=True`, a warning
with the count and the files), a mask of the wrong size an error. [`headclip_hf.dataset_export`] writes any of these
as Parquet with the files embedded.
"""

import csv
import functools
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.fingerprint import Hasher
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image
from transformers import BatchFeature

from .processing_headclip import to_binary_mask

logger = logging.getLogger(__name__)

LABEL_NAMES = ["normal", "anomaly"]
NORMAL_DEFECT_TYPE = "good"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_CSV_COLUMNS = ("object", "split", "label", "image", "mask")
META_JSON = "meta.json"

# What each column holds (dataset cards quote it).
ANOMALY_FEATURE_DESCRIPTIONS = {
    "image": "the image",
    "mask": "pixel labels as a grey 0/255 PNG (255 = anomalous pixel); null for normal images (all zero) and for "
    "unknown masks",
    "label": "0 normal, 1 anomaly",
    "category": "object class, e.g. bottle",
    "defect_type": "good for every normal image, the defect's name otherwise",
    "path": "the image file, relative to the source folder",
    "mask_valid": "whether the row's pixel labels are known (pixel metrics use only these rows)",
}
ANOMALY_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "label": datasets.ClassLabel(names=LABEL_NAMES),
        "category": datasets.Value("string"),
        "defect_type": datasets.Value("string"),
        "path": datasets.Value("string"),
        "mask_valid": datasets.Value("bool"),
    }
)

# What each folder layout looks like, in the order "auto" tries them; error messages quote it. The first three are
# tables that `datasets` reads; the others are the folder layouts of the field, scanned here.
LAYOUT_SIGNATURES = {
    "save_to_disk": "<root>/state.json or <root>/dataset_dict.json (Dataset.save_to_disk, DatasetDict.save_to_disk)",
    "parquet": "<root>/**/*.parquet (Parquet files: `headclip dataset export`, a copy of a Hub data set repository)",
    "imagefolder": "<root>/**/metadata.{csv,jsonl,parquet} next to the images (datasets' imagefolder)",
    "meta_json": "<root>/meta.json (AnomalyCLIP / APRIL-GAN meta file)",
    "visa": "<root>/split_csv/1cls.csv (VisA raw layout)",
    "mvtec": "<root>[/<category>]/test/<defect>/ with ground_truth/ (MVTec AD, MVTec-like converted VisA)",
    "generic": "<root>[/<category>]/{good,<defect>}/ with ground_truth/ (generic folder: MVTec test without test/)",
}
LAYOUTS = ("auto", *LAYOUT_SIGNATURES)


class SplitNotFoundError(ValueError):
    """
    The source has no split of the name asked for (`load_anomaly_dataset(..., split=...)`): a layout without it (the
    generic layout has only "test"; MVTec AD categories without `train/`), a meta file, CSV or table source that does
    not list it, or a split that holds no images.
    """


TABLE_LAYOUTS = ("save_to_disk", "parquet", "imagefolder")
IMAGEFOLDER_METADATA = frozenset({"metadata.csv", "metadata.jsonl", "metadata.parquet"})

# Column names found automatically in a table (compared in lower case), in order of preference.
COLUMN_CANDIDATES = {
    "image": ("image", "img", "images", "image_path", "img_path", "image_file", "file_name", "filename", "filepath"),
    "mask": ("mask", "masks", "gt", "gt_mask", "ground_truth", "mask_path", "gt_path", "segmentation", "anomaly_mask"),
    "label": ("label", "labels", "anomaly", "is_anomaly", "anomalous", "is_anomalous", "defective", "target"),
    "category": ("category", "cls_name", "class_name", "object", "object_name", "object_category"),
    "defect_type": ("defect_type", "defect", "defect_name", "specie_name", "anomaly_type"),
}
# Label names that mean "normal" (any case); every other name is an anomaly (its defect type).
NORMAL_LABEL_NAMES = frozenset({"good", "normal", "ok", "nominal", "negative", "0", "false"})

# Part of the cache key: bump it when the rows written for the same files change (columns, mask encoding).
_ROW_FORMAT_VERSION = 1


@dataclass(frozen=True)
class _Entry:
    """One image found by a layout scanner, before validation. `mask` is the mask file the layout names, if any."""

    image: str
    label: int
    category: str
    defect_type: str
    mask: str | None = None
    mask_valid: bool = False


def load_anomaly_dataset(
    source: str
    | os.PathLike
    | Sequence[str | os.PathLike]
    | datasets.Dataset
    | datasets.DatasetDict
    | datasets.IterableDataset
    | datasets.IterableDatasetDict,
    layout: str = "auto",
    split: str = "test",
    categories: Sequence[str] | None = None,
    skip_unreadable: bool = False,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    allow_outside_root: bool = False,
    *,
    revision: str | None = None,
    streaming: bool = False,
    image_column: str | None = None,
    mask_column: str | None = None,
    label_column: str | None = None,
    category_column: str | None = None,
    defect_type_column: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """
    Load an anomaly-detection data set into a `datasets.Dataset` with the columns of [`ANOMALY_FEATURES`].

    Sources:

    - a folder in one of the layouts below;
    - a `datasets.Dataset` / `IterableDataset`, or a `DatasetDict` / `IterableDatasetDict` (the `split` is taken);
    - tables read by `datasets`: a `save_to_disk` folder, Parquet files (one file, a list of files, or a folder of
      them such as a `headclip dataset export` or a copy of a Hub repository), an `imagefolder`-style folder with a
      metadata file, or a Hub data set id (`"user/mvtec-ad"`, read by `datasets.load_dataset(id, revision=...,
      split=..., streaming=...)`, which uses the local `datasets` cache when `HF_DATASETS_OFFLINE=1`).

    Folder layouts (`layout="auto"` tries the table folders first, then these, and uses the first that matches):

    - `"meta_json"`: `<root>/meta.json` of AnomalyCLIP / APRIL-GAN, `{split: {category: [{"img_path", "mask_path",
      "cls_name", "specie_name", "anomaly"}]}}`, paths relative to `root`, `mask_path` "" where there is no mask.
    - `"visa"`: raw VisA, `<root>/split_csv/1cls.csv` with the columns `object,split,label,image,mask` (label
      "normal" / "anomaly", paths relative to `root`), images in `<category>/Data/Images/{Normal,Anomaly}`.
    - `"mvtec"`: MVTec AD and the MVTec-like converted VisA, `<category>/test/<defect>/*` (`good` = normal),
      `<category>/train/good/*` (`split="train"`), masks in `<category>/ground_truth/<defect>/<stem>_mask.<ext>`.
    - `"generic"`: the MVTec test layout without the `test/` level, `<category>/{good,<defect>}/*` and
      `<category>/ground_truth/<defect>/<stem>_mask.<ext>`; test split only.

    In the folder layouts a mask is `<stem>_mask.<ext>` or `<stem>.<ext>` (BTAD) in any image format, and `root` is
    either a data set root holding category folders or one category folder (named after the folder). A category
    without a `ground_truth/` folder, or whose meta file / CSV names no mask, has image labels only (`mask_valid` is
    False on all its rows). A category without normal images (polyp sets) loads too. Both are logged as warnings.

    Tables: a table that already has exactly [`ANOMALY_FEATURES`] (an export of this package) is used as it is.
    Otherwise its columns are mapped (see [`COLUMN_CANDIDATES`] for the names found automatically, case-insensitive;
    the `*_column` arguments name them explicitly): images and masks as `Image()` columns or file paths (relative
    paths are relative to the folder of a local source), labels in any of the conventions of [`label_from_value`]
    (0/1, booleans, "good"/"normal" and "anomaly"/defect names, `ClassLabel`s of these), a category (default: the
    source's name) and a defect type (default: the label's name). Without a label column the defect type gives the
    label. A normal row's pixel labels are known (`mask_valid`) when the table has a mask column; a `mask_valid`
    column, if present, is used as it is. Rows are converted by `Dataset.map` (cached; `num_proc` processes) or
    lazily, row by row, on a streaming data set.

    Validation reads every file before a row is used: image and mask headers (sizes), and the whole stream of each
    file, cheaply (`verify()` for PNG, a 1/8-scale draft decode for JPEG, a full decode otherwise), so a truncated
    file fails with its name rather than in the middle of an evaluation. Folders are validated up front; table rows
    as they are converted.

    Caching: folder rows are generated by `datasets.Dataset.from_generator`, keyed on the list of files and their sizes
    and modification times, so a second call on unchanged files reuses the Arrow cache in `cache_dir` and later
    `map` calls are cached; two roots, splits or category selections never share a cache entry. Images are stored as
    file paths (like `imagefolder`; [`export_anomaly_dataset`] embeds them), masks as 0/255 PNG bytes (see the module
    docstring).

    Args:
        source (`str`, `os.PathLike`, a list of Parquet files, or a `datasets` data set): What to load (see above).
        layout (`str`, defaults to `"auto"`): For a folder, one of [`LAYOUTS`].
        split (`str`, defaults to `"test"`): The split to load; `"train"` gives the normal training images of the
            MVTec and VisA layouts (few-shot references). A source with one table (a `Dataset`, Parquet files
            without split names) is used whole.
        categories (`Sequence[str]`, *optional*): Load only these categories (all by default).
        skip_unreadable (`bool`, defaults to `False`): Skip rows whose image or mask cannot be read, with a warning
            that gives their count and files (also written to `dataset.info.description`), instead of raising.
        cache_dir (`str` or `os.PathLike`, *optional*): The `datasets` cache folder (`~/.cache/huggingface/datasets` by
            default).
        num_proc (`int`, *optional*): Processes that generate or convert the rows (decode and re-encode the masks).
        allow_outside_root (`bool`, defaults to `False`): Read files that a meta file, CSV or table of a local source
            lists outside its folder (`../x.png`, absolute paths); refused by default.
        revision (`str`, *optional*): The branch, tag or commit of a Hub data set.
        streaming (`bool`, defaults to `False`): Return a `datasets.IterableDataset` that reads (and for tables,
            converts) rows as they are iterated, without materialising the data set: constant memory, nothing
            downloaded up front for a Hub id. An `IterableDataset` source always streams.
        image_column, mask_column, label_column, category_column, defect_type_column (`str`, *optional*): The table
            columns holding each field (found automatically when not given).

    Returns:
        `datasets.Dataset` (or `datasets.IterableDataset` when streaming): One row per image with the features
        [`ANOMALY_FEATURES`]; `info.description` summarises the load.

    Raises:
        `SplitNotFoundError` (a `ValueError`): the source has no split `split`, or it holds no images.
        `ValueError`: an unknown `layout` or category, a root that holds no images in the layouts tried, a
            malformed meta file or CSV (the message names the entry; labels must be 0 or 1), a listed path that
            leaves `root`, a mask whose size differs from its image's, a column that does not exist or cannot be
            read (the message lists the columns), a label outside the known conventions.
        `FileNotFoundError`: `source` does not exist (neither locally nor, for an id, on the Hub), or a meta file /
            CSV names an image that does not exist.
        `ConnectionError`: a Hub id that cannot be reached (offline, and not in the `datasets` cache).
        `OSError`: an unreadable or truncated image or mask, a broken symbolic link, an image beyond PIL's
            decompression-bomb limit (unless `skip_unreadable=True`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}.")
    columns = {
        "image": image_column,
        "mask": mask_column,
        "label": label_column,
        "category": category_column,
        "defect_type": defect_type_column,
    }
    options = _LoadOptions(split, categories, skip_unreadable, num_proc, allow_outside_root, columns)
    if isinstance(source, _DATASET_TYPES):
        _check_options_apply("an in-memory data set", layout, ("auto",), revision)
        table = _pick_split(source, split, "the data set")
        if streaming and isinstance(table, datasets.Dataset):
            table = table.to_iterable_dataset()
        return _from_table(table, "an in-memory data set", table.info.dataset_name or "default", None, options)
    if isinstance(source, (list, tuple)) or Path(source).expanduser().is_file():
        files = source if isinstance(source, (list, tuple)) else [source]
        _check_options_apply("Parquet files", layout, ("auto", "parquet"), revision)
        return _from_parquet_files([Path(f).expanduser().resolve() for f in files], streaming, cache_dir, options)
    path = Path(source).expanduser()
    if not path.exists() and _is_hub_id(str(source)):
        _check_options_apply(f"the Hub data set id {source!r}", layout, ("auto",), None)
        return _from_hub(str(source), revision, streaming, cache_dir, options)
    root = path.resolve()
    tried = list(LAYOUT_SIGNATURES) if layout == "auto" else [layout]
    if not root.is_dir():
        raise FileNotFoundError(f"Data set root {root} does not exist or is not a folder. {_layouts_tried(tried)}")
    if layout == "auto":
        layout = _detect_layout(root)
        if layout is None:
            raise ValueError(f"No images found in data set root {root}. {_layouts_tried(tried)}")
    _check_options_apply(f"the folder {root}", layout, LAYOUTS, revision)
    if layout in TABLE_LAYOUTS:
        return _from_table_folder(root, layout, streaming, cache_dir, options)
    named_columns = [f"{name}_column" for name, column in columns.items() if column is not None]
    if named_columns:
        raise ValueError(
            f"{', '.join(named_columns)} name columns of a table; {root} is a folder in the {layout} layout, whose "
            "fields the layout fixes."
        )
    return _from_folder(root, layout, tried, streaming, cache_dir, options)


_DATASET_TYPES = (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset, datasets.IterableDatasetDict)


def _check_options_apply(origin: str, layout: str, layouts: Sequence[str], revision: str | None) -> None:
    """Refuse a `layout` or `revision` that does not apply to the source (rather than ignore it)."""
    if layout not in layouts:
        raise ValueError(f"layout={layout!r} applies to folders; the source is {origin} (use layout='auto').")
    if revision is not None:
        raise ValueError(f"revision={revision!r} applies to Hub data set ids; the source is {origin}.")


def _from_folder(
    root: Path,
    layout: str,
    tried: list[str],
    streaming: bool,
    cache_dir: str | os.PathLike | None,
    options: "_LoadOptions",
) -> datasets.Dataset | datasets.IterableDataset:
    """Scan, check and generate the rows of a folder layout."""
    split = options.split
    entries, has_masks = _SCANNERS[layout](root, split, options.allow_outside_root)
    entries = _select_categories(entries, options.categories, root)
    if not entries:
        raise SplitNotFoundError(
            f"No images found in data set root {root} for split {split!r}. {_layouts_tried(tried)}"
        )
    entries = _resolve_masks(entries, has_masks)
    entries, skipped = _validate_files(entries, options.skip_unreadable)
    if not entries:
        raise ValueError(f"Every image in {root} is unreadable ({len(skipped)} rows skipped).")
    categories = [entry.category for entry in entries]
    labels = [entry.label for entry in entries]
    _warn_about_categories(categories, labels, has_masks, split)

    records = [asdict(entry) for entry in entries]
    if streaming:
        dataset = datasets.IterableDataset.from_generator(
            _generate_rows,
            features=ANOMALY_FEATURES,
            gen_kwargs={"records": records},
            split=datasets.NamedSplit(split),
        )
    else:
        dataset = datasets.Dataset.from_generator(
            _generate_rows,
            features=ANOMALY_FEATURES,
            gen_kwargs={"records": records},
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            split=datasets.NamedSplit(split),
            num_proc=options.num_proc,
            fingerprint=_fingerprint(records, split),
        )
    mask_valid = [entry.mask_valid for entry in entries]
    dataset.info.description = _describe(f"{root} (layout {layout})", split, categories, labels, mask_valid, skipped)
    logger.info(dataset.info.description)
    return dataset


def _layouts_tried(layouts: Sequence[str]) -> str:
    return "Layouts tried: " + "; ".join(f"{name}: {LAYOUT_SIGNATURES[name]}" for name in layouts) + "."


def _detect_layout(root: Path) -> str | None:
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
        return "save_to_disk"
    if _holds_file(root, lambda name: name.endswith(".parquet")):
        return "parquet"
    if _holds_file(root, IMAGEFOLDER_METADATA.__contains__):
        return "imagefolder"
    if (root / META_JSON).is_file():
        return "meta_json"
    if (root / VISA_SPLIT_CSV).is_file():
        return "visa"
    if _mvtec_category_dirs(root):
        return "mvtec"
    if _generic_category_dirs(root):
        return "generic"
    return None


def _holds_file(root: Path, matches: Callable[[str], bool]) -> bool:
    """Whether a file whose name `matches` lies anywhere under `root` (hidden folders left out)."""
    for _, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        if any(matches(name) for name in files):
            return True
    return False


# Layout scanners: `(root, split, allow_outside_root) -> (entries, has_masks)`, where `has_masks[category]` says
# whether the category has pixel labels at all. Paths in the entries are absolute; a named mask file may still be
# missing (checked later).


def _scan_meta_json(root: Path, split: str, allow_outside_root: bool) -> tuple[list[_Entry], dict[str, bool]]:
    meta_path = root / META_JSON
    if not meta_path.is_file():
        return [], {}
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path} is not valid JSON: {err}.") from err
    if not isinstance(meta, dict):
        raise ValueError(
            f"{meta_path} must hold an object {{split: {{category: [entries]}}}}, not {_type_name(meta)}."
        )
    if split not in meta:
        raise SplitNotFoundError(f"{meta_path} has no split {split!r}; its splits are {sorted(meta)}.")
    entries = []
    has_masks: dict[str, bool] = {}
    for split_name, classes in meta.items():
        if not isinstance(classes, dict):
            raise ValueError(
                f"{meta_path}: split {split_name!r} must map category names to lists of entries, not "
                f"{_type_name(classes)}."
            )
        for class_name, items in classes.items():
            if not isinstance(items, list):
                raise ValueError(
                    f"{meta_path}: {split_name}/{class_name} must be a list of entries, not {_type_name(items)}."
                )
            for index, item in enumerate(items):
                where = f"{meta_path}: entry {split_name}/{class_name}[{index}]"
                image, mask, category, defect_type, label = _meta_entry_fields(item, where)
                where += f" ({image})"
                category = category or class_name
                has_masks[category] = has_masks.get(category, False) or (label == 1 and mask is not None)
                if split_name == split:
                    image_path = _listed_path(root, image, "img_path", where, allow_outside_root)
                    mask_path = _listed_path(root, mask, "mask_path", where, allow_outside_root) if mask else None
                    defect_type = defect_type or (NORMAL_DEFECT_TYPE if label == 0 else "anomaly")
                    entries.append(
                        _Entry(
                            _existing_file(image_path, meta_path),
                            label,
                            category,
                            defect_type,
                            str(mask_path) if mask_path is not None else None,
                        )
                    )
    return entries, has_masks


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _meta_entry_fields(item: Any, where: str) -> tuple[str, str | None, str | None, str | None, int]:
    """Check one meta.json entry: `(img_path, mask_path or None, cls_name, specie_name, anomaly)`."""
    if not isinstance(item, dict):
        raise ValueError(
            f"{where} must be an object with img_path, mask_path and anomaly (0 or 1), not {_type_name(item)}."
        )
    image = item.get("img_path")
    if isinstance(image, str) and image:
        where += f" ({image})"
    else:
        raise ValueError(f"{where}: img_path must be a path (a non-empty string) relative to the root, not {image!r}.")
    mask = item.get("mask_path")
    if mask is not None and not isinstance(mask, str):
        raise ValueError(f'{where}: mask_path must be a path (a string; "" or null for none), not {mask!r}.')
    for key in ("cls_name", "specie_name"):
        if item.get(key) is not None and not isinstance(item[key], str):
            raise ValueError(f"{where}: {key} must be a string, not {item[key]!r}.")
    label = item.get("anomaly")
    if isinstance(label, str) or label not in (0, 1):
        raise ValueError(f"{where}: anomaly must be 0 or 1, not {label!r} (1 marks an anomalous image).")
    return image, mask or None, item.get("cls_name"), item.get("specie_name"), int(label)


def _listed_path(root: Path, listed: str, field_name: str, where: str, allow_outside_root: bool) -> Path:
    """`root / listed`, normalised; a path that leaves `root` (`..`, absolute) is refused unless allowed."""
    path = Path(os.path.normpath(root / listed))
    if not allow_outside_root and not path.is_relative_to(root):
        raise ValueError(
            f"{where}: {field_name} {listed!r} leaves the data set root {root}. Listed files must lie under the root; "
            "pass allow_outside_root=True (--allow_outside_root on the command line) to read files elsewhere (only "
            "for lists you trust)."
        )
    return path


def _scan_visa(root: Path, split: str, allow_outside_root: bool) -> tuple[list[_Entry], dict[str, bool]]:
    csv_path = root / VISA_SPLIT_CSV
    if not csv_path.is_file():
        return [], {}
    with csv_path.open(newline="") as file:
        reader = csv.DictReader(file)
        missing_columns = set(VISA_CSV_COLUMNS) - set(reader.fieldnames or ())
        if missing_columns:
            raise ValueError(f"{csv_path} lacks the columns {sorted(missing_columns)}; expected {VISA_CSV_COLUMNS}.")
        rows = list(reader)
    labels = {name: index for index, name in enumerate(LABEL_NAMES)}
    entries = []
    has_masks: dict[str, bool] = {}
    for line, row in enumerate(rows, start=2):
        if row["label"] not in labels:
            raise ValueError(f"{csv_path}, line {line}: label {row['label']!r} is neither 'normal' nor 'anomaly'.")
        label = labels[row["label"]]
        category = row["object"]
        has_masks[category] = has_masks.get(category, False) or bool(row["mask"])
        if row["split"] == split:
            where = f"{csv_path}, line {line}"
            image = _existing_file(_listed_path(root, row["image"], "image", where, allow_outside_root), csv_path)
            defect_type = NORMAL_DEFECT_TYPE if label == 0 else "anomaly"
            mask = str(_listed_path(root, row["mask"], "mask", where, allow_outside_root)) if row["mask"] else None
            entries.append(_Entry(image, label, category, defect_type, mask))
    return entries, has_masks


def _scan_mvtec(root: Path, split: str, allow_outside_root: bool) -> tuple[list[_Entry], dict[str, bool]]:
    entries = []
    has_masks = {}
    for category_dir in _mvtec_category_dirs(root):
        entries += _scan_folder_category(category_dir, category_dir / split)
        has_masks[category_dir.name] = (category_dir / "ground_truth").is_dir()
    return entries, has_masks


def _scan_generic(root: Path, split: str, allow_outside_root: bool) -> tuple[list[_Entry], dict[str, bool]]:
    if split != "test":
        raise SplitNotFoundError(f"The generic layout (used for {root}) has only a test split, not {split!r}.")
    entries = []
    has_masks = {}
    for category_dir in _generic_category_dirs(root):
        entries += _scan_folder_category(category_dir, category_dir)
        has_masks[category_dir.name] = (category_dir / "ground_truth").is_dir()
    return entries, has_masks


_SCANNERS: dict[str, Callable[[Path, str, bool], tuple[list[_Entry], dict[str, bool]]]] = {
    "meta_json": _scan_meta_json,
    "visa": _scan_visa,
    "mvtec": _scan_mvtec,
    "generic": _scan_generic,
}


def _scan_folder_category(category_dir: Path, images_dir: Path) -> list[_Entry]:
    """`images_dir/<defect>/*` (`good` = normal), masks from `category_dir/ground_truth/<defect>/`."""
    entries = []
    for defect_dir in _subdirs(images_dir):
        if defect_dir.name == "ground_truth":
            continue
        label = 0 if defect_dir.name == NORMAL_DEFECT_TYPE else 1
        masks = {path.stem: path for path in image_files(category_dir / "ground_truth" / defect_dir.name)}
        for image in image_files(defect_dir):
            mask = None
            if label == 1:
                mask = masks.get(f"{image.stem}_mask") or masks.get(image.stem)
            entries.append(
                _Entry(str(image), label, category_dir.name, defect_dir.name, str(mask) if mask is not None else None)
            )
    return entries


def _mvtec_category_dirs(root: Path) -> list[Path]:
    if (root / "test").is_dir():
        return [root]
    return [path for path in _subdirs(root) if (path / "test").is_dir()]


def _generic_category_dirs(root: Path) -> list[Path]:
    if _is_generic_category(root):
        return [root]
    return [path for path in _subdirs(root) if _is_generic_category(path)]


def _is_generic_category(path: Path) -> bool:
    """A folder with at least one sub-folder (other than `ground_truth`) that directly holds images."""
    return any(image_files(sub) for sub in _subdirs(path) if sub.name != "ground_truth")


def _subdirs(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return sorted(child for child in path.iterdir() if child.is_dir() and not child.name.startswith("."))


def image_files(folder: str | os.PathLike) -> list[Path]:
    """
    The image files directly in `folder` (by extension, hidden files left out), sorted; `[]` if it is not a folder.

    Broken symbolic links are listed too, so that readers report them as unreadable files (named and counted) rather
    than drop them without a word.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        child
        for child in folder.iterdir()
        if child.suffix.lower() in IMAGE_EXTENSIONS and not child.name.startswith(".") and not child.is_dir()
    )


def _existing_file(path: Path, listed_in: Path) -> str:
    """`path` as a string; a listed file that is missing is an error (a broken link stays, to be named unreadable)."""
    if not os.path.lexists(path) or path.is_dir():
        raise FileNotFoundError(f"Image {path}, listed in {listed_in}, does not exist.")
    return str(path)


def _select_categories(entries: list[_Entry], categories: Sequence[str] | None, root: Path) -> list[_Entry]:
    if categories is None:
        return entries
    _check_categories(categories, sorted({entry.category for entry in entries}), root)
    return [entry for entry in entries if entry.category in set(categories)]


def _check_categories(categories: Sequence[str], available: list[str], origin: Any) -> None:
    unknown = sorted(set(categories) - set(available))
    if unknown:
        raise ValueError(f"Unknown categories {unknown} in {origin}; available categories: {available}.")


def _resolve_masks(entries: list[_Entry], has_masks: dict[str, bool]) -> list[_Entry]:
    """Set `mask_valid`; an anomalous image without its mask file in a category with masks gets an unknown mask."""
    resolved = []
    missing = []
    for entry in entries:
        if not has_masks[entry.category]:
            resolved.append(replace(entry, mask=None, mask_valid=False))
        elif entry.label == 0:
            resolved.append(replace(entry, mask=None, mask_valid=True))
        elif entry.mask is not None and os.path.lexists(entry.mask):  # a broken link is reported as unreadable
            resolved.append(replace(entry, mask_valid=True))
        else:
            missing.append(entry.image if entry.mask is None else f"{entry.image} (mask {entry.mask} not found)")
            resolved.append(replace(entry, mask=None, mask_valid=False))
    if missing:
        logger.warning(
            "%d anomalous images have no mask; their masks are unknown (mask_valid=False) and they are excluded "
            "from pixel metrics:\n  %s",
            len(missing),
            "\n  ".join(missing),
        )
    return resolved


def _validate_files(entries: list[_Entry], skip_unreadable: bool) -> tuple[list[_Entry], list[str]]:
    """Check that every image and mask reads to its end and that each mask has its image's size."""
    kept = []
    skipped = []
    for entry in entries:
        try:
            image_size = _readable_image_size(entry.image)
            mask_size = _readable_image_size(entry.mask) if entry.mask is not None else image_size
        except OSError as err:
            if not skip_unreadable:
                raise _unreadable_error(err) from err
            skipped.append(str(err))
            continue
        _check_mask_size(mask_size, image_size, f"Mask {entry.mask}", f"image {entry.image}")
        kept.append(entry)
    _warn_skipped(skipped, len(entries))
    return kept, skipped


def _warn_skipped(skipped: list[str], num_rows: int) -> None:
    """Log the rows left out with `skip_unreadable`: their count of `num_rows` and why each (nothing when none)."""
    if skipped:
        logger.warning(
            "Skipped %d of %d rows with unreadable files (skip_unreadable=True, --skip_unreadable):\n  %s",
            len(skipped),
            num_rows,
            "\n  ".join(skipped),
        )


def _unreadable_error(error: OSError) -> OSError:
    return OSError(
        f"Cannot read {error}. Fix or remove the file, or pass skip_unreadable=True (--skip_unreadable on the command "
        "line) to skip such rows."
    )


def _check_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int], mask_name: str, image_name: str) -> None:
    if mask_size != image_size:
        raise ValueError(
            f"{mask_name[0].upper()}{mask_name[1:]} is {mask_size[0]}x{mask_size[1]} but its {image_name} is "
            f"{image_size[0]}x{image_size[1]}; a mask must have its image's size."
        )


def _readable_image_size(source: str | bytes, name: str | None = None) -> tuple[int, int]:
    """
    The (width, height) of an image (a file path, or the bytes of a file) that reads to its end; an `OSError` naming
    it (`name`, default "image file <path>") otherwise: also for a broken symbolic link, and for an image larger
    than PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`).

    The check costs a fraction of a decode (the README's "Speed" section has the figures): `verify()` reads a PNG's
    chunks and checks their CRCs without decompressing; JPEG's `verify()` checks nothing, so a JPEG is decoded at 1/8
    scale (`draft`), which still reads the whole entropy-coded stream. Other formats are decoded fully.
    """
    name = name or f"image file {source}"
    if isinstance(source, str) and os.path.islink(source) and not os.path.exists(source):
        raise OSError(f"{name} (broken symbolic link to {os.readlink(source)})")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            size = image.size
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
    except _READ_ERRORS as err:
        raise OSError(f"{name} ({type(err).__name__}: {err})") from err
    return size


# What PIL raises for a file it cannot read: damaged data (OSError, SyntaxError, ValueError), too many pixels.
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _warn_about_categories(categories: list[str], labels: list[int], has_masks: dict[str, bool], split: str) -> None:
    """Warn about categories without normal images, without anomalous images (test split) or without masks."""
    for category in sorted(set(categories)):
        labels_of_category = {label for name, label in zip(categories, labels, strict=True) if name == category}
        if 0 not in labels_of_category:
            logger.warning(
                "Category %r has no normal images: image-level metrics are undefined on it (pixel-level only).",
                category,
            )
        if 1 not in labels_of_category and split == "test":
            logger.warning("Category %r has no anomalous images: image-level metrics are undefined on it.", category)
        if not has_masks[category]:
            logger.warning(
                "Category %r has no pixel labels (image labels only): mask_valid is False on all its rows and pixel "
                "metrics are undefined on it.",
                category,
            )


def _fingerprint(records: list[dict[str, Any]], split: str) -> str:
    """The cache key: the rows to write and the size and modification time of every file they read."""
    files = [record["image"] for record in records] + [record["mask"] for record in records if record["mask"]]
    stats = [(os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in files]
    return Hasher.hash([_ROW_FORMAT_VERSION, split, records, stats])


def _generate_rows(records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The `from_generator` generator: `records` come through `gen_kwargs`, so `num_proc` shards them."""
    for record in records:
        yield {
            "image": record["image"],
            "mask": _mask_png(_binary_mask(record["mask"], f"mask file {record['mask']}")) if record["mask"] else None,
            "label": record["label"],
            "category": record["category"],
            "defect_type": record["defect_type"],
            "path": record["image"],
            "mask_valid": record["mask_valid"],
        }


def _binary_mask(source: str | bytes, name: str) -> np.ndarray:
    """A mask (a file path or a file's bytes) as a uint8 0/255 array, binarised by `to_binary_mask` (every saving
    convention); an `OSError` naming it (`name`) when it cannot be read."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            return to_binary_mask(image).astype(np.uint8) * 255
    except _READ_ERRORS as err:
        raise OSError(f"{name} ({type(err).__name__}: {err})") from err


def _mask_png(mask: np.ndarray) -> dict[str, Any]:
    """A 0/255 mask as the `Image` feature's storage: grey PNG bytes (the encoding `datasets` gives a uint8 array)."""
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _describe(
    origin: Any, split: str, categories: list[str], labels: list[int], mask_valid: list[bool], skipped: list[str]
) -> str:
    anomalous = sum(labels)
    description = (
        f"Anomaly detection data loaded by headclip_hf.load_anomaly_dataset from {origin}, split {split}: "
        f"{len(labels)} images ({len(labels) - anomalous} normal, {anomalous} anomalous), {sum(mask_valid)} with "
        f"known pixel labels, categories {sorted(set(categories))}."
    )
    if skipped:
        description += f" Skipped {len(skipped)} rows with unreadable files: " + "; ".join(skipped) + "."
    return description


# Tables: `datasets` data sets, `save_to_disk` folders, Parquet files, `imagefolder` folders and Hub ids, mapped to
# the columns of ANOMALY_FEATURES.


@dataclass(frozen=True)
class _LoadOptions:
    """The arguments of `load_anomaly_dataset` that every source shares."""

    split: str
    categories: Sequence[str] | None
    skip_unreadable: bool
    num_proc: int | None
    allow_outside_root: bool
    columns: dict[str, str | None]


@dataclass(frozen=True)
class _ColumnPlan:
    """Which column of a table gives each anomaly field, and how to read it."""

    image: str
    image_is_path: bool
    mask: str | None
    mask_is_path: bool
    label: str | None
    category: str | None
    defect_type: str | None
    path: str | None
    mask_valid: str | None
    class_names: dict[str, list[str]]
    default_category: str
    base_folder: str | None
    allow_outside_root: bool


def _from_table_folder(
    root: Path, layout: str, streaming: bool, cache_dir: str | os.PathLike | None, options: _LoadOptions
) -> datasets.Dataset | datasets.IterableDataset:
    origin = f"{root} (layout {layout})"
    if layout == "save_to_disk":
        table = _pick_split(datasets.load_from_disk(str(root)), options.split, origin)
        if streaming and isinstance(table, datasets.Dataset):
            table = table.to_iterable_dataset()
    else:
        table = _load_with_datasets(str(root), origin, options.split, streaming=streaming, cache_dir=cache_dir)
    return _from_table(table, origin, root.name, root, options)


def _from_parquet_files(
    paths: list[Path], streaming: bool, cache_dir: str | os.PathLike | None, options: _LoadOptions
) -> datasets.Dataset | datasets.IterableDataset:
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"Parquet file {path} does not exist.")
        if path.suffix != ".parquet":
            raise ValueError(
                f"{path} is a file but not a Parquet file (.parquet). A data set is a folder, Parquet files, a Hub "
                "data set id or a `datasets` data set."
            )
    origin = f"Parquet files {', '.join(map(str, paths))}" if len(paths) > 1 else f"{paths[0]} (Parquet)"
    table = _load_with_datasets(
        "parquet", origin, "train", data_files=[str(path) for path in paths], streaming=streaming, cache_dir=cache_dir
    )
    return _from_table(table, origin, paths[0].stem, paths[0].parent, options)


def _from_hub(
    repo_id: str, revision: str | None, streaming: bool, cache_dir: str | os.PathLike | None, options: _LoadOptions
) -> datasets.Dataset | datasets.IterableDataset:
    origin = f"the Hub data set {repo_id}" + (f" at revision {revision}" if revision else "")
    table = _load_with_datasets(
        repo_id, origin, options.split, revision=revision, streaming=streaming, cache_dir=cache_dir
    )
    return _from_table(table, origin, repo_id.split("/")[-1], None, options)


def _load_with_datasets(
    path: str, origin: str, split: str, cache_dir: str | os.PathLike | None, **kwargs: Any
) -> datasets.Dataset | datasets.IterableDataset:
    """`datasets.load_dataset(path, split=split, ...)` with its errors turned into one message naming the source."""
    try:
        return datasets.load_dataset(
            path, split=split, cache_dir=str(cache_dir) if cache_dir is not None else None, **kwargs
        )
    except ValueError as error:  # e.g. an unknown split, with the list of splits
        kind = SplitNotFoundError if str(error).startswith("Unknown split") else ValueError
        raise kind(f"Cannot load split {split!r} of {origin}: {error}") from error
    except OSError as error:  # not found, offline and not cached (ConnectionError), unreadable files
        kind = next(kind for kind in (ConnectionError, FileNotFoundError, OSError) if isinstance(error, kind))
        hint = ""
        if origin.startswith("the Hub data set"):
            download = (
                f"download the repository on a connected machine (`hf download {path} --repo-type dataset "
                "--local-dir DIR`) and pass the folder DIR."
            )
            if datasets.config.HF_HUB_OFFLINE:  # HF_DATASETS_OFFLINE, else HF_HUB_OFFLINE
                offline = (
                    "`datasets` is offline here (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and its local cache holds no "
                    "copy of it: "
                )
            else:
                offline = (
                    "Without network access, set HF_DATASETS_OFFLINE=1 to use the copy in the local `datasets` cache "
                    "(made by an earlier online load), or "
                )
            hint = f" ({path!r} is not a local file or folder either.) {offline}{download}"
        raise kind(f"Cannot load {origin}: {error}.{hint}") from error


def _pick_split(
    source: datasets.Dataset | datasets.DatasetDict | datasets.IterableDataset | datasets.IterableDatasetDict,
    split: str,
    origin: str,
) -> datasets.Dataset | datasets.IterableDataset:
    if not isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return source
    if split not in source:
        raise SplitNotFoundError(f"{origin} has no split {split!r}; its splits are {sorted(source)}.")
    return source[split]


def _is_hub_id(text: str) -> bool:
    """Whether `text` can name a Hub repository (`name` or `namespace/name`) rather than a local path."""
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", ""):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _from_table(
    table: datasets.Dataset | datasets.IterableDataset,
    origin: str,
    default_category: str,
    base_folder: Path | None,
    options: _LoadOptions,
) -> datasets.Dataset | datasets.IterableDataset:
    """Map a table's columns to ANOMALY_FEATURES (a table that has them already is used as it is)."""
    streaming = isinstance(table, datasets.IterableDataset)
    if table.features is None:  # a streaming source that does not declare its features: read them from its first rows
        table = table._resolve_features()
    skipped: list[str] = []
    if table.features == ANOMALY_FEATURES and not any(options.columns.values()):
        converted = _select_table_categories(table, "category", {}, default_category, options.categories, origin)
    else:
        plan = _plan_columns(table.features, options, origin, default_category, base_folder)
        for column in (plan.image, plan.mask):  # before any filter: a streaming filter hands on decoded rows
            if column is not None and isinstance(table.features[column], datasets.Image):
                table = table.cast_column(column, datasets.Image(decode=False))
        table = _select_table_categories(
            table, plan.category, plan.class_names, default_category, options.categories, origin
        )
        converted, skipped = _convert_rows(table, plan, origin, options)
    if streaming:
        converted.info.description = (
            f"Anomaly detection data streamed by headclip_hf.load_anomaly_dataset from {origin}, split "
            f"{options.split}: rows are read and checked as they are iterated."
        )
        return converted
    if len(converted) == 0:
        raise ValueError(
            f"No images in {origin} for split {options.split!r} ({len(skipped)} unreadable rows skipped)."
        )
    summary = converted.select_columns(["category", "label", "mask_valid"]).to_dict()
    has_masks: dict[str, bool] = {}
    for category, valid in zip(summary["category"], summary["mask_valid"], strict=True):
        has_masks[category] = has_masks.get(category, False) or valid
    _warn_about_categories(summary["category"], summary["label"], has_masks, options.split)
    converted.info.description = _describe(
        origin, options.split, summary["category"], summary["label"], summary["mask_valid"], skipped
    )
    logger.info(converted.info.description)
    return converted


def _plan_columns(
    features: datasets.Features,
    options: _LoadOptions,
    origin: str,
    default_category: str,
    base_folder: Path | None,
) -> _ColumnPlan:
    """Find (or check the named) columns of each field and check their types; errors list the columns."""
    available = list(features)
    by_lowercase = {name.lower(): name for name in available}

    def find(field_name: str) -> str | None:
        named = options.columns[field_name]
        if named is not None:
            if named not in features:
                raise ValueError(
                    f"{field_name}_column={named!r} is not a column of {origin}; its columns are {available}."
                )
            return named
        return next((by_lowercase[name] for name in COLUMN_CANDIDATES[field_name] if name in by_lowercase), None)

    image, mask, label = find("image"), find("mask"), find("label")
    category, defect_type = find("category"), find("defect_type")
    if image is None:
        image_columns = [name for name in available if isinstance(features[name], datasets.Image) and name != mask]
        if len(image_columns) != 1:
            raise ValueError(
                f"No image column in {origin}: none of {list(COLUMN_CANDIDATES['image'])} (nor a single Image() "
                f"column); its columns are {available}. Name it with image_column= (--image_column)."
            )
        image = image_columns[0]
    if label is None and defect_type is None:
        raise ValueError(
            f"No label column in {origin}: none of {list(COLUMN_CANDIDATES['label'])}, nor a defect type column "
            f"({list(COLUMN_CANDIDATES['defect_type'])}) to derive it from; its columns are {available}. Name it with "
            "label_column= (--label_column)."
        )
    _check_column_type(features, image, "image", origin, images=True)
    _check_column_type(features, mask, "mask", origin, images=True)
    _check_column_type(features, label, "label", origin, labels=True)
    _check_column_type(features, category, "category", origin)
    _check_column_type(features, defect_type, "defect_type", origin)
    path = "path" if "path" in features and image != "path" and _is_text(features["path"]) else None
    mask_valid = "mask_valid" if features.get("mask_valid") == datasets.Value("bool") else None
    return _ColumnPlan(
        image=image,
        image_is_path=_is_text(features[image]),
        mask=mask,
        mask_is_path=mask is not None and _is_text(features[mask]),
        label=label,
        category=category,
        defect_type=defect_type,
        path=path,
        mask_valid=mask_valid,
        class_names={
            name: list(feature.names) for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)
        },
        default_category=default_category,
        base_folder=str(base_folder) if base_folder is not None else None,
        allow_outside_root=options.allow_outside_root,
    )


def _is_text(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _check_column_type(
    features: datasets.Features,
    column: str | None,
    field_name: str,
    origin: str,
    images: bool = False,
    labels: bool = False,
) -> None:
    if column is None:
        return
    feature = features[column]
    if images:
        valid, expected = isinstance(feature, datasets.Image) or _is_text(feature), "images (Image()) or file paths"
    elif labels:
        valid = isinstance(feature, datasets.ClassLabel) or (
            isinstance(feature, datasets.Value) and feature.dtype in _LABEL_DTYPES
        )
        expected = "labels (ClassLabel, booleans, integers, numbers or strings)"
    else:
        valid, expected = isinstance(feature, datasets.ClassLabel) or _is_text(feature), "names (strings)"
    if not valid:
        raise ValueError(f"Column {column!r} ({field_name}) of {origin} holds {feature}, not {expected}.")


_LABEL_DTYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32"}
    | {"float64", "string", "large_string"}
)


def _select_table_categories(
    table: datasets.Dataset | datasets.IterableDataset,
    column: str | None,
    class_names: dict[str, list[str]],
    default_category: str,
    categories: Sequence[str] | None,
    origin: str,
) -> datasets.Dataset | datasets.IterableDataset:
    """Keep the rows of `categories` before they are converted (streaming: unknown names select nothing)."""
    if categories is None:
        return table
    if column is None:
        _check_categories(categories, [default_category], origin)
        return table
    names = class_names.get(column)
    if isinstance(table, datasets.Dataset):
        _check_categories(categories, sorted({_text(value, names) for value in table.unique(column)}), origin)
    return table.filter(
        functools.partial(_in_categories, selected=frozenset(categories), names=names), input_columns=column
    )


def _in_categories(value: Any, selected: frozenset[str], names: list[str] | None) -> bool:
    return _text(value, names) in selected


def _text(value: Any, names: list[str] | None) -> str | None:
    """A category or defect value as text: a `ClassLabel` index as its name; `None` stays `None`."""
    if value is None:
        return None
    if names is not None and isinstance(value, int):
        return names[value]
    return str(value)


def _convert_rows(
    table: datasets.Dataset | datasets.IterableDataset, plan: _ColumnPlan, origin: str, options: _LoadOptions
) -> tuple[datasets.Dataset | datasets.IterableDataset, list[str]]:
    """Run `_RowConverter` over `table` (`Dataset.map`, cached; lazily on a streaming table); drop unreadable rows."""
    converter = _RowConverter(plan, origin, options.skip_unreadable)
    features = ANOMALY_FEATURES
    if options.skip_unreadable:
        features = datasets.Features({**ANOMALY_FEATURES, _UNREADABLE: datasets.Value("string")})
    arguments = {"batched": True, "with_indices": True, "remove_columns": list(table.features)}
    skipped: list[str] = []
    if isinstance(table, datasets.IterableDataset):
        converted = table.map(converter, **arguments)
        if options.skip_unreadable:
            converted = converted.filter(_readable_or_warn, input_columns=_UNREADABLE).remove_columns(_UNREADABLE)
        return converted.cast(ANOMALY_FEATURES), skipped
    converted = table.map(
        converter, features=features, num_proc=options.num_proc, desc="Reading anomaly rows", **arguments
    )
    if options.skip_unreadable:
        skipped = [reason for reason in converted[_UNREADABLE] if reason]
        converted = converted.filter(_is_readable, input_columns=_UNREADABLE).remove_columns(_UNREADABLE)
        _warn_skipped(skipped, len(table))
    return converted, skipped


# The column `_RowConverter` adds with `skip_unreadable=True`: why a row is unreadable ("" when it is readable).
_UNREADABLE = "_unreadable"
_SKIPPED_ROW = {
    "image": None,
    "mask": None,
    "label": 0,
    "category": "",
    "defect_type": "",
    "path": "",
    "mask_valid": False,
}


def _is_readable(reason: str) -> bool:
    return not reason


def _readable_or_warn(reason: str) -> bool:
    """The streaming filter: rows are dropped as they are met, each with a warning."""
    if reason:
        logger.warning("Skipped a row with unreadable files (skip_unreadable=True, --skip_unreadable): %s", reason)
    return not reason


@dataclass(frozen=True)
class _RowConverter:
    """The batched `map` function that turns a table's rows into rows of ANOMALY_FEATURES, checking every file."""

    plan: _ColumnPlan
    origin: str
    skip_unreadable: bool

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        converted: dict[str, list] = {name: [] for name in ANOMALY_FEATURES}
        if self.skip_unreadable:
            converted[_UNREADABLE] = []
        for position, index in enumerate(indices):
            row = {column: values[position] for column, values in batch.items()}
            try:
                values, reason = self.convert(row, index), ""
            except OSError as error:
                if not self.skip_unreadable:
                    raise _unreadable_error(error) from error
                values, reason = _SKIPPED_ROW, str(error)
            for name, value in values.items():
                converted[name].append(value)
            if self.skip_unreadable:
                converted[_UNREADABLE].append(reason)
        return converted

    def convert(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        plan = self.plan
        image = self._file(row[plan.image], plan.image_is_path, "image", index)
        if image is None:
            raise ValueError(f"Row {index} of {self.origin} has no image (column {plan.image!r}).")
        image_path, image_bytes = image
        where = f"row {index}" + (f" ({image_path})" if image_path else "") + f" of {self.origin}"
        label, defect_type = self._label(row, where)
        image_name = f"image {image_path or '(embedded)'} of {where}"
        image_size = _readable_image_size(image_bytes if image_bytes is not None else image_path, image_name)
        mask = self._file(row[plan.mask], plan.mask_is_path, "mask", index) if plan.mask is not None else None
        mask_png = None
        if mask is not None:
            mask_path, mask_bytes = mask
            mask_name = f"mask {mask_path or '(embedded)'} of {where}"
            binary = _binary_mask(mask_bytes if mask_bytes is not None else mask_path, mask_name)
            _check_mask_size((binary.shape[1], binary.shape[0]), image_size, mask_name, image_name)
            mask_png = _mask_png(binary)
        if plan.mask_valid is not None:
            mask_valid = bool(row[plan.mask_valid])
        else:  # a normal row's mask is known (all zero) when the table has masks; an anomalous row's when it has one
            mask_valid = mask_png is not None if label == 1 else plan.mask is not None
        category = _text(row[plan.category], plan.class_names.get(plan.category)) if plan.category else None
        return {
            "image": {"bytes": image_bytes, "path": image_path},
            "mask": mask_png,
            "label": label,
            "category": category or plan.default_category,
            "defect_type": defect_type,
            "path": row[plan.path] if plan.path is not None else image_path or f"{index}",
            "mask_valid": mask_valid,
        }

    def _file(self, value: Any, is_path: bool, field_name: str, index: int) -> tuple[str | None, bytes | None] | None:
        """`(path, bytes)` of an image or mask value (a path, or an `Image(decode=False)` dict); `None` if none."""
        if value is None or value == "":
            return None
        path, data = (value, None) if is_path else (value.get("path"), value.get("bytes"))
        if data is None and not path:
            return None
        if data is None and self.plan.base_folder is not None:
            where = f"{self.origin}, row {index}"
            if is_path:  # a listed path, like a meta file's: it must stay under the source's folder
                path = str(
                    _listed_path(Path(self.plan.base_folder), path, field_name, where, self.plan.allow_outside_root)
                )
            else:
                path = os.path.join(self.plan.base_folder, path)
        return path, data

    def _label(self, row: dict[str, Any], where: str) -> tuple[int, str]:
        """`(label, defect_type)` from the label column (or, without one, from the defect type)."""
        plan = self.plan
        defect = _text(row[plan.defect_type], plan.class_names.get(plan.defect_type)) if plan.defect_type else None
        column = plan.label if plan.label is not None else plan.defect_type
        value = row[plan.label] if plan.label is not None else defect
        try:
            label, name = label_from_value(value, plan.class_names.get(plan.label) if plan.label else None)
        except ValueError as error:
            raise ValueError(f"{where}, column {column!r}: {error}") from error
        if label == 0:
            return 0, NORMAL_DEFECT_TYPE
        return 1, defect or name or "anomaly"


def label_from_value(value: Any, class_names: Sequence[str] | None = None) -> tuple[int, str | None]:
    """
    Read an image label in any of the known conventions.

    - `True` / `False`, `1` / `0` (integers or floats, also as strings, `"true"` / `"false"`);
    - names: [`NORMAL_LABEL_NAMES`] ("good", "normal", "ok", ...) are normal; any other name ("anomaly", "defect",
      "crack", ...) is anomalous, and is the image's defect type;
    - a `ClassLabel` index, read as its name (`class_names`).

    Args:
        value (`Any`): The label.
        class_names (`Sequence[str]`, *optional*): The names of a `ClassLabel` column, to read indices as names.

    Returns:
        `tuple[int, str | None]`: The label (0 normal, 1 anomalous) and the defect name it gives (`None` for numbers,
        booleans and normal names).

    Raises:
        `ValueError`: a value outside these conventions (2, 0.7, -1, an empty string, `None`, ...).
    """
    if class_names is not None and isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(class_names):
            raise ValueError(f"label {value} is not an index of the ClassLabel names {list(class_names)}.")
        value = class_names[value]
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return int(value), None
    if isinstance(value, str) and value.strip():
        name = value.strip()
        if name.lower() in NORMAL_LABEL_NAMES:
            return 0, None
        if name.lower() in ("1", "true"):
            return 1, None
        try:
            number = float(name)
        except ValueError:
            return 1, name  # "anomaly", "defect" or a defect name
        if number in (0, 1):
            return int(number), None
    raise ValueError(
        f"label {value!r} is outside the known conventions: 0/1, booleans, {sorted(NORMAL_LABEL_NAMES)} for normal "
        "images and 'anomaly' or a defect name for anomalous ones. Map the column to these values, or name another "
        "column with label_column= (--label_column)."
    )


def _process_batch(
    processor: Any, images: list, masks: list, labels: Sequence[int], mask_valid: Sequence[bool]
) -> BatchFeature:
    batch = processor(images=images, masks=masks, return_tensors="pt")
    batch["labels"] = torch.tensor(labels, dtype=torch.long)
    batch["mask_valid"] = torch.tensor(mask_valid, dtype=torch.bool)
    return batch


@dataclass
class AnomalyCollator:
    """
    Turn rows of [`load_anomaly_dataset`] into a batch: `pixel_values` [B, 3, S, S], `masks` [B, S, S] in {0, 1},
    `labels` (long [B]) and `mask_valid` (bool [B]). The `DataLoader` `collate_fn` / `Trainer` `data_collator`
    (with `remove_unused_columns=False`, since the model does not take the raw columns).

    Resizing and mask binarisation are the processor's: `processor(images=..., masks=..., return_tensors="pt")`, where
    a `None` mask (a normal image, or an unknown mask) becomes all zeros; `mask_valid` says which zeros are real.

    Args:
        processor (`HeadCLIPProcessor`): The processor (or anything with its call signature).
    """

    processor: Any

    def __call__(self, features: list[dict[str, Any]]) -> BatchFeature:
        return _process_batch(
            self.processor,
            images=[row["image"] for row in features],
            masks=[row["mask"] for row in features],
            labels=[row["label"] for row in features],
            mask_valid=[row["mask_valid"] for row in features],
        )


def make_transform(processor: Any) -> Callable[[dict[str, list]], BatchFeature]:
    """
    The same processing as [`AnomalyCollator`] as a `datasets` transform: `dataset.set_transform(make_transform(p))`
    (or `with_transform`) processes rows lazily on access, and `torch`'s default collate stacks them.
    """

    def transform(batch: dict[str, list]) -> BatchFeature:
        return _process_batch(processor, batch["image"], batch["mask"], batch["label"], batch["mask_valid"])

    return transform
