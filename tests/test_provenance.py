"""Provenance: the HeadCLIP parameter hash, and what `headclip evaluate` records in results.json."""

import json
import shutil
from datetime import datetime, timedelta, timezone

import pytest
import torch
from peft import LoraConfig, get_peft_model

import headclip_hf
from headclip_hf import HeadCLIPModel, headclip_parameters_hash
from headclip_hf.calibration import CalibrationResult
from headclip_hf.cli import main
from headclip_hf.provenance import check_results_provenance


def test_parameter_hash_follows_the_headclip_parameters_and_settings_not_the_thresholds(tiny_model, tmp_path):
    original = headclip_parameters_hash(tiny_model)
    assert len(original) == 64 and headclip_parameters_hash(tiny_model) == original  # deterministic
    # Saved and loaded, cast to float64 and back: the same model, the same hash.
    tiny_model.save_pretrained(tmp_path)
    assert headclip_parameters_hash(HeadCLIPModel.from_pretrained(tmp_path)) == original
    assert headclip_parameters_hash(tiny_model.to(torch.float64).to(torch.float32)) == original
    # Calibrating changes no score or map: thresholds and their record leave the hash alone.
    CalibrationResult(0.25, 0.5, {"method": "f1"}, {"bottle": 0.3}, {"bottle": 0.6}).apply(tiny_model)
    assert headclip_parameters_hash(tiny_model) == original
    # A backbone weight is not a HeadCLIP parameter (LoRA weights are not part of the hash).
    with torch.no_grad():
        tiny_model.vision_model.post_layernorm.weight.add_(1.0)
    assert headclip_parameters_hash(tiny_model) == original

    # Every HeadCLIP parameter and every setting of the scores and maps changes it.
    changed = set()
    for name, parameter in tiny_model.named_parameters():
        if name.startswith(("prompt_learner.", "attention_head_weights.")):
            before = parameter.detach().clone()
            with torch.no_grad():
                parameter.view(-1)[0] += 0.5
            changed.add(headclip_parameters_hash(tiny_model))
            with torch.no_grad():
                parameter.copy_(before)
            assert headclip_parameters_hash(tiny_model) == original, name
    settings = dict(
        joint_alpha=0.25,
        map_sigma=2.0,
        feature_layers=[2, 4],
        few_shot_weight=0.75,
        global_feature_layernorm=False,
        joint_pooling="topk_mean",
        temperature=0.05,
        image_size=56,
    )
    for name, value in settings.items():
        config = tiny_model.config
        before = getattr(config, name)
        setattr(config, name, value)
        changed.add(headclip_parameters_hash(tiny_model))
        setattr(config, name, before)
        assert headclip_parameters_hash(tiny_model) == original, name
    assert len(changed) == 4 + len(settings) and original not in changed


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


def test_results_files_that_cannot_vouch_for_the_model_are_refused_by_name(tiny_model, tmp_path):
    results_file = tmp_path / "results.json"
    provenance = {
        "model": {"name_or_path": "mine", "headclip_parameters_sha256": headclip_parameters_hash(tiny_model)}
    }
    results_file.write_text(json.dumps({"provenance": provenance}))
    check_results_provenance(results_file, tiny_model)  # the model's own run
    tiny_model.config.joint_alpha = 0.25  # the same weights, another joint score: other numbers
    with pytest.raises(ValueError, match=r"results.json was computed by another model \(mine, .*other settings"):
        check_results_provenance(results_file, tiny_model)
    for content, message in (
        ("[1, 2]", r"results.json holds a JSON list, not the object `headclip evaluate` writes"),
        ("{not json", r"results.json is not a JSON file \(Expecting property name"),
        ('{"provenance": [1]}', r"results.json does not say which model produced it"),
        ('{"provenance": {"model": "mine"}}', r"results.json does not say which model produced it"),
        ('{"provenance": {"model": {"headclip_parameters_sha256": 3}}}', r"does not say which model produced it"),
    ):
        results_file.write_text(content)
        with pytest.raises(ValueError, match=message):
            check_results_provenance(results_file, tiny_model)
