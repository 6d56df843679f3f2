"""Shared test fixtures: offline Hub, the real data in ../shared, the real CLIP tokenizer, tiny CLIP configs."""

import os
from pathlib import Path

import pytest

# Tests never reach the Hub: everything loads from local folders made in the test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def test_data_dir() -> Path:
    """`$HEADCLIP_TEST_DATA` (default `../shared/data`): real MVTec AD bottle and Kvasir-SEG images."""
    root = Path(os.environ.get("HEADCLIP_TEST_DATA", SHARED / "data"))
    if not (root / "mvtec_ad" / "bottle").is_dir():
        pytest.skip(f"real test data not found at {root} (set HEADCLIP_TEST_DATA to the shared data folder)")
    return root


@pytest.fixture(scope="session")
def clip_tokenizer_dir() -> Path:
    """The real CLIP tokenizer files in `../shared/clip_tokenizer`."""
    path = SHARED / "clip_tokenizer"
    if not (path / "vocab.json").is_file():
        pytest.skip(f"real CLIP tokenizer not found at {path}")
    return path
