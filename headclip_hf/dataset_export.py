# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Export an anomaly data set as Parquet shards with the images embedded and a dataset card; publish it on the Hub.

    export_anomaly_dataset("data/mvtec_ad", "exports/mvtec_ad", splits=("test", "train"))
    upload_anomaly_dataset("exports/mvtec_ad", "user/mvtec-ad", private=True)
    load_anomaly_dataset("exports/mvtec_ad")  # the same rows, anywhere: no absolute path, no file outside the folder

The folder is what `Dataset.push_to_hub` writes to a repository: `data/<split>-<index>-of-<count>.parquet` (each
image's and mask's file bytes embedded, `datasets` features in the Parquet metadata) and `README.md`, a dataset card
whose YAML lists the splits and features, so that `datasets.load_dataset(folder or repo id)` reads it as it is.
"""

import functools
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets.info import DatasetInfosDict
from datasets.table import embed_table_storage
from datasets.utils.py_utils import convert_file_size_to_int
from huggingface_hub import DatasetCard, DatasetCardData
from tqdm.auto import tqdm

from .data import ANOMALY_FEATURE_DESCRIPTIONS, ANOMALY_FEATURES, LABEL_NAMES, load_anomaly_dataset
from .files import OutputKind, check_output_folder, output_folder
from .hub import check_repo_id, upload_hub_folder

DATASET_CARD = "README.md"
DATA_FOLDER = "data"
DATASET_EXPORT_OUTPUT = OutputKind("HeadCLIP data set export", frozenset({DATASET_CARD, DATA_FOLDER}))
DEFAULT_MAX_SHARD_SIZE = "500MB"
# How far above the source folder a README with its licence and citation is looked for (category -> data set -> all).
README_LEVELS = 2


@dataclass(frozen=True)
class SourceNotes:
    """What a source's README says about its licence and citation (each `None` when it says nothing)."""

    license: str | None = None
    license_text: str | None = None
    citation: str | None = None
    readme: Path | None = None


def export_anomaly_dataset(
    source: Any,
    output_dir: str | os.PathLike,
    splits: str | Sequence[str] = ("test",),
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    *,
    license: str | None = None,
    citation: str | None = None,
    pretty_name: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    **load_kwargs: Any,
) -> Path:
    """
    Write an anomaly data set as Parquet shards with the image and mask bytes embedded, plus a dataset card.

    Every split is read by [`load_anomaly_dataset`] (so every source it accepts can be exported, and the rows are
    checked on the way); the `path` column becomes relative to the source folder. The folder is written whole or not
    at all ([`headclip_hf.files.output_folder`]). Loading it again, from wherever it is moved, gives the same rows,
    labels and masks bit for bit.

    Args:
        source (`Any`): What [`load_anomaly_dataset`] accepts (a folder, Parquet files, a Hub id, a `datasets` data
            set).
        output_dir (`str` or `os.PathLike`): The folder to write (`README.md` and `data/`).
        splits (`str` or `Sequence[str]`, defaults to `("test",)`): The splits to export.
        max_shard_size (`int` or `str`, defaults to `"500MB"`): The largest Parquet shard, before compression (a
            number of bytes, or a size such as "500MB" or "1GiB").
        license (`str`, *optional*): The Hub licence id of the card (default: read from the source's README, or for
            a `datasets` data set from its `info.license`).
        citation (`str`, *optional*): The citation of the card (default: read from the source's README, or for a
            `datasets` data set from its `info.citation`).
        pretty_name (`str`, *optional*): The card's title (default: the source's name).
        repo_id (`str`, *optional*): The Hub repository the folder is meant for, used in the card's examples.
        overwrite (`bool`, defaults to `False`): Replace this writer's files in a folder that also holds other files.
        **load_kwargs: Further arguments of [`load_anomaly_dataset`] (`layout`, `categories`, column mapping, ...).

    Returns:
        `Path`: `output_dir`.

    Raises:
        `ValueError`: a `max_shard_size` that is not a size, an invalid `repo_id`, `streaming=True` (an export needs
            the whole data set), and the errors of [`load_anomaly_dataset`].
        `OSError`: the errors of [`load_anomaly_dataset`] and of [`headclip_hf.files.check_output_folder`].
    """
    if load_kwargs.get("streaming"):
        raise ValueError("An export writes whole splits: load the source without streaming (streaming=False).")
    splits = [splits] if isinstance(splits, str) else list(splits)
    shard_bytes = parse_shard_size(max_shard_size)
    if repo_id is not None:
        check_repo_id(repo_id)
    output_dir = check_output_folder(output_dir, DATASET_EXPORT_OUTPUT, overwrite)
    loaded = {split: load_anomaly_dataset(source, split=split, **load_kwargs) for split in splits}
    source_folder = _source_folder(source)
    notes = read_source_notes(source_folder) if source_folder is not None else dataset_info_notes(source)
    card = render_dataset_card(
        loaded,
        source_name=_source_name(source, source_folder, notes.readme),
        license=license or notes.license,
        license_text=notes.license_text,
        citation=citation or notes.citation,
        pretty_name=pretty_name,
        repo_id=repo_id,
    )
    with output_folder(output_dir, DATASET_EXPORT_OUTPUT, overwrite) as staging:
        (staging / DATA_FOLDER).mkdir()
        for split, dataset in loaded.items():
            write_parquet_shards(_relative_paths(dataset, source_folder), staging / DATA_FOLDER, split, shard_bytes)
        card.save(staging / DATASET_CARD)
    return output_dir


def upload_anomaly_dataset(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload anomaly data set",
) -> str:
    """
    Upload an [`export_anomaly_dataset`] folder to the Hub data set repository `repo_id` (created when missing,
    `private` then), as `HfApi.upload_folder`: only the export's own files (`README.md`, `data/`), never other files
    of the folder. Returns the URL of the commit.
    """
    return upload_hub_folder(
        folder,
        repo_id,
        private=private,
        revision=revision,
        token=token,
        commit_message=commit_message,
        repo_type="dataset",
        output_kind=DATASET_EXPORT_OUTPUT,
    )


def parse_shard_size(max_shard_size: int | str) -> int:
    """`"500MB"` -> 500000000 (`datasets`' own parser); a `ValueError` naming the value if it is not a size."""
    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"max_shard_size {max_shard_size!r} is not a size: give bytes or a size such as 500MB or 1GiB."
        ) from error
    if size <= 0:
        raise ValueError(f"max_shard_size {max_shard_size!r} must be positive.")
    return size


def write_parquet_shards(dataset: datasets.Dataset, folder: Path, split: str, max_shard_bytes: int) -> list[Path]:
    """
    Write `dataset` as `folder/<split>-<index>-of-<count>.parquet`, each at most about `max_shard_bytes` before
    compression, with the bytes of the files its `Image` columns point to embedded (as `Dataset.push_to_hub` does:
    `embed_table_storage`; an embedded image keeps only its file name).
    """
    # The size of the rows and of the files they point to: the estimate `push_to_hub` shards by.
    num_shards = max(1, math.ceil(dataset._estimate_nbytes() / max_shard_bytes))
    written = []
    for index in tqdm(range(num_shards), desc=f"Writing the {split} split", unit="shard"):
        shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True)
        shard = shard.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)
        path = folder / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
        shard.to_parquet(path)
        written.append(path)
    return written


def _relative_paths(dataset: datasets.Dataset, source_folder: Path | None) -> datasets.Dataset:
    """The `path` column relative to the source folder (or, for an in-memory source, to its files' common folder)."""
    absolute = [path for path in dataset.unique("path") if os.path.isabs(path)]
    if not absolute:
        return dataset
    base = (
        source_folder
        if source_folder is not None
        else Path(os.path.commonpath([os.path.dirname(p) for p in absolute]))
    )
    return dataset.map(
        functools.partial(_relative_to, base=str(base)), input_columns="path", batched=True, desc="Relative paths"
    )


def _relative_to(paths: list[str], base: str) -> dict[str, list[str]]:
    return {"path": [Path(os.path.relpath(p, base)).as_posix() if os.path.isabs(p) else p for p in paths]}


def _source_folder(source: Any) -> Path | None:
    """The local folder a source lives in (a Parquet file's folder); `None` for Hub ids and in-memory data sets."""
    if isinstance(source, (list, tuple)):
        source = source[0] if source else None
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    return path.resolve().parent if path.is_file() else None


def _source_name(source: Any, source_folder: Path | None, readme: Path | None) -> str:
    """A name for the card: the folder's path below its README ("mvtec_ad/bottle"), a Hub id, ..."""
    if source_folder is not None:
        if readme is not None and readme.parent != source_folder:
            return source_folder.relative_to(readme.parent).as_posix()
        return source_folder.name
    if isinstance(source, str):
        return source  # a Hub id
    return "an in-memory data set"


def read_source_notes(folder: Path, levels: int = README_LEVELS) -> SourceNotes:
    """
    The licence and citation a source's README gives: the nearest `README.md` in `folder` or up to `levels` folders
    above it. A dataset card's YAML `license` is used as it is; otherwise the sections whose headings mention a
    licence or a citation are read, keeping the items (bullets or paragraphs) that name the source (any folder name
    between the README and `folder`, e.g. "mvtec_ad" matches "MVTec AD") when some do. A Hub licence id is
    recognised in the text for Creative Commons, Apache 2.0 and MIT licences ("other" for any other licence text).
    """
    readme = next(
        (
            parent / name
            for parent in [folder, *folder.parents][: levels + 1]
            for name in ("README.md", "readme.md", "README")
            if (parent / name).is_file()
        ),
        None,
    )
    if readme is None:
        return SourceNotes()
    text = readme.read_text(encoding="utf-8")
    card_license = None
    if text.startswith("---"):  # a dataset card: YAML metadata, then the text
        card = DatasetCard(text)
        card_license, text = card.data.get("license"), card.text
    names = [_normalised(part) for part in folder.relative_to(readme.parent).parts]
    license_items = _relevant_items(_section(text, r"licen[cs]e"), names)
    citation_items = _relevant_items(_section(text, r"citation|cite"), names)
    citation = _citation(citation_items)
    license_text = " ".join(_CITE.sub("", item).strip() for item in license_items) or None
    license_id = card_license or (_license_id(license_text) if license_text else None)
    return SourceNotes(license=license_id, license_text=license_text, citation=citation, readme=readme)


_HEADING = re.compile(r"^#{1,6}\s+(.*)$", re.MULTILINE)
_CITE = re.compile(r"\bCite[sd]?:?\s+(.+)$", re.DOTALL)
_BIBTEX = re.compile(r"```(?:bibtex|bib)?\n(@.+?)```", re.DOTALL)
_CREATIVE_COMMONS = re.compile(r"\bCC[ -]BY((?:[ -](?:NC|SA|ND))*)[ -](\d\.\d)\b", re.IGNORECASE)


def _section(text: str, heading_pattern: str) -> str:
    """The text under the first heading that matches `heading_pattern` (case-insensitive), up to the next heading."""
    headings = list(_HEADING.finditer(text))
    for index, heading in enumerate(headings):
        if re.search(heading_pattern, heading.group(1), re.IGNORECASE):
            end = headings[index + 1].start() if index + 1 < len(headings) else len(text)
            return text[heading.end() : end].strip()
    return ""


def _relevant_items(section: str, names: list[str]) -> list[str]:
    """A section's bullets (or paragraphs), wrapped lines joined; those that mention one of `names` if any do."""
    if not section:
        return []
    if _BIBTEX.search(section):
        return [section]
    blocks = re.split(r"\n\s*\n|\n(?=\s*[-*] )", section)
    items = [" ".join(line.strip() for line in block.strip().lstrip("-* ").splitlines()) for block in blocks]
    items = [item for item in items if item]
    named = [item for item in items if any(name and name in _normalised(item) for name in names)]
    return named or items


def _citation(items: list[str]) -> str | None:
    """A BibTeX block if there is one, else the "Cite ..." sentences of the items, else the items themselves."""
    for item in items:
        bibtex = _BIBTEX.search(item)
        if bibtex:
            return bibtex.group(1).strip()
    cited = [match.group(1).strip() for item in items if (match := _CITE.search(item))]
    return "\n\n".join(cited or items) or None


def dataset_info_notes(source: Any) -> SourceNotes:
    """
    The licence and citation a `datasets` data set carries in its `DatasetInfo` (a `DatasetDict`'s first split's);
    an empty `SourceNotes` for other sources. A licence that is not a Hub licence id (one word such as "mit" or
    "cc-by-nc-sa-4.0") is kept as the card's licence text, with the id read from it.
    """
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        source = next(iter(source.values()), None)
    if not isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return SourceNotes()
    license, citation = (source.info.license or "").strip(), (source.info.citation or "").strip()
    if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        return SourceNotes(license=license, citation=citation or None)
    return SourceNotes(
        license=_license_id(license) if license else None, license_text=license or None, citation=citation or None
    )


def _license_id(text: str) -> str:
    creative_commons = _CREATIVE_COMMONS.search(text)
    if creative_commons:
        clauses = re.findall(r"NC|SA|ND", creative_commons.group(1).upper())
        return "-".join(["cc-by", *(clause.lower() for clause in clauses), creative_commons.group(2)])
    if re.search(r"\bApache(?: License)?,? (?:Version )?2\.0\b", text, re.IGNORECASE):
        return "apache-2.0"
    if re.search(r"\bMIT\b", text):
        return "mit"
    return "other"


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def render_dataset_card(
    splits: Mapping[str, datasets.Dataset],
    *,
    source_name: str,
    license: str | None = None,
    license_text: str | None = None,
    citation: str | None = None,
    pretty_name: str | None = None,
    repo_id: str | None = None,
) -> DatasetCard:
    """
    The dataset card of an export: YAML metadata (licence, the splits' Parquet files, the features, tags) and a text
    with how to load it, the columns, the number of images per split and category, the licence and the citation.
    """
    pretty_name = pretty_name or source_name
    card_data = DatasetCardData(
        license=license,
        pretty_name=pretty_name,
        task_categories=["image-segmentation", "image-classification"],
        tags=["anomaly-detection", "zero-shot-anomaly-detection", "headclip"],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"{DATA_FOLDER}/{split}-*"} for split in splits],
            }
        ],
    )
    split_infos = datasets.SplitDict()
    for split, dataset in splits.items():
        split_infos.add(datasets.SplitInfo(name=split, num_examples=len(dataset)))
    info = datasets.DatasetInfo(features=ANOMALY_FEATURES, splits=split_infos)
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)

    where = repo_id or "path/to/this/folder"
    first_split = next(iter(splits))
    columns = "\n".join(
        f"| `{name}` | {_feature_name(feature)} | {ANOMALY_FEATURE_DESCRIPTIONS[name]} |"
        for name, feature in ANOMALY_FEATURES.items()
    )
    licence = license_text or (
        f"Licence: `{license}`." if license else "The source states no licence: check its terms before sharing."
    )
    text = f"""# {pretty_name}

Anomaly detection data ({source_name}) in the columns of `headclip_hf.load_anomaly_dataset`, exported by
`headclip dataset export`: Parquet shards with the image and mask files embedded.

## Load it

```python
from headclip_hf import load_anomaly_dataset

dataset = load_anomaly_dataset("{where}", split="{first_split}")  # or datasets.load_dataset("{where}")
```

Evaluate a HeadCLIP on it: `headclip evaluate {where} --split {first_split} --model MODEL`.

## Columns

| column | type | meaning |
|---|---|---|
{columns}

## Contents

| split | category | images | normal | anomalous | known pixel labels |
|---|---|---|---|---|---|
{_contents_table(splits)}

## Licence

{licence}

## Citation

{citation or "The source gives no citation."}
"""
    return DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n{text}")


def _feature_name(feature: Any) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return f"ClassLabel ({', '.join(LABEL_NAMES)})"
    if isinstance(feature, datasets.Image):
        return "Image"
    return feature.dtype


def _contents_table(splits: Mapping[str, datasets.Dataset]) -> str:
    rows = []
    for split, dataset in splits.items():
        columns = dataset.select_columns(["category", "label", "mask_valid"]).to_dict()
        counts: Counter = Counter()
        for category, label, valid in zip(columns["category"], columns["label"], columns["mask_valid"], strict=True):
            counts[category, "images"] += 1
            counts[category, LABEL_NAMES[label]] += 1
            counts[category, "valid"] += valid
        for category in sorted({category for category, _ in counts}):
            numbers = [counts[category, key] for key in ("images", *LABEL_NAMES, "valid")]
            rows.append(f"| {split} | {category} | " + " | ".join(map(str, numbers)) + " |")
    return "\n".join(rows)


__all__ = [
    "DATASET_EXPORT_OUTPUT",
    "SourceNotes",
    "export_anomaly_dataset",
    "parse_shard_size",
    "read_source_notes",
    "render_dataset_card",
    "upload_anomaly_dataset",
    "write_parquet_shards",
]
