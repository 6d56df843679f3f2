# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""Writing outputs without losing anything the user had.

Every folder this package writes (adapters, models, detections, evaluations, exports, ...) goes through
[`output_folder`]: the files are written into a staging folder next to the target and moved into place only when
all of them are complete, so an interrupted run never leaves a half-written or mixed output under the final name.
What may already be in the target is decided by the writer's [`OutputKind`], the names it writes:

- no target, or an empty one: the staging folder becomes the target;
- a target holding only the entries of an earlier output of the same kind: it is replaced as a whole;
- a target holding anything else (the user's files): refused with a `FileExistsError` that names those entries,
  unless `overwrite=True`, which replaces only the kind's own entries and leaves every other file where it is.

[`check_output_folder`] runs the same checks up front, so that a command refuses a bad output location before any
expensive work. Single files go through [`output_file`] (written under a temporary name, then renamed).
"""

import fnmatch
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# How many of a folder's foreign entries an error message lists.
_LISTED_ENTRIES = 5


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
        """Whether a top-level entry called `entry_name` is one this writer creates."""
        return entry_name in self.entries or any(fnmatch.fnmatchcase(entry_name, p) for p in self.patterns)


def _foreign_entries(folder: Path, kind: OutputKind) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if not kind.owns(entry.name))


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


def check_output_folder(folder: str | os.PathLike, kind: OutputKind, overwrite: bool = False) -> Path:
    """
    Check that [`output_folder`] may write `folder`, before any work is done.

    Args:
        folder (`str` or `os.PathLike`): The output folder.
        kind (`OutputKind`): What will be written there.
        overwrite (`bool`, *optional*, defaults to `False`): Whether the kind's own entries may be replaced in a
            folder that also holds other files.

    Returns:
        `Path`: `folder`, with `~` expanded.

    Raises:
        `NotADirectoryError`: `folder` (or a folder on its way) is a file.
        `FileExistsError`: `folder` holds entries the kind does not write and `overwrite` is false.
        `PermissionError`: `folder` cannot be created or written.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder: choose a folder for the {kind.name}.")
    foreign = _foreign_entries(folder, kind)
    if foreign and not overwrite:
        raise FileExistsError(
            f"{folder} holds files that are not part of a {kind.name} ({_describe_entries(foreign)}): nothing was "
            "written. Choose a new or empty folder, or pass --overwrite (overwrite=True) to replace only the "
            f"{kind.name} files there and keep the others."
        )
    _check_writable_location(folder if folder.exists() else folder.parent / folder.name)
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write {folder}: the folder is not writable.")
    return folder


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
    without an error the staging folder's entries take their place in `folder` (see the module docstring for what may
    already be there), otherwise the staging folder is deleted and `folder` is left exactly as it was.

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
        check_output_folder(folder, kind, overwrite)  # the folder may have changed while the output was written
        if folder.is_dir() and _foreign_entries(folder, kind):
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

    Raises:
        `IsADirectoryError`: `path` is a folder.
        `FileExistsError`: `path` exists, is not an earlier output, and `overwrite` is false.
        `NotADirectoryError` / `PermissionError`: the file cannot be created.
    """
    path = Path(path).expanduser()
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
    "OutputKind",
    "check_output_file",
    "check_output_folder",
    "output_file",
    "output_folder",
    "replace_directory",
]
