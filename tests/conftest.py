"""Shared test fixtures: offline Hub, the real data in ../shared, the real CLIP tokenizer, tiny CLIP configs."""

import os
import shutil
import subprocess
import sys
import textwrap
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


@pytest.fixture(scope="session")
def clip_tokenizer(clip_tokenizer_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_dir)


def build_tiny_config(**overrides):
    """A tiny random-weight HeadCLIP config: CLIP's real text vocabulary (so the default prompt ids are valid)."""
    from headclip_hf import HeadCLIPConfig

    kwargs = dict(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            patch_size=8,
            image_size=32,
        ),
        projection_dim=16,
        prompt_length=6,
        deep_prompt_depth=3,
        deep_prompt_length=2,
        image_size=64,
    )
    kwargs.update(overrides)
    return HeadCLIPConfig(**kwargs)


@pytest.fixture
def tiny_config_factory():
    """`factory(**overrides)` -> a tiny `HeadCLIPConfig` (hidden 32, 3 text / 4 vision layers, 4 heads, patch 8)."""
    return build_tiny_config


@pytest.fixture
def tiny_model():
    """A tiny untrained `HeadCLIPModel` in eval mode, seeded."""
    import torch

    from headclip_hf import HeadCLIPModel

    torch.manual_seed(0)
    return HeadCLIPModel(build_tiny_config()).eval()


@pytest.fixture
def clip_checkpoint(tmp_path, tiny_model):
    """A plain `CLIPModel` folder holding the CLIP weights of `tiny_model` (safetensors + config.json)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=tiny_model.config.text_config.to_dict(),
        vision_config=tiny_model.config.vision_config.to_dict(),
        projection_dim=tiny_model.config.projection_dim,
    )
    clip = CLIPModel(config)
    missing, unexpected = clip.load_state_dict(tiny_model.state_dict(), strict=False)
    assert not missing
    path = tmp_path / "clip"
    clip.save_pretrained(path)
    return path


@pytest.fixture
def headclip_checkpoint(tmp_path, tiny_model, clip_tokenizer):
    """A saved HeadCLIP folder: `tiny_model` (head weights moved off 1) and a processor at its 64 px working size."""
    import torch

    from headclip_hf import HeadCLIPProcessor

    with torch.no_grad():
        tiny_model.head_weights.uniform_(0.5, 1.5)
    path = tmp_path / "headclip"
    tiny_model.save_pretrained(path)
    HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=tiny_model.config.image_size).save_pretrained(path)
    return path


@pytest.fixture
def image_folder(tmp_path, test_data_dir):
    """A folder of three real images of different sizes and formats, one corrupt PNG and a text file."""
    folder = tmp_path / "images"
    folder.mkdir()
    bottle = test_data_dir / "mvtec_ad" / "bottle"
    shutil.copy(bottle / "broken_small" / "000.png", folder / "bottle_broken.png")
    shutil.copy(bottle / "good" / "000.png", folder / "bottle_good.png")
    polyp = sorted((test_data_dir / "kvasir_seg" / "colon" / "polyp").iterdir())[0]
    shutil.copy(polyp, folder / "polyp.jpg")
    (folder / "corrupt.png").write_bytes((bottle / "good" / "001.png").read_bytes()[:2000])  # truncated
    (folder / "notes.txt").write_text("not an image")
    return folder


# Prepended to the scripts of `run_without_headclip` and `run_without_torch`: importing the module BLOCKED (or one of
# its submodules) fails there, as on a machine without it.
_BLOCK_IMPORT = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    class BlockImport:
        def find_spec(self, name, path=None, target=None):
            if name == BLOCKED or name.startswith(BLOCKED + "."):
                raise ImportError(BLOCKED + " is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockImport())
    try:
        import {blocked}  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit(BLOCKED + " should not be importable here")
    """
)


def _script_runner(tmp_path: Path, blocked: str, pythonpath: str):
    """`run(script, *args)`: run `script` in a subprocess where `blocked` cannot be imported (offline, its own
    remote-code module cache, cwd `tmp_path`, `PYTHONPATH` `pythonpath`); assert it succeeds; return the result."""

    def run(script: str, *args) -> subprocess.CompletedProcess:
        path = tmp_path / f"without_{blocked}.py"
        path.write_text(_BLOCK_IMPORT.format(blocked=blocked) + textwrap.dedent(script))
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_MODULES_CACHE": str(tmp_path / "modules"),
            "PYTHONPATH": pythonpath,
        }
        result = subprocess.run(
            [sys.executable, str(path), *map(str, args)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    return run


@pytest.fixture
def run_without_headclip(tmp_path):
    """
    `run(script, *args)`: run the Python `script` in a subprocess that cannot import headclip_hf (offline, its own
    remote-code module cache, cwd `tmp_path`), assert it succeeds, and return the `CompletedProcess`.
    """
    return _script_runner(tmp_path, "headclip_hf", pythonpath="")


@pytest.fixture
def run_without_torch(tmp_path):
    """
    `run(script, *args)`: as `run_without_headclip`, but `import torch` fails and this tree's headclip_hf imports (a
    deployment machine that runs exported graphs).
    """
    return _script_runner(tmp_path, "torch", pythonpath=str(REPO_ROOT))


# Headless Chromium on a machine without a screen or network (the flags of this machine's environment notes): no
# background connections, a fresh profile per test (`--user-data-dir` is added by the fixture).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


@pytest.fixture
def browser(tmp_path):
    """
    A headless Chromium driven by Selenium: Debian's `chromium` and `chromium-driver` (`.ci/run` installs them with
    apt-get when missing). Skipped, with the reason, where no browser is installed.
    """
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'")
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip(
            "no Chromium and ChromeDriver on this machine (Debian: apt-get install chromium chromium-driver; .ci/run "
            "does it where apt-get is available)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Every test starts without accelerate's process-wide state (as accelerate's own test cases do), so that tests
    may train with different settings (e.g. mixed precision) in one pytest process."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def transformers_logs(caplog):
    """`caplog` that also receives transformers' own records (transformers' logger does not propagate by default)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_propagation()
    caplog.set_level("INFO")
    caplog.set_level("INFO", logger="transformers")  # its level, WARNING by default, is restored afterwards
    yield caplog
    transformers_logging.disable_propagation()
