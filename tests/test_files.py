"""Output folders and files: staged and moved into place, earlier outputs replaced, the user's files never lost."""

import json
import os
from pathlib import Path

import pytest

from headclip_hf import __version__
from headclip_hf.files import (
    OUTPUT_MARKER,
    OutputKind,
    check_output_file,
    check_output_folder,
    output_file,
    output_folder,
    output_marker_kind,
)

KIND = OutputKind("test output", frozenset({"result.json", "plots"}), patterns=("part-*.bin",))
OTHER_KIND = OutputKind("other output", frozenset({"result.json", "plots"}))


def write_output(staging: Path, text: str) -> None:
    (staging / "result.json").write_text(text)
    (staging / "plots").mkdir()
    (staging / "plots" / "a.png").write_text(text)
    (staging / "part-001.bin").write_text(text)


def test_new_folder_and_earlier_output_are_written_whole(tmp_path):
    target = tmp_path / "out" / "run"
    with output_folder(target, KIND) as staging:
        write_output(staging, "first")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "part-001.bin", "plots", "result.json"]
    marker = json.loads((target / OUTPUT_MARKER).read_text())
    assert (marker["kind"], marker["headclip_hf_version"]) == ("test output", __version__) and marker["date"]
    assert output_marker_kind(target) == "test output"
    with output_folder(target, KIND) as staging:  # an earlier output of the same kind is replaced as a whole
        (staging / "result.json").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "result.json"]
    assert (target / "result.json").read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["run"]  # no staging or previous folder left


def test_folder_with_user_files_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "mywork"
    (target / "sub").mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    (target / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(
        FileExistsError,
        match=r"mywork holds files that are not part of a test output \(notes.txt, sub\); it is not an earlier output "
        r"\(it has no \.headclip_output\.json marker\): nothing was written\. .* pass --overwrite "
        r"\(overwrite=True\) to write the test output there anyway \(every file there kept\)\.",
    ):
        check_output_folder(target, KIND)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        with output_folder(target, KIND) as staging:
            write_output(staging, "new")
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "sub"]
    assert (target / "sub" / "data.csv").read_text() == "1,2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mywork"]


def test_overwrite_replaces_only_the_kinds_own_entries(tmp_path):
    target = tmp_path / "mywork"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "part-009.bin").write_text("old part")
    (target / "result.json").write_text("old")
    with pytest.raises(
        FileExistsError, match=r"there anyway \(part-009.bin, result.json replaced, every other file kept\)"
    ):
        check_output_folder(target, KIND)
    with output_folder(target, KIND, overwrite=True) as staging:
        write_output(staging, "new")
    expected = [OUTPUT_MARKER, "notes.txt", "part-001.bin", "plots", "result.json"]
    assert sorted(p.name for p in target.iterdir()) == expected
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "result.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mywork"]
    # Now an earlier output, but next to the user's file: still refused without overwrite.
    with pytest.raises(FileExistsError, match=r"mywork holds files that are not part of a test output \(notes.txt\)"):
        check_output_folder(target, KIND)


@pytest.mark.parametrize(
    "user_entries",
    [("README.md", "data/raw.csv"), ("result.json",), ("plots/figure.png", "part-7.bin")],
    ids=["readme-and-data", "one-name-of-the-kind", "all-names-of-the-kind"],
)
def test_a_folder_without_the_marker_is_the_users_even_with_the_writers_names(tmp_path, user_entries):
    kind = OutputKind("test export", frozenset({"README.md", "data", "result.json", "plots"}), ("part-*.bin",))
    target = tmp_path / "proj"
    for name in user_entries:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(f"mine: {name}")
    with pytest.raises(
        FileExistsError, match=r"proj holds files that are not part of a test export \(.*\); it is not an earlier"
    ):
        with output_folder(target, kind) as staging:
            (staging / "README.md").write_text("new")
    for name in user_entries:
        assert (target / name).read_text() == f"mine: {name}"
    assert not (target / OUTPUT_MARKER).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["proj"]


def test_another_kinds_output_or_an_unreadable_marker_is_not_replaced(tmp_path):
    target = tmp_path / "run"
    with output_folder(target, OTHER_KIND) as staging:  # the same entry names, another writer
        (staging / "result.json").write_text("other")
    with pytest.raises(
        FileExistsError, match=r"run holds files .* test output \(result.json\); it holds a other output:"
    ):
        check_output_folder(target, KIND)
    (target / OUTPUT_MARKER).write_text("{ not json")
    assert output_marker_kind(target) is None
    with pytest.raises(
        FileExistsError, match=r"it is not an earlier output \(it has no .headclip_output.json marker\)"
    ):
        check_output_folder(target, KIND)
    assert (target / "result.json").read_text() == "other"
    with output_folder(tmp_path / "empty", KIND) as staging:  # an output with nothing but its marker
        pass
    with output_folder(tmp_path / "empty", OTHER_KIND) as staging:  # is empty: any writer may use it
        (staging / "plots").mkdir()
    assert output_marker_kind(tmp_path / "empty") == "other output"


@pytest.mark.parametrize(
    "working_folder, spelling",
    [("run", "."), ("run", "../sub/../run"), (".", "run")],
    ids=["dot-inside-it", "dot-dot", "relative"],
)
def test_relative_output_folders_and_the_working_folder(tmp_path, monkeypatch, working_folder, spelling):
    (tmp_path / "sub").mkdir()
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / working_folder)  # with "dot-inside-it", the shell is in the empty output folder
    folder = (tmp_path / "run").resolve()
    assert check_output_folder(spelling, KIND) == folder
    with output_folder(spelling, KIND) as staging:
        write_output(staging, "first")
    with output_folder(spelling, KIND) as staging:  # the earlier output, replaced
        (staging / "result.json").write_text("second")
    assert sorted(os.listdir(folder)) == [OUTPUT_MARKER, "result.json"]
    assert (folder / "result.json").read_text() == "second"
    assert sorted(os.listdir(".")) == sorted(os.listdir(tmp_path / working_folder))  # still the shell's folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "sub"]  # no staging or previous folder left


def test_error_while_writing_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "run"
    with output_folder(target, KIND) as staging:
        write_output(staging, "first")
    with pytest.raises(RuntimeError, match="interrupted"):
        with output_folder(target, KIND) as staging:
            (staging / "result.json").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "result.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("user_files", [False, True], ids=["earlier-output", "with-user-files"])
def test_failed_move_into_place_restores_the_previous_folder(tmp_path, monkeypatch, user_files):
    target = tmp_path / "run"
    with output_folder(target, KIND) as staging:
        write_output(staging, "previous")
    if user_files:
        (target / "notes.txt").write_text("mine")
    real_replace = os.replace

    def fail_moving_new_entries_in(source, destination):
        if ".partial" in str(source):
            raise OSError("device busy")
        return real_replace(source, destination)

    monkeypatch.setattr("headclip_hf.files.os.replace", fail_moving_new_entries_in)
    with pytest.raises(OSError, match="device busy"):
        with output_folder(target, KIND, overwrite=user_files) as staging:
            write_output(staging, "new")
    assert (target / "result.json").read_text() == "previous"
    assert (target / "plots" / "a.png").read_text() == "previous"
    expected = [OUTPUT_MARKER, "part-001.bin", "plots", "result.json"] + (["notes.txt"] if user_files else [])
    assert sorted(p.name for p in target.iterdir()) == sorted(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_unwritable_locations_are_refused_up_front(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="a_file is a file, not a folder"):
        check_output_folder(a_file, KIND)
    with pytest.raises(NotADirectoryError, match=r"Cannot write .*a_file/run: .*a_file is a file"):
        check_output_folder(a_file / "run", KIND)


def test_a_writer_creating_unlisted_entries_is_a_bug(tmp_path):
    with pytest.raises(RuntimeError, match=r"entries its OutputKind does not list: \['stray.txt'\]"):
        with output_folder(tmp_path / "run", KIND) as staging:
            (staging / "stray.txt").write_text("x")
    assert not (tmp_path / "run").exists()


def test_output_file_is_atomic_and_keeps_what_exists(tmp_path):
    path = tmp_path / "refs.safetensors"
    with output_file(path) as temporary:
        temporary.write_text("first")
    assert path.read_text() == "first"
    with pytest.raises(FileExistsError, match="refs.safetensors already exists"):
        with output_file(path) as temporary:
            temporary.write_text("second")
    with pytest.raises(RuntimeError):
        with output_file(path, overwrite=True) as temporary:
            temporary.write_text("half")
            raise RuntimeError
    assert path.read_text() == "first"
    with output_file(path, is_earlier_output=lambda p: p.read_text() == "first") as temporary:
        temporary.write_text("second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refs.safetensors"]
    with pytest.raises(IsADirectoryError, match="is a folder"):
        with output_file(tmp_path):
            pass


def test_output_files_are_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    assert check_output_file("sub/../refs.safetensors") == tmp_path.resolve() / "refs.safetensors"
    with output_file("./refs.safetensors") as temporary:
        temporary.write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refs.safetensors", "sub"]
    with pytest.raises(IsADirectoryError, match=f"{tmp_path.resolve()} is a folder"):
        check_output_file(".")
