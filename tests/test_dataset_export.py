"""`export_anomaly_dataset` and `headclip dataset export`: round trips on the real images (moved, bit for bit),
the dataset card, evaluation of an export (streaming too, sharded by node), the Hub upload up to the network call."""

import json
import math
import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard
from test_data import make_generic_tree, make_mvtec_tree
from test_hub import RecordingHfApi

from headclip_hf import HeadCLIPProcessor, export_anomaly_dataset, load_anomaly_dataset
from headclip_hf import evaluation as evaluation_module
from headclip_hf.cli import main
from headclip_hf.dataset_export import SourceNotes, dataset_info_notes, read_source_notes
from headclip_hf.evaluation import evaluate_model
from headclip_hf.metrics import AnomalyMetricsAccumulator

REAL_SOURCES = {"bottle": ("mvtec_ad", "bottle"), "colon": ("kvasir_seg", "colon")}


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """`datasets` caches (of the commands, which take no cache_dir) go to the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


@pytest.fixture(scope="module")
def exported(test_data_dir, tmp_path_factory):
    """The real bottle and colon sets exported, then moved to another folder: name -> (source folder, export)."""
    base = tmp_path_factory.mktemp("exports")
    folders = {}
    for name, parts in REAL_SOURCES.items():
        source = test_data_dir.joinpath(*parts).resolve()
        export_anomaly_dataset(source, base / "written" / name, max_shard_size="20MB", cache_dir=base / "cache")
        moved = base / "moved" / name
        moved.parent.mkdir(exist_ok=True)
        shutil.move(base / "written" / name, moved)
        folders[name] = (source, moved)
    return folders


@pytest.fixture(scope="module")
def small_bottle(test_data_dir, tmp_path_factory):
    """Every fifth real bottle image (4 normal, 13 anomalous, with their masks) copied into a folder, and its export
    moved elsewhere: (source folder, export)."""
    base = tmp_path_factory.mktemp("small_bottle")
    bottle = test_data_dir / "mvtec_ad" / "bottle"
    source = base / "bottle"
    for image in sorted(bottle.glob("*/*.png"))[::5]:
        (source / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, source / image.parent.name / image.name)
        mask = bottle / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
        if mask.is_file():
            (source / "ground_truth" / image.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(mask, source / "ground_truth" / image.parent.name / mask.name)
    export_anomaly_dataset(source, base / "written", cache_dir=base / "cache")
    shutil.move(base / "written", base / "moved")
    return source, base / "moved"


@pytest.mark.parametrize("name", list(REAL_SOURCES))
def test_export_moved_elsewhere_loads_the_same_rows_bit_for_bit(exported, name, tmp_path):
    source, export = exported[name]
    original = load_anomaly_dataset(source, cache_dir=tmp_path / "cache")

    loaded = load_anomaly_dataset(export, cache_dir=tmp_path / "cache")

    assert loaded.features == original.features
    for key in ("label", "category", "defect_type", "mask_valid"):
        assert list(loaded[key]) == list(original[key]), key
    assert list(loaded["path"]) == [str(Path(path).relative_to(source)) for path in original["path"]]
    raw_loaded = loaded.cast_column("image", datasets.Image(decode=False)).cast_column(
        "mask", datasets.Image(decode=False)
    )
    raw_original = original.cast_column("mask", datasets.Image(decode=False))
    for row, before, path in zip(raw_loaded, raw_original, original["path"], strict=True):
        assert row["image"]["bytes"] == Path(path).read_bytes()  # the source file, embedded as it is
        assert (row["mask"] is None) == (before["mask"] is None)
        if row["mask"] is not None:
            assert row["mask"]["bytes"] == before["mask"]["bytes"]
    for shard in sorted((export / "data").iterdir()):
        assert str(source).encode() not in shard.read_bytes()  # no absolute path anywhere
        table = pq.read_table(shard)
        stored_paths = table["path"].to_pylist() + [image["path"] for image in table["image"].to_pylist()]
        assert not any(Path(path).is_absolute() for path in stored_paths)


def test_shards_follow_max_shard_size(exported):
    _, export = exported["bottle"]  # 83 PNGs of about 0.5 MB: three shards of at most 20 MB
    shards = sorted(path.name for path in (export / "data").iterdir())
    total = sum(path.stat().st_size for path in (export / "data").iterdir())
    assert shards == [f"test-{index:05d}-of-{len(shards):05d}.parquet" for index in range(len(shards))]
    assert len(shards) == math.ceil(total / 20e6) == 3


def test_dataset_card_has_features_counts_licence_and_citation(exported):
    _, bottle = exported["bottle"]
    _, colon = exported["colon"]

    card = DatasetCard.load(bottle / "README.md")
    assert card.data.license == "cc-by-nc-sa-4.0"  # recognised in ../shared/data/README.md
    assert card.data.configs == [{"config_name": "default", "data_files": [{"split": "test", "path": "data/test-*"}]}]
    features = {feature["name"]: feature["dtype"] for feature in card.data.dataset_info["features"]}
    assert features["image"] == features["mask"] == "image"
    assert features["label"] == {"class_label": {"names": {"0": "normal", "1": "anomaly"}}}
    assert card.data.dataset_info["splits"] == [{"name": "test", "num_bytes": 0, "num_examples": 83}]
    assert card.text.startswith("\n# mvtec_ad/bottle\n")
    assert "| test | bottle | 83 | 20 | 63 | 83 |" in card.text
    assert (
        "## Licence\n\nMVTec AD: CC BY-NC-SA 4.0, Copyright MVTec Software GmbH. Non-commercial use only.\n"
        in card.text
    )
    assert '## Citation\n\nBergmann et al., "MVTec AD - A Comprehensive Real-World Dataset' in card.text
    assert "/" + "shared/data" not in card.content

    colon_card = DatasetCard.load(colon / "README.md")
    assert colon_card.data.license == "other"
    assert "| test | colon | 120 | 0 | 120 | 120 |" in colon_card.text
    assert "Kvasir-SEG: free for research and education." in colon_card.text
    assert 'Jha et al., "Kvasir-SEG: A Segmented Polyp Dataset", MMM 2020.' in colon_card.text


def test_source_notes_from_a_dataset_card(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nlicense: apache-2.0\n---\n# Widgets\n\n## Citation\n\n"
        "```bibtex\n@article{widgets,\n  title={Widgets}\n}\n```\n"
    )
    notes = read_source_notes(make_generic_tree(tmp_path / "widgets"))
    assert notes.license == "apache-2.0"
    assert notes.citation == "@article{widgets,\n  title={Widgets}\n}"
    assert read_source_notes(tmp_path / "widgets", levels=0).license is None  # the README is one level up


def test_source_notes_of_an_in_memory_data_set(tmp_path):
    # A `datasets` data set carries its licence and citation in its DatasetInfo: the card takes them from there.
    root = make_mvtec_tree(tmp_path / "mvtec")
    rows = load_anomaly_dataset(root, cache_dir=tmp_path / "cache")
    citation = "@article{widgets,\n  title={Widgets}\n}"
    rows.info.license, rows.info.citation = "cc-by-nc-sa-4.0", citation
    export_anomaly_dataset(datasets.DatasetDict({"test": rows}), tmp_path / "export")
    card = DatasetCard.load(tmp_path / "export" / "README.md")
    assert card.data.license == "cc-by-nc-sa-4.0" and citation in card.text

    rows.info.license = "CC BY-NC-SA 4.0: non-commercial use only"
    notes = dataset_info_notes(rows)
    assert (notes.license, notes.license_text, notes.citation) == ("cc-by-nc-sa-4.0", rows.info.license, citation)
    assert dataset_info_notes(str(root)) == SourceNotes()
    rows.info.license = rows.info.citation = ""
    assert dataset_info_notes(rows) == SourceNotes()


def results_of(folder: Path) -> dict:
    """The metrics of an evaluation run (its provenance, which names the data source and the date, left out)."""
    results = json.loads((folder / "results.json").read_text())
    results.pop("provenance")
    return results


def assert_same_numbers(left, right, where="results"):
    """Equal JSON trees, numbers to 1e-9."""
    if isinstance(left, dict):
        assert set(left) == set(right), where
        for key in left:
            assert_same_numbers(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, list):
        assert len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            assert_same_numbers(a, b, f"{where}[{index}]")
    elif isinstance(left, float):
        assert right == pytest.approx(left, abs=1e-9), where
    else:
        assert left == right, where


def test_evaluate_on_the_export_and_streaming_equals_the_folder(small_bottle, headclip_checkpoint, tmp_path, capsys):
    source, export = small_bottle
    common = ("--model", headclip_checkpoint, "--batch_size", 32, "--device", "cpu", "--no_plots")
    runs = {"folder": (source,), "export": (export,), "streaming": (export, "--streaming")}
    for name, arguments in runs.items():
        status = main(["evaluate", *map(str, (*arguments, *common, "--out", tmp_path / name))])
        assert status == 0, capsys.readouterr().err
    folder = results_of(tmp_path / "folder")
    assert folder["categories"]["bottle"]["counts"]["num_images"] == 17
    assert_same_numbers(folder, results_of(tmp_path / "export"))
    assert_same_numbers(folder, results_of(tmp_path / "streaming"))


class FakeProcess:
    """`PartialState` of process `index` of 2."""

    def __init__(self, index: int):
        self.num_processes, self.process_index, self.is_main_process = 2, index, index == 0


def test_streaming_evaluation_is_sharded_by_node(small_bottle, tiny_model, clip_tokenizer, monkeypatch):
    _, export = small_bottle
    processor = HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64)
    whole = evaluate_model(tiny_model, processor, load_anomaly_dataset(export), batch_size=16, show_progress=False)
    states = []
    monkeypatch.setattr(evaluation_module, "gather_object", lambda objects: states.extend(objects) or objects)
    for index in (0, 1):
        monkeypatch.setattr(evaluation_module, "PartialState", lambda index=index: FakeProcess(index))
        streamed = load_anomaly_dataset(export, streaming=True)
        part = evaluate_model(tiny_model, processor, streamed, batch_size=16, show_progress=False)
        assert 0 < part.categories["bottle"].counts["num_images"] < 17
    merged = AnomalyMetricsAccumulator.from_state_dict(states[0]).merge(
        AnomalyMetricsAccumulator.from_state_dict(states[1])
    )
    results = merged.compute()
    assert results.categories["bottle"].counts == whole.categories["bottle"].counts  # every image once
    for name, metric in whole.categories["bottle"].metrics.items():
        assert results.categories["bottle"].metrics[name].value == pytest.approx(metric.value, abs=1e-9), name


def test_several_splits_and_small_shards_keep_the_rows_in_order(tmp_path):
    root = make_mvtec_tree(tmp_path / "mvtec")

    export_anomaly_dataset(root, tmp_path / "export", splits=["test", "train"], max_shard_size="8KB")

    shards = sorted(path.name for path in (tmp_path / "export" / "data").iterdir())
    for split in ("test", "train"):  # 5 and 3 images of 3 KB each (PNG noise): shards of at most 8 KB
        names = [name for name in shards if name.startswith(f"{split}-")]
        assert len(names) > 1 and names == [f"{split}-{i:05d}-of-{len(names):05d}.parquet" for i in range(len(names))]
    for split in ("test", "train"):
        original = load_anomaly_dataset(root, split=split, cache_dir=tmp_path / "cache")
        loaded = load_anomaly_dataset(tmp_path / "export", split=split, cache_dir=tmp_path / "cache")
        assert list(loaded["path"]) == [str(Path(path).relative_to(root)) for path in original["path"]]
        assert list(loaded["label"]) == list(original["label"])


def test_export_and_push_to_hub(tmp_path, monkeypatch, capsys):
    RecordingHfApi.calls = []  # the stand-in for HfApi of the model tests (test_hub.py)
    monkeypatch.setattr("headclip_hf.hub.HfApi", RecordingHfApi)
    root = make_generic_tree(tmp_path / "widgets")
    out = tmp_path / "export"

    status = main(
        ["dataset", "export", str(root), "--output-dir", str(out), "--push-to-hub", "someone/widgets", "--private"]
        + ["--token", "hf_test", "--license", "cc-by-4.0", "--citation", "Someone, Widgets, 2026."]
    )

    captured = capsys.readouterr()
    assert status == 0, captured.err
    calls = dict(RecordingHfApi.calls)
    assert [name for name, _ in RecordingHfApi.calls] == ["init", "whoami", "init", "create_repo", "upload_folder"]
    assert calls["init"] == {"token": "hf_test"}  # the login is checked first
    assert calls["create_repo"] == {
        "repo_id": "someone/widgets",
        "repo_type": "dataset",
        "private": True,
        "exist_ok": True,
    }
    upload = calls["upload_folder"]
    assert (upload["repo_id"], upload["repo_type"], Path(upload["folder_path"])) == ("someone/widgets", "dataset", out)
    assert upload["files"] == {"README.md", "data/test-00000-of-00001.parquet"}
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "cc-by-4.0" and "Someone, Widgets, 2026." in card.text
    assert 'load_anomaly_dataset("someone/widgets", split="test")' in card.text
    assert "commit/abc" in captured.out


def test_push_to_hub_uploads_only_the_export_of_a_shared_folder(tmp_path, monkeypatch, capsys):
    RecordingHfApi.calls = []
    monkeypatch.setattr("headclip_hf.hub.HfApi", RecordingHfApi)
    root = make_generic_tree(tmp_path / "widgets")
    out = tmp_path / "project"
    (out / "private").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "private" / "secrets.csv").write_text("a,b")

    status = main(["dataset", "export", str(root), "--output_dir", str(out), "--overwrite", "--push_to_hub", "a/b"])

    assert status == 0, capsys.readouterr().err
    upload = dict(RecordingHfApi.calls)["upload_folder"]
    assert upload["files"] == {"README.md", "data/test-00000-of-00001.parquet"}  # not the user's other files
    assert (out / "notes.txt").read_text() == "mine" and (out / "private" / "secrets.csv").read_text() == "a,b"


def test_export_errors_come_before_any_work(tmp_path, capsys):
    root = make_generic_tree(tmp_path / "widgets")
    out = tmp_path / "export"

    def export(*extra):
        status = main(["dataset", "export", str(root), "--output_dir", str(out), *map(str, extra)])
        return status, capsys.readouterr().err

    status, err = export("--push_to_hub", "not a valid id!!")
    assert status == 1 and "headclip: error: 'not a valid id!!' is not a valid Hub repository id" in err
    status, err = export("--max_shard_size", "lots")
    assert status == 1 and "max_shard_size 'lots' is not a size" in err
    status, err = export("--push_to_hub", "someone/widgets")  # HF_HUB_OFFLINE=1
    assert status == 1 and "Cannot upload to the Hugging Face Hub" in err and "leave out --push_to_hub" in err
    status, err = export("--image_column", "picture")
    assert status == 1 and "image_column name columns of a table" in err
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    status, err = export()
    assert status == 1 and "holds files that are not part of a HeadCLIP data set export (notes.txt)" in err
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="An export writes whole splits"):
        export_anomaly_dataset(root, tmp_path / "other", streaming=True)


def test_evaluate_takes_the_data_flags(tmp_path, capsys):
    status = main(["evaluate", "someone/not-cached", "--split", "test", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert status == 1
    assert "headclip: error: Cannot load the Hub data set someone/not-cached" in err  # named once
    assert "Cannot load the data set" not in err
    # The tests run offline (HF_HUB_OFFLINE=1): the advice is not to set what is already set.
    assert "`datasets` is offline here (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and its local cache holds no copy" in err
    assert "set HF_DATASETS_OFFLINE=1" not in err
    table = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"picture": ["a.png"], "label": [0]}).to_parquet(table)
    status = main(["evaluate", str(table), "--image_column", "img", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert status == 1 and "image_column='img' is not a column of" in err and "['picture', 'label']" in err
