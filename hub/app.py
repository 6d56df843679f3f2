#!/usr/bin/env python
# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""
The HeadCLIP demo: a Gradio app over the pipeline (upload an image or pick a sample, threshold sliders starting at the
model's calibrated thresholds, few-shot references). The same command as `headclip demo`; the app is
`headclip_hf.demo.build_demo`. A Space published with `headclip push --space` runs it through its own `app.py` (the
package's `headclip_hf/space_app.py`).

    pip install "headclip_hf[demo]"
    python hub/app.py --model runs/mvtec/adapter           # http://127.0.0.1:7860
    python hub/app.py --model runs/mvtec/adapter --share   # also a temporary public link

`--help` lists every option.
"""

import sys

from headclip_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
