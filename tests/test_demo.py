"""The demo app: its logic against the pipeline, `headclip demo` errors, and the page in a real headless Chromium."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headclip_hf import HeadCLIPModel, HeadCLIPProcessor
from headclip_hf.cli import main
from headclip_hf.demo import (
    DEMO_INSTALL_HINT,
    SAMPLE_IMAGES_DIR,
    build_demo,
    detect,
    import_gradio,
    model_thresholds,
    render,
    sample_images,
)
from headclip_hf.pipeline_headclip import TASK, ZeroShotAnomalyDetectionPipeline

REPO_ROOT = Path(__file__).resolve().parent.parent
ANOMALOUS_SAMPLE = SAMPLE_IMAGES_DIR / "bottle_broken_large_000.png"
NORMAL_SAMPLE = SAMPLE_IMAGES_DIR / "bottle_good_000.png"


@pytest.fixture
def detector(headclip_checkpoint):
    model = HeadCLIPModel.from_pretrained(headclip_checkpoint).eval()
    processor = HeadCLIPProcessor.from_pretrained(headclip_checkpoint)
    return ZeroShotAnomalyDetectionPipeline(model=model, processor=processor, task=TASK, device="cpu")


def test_sample_images_are_real_images_with_masks_and_small():
    images = sample_images()
    assert 1 <= len(images) <= 6
    total = sum(path.stat().st_size for path in SAMPLE_IMAGES_DIR.rglob("*") if path.is_file())
    assert total <= 2 * 1024 * 1024
    readme = (SAMPLE_IMAGES_DIR / "README.md").read_text()
    for path in images:
        assert path.name in readme
        with Image.open(path) as image:
            assert image.mode == "RGB" and max(image.size) == 448
            size = image.size
        mask = SAMPLE_IMAGES_DIR / "ground_truth" / f"{path.stem}_mask.png"
        if "good" in path.name:
            assert not mask.exists()
        else:
            with Image.open(mask) as mask_image:
                assert mask_image.size == size and np.asarray(mask_image).any()
    assert "CC BY-NC-SA 4.0" in readme and "Kvasir-SEG" in readme and "Changes made" in readme


def test_sample_images_are_package_data():
    """pyproject's package-data globs (as setuptools expands them) cover every sample file: a wheel ships them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(REPO_ROOT / "pyproject.toml", "rb") as file:
        patterns = tomllib.load(file)["tool"]["setuptools"]["package-data"]["headclip_hf"]
    package = SAMPLE_IMAGES_DIR.parent
    assert package == Path(sys.modules["headclip_hf"].__file__).parent
    shipped = {path for pattern in patterns for path in package.glob(pattern) if path.is_file()}
    files = {path for path in SAMPLE_IMAGES_DIR.rglob("*") if path.is_file()}
    assert len(files) == 9 and files <= shipped


def test_thresholds_start_at_the_calibrated_values(tiny_model):
    assert model_thresholds(tiny_model) == (0.5, 0.5, False)
    tiny_model.config.image_threshold = 0.7
    assert model_thresholds(tiny_model) == (0.7, 0.7, True)  # the pixel threshold follows, as in the pipeline
    tiny_model.config.pixel_threshold = 0.25
    assert model_thresholds(tiny_model) == (0.7, 0.25, True)


@pytest.mark.parametrize("threshold, pixel_threshold", [(0.5, 0.5), (0.0, 0.3), (1.0, 0.6)])
def test_detect_and_render_give_the_pipeline_result(detector, threshold, pixel_threshold):
    detection = detect(detector, ANOMALOUS_SAMPLE)
    view = render(detection, threshold, pixel_threshold)
    expected = detector(str(ANOMALOUS_SAMPLE), threshold=threshold, pixel_threshold=pixel_threshold)
    assert detection.score == expected["score"]
    assert view.score == f"{expected['score']:.4f}" and view.label == expected["label"]
    assert np.array_equal(np.asarray(view.mask), np.asarray(expected["mask"]))
    assert np.array_equal(np.asarray(view.heatmap), np.asarray(expected["heatmap"]))
    assert np.array_equal(np.asarray(view.image), np.asarray(Image.open(ANOMALOUS_SAMPLE).convert("RGB")))
    assert f"score {view.score}" in view.message and "zero-shot" in view.message


def test_detect_refuses_files_that_are_not_images(detector, tmp_path):
    assert detect(detector, None) is None and render(None, 0.5, 0.5).as_tuple() == (None, None, None, "", "", "")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    not_an_image = r"'notes.txt' is not an image that can be read \(cannot identify image file 'notes.txt'\)"
    with pytest.raises(ValueError, match=r"The file " + not_an_image):
        detect(detector, notes)
    with pytest.raises(ValueError, match=r"The reference " + not_an_image):
        detect(detector, ANOMALOUS_SAMPLE, [NORMAL_SAMPLE, notes])


def test_detect_with_references_is_the_few_shot_pipeline(detector):
    references = [NORMAL_SAMPLE, SAMPLE_IMAGES_DIR / "bottle_good_001.png"]
    detection = detect(detector, ANOMALOUS_SAMPLE, references)
    expected = detector(str(ANOMALOUS_SAMPLE), reference_images=[str(path) for path in references])
    assert detection.score == expected["score"] and detection.num_references == 2
    assert np.array_equal(detection.anomaly_map, expected["anomaly_map"])
    assert "few-shot with 2 normal references" in render(detection, 0.5, 0.5).message


def _component(demo, elem_id):
    return next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def test_build_demo_sets_the_sliders_and_the_reference_input(detector):
    model, processor = detector.model, detector.processor
    model.config.image_threshold, model.config.pixel_threshold = 0.62, 0.41
    demo = build_demo(model, processor, examples=[ANOMALOUS_SAMPLE])
    assert _component(demo, "image-threshold").value == 0.62
    assert _component(demo, "pixel-threshold").value == 0.41
    assert _component(demo, "reference-files").visible is True


def test_without_gradio_the_message_names_the_extra(monkeypatch, headclip_checkpoint, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    with pytest.raises(
        ImportError, match=r'The demo needs Gradio, which is not installed: pip install "headclip_hf\[demo\]"'
    ):
        import_gradio()
    assert main(["demo", "--model", str(headclip_checkpoint)]) == 1
    assert (
        capsys.readouterr().err.strip()
        == f"headclip: error: The demo needs Gradio, which is not installed: {DEMO_INSTALL_HINT}"
    )


def test_demo_command_checks_the_model_before_serving(monkeypatch, tmp_path, headclip_checkpoint, capsys):
    gradio = import_gradio()

    def no_launch(*args, **kwargs):
        raise AssertionError("the server must not start")

    monkeypatch.setattr(gradio.Blocks, "launch", no_launch)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    assert main(["demo", "--model", str(broken)]) == 1
    assert capsys.readouterr().err.startswith(f"headclip: error: Cannot load the model or processor from '{broken}'")
    assert main(["demo", "--model", str(tmp_path / "missing")]) == 1
    assert f"headclip: error: --model {tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
    assert main(["demo", "--model", str(headclip_checkpoint), "--examples", str(tmp_path / "nowhere")]) == 1
    assert f"--examples {tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err


def test_demo_port_is_checked_before_the_model_loads(monkeypatch, headclip_checkpoint, capsys):
    import_gradio()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr("headclip_hf.cli.demo.load_model_and_processor", no_model)
    for port, shown in (("99999", "99999"), ("0", "0"), ("http", "'http'")):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--model", str(headclip_checkpoint), "--port", port])
        assert exit_info.value.code == 2
        assert f"argument --port: {shown} is not a port number (1 to 65535)" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", "--model", str(headclip_checkpoint), "--port", str(port)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"headclip: error: Cannot serve on 127.0.0.1:{port}: Address already in use.")
    assert f"choose another with --port (e.g. --port {port + 1})" in captured.err and "Serving" not in captured.out


def test_demo_says_serving_only_once_the_server_is_up(monkeypatch, headclip_checkpoint, capsys):
    gradio = import_gradio()
    events = []

    def launch(self, **kwargs):
        events.append(("launch", kwargs["prevent_thread_lock"], capsys.readouterr().out))
        raise OSError("Cannot find empty port")  # what Gradio raises when the server cannot start

    monkeypatch.setattr(gradio.Blocks, "launch", launch)
    monkeypatch.setattr(gradio.Blocks, "block_thread", lambda self: events.append(("block_thread",)))
    port = str(_free_port())
    assert main(["demo", "--model", str(headclip_checkpoint), "--port", port, "--device", "cpu"]) == 1
    assert events == [("launch", True, "")] and "Serving" not in capsys.readouterr().out
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: events.append(("launch",)))
    assert main(["demo", "--model", str(headclip_checkpoint), "--port", port, "--device", "cpu"]) == 0
    assert events[1:] == [("launch",), ("block_thread",)] and "Serving the HeadCLIP demo" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def demo_url(headclip_checkpoint, tmp_path):
    """`headclip demo` on the tiny checkpoint, served on 127.0.0.1 at a free port by a subprocess; its URL."""
    pytest.importorskip("gradio", reason="gradio is not installed: pip install -e '.[dev]'")
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
    }
    command = [sys.executable, "-m", "headclip_hf.cli", "demo", "--model", str(headclip_checkpoint)]
    command += ["--port", str(port), "--device", "cpu"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(url, server, tmp_path / "server.log")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _wait_until_serving(url: str, server: subprocess.Popen, log: Path, attempts: int = 600) -> None:
    for _ in range(attempts):
        if server.poll() is not None:
            raise AssertionError(f"the demo server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the demo server did not answer at {url}:\n{log.read_text()[-3000:]}")


def _upload(browser, elem_id: str, path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))


def _text(browser, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input").get_attribute("value")


def _message(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, "message").text


def _wait(browser, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, 120, poll_frequency=0.25).until(lambda _: condition(), message=f"waiting for {what}")


def _shown_image(browser, elem_id: str) -> np.ndarray:
    from selenium.webdriver.common.by import By

    source = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} img").get_attribute("src")
    with urllib.request.urlopen(source) as response:
        return np.asarray(Image.open(BytesIO(response.read())).convert("RGB"))


def _clear_upload(browser, elem_id: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f"#{elem_id} button[aria-label='Clear']").click()
    _wait(browser, lambda: _text(browser, "score") == "", "the cleared page")


def test_demo_in_a_browser(demo_url, browser, detector, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(demo_url)
    _wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#image-file input[type=file]"), "the page")
    assert "HeadCLIP zero-shot anomaly detection" in browser.title

    # An uploaded sample image: the score and heatmap shown are the pipeline's.
    expected = detector(str(ANOMALOUS_SAMPLE), threshold=0.5, pixel_threshold=0.5)
    _upload(browser, "image-file", ANOMALOUS_SAMPLE)
    _wait(browser, lambda: _text(browser, "score") != "", "the score")
    _wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#heatmap img"), "the heatmap")
    assert _text(browser, "score") == f"{expected['score']:.4f}"
    assert _text(browser, "label") == expected["label"]
    assert np.array_equal(_shown_image(browser, "heatmap"), np.asarray(expected["heatmap"]))
    assert np.array_equal(_shown_image(browser, "mask"), np.asarray(expected["mask"].convert("RGB")))
    browser.save_screenshot(str(tmp_path / "demo.png"))

    # The image threshold slider re-applies the threshold to the same result.
    threshold_box = browser.find_element(By.CSS_SELECTOR, "#image-threshold input[type=number]")
    high = min(1.0, round(expected["score"] + 0.05, 3))
    threshold_box.send_keys(Keys.CONTROL, "a")
    threshold_box.send_keys(f"{high}", Keys.ENTER)
    _wait(browser, lambda: f"image threshold {high:.4f}" in _message(browser), "rethreshold")
    assert _text(browser, "label") == "normal" and _text(browser, "score") == f"{expected['score']:.4f}"
    assert f"is below the image threshold {high:.4f}, so normal." in _message(browser)  # markdown rendered
    assert browser.find_element(By.CSS_SELECTOR, "#message strong").text == ANOMALOUS_SAMPLE.name

    # A file that is not an image: a message, and the app goes on serving.
    _clear_upload(browser, "image-file")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    _upload(browser, "image-file", notes)
    _wait(browser, lambda: "notes.txt" in _message(browser), "the error message")
    message = _message(browser)
    assert "Could not process the upload. The file 'notes.txt' is not an image that can be read" in message
    assert str(tmp_path) not in message  # the file as the user named it, not the server's upload path
    assert _text(browser, "score") == ""
    browser.save_screenshot(str(tmp_path / "demo_not_an_image.png"))

    _clear_upload(browser, "image-file")
    _upload(browser, "image-file", NORMAL_SAMPLE)
    normal = detector(str(NORMAL_SAMPLE))
    _wait(browser, lambda: _text(browser, "score") == f"{normal['score']:.4f}", "the second image's score")
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_demo_few_shot_in_a_browser(demo_url, browser, detector, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(demo_url)
    _wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#reference-files input[type=file]"), "the page")
    references = [NORMAL_SAMPLE, SAMPLE_IMAGES_DIR / "bottle_good_001.png"]
    browser.find_element(By.CSS_SELECTOR, "#reference-files input[type=file]").send_keys(
        "\n".join(str(path) for path in references)
    )
    _upload(browser, "image-file", ANOMALOUS_SAMPLE)
    _wait(browser, lambda: "few-shot with 2 normal references" in _message(browser), "the few-shot result")
    expected = detector(str(ANOMALOUS_SAMPLE), reference_images=[str(path) for path in references])
    assert _text(browser, "score") == f"{expected['score']:.4f}"
    assert np.array_equal(_shown_image(browser, "heatmap"), np.asarray(expected["heatmap"]))
    browser.save_screenshot(str(tmp_path / "demo_few_shot.png"))
