#!/usr/bin/env python
# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""
Publish a trained HeadCLIP on the Hugging Face Hub: the model (with its remote code and the custom
"zero-shot-anomaly-detection" pipeline) or the adapter, the processor, and a model card rendered from
`headclip_hf/model_card.md` with the metrics of an evaluation run. The same command as `headclip push`; the logic is
in `headclip_hf.hub`.

    # look at exactly what would be uploaded
    python hub/publish.py --model runs/mvtec/adapter --results eval/visa --train_dataset "MVTec AD" \
        --eval_dataset VisA --repo_id user/headclip-mvtec --dry_run --output_dir hub-preview/

    # upload (log in first with `hf auth login`, or pass --token)
    python hub/publish.py --model runs/mvtec/adapter --results eval/visa --train_dataset "MVTec AD" \
        --eval_dataset VisA --repo_id user/headclip-mvtec --private --revision v1

`--help` lists every option.
"""

import sys

from headclip_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
