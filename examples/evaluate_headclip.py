#!/usr/bin/env python
# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""
Zero-shot evaluation: a trained HeadCLIP (model or adapter) on one or more data sets it was not trained on ->
per-category metrics (image AUROC / AP / F1-max, pixel AUROC / AP / F1-max / AUPRO), as a markdown table, JSON and
ROC / PR / PRO plots per category. `headclip evaluate` once per data set; the logic is in `headclip_hf.cli.evaluate`.

    python examples/evaluate_headclip.py --data data/visa data/mpdd --output_dir eval/ --model runs/mvtec/adapter

writes `eval/visa/` and `eval/mpdd/` (`results.md`, `results.json`, `plots/<category>.png`), one folder per data set
named after it. Every other option is `headclip evaluate`'s (`--model`, `--adapter`, `--layout`, `--batch_size`,
`--image_size`, ...: see `headclip evaluate --help`). All output folders are checked before the first evaluation.

Few-shot protocol: `--k_shot 4 --k_shot_seeds 0 1 2` draws 4 normal reference images per category and seed (from the
layout's training normals, MVTec AD / VisA `train/good`, else from the test normals, which are then left out of that
category's evaluation) and writes `eval/<data set>/k_shot_results.md` (mean ± standard deviation over the seeds),
`k_shot_results.json` (with the reference files used) and each seed's results under `seed_<seed>/`.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from headclip_hf.cli import main as headclip
from headclip_hf.cli._common import apply_flag_convention, positive_int
from headclip_hf.files import check_output_folder
from headclip_hf.reporting import evaluate_output_kind


def main(argv: Sequence[str] | None = None) -> int:
    """Run `headclip evaluate` on each `--data` folder, writing `--output_dir/<data set name>`; the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Any other option is passed to `headclip evaluate` (see `headclip evaluate --help`).",
        allow_abbrev=False,  # abbreviations would take `headclip evaluate`'s options
    )
    parser.add_argument("--data", nargs="+", required=True, help="data set folders to evaluate on")
    parser.add_argument("--output_dir", "--out", required=True, help="parent folder of one output folder per data set")
    parser.add_argument("--overwrite", action="store_true", help="as `headclip evaluate --overwrite`")
    parser.add_argument("--k_shot", type=positive_int, help="as `headclip evaluate --k_shot`")
    args, evaluate_options = apply_flag_convention(parser).parse_known_args(argv)
    outputs = {data: Path(args.output_dir) / Path(data).resolve().name for data in args.data}
    if len(set(outputs.values())) < len(outputs):
        print("evaluate_headclip: error: two --data folders have the same name; evaluate them apart.", file=sys.stderr)
        return 1
    try:
        for output_dir in outputs.values():
            check_output_folder(output_dir, evaluate_output_kind(args.k_shot), args.overwrite)
    except OSError as error:
        print(f"evaluate_headclip: error: {error}", file=sys.stderr)
        return 1
    options = ["--overwrite"] * args.overwrite + ([] if args.k_shot is None else ["--k_shot", str(args.k_shot)])
    for data, output_dir in outputs.items():
        status = headclip(["evaluate", data, "--output_dir", str(output_dir), *options, *evaluate_options])
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
