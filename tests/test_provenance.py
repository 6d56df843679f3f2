"""Provenance: the HeadCLIP parameter hash, and what `headclip evaluate` records in results.json."""

import hashlib
import json
import shutil
from datetime import datetime, timedelta, timezone

import torch
from peft import LoraConfig, get_peft_model

import headclip_hf
from headclip_hf import HeadCLIPModel, headclip_parameters_hash
from headclip_hf.cli import main


def test_parameter_hash_covers_exactly_the_headclip_parameters(tiny_model):
    digest = hashlib.sha256()
    headclip = {
        name: tensor
        for name, tensor in tiny_model.state_dict().items()
        if name.startswith(("prompt_learner.", "attention_head_weights."))
    }
    assert set(headclip) == {
        "prompt_learner.normal_context",
        "prompt_learner.abnormal_context",
        "prompt_learner.deep_prompts",
        "attention_head_weights.weight",
    }
    for name in sorted(headclip):
        values = headclip[name].float().numpy()
        digest.update(f"{name}:{tuple(values.shape)}\n".encode())
        digest.update(values.tobytes())
    original = headclip_parameters_hash(tiny_model)
    assert original == digest.hexdigest()

    with torch.no_grad():
        tiny_model.vision_model.post_layernorm.weight.add_(1.0)  # a backbone weight: not a HeadCLIP parameter
    assert headclip_parameters_hash(tiny_model) == original
    with torch.no_grad():
        tiny_model.head_weights[0, 0] = 0.5
    assert headclip_parameters_hash(tiny_model) != original


def test_evaluate_records_the_provenance_of_its_results(test_data_dir, headclip_checkpoint, tmp_path):
    data = tmp_path / "bottle"
    source = test_data_dir / "mvtec_ad" / "bottle"
    for folder in ("good", "broken_large", "ground_truth/broken_large"):
        (data / folder).mkdir(parents=True)
    shutil.copy(source / "good" / "000.png", data / "good")
    shutil.copy(source / "broken_large" / "000.png", data / "broken_large")
    shutil.copy(source / "ground_truth" / "broken_large" / "000_mask.png", data / "ground_truth" / "broken_large")
    out = tmp_path / "eval"
    before = datetime.now(timezone.utc).replace(microsecond=0)
    argv = ["evaluate", data, "--layout", "generic", "--model", headclip_checkpoint, "--out", out, "--device", "cpu"]
    assert main([str(arg) for arg in argv]) == 0

    provenance = json.loads((out / "results.json").read_text())["provenance"]
    model = HeadCLIPModel.from_pretrained(headclip_checkpoint)
    assert provenance["model"] == {
        "name_or_path": str(headclip_checkpoint),
        "adapter": None,
        "headclip_parameters_sha256": headclip_parameters_hash(model),
    }
    assert provenance["image_size"] == model.config.image_size == 64
    assert provenance["data_source"] == str(data)
    assert provenance["headclip_hf_version"] == headclip_hf.__version__
    date = datetime.fromisoformat(provenance["date"])
    assert date.utcoffset() == timedelta(0) and before <= date <= datetime.now(timezone.utc)


def test_parameter_hash_of_a_lora_model_is_the_hash_of_the_merged_model(tiny_model):
    peft_model = get_peft_model(
        tiny_model,
        LoraConfig(
            r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["prompt_learner", "attention_head_weights"]
        ),
    )
    trained = peft_model.get_base_model().attention_head_weights.modules_to_save["default"]
    with torch.no_grad():
        trained.weight.mul_(0.5)  # what LoRA training changes: the trained copy, not the original module
    during_training = headclip_parameters_hash(peft_model)
    merged = peft_model.merge_and_unload()
    assert torch.equal(merged.head_weights, trained.weight)
    assert headclip_parameters_hash(merged) == during_training
