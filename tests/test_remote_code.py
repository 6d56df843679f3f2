"""Hub remote code: a saved HeadCLIP loads with AutoModel + trust_remote_code in a process that cannot import
headclip_hf, and computes the same outputs."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file

REMOTE_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys

    class BlockHeadCLIP:
        # Make `import headclip_hf` fail, as on a machine without the package.
        def find_spec(self, name, path=None, target=None):
            if name == "headclip_hf" or name.startswith("headclip_hf."):
                raise ImportError("headclip_hf is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockHeadCLIP())

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel

    model_dir, inputs_file, outputs_file = sys.argv[1:4]
    try:
        import headclip_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("headclip_hf should not be importable here")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    assert type(model).__name__ == "HeadCLIPModel" and "transformers_modules" in type(model).__module__
    assert type(config).__name__ == "HeadCLIPConfig"
    with torch.no_grad():
        out = model(pixel_values=load_file(inputs_file)["pixel_values"])
    save_file({"anomaly_map": out.anomaly_map, "image_score": out.image_score}, outputs_file)
    """
)


def test_remote_code_load_without_the_package(tiny_model, tmp_path):
    with torch.no_grad():
        tiny_model.head_weights.uniform_(0.5, 1.5)
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    assert {"configuration_headclip.py", "modeling_headclip.py"} <= {p.name for p in model_dir.iterdir()}
    auto_map = json.loads((model_dir / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_headclip.HeadCLIPConfig",
        "AutoModel": "modeling_headclip.HeadCLIPModel",
    }
    pixel_values = torch.randn(2, 3, 64, 64)
    save_file({"pixel_values": pixel_values}, tmp_path / "inputs.safetensors")
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_LOAD_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(script), str(model_dir), str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.st")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = load_file(tmp_path / "out.st")
    with torch.no_grad():
        local = tiny_model(pixel_values=pixel_values)
    assert torch.equal(remote["anomaly_map"], local.anomaly_map)
    assert torch.equal(remote["image_score"], local.image_score)
