"""What the benchmark scripts share: where the real CLIP architectures come from, and measuring in a child process."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# A folder holding one CLIP config folder per architecture (e.g. `clip-vit-base-patch16/config.json`).
CONFIGS_DIR_VARIABLE = "HEADCLIP_CONFIGS_DIR"
# glibc: blocks of this many bytes or more are mmapped and handed back to the system when freed, so that a process's
# peak resident set counts live memory, not freed blocks glibc keeps (its dynamic threshold keeps up to 32 MiB).
MMAP_THRESHOLD = 131072


def add_configs_dir_argument(parser: argparse.ArgumentParser) -> None:
    """`--configs_dir`, defaulting to the `HEADCLIP_CONFIGS_DIR` environment variable."""
    parser.add_argument(
        "--configs_dir",
        type=Path,
        default=os.environ.get(CONFIGS_DIR_VARIABLE),
        help=f"folder holding one CLIP config folder per case (config.json) (default: ${CONFIGS_DIR_VARIABLE})",
    )


def check_cases(
    parser: argparse.ArgumentParser,
    configs_dir: Path | None,
    cases: list[str],
    sizes: tuple[str, ...],
    allow_tiny: bool = False,
) -> None:
    """
    Stop with a usage error, before any work, unless every case is `config_folder:<sizes>` (positive whole numbers)
    naming a folder of `configs_dir` that holds a `config.json`; with `allow_tiny`, "tiny:<sizes>" needs no folder.
    """
    form = ":".join(("config_folder", *sizes))
    for case in cases:
        name, *values = case.split(":")
        if len(values) != len(sizes) or not all(value.isdigit() and int(value) > 0 for value in values):
            parser.error(f"case {case!r} is not {form} (positive whole numbers)")
        if allow_tiny and name == "tiny":
            continue
        if configs_dir is None:
            parser.error(
                f"pass --configs_dir DIR or set {CONFIGS_DIR_VARIABLE}: a folder holding the CLIP config folder of "
                "each case (e.g. clip-vit-base-patch16/config.json)"
            )
        if not (configs_dir / name / "config.json").is_file():
            parser.error(f"case {case!r}: {configs_dir / name / 'config.json'} does not exist")


def run_child(script: str, child: dict, what: str, live_memory: bool = True) -> dict:
    """
    Run `script --child <child as JSON>` in its own process (so that its memory is its own) and return the JSON
    object it prints last; with `live_memory`, under `MALLOC_MMAP_THRESHOLD_` ([`MMAP_THRESHOLD`]). A failed child
    stops the benchmark with `what` and the end of its error output.
    """
    environment = dict(os.environ)
    if live_memory:
        environment["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    command = [sys.executable, script, "--child", json.dumps(child)]
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
