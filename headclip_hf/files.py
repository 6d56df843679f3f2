# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Writing outputs without losing anything the user had.

Every folder this package writes (adapters, models, detections, evaluations, exports, ...) goes through
[`output_folder`]: the files are written into a staging folder next to the target and moved into place only when
all of them are complete, so an interrupted run never leaves a half-written or mixed output under the final name.
Each output folder also gets a hidden marker file, `.headclip_output.json` ([`OUTPUT_MARKER`]: the writer's
[`OutputKind`] name, the package version, the date), which tells an earlier output from a folder of the user's. What
may already be in the target:

- no target, or an empty one: the staging folder becomes the target;
- an earlier output of the same kind (its marker names the kind, and it holds only the kind's entries): it is
  replaced as a whole;
- anything else (a folder without the marker, even one whose files have the writer's names, such as `README.md` or
  `data/`; another kind's output; an earlier output next to the user's files): refused with a `FileExistsError`
  that names the entries, unless `overwrite=True`, which replaces only the entries with the kind's names and leaves
  every other file where it is.

[`check_output_folder`] runs the same checks up front, so that a command refuses a bad output location before any
expensive work. Paths are resolved (`~`, `.`, `..`, symbolic links) first. The marker is never uploaded
(`headclip_hf.hub.upload_hub_folder` sends only a kind's entries) and loaders skip it (a hidden file). Single files go
through [`output_file`] (written under a temporary name, then renamed).
"""

import datetime
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# How many of a folder's foreign entries an error message lists.
_LISTED_ENTRIES = 5
# The hidden file every output folder holds: which kind of output it is (see the module docstring).
OUTPUT_MARKER = ".headclip_output.json"


@dataclass(frozen=True)
class OutputKind:
    """
    What one writer of this package puts in a folder, to tell its own entries from the user's.

    Args:
        name (`str`): What the folder holds, for messages, e.g. "HeadCLIP adapter".
        entries (`frozenset[str]`): Exact names of the files and sub-folders the writer creates at the top level.
        patterns (`tuple[str, ...]`, *optional*): `fnmatch` patterns for names with a variable part (sharded weights).
    """

    name: str
    entries: frozenset[str]
    patterns: tuple[str, ...] = field(default=())

    def owns(self, entry_name: str) -> bool:
        """Whether a top-level entry called `entry_name` is one this writer creates (the marker is every writer's)."""
        return (
            entry_name == OUTPUT_MARKER
            or entry_name in self.entries
            or any(fnmatch.fnmatchcase(entry_name, p) for p in self.patterns)
        )


def output_marker_kind(folder: str | os.PathLike) -> str | None:
    """The name of the [`OutputKind`] whose output `folder` holds, from its marker; `None` without a readable one."""
    try:
        record = json.loads((Path(folder) / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record.get("kind") if isinstance(record, dict) and isinstance(record.get("kind"), str) else None


def _write_marker(folder: Path, kind: OutputKind) -> None:
    from . import __version__  # the package imports this module

    record = {
        "kind": kind.name,
        "headclip_hf_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / OUTPUT_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _foreign_entries(folder: Path, kind: OutputKind) -> list[str]:
    """
    The entries of `folder` that are not part of an earlier output of `kind`: in a folder whose marker names `kind`,
    those the kind does not write; in any other non-empty folder, all of them.
    """
    if not folder.is_dir():
        return []
    names = sorted(entry.name for entry in folder.iterdir() if entry.name != OUTPUT_MARKER)
    if output_marker_kind(folder) != kind.name:
        return names
    return [name for name in names if not kind.owns(name)]


def _describe_entries(names: list[str]) -> str:
    listed = ", ".join(names[:_LISTED_ENTRIES])
    return listed + (f" and {len(names) - _LISTED_ENTRIES} more" if len(names) > _LISTED_ENTRIES else "")


def _nearest_existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def _check_writable_location(path: Path) -> None:
    """Raise an `OSError` naming `path` when it cannot be created or written (a file on its way, no permission)."""
    ancestor = _nearest_existing_ancestor(path.parent)
    if not ancestor.is_dir():
        raise NotADirectoryError(f"Cannot write {path}: {ancestor} is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write {path}: the folder {ancestor} is not writable.")


def resolve_path(path: str | os.PathLike) -> Path:
    """`path` as an absolute path without `~`, `.`, `..` or symbolic links: what the output functions work on."""
    return Path(path).expanduser().resolve()


def check_writable_folder(folder: str | os.PathLike, what: str = "the output") -> Path:
    """
    Check that `folder` is, or can be created as, a folder this process can write into (the checks of
    [`check_output_folder`] that do not depend on what is in it, for writers that add to a folder, such as a
    training run's output folder).

    Args:
        folder (`str` or `os.PathLike`): The folder.
        what (`str`, *optional*): What goes there, for the message.

    Returns:
        `Path`: `folder`, resolved ([`resolve_path`]).

    Raises:
        `NotADirectoryError`: `folder` (or a folder on its way) is a file.
        `PermissionError`: `folder` cannot be created or written.
    """
    folder = resolve_path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder: choose a folder for {what}.")
    _check_writable_location(folder)
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write {folder}: the folder is not writable.")
    return folder


def _refusal(folder: Path, kind: OutputKind, foreign: list[str]) -> FileExistsError:
    """The error for a `folder` holding `foreign` entries, saying what it holds and what `--overwrite` would do."""
    marker_kind = output_marker_kind(folder)
    what = f"holds files that are not part of a {kind.name} ({_describe_entries(foreign)})"
    if marker_kind is None:
        what += f"; it is not an earlier output (it has no {OUTPUT_MARKER} marker)"
    elif marker_kind != kind.name:
        what += f"; it holds a {marker_kind}"
    replaced = sorted(
        entry.name for entry in folder.iterdir() if entry.name != OUTPUT_MARKER and kind.owns(entry.name)
    )
    kept = f"{_describe_entries(replaced)} replaced, every other file kept" if replaced else "every file there kept"
    return FileExistsError(
        f"{folder} {what}: nothing was written. Choose a new or empty folder, or pass --overwrite (overwrite=True) "
        f"to write the {kind.name} there anyway ({kept})."
    )


def check_output_folder(folder: str | os.PathLike, kind: OutputKind, overwrite: bool = False) -> Path:
    """
    Check that [`output_folder`] may write `folder`, before any work is done.

    Args:
        folder (`str` or `os.PathLike`): The output folder.
        kind (`OutputKind`): What will be written there.
        overwrite (`bool`, *optional*, defaults to `False`): Whether the kind's own entries may be replaced in a
            folder that is not an earlier output of the kind alone (see the module docstring).

    Returns:
        `Path`: `folder`, resolved ([`resolve_path`]).

    Raises:
        `NotADirectoryError`: `folder` (or a folder on its way) is a file.
        `FileExistsError`: `folder` is neither empty nor an earlier output of the kind, and `overwrite` is false.
        `PermissionError`: `folder` cannot be created or written.
    """
    folder = resolve_path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder: choose a folder for the {kind.name}.")
    foreign = _foreign_entries(folder, kind)
    if foreign and not overwrite:
        raise _refusal(folder, kind, foreign)
    return check_writable_folder(folder, f"the {kind.name}")


def replace_directory(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """
    Move the complete folder `staging` to `target` (same file system). A previous `target` is moved aside under a
    fresh hidden name first and deleted last; if the move fails, it is put back.
    """
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".previous", dir=target.parent))
    previous = aside / target.name
    os.replace(target, previous)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(previous, target)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _swap_own_entries(staging: Path, folder: Path, kind: OutputKind) -> None:
    """Replace the kind's entries of `folder` by those of `staging`, one by one, leaving every other entry alone."""
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".previous", dir=folder.parent))
    moved_aside, placed = [], []
    try:
        for entry in sorted(folder.iterdir()):
            if kind.owns(entry.name):
                os.replace(entry, aside / entry.name)
                moved_aside.append(entry.name)
        for entry in sorted(staging.iterdir()):
            os.replace(entry, folder / entry.name)
            placed.append(entry.name)
    except BaseException:
        for name in placed:
            os.replace(folder / name, staging / name)
        for name in moved_aside:
            os.replace(aside / name, folder / name)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _apply_default_permissions(path: Path) -> None:
    """`mkdtemp` / `mkstemp` make owner-only entries; outputs get the usual permissions of the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def output_folder(folder: str | os.PathLike, kind: OutputKind, overwrite: bool = False) -> Iterator[Path]:
    """
    Write the output folder `folder` atomically: yields an empty staging folder next to it; when the block ends
    without an error the staging folder's entries, and the marker [`OUTPUT_MARKER`], take their place in `folder`
    (see the module docstring for what may already be there), otherwise the staging folder is deleted and `folder` is
    left exactly as it was.

    Args:
        folder (`str` or `os.PathLike`): The output folder.
        kind (`OutputKind`): What the block writes; every entry it creates must be one of the kind's.
        overwrite (`bool`, *optional*, defaults to `False`): Replace the kind's entries in a folder that also holds
            other files (those stay).

    Raises:
        The errors of [`check_output_folder`], up front and again when the output is moved into place.
    """
    folder = check_output_folder(folder, kind, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    _apply_default_permissions(staging)
    try:
        yield staging
        strangers = [entry.name for entry in staging.iterdir() if not kind.owns(entry.name)]
        if strangers:
            raise RuntimeError(f"The {kind.name} writer created entries its OutputKind does not list: {strangers}.")
        _write_marker(staging, kind)
        check_output_folder(folder, kind, overwrite)  # the folder may have changed while the output was written
        # A folder with other files keeps them; the working folder (`--output_dir .`) or one holding it stays the
        # same folder, so that the shell in it sees the new files.
        working_folder = Path.cwd().resolve()
        in_use = folder == working_folder or folder in working_folder.parents
        if folder.is_dir() and (in_use or _foreign_entries(folder, kind)):
            _swap_own_entries(staging, folder, kind)
        else:
            replace_directory(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_output_file(
    path: str | os.PathLike, overwrite: bool = False, is_earlier_output: Callable[[Path], bool] | None = None
) -> Path:
    """
    Check that [`output_file`] may write the file `path`: its folder can be written, and an existing file is replaced
    only with `overwrite` or when `is_earlier_output(path)` says it is an earlier output of the same writer.

    Returns:
        `Path`: `path`, resolved ([`resolve_path`]).

    Raises:
        `IsADirectoryError`: `path` is a folder.
        `FileExistsError`: `path` exists, is not an earlier output, and `overwrite` is false.
        `NotADirectoryError` / `PermissionError`: the file cannot be created.
    """
    path = resolve_path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give a file name for the output.")
    if path.exists() and not overwrite and not (is_earlier_output is not None and is_earlier_output(path)):
        raise FileExistsError(
            f"{path} already exists and was not written by this command: nothing was written. Choose another file "
            "name, or pass --overwrite (overwrite=True) to replace it."
        )
    _check_writable_location(path)
    return path


@contextmanager
def output_file(
    path: str | os.PathLike, overwrite: bool = False, is_earlier_output: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """
    Write the file `path` atomically: yields a temporary path in the same folder, renamed to `path` when the block
    ends without an error (and deleted otherwise). Checks as [`check_output_file`].
    """
    path = check_output_file(path, overwrite, is_earlier_output)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    _apply_default_permissions(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


__all__ = [
    "OUTPUT_MARKER",
    "OutputKind",
    "check_output_file",
    "check_output_folder",
    "check_writable_folder",
    "output_file",
    "output_folder",
    "output_marker_kind",
    "replace_directory",
    "resolve_path",
]
