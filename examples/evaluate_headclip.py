#!/usr/bin/env python
# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""
Zero-shot evaluation: a trained HeadCLIP (model or adapter) on one or more data sets it was not trained on ->
per-category metrics (image AUROC / AP / F1-max, pixel AUROC / AP / F1-max / AUPRO), as a markdown table, JSON and
ROC / PR / PRO plots per category. `headclip evaluate` once per data set; the logic is in `headclip_hf.cli.evaluate`.

    python examples/evaluate_headclip.py --data data/visa data/mpdd --output_dir eval/ --model runs/mvtec/adapter

writes `eval/visa/` and `eval/mpdd/` (`results.md`, `results.json`, `plots/<category>.png`), one folder per data set
named after it. Every other option is `headclip evaluate`'s (`--model`, `--adapter`, `--layout`, `--batch_size`,
`--image_size`, `--overwrite`, ...: see `headclip evaluate --help`). All output folders are checked before the first
evaluation starts.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from headclip_hf.cli import main as headclip
from headclip_hf.cli._common import apply_flag_convention
from headclip_hf.cli.evaluate import EVALUATE_OUTPUT
from headclip_hf.files import check_output_folder


def main(argv: Sequence[str] | None = None) -> int:
    """Run `headclip evaluate` on each `--data` folder, writing `--output_dir/<data set name>`; the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other option is passed to `headclip evaluate` (see `headclip evaluate --help`).",
        allow_abbrev=False,  # abbreviations would take `headclip evaluate`'s options
    )
    parser.add_argument("--data", nargs="+", required=True, help="data set folders to evaluate on")
    parser.add_argument("--output_dir", "--out", required=True, help="parent folder of one output folder per data set")
    parser.add_argument("--overwrite", action="store_true", help="as `headclip evaluate --overwrite`")
    args, evaluate_options = apply_flag_convention(parser).parse_known_args(argv)
    outputs = {data: Path(args.output_dir) / Path(data).resolve().name for data in args.data}
    if len(set(outputs.values())) < len(outputs):
        print("evaluate_headclip: error: two --data folders have the same name; evaluate them apart.", file=sys.stderr)
        return 1
    overwrite = ["--overwrite"] if args.overwrite else []
    try:
        for output_dir in outputs.values():
            check_output_folder(output_dir, EVALUATE_OUTPUT, args.overwrite)
    except OSError as error:
        print(f"evaluate_headclip: error: {error}", file=sys.stderr)
        return 1
    for data, output_dir in outputs.items():
        status = headclip(["evaluate", data, "--output_dir", str(output_dir), *overwrite, *evaluate_options])
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
