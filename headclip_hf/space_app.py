# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""
Hugging Face Space entry: the HeadCLIP demo (`headclip_hf.demo`) over the model listed under `models:` in this
Space's README.md. `headclip push --space` writes the Space folder around it, with this file as its `app.py` (in the
package it is `headclip_hf/space_app.py`; importing it starts building the demo).

Run it on your own machine with a model of your own: HEADCLIP_MODEL=runs/mvtec/adapter python app.py in a Space
folder, or HEADCLIP_MODEL=runs/mvtec/adapter python -m headclip_hf.space_app anywhere.
"""

from pathlib import Path

from headclip_hf.space import build_space_demo

demo = build_space_demo(Path(__file__).resolve().parent)

if __name__ == "__main__":
    demo.launch()
