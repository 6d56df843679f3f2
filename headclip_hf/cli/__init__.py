# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""The `headclip` command: one module per sub-command, one flag convention, one error path.

    headclip detect images/ --output_dir detections/                     # default model from the Hub
    headclip evaluate data/visa --model runs/mvtec/adapter --output_dir eval/visa
    headclip calibrate data/my_line --model runs/mvtec/adapter --output_dir runs/my_line/adapter
    headclip train --train_data data/mvtec_ad --output_dir runs/mvtec
    headclip push --model runs/mvtec/adapter --results eval/visa --repo_id user/headclip-mvtec ...
    headclip references good/ --model runs/mvtec/adapter --output_file refs.safetensors   # few-shot references
    headclip convert anomalyclip ...
    headclip dataset export data/mvtec_ad --output_dir exports/mvtec_ad --push_to_hub user/mvtec-ad
    headclip demo --model runs/mvtec/adapter                             # try it in the browser
    headclip export --model runs/mvtec/adapter --format onnx --output_dir exports/headclip-onnx

`headclip <command> --help` documents each command. Conventions shared by every command:

- Flags use transformers' underscore spelling (`--output_dir`, `--batch_size`, the names `headclip train` shares with
  `TrainingArguments`); every flag also accepts the dash spelling (`--output-dir`), and `--out` is short for
  `--output_dir`. Help shows the underscore spelling only.
- A user error (a missing file, an unwritable output folder, an invalid value, no network for a Hub id) is one line
  `headclip: error: <what is wrong and what to do>` on stderr and exit status 1, without a traceback; set
  `HEADCLIP_DEBUG=1` to see the traceback. Ctrl-C exits with status 130.
- Output folders are written whole or not at all (`headclip_hf.files`); a folder holding other files is refused
  unless `--overwrite`.

Each command module has `add_parser(commands)` (it sets `handler=run` as the parser default) and `run(args) -> int`.
`train` takes the arguments of `examples/train_headclip.py` (`headclip_hf.training.main`, an `HfArgumentParser`).
"""

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from . import calibrate, convert, dataset, demo, detect, evaluate, export, push, references, train
from ._common import CommandError, HelpFormatter, apply_flag_convention

COMMANDS = (detect, evaluate, calibrate, references, train, push, convert, dataset, demo, export)


def build_parser() -> argparse.ArgumentParser:
    """The `headclip` argument parser (`headclip train` arguments go to the training example's own parser)."""
    parser = argparse.ArgumentParser(
        prog="headclip",
        description="HeadCLIP zero-shot anomaly detection: anomaly maps and scores for images of unseen objects.",
        epilog="`headclip <command> --help` shows each command's options and examples. Every option also accepts "
        "the dash spelling (--output-dir for --output_dir).",
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for command in COMMANDS:
        command.add_parser(commands)
    return apply_flag_convention(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `headclip` command with `argv` (default: the process arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def run_command() -> int:
        if argv[:1] == ["train"]:
            train.main(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        return args.handler(args)

    return report_errors(run_command)


def report_errors(command: Callable[[], object], prog: str = "headclip") -> int:
    """
    Run `command()` on the `headclip` error path, for the command and the example scripts: a user error
    (`CommandError`, `ValueError`, `OSError`) is one line `<prog>: error: <message>` on stderr and exit status 1,
    without a traceback (`HEADCLIP_DEBUG=1` shows it); Ctrl-C is status 130.

    Returns:
        The exit status: `command()`'s when it returns an `int`, else 0.
    """
    try:
        status = command()
    except (CommandError, ValueError, OSError) as error:
        if os.environ.get("HEADCLIP_DEBUG"):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


__all__ = ["COMMANDS", "CommandError", "build_parser", "main", "report_errors"]
