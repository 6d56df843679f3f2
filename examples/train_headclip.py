#!/usr/bin/env python
# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""
Train HeadCLIP's prompts and head weights on an auxiliary labelled anomaly data set (AnomalyCLIP's zero-shot
protocol: train on one data set's test split, evaluate on others), with Accelerate:

    python examples/train_headclip.py --train_data data/mvtec_ad --eval_data data/visa --output_dir runs/mvtec
    accelerate launch examples/train_headclip.py ...       # several GPUs or nodes

The arguments (model, data and training dataclasses, parsed with `HfArgumentParser`) and the training loop live in
`headclip_hf.training`; this script runs the `headclip train` command itself (same code, same clear errors).
`--help` explains every argument and shows more examples (resuming, LoRA, mixed precision, several CPU processes,
ablations, activation checkpointing, schedules, the best model, publishing on the Hub). The result is
`<output_dir>/adapter`, loadable with `headclip_hf.adapters.load_headclip_model(<output_dir>/adapter)`.
"""

import sys

from headclip_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
