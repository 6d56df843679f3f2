#!/usr/bin/env python
# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""
Train HeadCLIP's prompts and head weights on an auxiliary labelled anomaly data set (AnomalyCLIP's zero-shot
protocol: train on one data set's test split, evaluate on others), with Accelerate.

Examples:

    # one CPU or GPU
    python examples/train_headclip.py --train_data data/mvtec_ad --eval_data data/visa --output_dir runs/mvtec

    # several GPUs or nodes (data sharded, metrics gathered), mixed precision, TensorBoard logs
    accelerate launch examples/train_headclip.py --train_data data/mvtec_ad --output_dir runs/mvtec \\
        --mixed_precision bf16 --report_to tensorboard

    # two CPU processes on a machine without GPUs (accelerate's multi-process launcher, gloo)
    accelerate launch --multi_gpu --num_processes 2 examples/train_headclip.py --use_cpu --train_data data/mvtec_ad \\
        --output_dir runs/mvtec

    # continue an interrupted run where it stopped
    python examples/train_headclip.py --train_data data/mvtec_ad --output_dir runs/mvtec \\
        --resume_from_checkpoint latest

    # LoRA on the vision attention projections on top of HeadCLIP (a PEFT adapter)
    python examples/train_headclip.py --train_data data/mvtec_ad --output_dir runs/mvtec-lora --lora_rank 8

`--help` lists every argument. The same entry point is the `headclip train` command. The result is
`<output_dir>/adapter`, loadable with `headclip_hf.adapters.load_headclip_model(<output_dir>/adapter)`.
"""

from headclip_hf.training import main

if __name__ == "__main__":
    main()
