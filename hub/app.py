# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""
Hugging Face Space entry: the HeadCLIP demo (`headclip_hf.demo`) over the model listed under `models:` in this
Space's README.md. `headclip push --space` writes the Space folder around it.

Run it on your own machine with a model of your own (in the project's repository this file is hub/app.py):
HEADCLIP_MODEL=runs/mvtec/adapter python app.py
"""

from pathlib import Path

from headclip_hf.space import build_space_demo

demo = build_space_demo(Path(__file__).resolve().parent)

if __name__ == "__main__":
    demo.launch()
