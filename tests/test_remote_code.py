"""Hub remote code: a saved HeadCLIP loads with AutoModel + trust_remote_code in a process that cannot import
headclip_hf, and computes the same outputs."""

import json

import torch
from safetensors.torch import load_file, save_file

REMOTE_LOAD_SCRIPT = """
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

model_dir, inputs_file, outputs_file = sys.argv[1:4]
config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
assert type(model).__name__ == "HeadCLIPModel" and "transformers_modules" in type(model).__module__
assert type(config).__name__ == "HeadCLIPConfig"
with torch.no_grad():
    out = model(pixel_values=load_file(inputs_file)["pixel_values"])
save_file({"anomaly_map": out.anomaly_map, "image_score": out.image_score}, outputs_file)
"""


def test_remote_code_load_without_the_package(tiny_model, tmp_path, run_without_headclip):
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
    run_without_headclip(REMOTE_LOAD_SCRIPT, model_dir, tmp_path / "inputs.safetensors", tmp_path / "out.st")
    remote = load_file(tmp_path / "out.st")
    with torch.no_grad():
        local = tiny_model(pixel_values=pixel_values)
    assert torch.equal(remote["anomaly_map"], local.anomaly_map)
    assert torch.equal(remote["image_score"], local.image_score)
