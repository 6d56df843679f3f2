"""Training with accelerate: loss goes down, only HeadCLIP (and LoRA) parameters change, exact resume, adapters,
PEFT LoRA, multi-process launch, and the bad-input rules."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image

from headclip_hf import HeadCLIPModel, HeadCLIPProcessor, load_anomaly_dataset
from headclip_hf.adapters import (
    ADAPTER_WEIGHTS_NAME,
    HEADCLIP_PARAMETER_PREFIXES,
    headclip_state_dict,
    load_headclip_adapter,
    load_headclip_model,
    save_headclip_adapter,
)
from headclip_hf.cli.train import main as training_main
from headclip_hf.cli.train import parse_config_overrides
from headclip_hf.configuration_headclip import HeadCLIPConfig
from headclip_hf.modeling_headclip import HeadCLIPHeadWeights, HeadCLIPPromptLearner
from headclip_hf.training import HeadCLIPTrainingArguments, train

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_generic_folder(root: Path, num_normal: int = 4, num_anomalous: int = 4, with_masks: bool = True) -> Path:
    """A synthetic data set in the generic layout: dark noisy images, anomalies are bright squares."""
    rng = np.random.default_rng(0)
    (root / "good").mkdir(parents=True)
    (root / "spot").mkdir()
    if with_masks:
        (root / "ground_truth" / "spot").mkdir(parents=True)
    for index in range(num_normal):
        pixels = rng.integers(0, 60, size=(48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "good" / f"{index:03d}.png")
    for index in range(num_anomalous):
        pixels = rng.integers(0, 60, size=(48, 48, 3), dtype=np.uint8)
        mask = np.zeros((48, 48), dtype=np.uint8)
        top, left = rng.integers(0, 32, size=2)
        mask[top : top + 14, left : left + 14] = 255
        pixels[mask > 0] = 250
        Image.fromarray(pixels).save(root / "spot" / f"{index:03d}.png")
        if with_masks:
            Image.fromarray(mask).save(root / "ground_truth" / "spot" / f"{index:03d}_mask.png")
    return root


@pytest.fixture
def base_dir(tmp_path, tiny_model, clip_tokenizer):
    """A saved tiny HeadCLIP with its processor (64 px), as a base checkpoint folder."""
    path = tmp_path / "base"
    tiny_model.save_pretrained(path)
    HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64).save_pretrained(path)
    return path


@pytest.fixture
def synthetic_set(tmp_path):
    return load_anomaly_dataset(write_generic_folder(tmp_path / "synthetic"), cache_dir=str(tmp_path / "cache"))


def training_args(output_dir, **overrides) -> HeadCLIPTrainingArguments:
    defaults = dict(output_dir=str(output_dir), num_train_epochs=1, per_device_train_batch_size=4, logging_steps=1)
    defaults.update(overrides)
    return HeadCLIPTrainingArguments(**defaults)


def run_training(base_dir, dataset, args, **kwargs):
    model = HeadCLIPModel.from_pretrained(base_dir)
    processor = HeadCLIPProcessor.from_pretrained(base_dir)
    losses = []
    on_step_end = kwargs.pop("on_step_end", lambda step, loss: losses.append(loss))
    adapter = train(model, processor, dataset, args, on_step_end=on_step_end, **kwargs)
    return model, adapter, losses


def backbone_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(HEADCLIP_PARAMETER_PREFIXES)}


@pytest.mark.parametrize("data", ["synthetic", "bottle"])
def test_loss_goes_down_and_only_headclip_parameters_change(base_dir, tmp_path, synthetic_set, test_data_dir, data):
    if data == "synthetic":
        dataset = synthetic_set
    else:  # 4 real bottle images (2 normal, 2 broken) in one fixed batch
        bottle = load_anomaly_dataset(test_data_dir / "mvtec_ad" / "bottle", cache_dir=str(tmp_path / "cache"))
        labels = np.array(bottle["label"])
        dataset = bottle.select([*np.flatnonzero(labels == 0)[:2], *np.flatnonzero(labels == 1)[:2]])
    before = HeadCLIPModel.from_pretrained(base_dir)
    args = training_args(
        tmp_path / "run", num_train_epochs=8, learning_rate=1e-2, per_device_train_batch_size=len(dataset)
    )
    model, _, losses = run_training(base_dir, dataset, args)
    assert len(losses) == 8
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    after = model.state_dict()
    for name, tensor in backbone_state(before).items():
        assert torch.equal(after[name], tensor), f"backbone parameter {name} changed"
    for name, tensor in headclip_state_dict(before).items():
        assert not torch.equal(after[name], tensor), f"HeadCLIP parameter {name} did not train"


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(base_dir, tmp_path, synthetic_set):
    common = dict(num_train_epochs=2, per_device_train_batch_size=3, save_steps=2)  # 3 steps per epoch, 6 in all
    _, reference_adapter, _ = run_training(base_dir, synthetic_set, training_args(tmp_path / "full", **common))

    def crash_at_step_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    interrupted = training_args(tmp_path / "interrupted", **common)
    with pytest.raises(KeyboardInterrupt):
        run_training(base_dir, synthetic_set, interrupted, on_step_end=crash_at_step_5)
    checkpoints = sorted(p.name for p in (tmp_path / "interrupted" / "checkpoints").iterdir())
    assert checkpoints == ["step_2", "step_3", "step_4"]  # every 2 steps, and the end of epoch 1
    assert not (tmp_path / "interrupted" / "adapter").exists()  # no final adapter from a killed run

    (tmp_path / "interrupted" / "checkpoints" / "step_notes").mkdir()  # a stray folder is not a checkpoint
    other_layout = training_args(
        tmp_path / "interrupted", resume_from_checkpoint="latest", **{**common, "per_device_train_batch_size": 2}
    )
    with pytest.raises(ValueError, match=r"saved in the middle of epoch 1 by 1 process\(es\) with batches of 3"):
        run_training(base_dir, synthetic_set, other_layout)
    resumed = training_args(tmp_path / "interrupted", resume_from_checkpoint="latest", **common)
    _, adapter, losses = run_training(base_dir, synthetic_set, resumed)
    assert len(losses) == 2  # steps 5 and 6
    reference = load_headclip_model(reference_adapter).state_dict()
    result = load_headclip_model(adapter).state_dict()
    for name in headclip_state_dict(HeadCLIPModel.from_pretrained(base_dir)):
        assert torch.equal(result[name], reference[name]), name


def test_adapter_round_trip_is_exact_and_small(base_dir, tmp_path, synthetic_set):
    model, adapter, _ = run_training(base_dir, synthetic_set, training_args(tmp_path / "run"))
    reloaded = load_headclip_model(adapter).eval()
    assert Path(reloaded.config._name_or_path) == base_dir
    pixel_values = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        expected, got = model(pixel_values=pixel_values), reloaded(pixel_values=pixel_values)
    for key in ("anomaly_map", "image_score", "layer_maps"):
        assert torch.equal(got[key], expected[key]), key
    # Only the HeadCLIP parameters are stored: 4 bytes each plus a small header.
    numel = sum(t.numel() for t in headclip_state_dict(model).values())
    assert numel == 2 * 6 * 32 + 2 * 2 * 32 + 4 * 4
    size = (adapter / ADAPTER_WEIGHTS_NAME).stat().st_size
    assert 4 * numel < size < 4 * numel + 2048


def test_vit_l14_adapter_is_under_one_megabyte():
    path = REPO_ROOT.parent / "shared" / "configs" / "clip-vit-large-patch14-336"
    if not (path / "config.json").is_file():
        pytest.skip(f"real CLIP configs not found at {path}")
    config = HeadCLIPConfig.from_pretrained(path)
    with torch.device("meta"):
        modules = [HeadCLIPPromptLearner(config), HeadCLIPHeadWeights(config)]
    numel = sum(p.numel() for module in modules for p in module.parameters())
    assert numel == 2 * 12 * 768 + 8 * 4 * 768 + 24 * 16 == 43_392
    assert 4 * numel < 1_000_000


def test_adapter_of_another_shape_is_refused(base_dir, tmp_path, tiny_config_factory):
    other = HeadCLIPModel(tiny_config_factory(prompt_length=5))
    save_headclip_adapter(other, tmp_path / "other", base_model_name_or_path=str(base_dir))
    with pytest.raises(
        ValueError,
        match=r"does not fit this model: prompt_learner.normal_context has shape \(5, 32\), the model expects \(6",
    ):
        load_headclip_adapter(HeadCLIPModel.from_pretrained(base_dir), tmp_path / "other")


def test_failed_adapter_save_keeps_the_previous_adapter(base_dir, tmp_path, monkeypatch):
    model = HeadCLIPModel.from_pretrained(base_dir)
    target = save_headclip_adapter(model, tmp_path / "adapter")
    before = (target / ADAPTER_WEIGHTS_NAME).read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("headclip_hf.adapters.save_file", broken_save)
    with torch.no_grad():
        model.head_weights.mul_(2.0)
    with pytest.raises(OSError, match="disk full"):
        save_headclip_adapter(model, target)
    assert (target / ADAPTER_WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no partial folder left behind


def test_lora_trains_saves_and_reloads_identically(base_dir, tmp_path, synthetic_set, caplog):
    args = training_args(tmp_path / "lora", num_train_epochs=2, learning_rate=1e-2, lora_rank=2)
    before = HeadCLIPModel.from_pretrained(base_dir)
    # A config field changed for training (not the base's) must come back with the adapter.
    model = HeadCLIPModel.from_pretrained(base_dir, joint_alpha=0.25)
    processor = HeadCLIPProcessor.from_pretrained(base_dir)
    adapter = train(model, processor, synthetic_set, args)
    assert (adapter / "adapter_config.json").is_file()
    # `model` was wrapped in place by PEFT: LoRA layers exist, the backbone weights themselves are unchanged.
    peft_model = PeftModel.from_pretrained(HeadCLIPModel.from_pretrained(base_dir, joint_alpha=0.25), adapter).eval()
    lora_weights = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert lora_weights and any(v.abs().sum() > 0 for k, v in lora_weights.items() if "lora_B" in k)
    trained = peft_model.state_dict()
    for name, tensor in before.state_dict().items():
        base_name = name if name.startswith(HEADCLIP_PARAMETER_PREFIXES) else None
        if base_name is None:
            continue
        copy = f"base_model.model.{name.split('.')[0]}.modules_to_save.default.{name.split('.', 1)[1]}"
        assert not torch.equal(trained[copy], tensor), f"{name} did not train"
    pixel_values = torch.randn(2, 3, 64, 64)
    reloaded_twice = PeftModel.from_pretrained(
        HeadCLIPModel.from_pretrained(base_dir, joint_alpha=0.25), adapter
    ).eval()
    with torch.no_grad():
        first, second = peft_model(pixel_values=pixel_values), reloaded_twice(pixel_values=pixel_values)
        merged_model = load_headclip_model(adapter).eval()
        merged = merged_model(pixel_values=pixel_values)
        untrained = before.eval()(pixel_values=pixel_values)
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    torch.testing.assert_close(merged.anomaly_map, first.anomaly_map, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged.image_score, first.image_score, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(untrained.image_score, first.image_score)
    assert merged_model.config.joint_alpha == 0.25
    # A PEFT adapter without the HeadCLIP config (plain PEFT) loads onto the base's config, with a warning.
    (adapter / "headclip_config.json").unlink()
    with caplog.at_level("WARNING", logger="headclip_hf.adapters"):
        assert load_headclip_model(adapter).config.joint_alpha == before.config.joint_alpha
    assert "headclip_config.json is missing" in caplog.text
    # Training cannot continue from a LoRA adapter (the LoRA weights would be lost).
    with pytest.raises(ValueError, match=r"is a LoRA \(PEFT\) adapter: training cannot continue from it"):
        training_main(["--model_name_or_path", str(adapter), "--train_data", "x", "--output_dir", str(tmp_path / "x")])


def test_tensorboard_logs_bf16_autocast_and_gradient_accumulation(base_dir, tmp_path, synthetic_set):
    args = training_args(
        tmp_path / "run",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        mixed_precision="bf16",
        report_to="tensorboard",
    )
    _, adapter, losses = run_training(base_dir, synthetic_set, args)
    assert len(losses) == 2  # 8 images / (2 per batch x 2 batches per step)
    assert all(np.isfinite(losses))
    event_files = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert event_files and event_files[0].stat().st_size > 0
    assert adapter.is_dir()


def test_config_overrides_parse_json_values_and_lists():
    parsed = parse_config_overrides("joint_alpha=1.0,feature_layers=[2, 4],use_head_weights=false,joint_pooling=max")
    assert parsed == {"joint_alpha": 1.0, "feature_layers": [2, 4], "use_head_weights": False, "joint_pooling": "max"}
    assert parse_config_overrides(None) == {}
    assert parse_config_overrides("joint_alpha=1.0,") == {"joint_alpha": 1.0}
    with pytest.raises(ValueError, match="config_overrides item 'joint_alpha' is not 'field=value'"):
        parse_config_overrides("joint_alpha")


def test_training_needs_masks_unless_image_labels_only(base_dir, tmp_path):
    image_only = load_anomaly_dataset(
        write_generic_folder(tmp_path / "no_masks", with_masks=False), cache_dir=str(tmp_path / "cache")
    )
    with pytest.raises(ValueError, match="Training needs pixel masks, and this training set has none"):
        run_training(base_dir, image_only, training_args(tmp_path / "run"))
    args = training_args(tmp_path / "run", allow_image_labels_only=True)
    _, adapter, losses = run_training(base_dir, image_only, args)
    assert adapter.is_dir() and len(losses) == 2


def test_output_dir_with_a_previous_run_is_refused(base_dir, tmp_path, synthetic_set):
    run_training(base_dir, synthetic_set, training_args(tmp_path / "run"))
    with pytest.raises(FileExistsError, match="holds a previous run .*--overwrite_output_dir"):
        run_training(base_dir, synthetic_set, training_args(tmp_path / "run"))
    _, adapter, _ = run_training(base_dir, synthetic_set, training_args(tmp_path / "run", overwrite_output_dir=True))
    assert adapter.is_dir()


def test_checkpoint_from_another_model_shape_is_refused(base_dir, tmp_path, synthetic_set, tiny_config_factory):
    run_training(base_dir, synthetic_set, training_args(tmp_path / "run"))
    other_dir = tmp_path / "other_base"
    HeadCLIPModel(tiny_config_factory(prompt_length=5)).save_pretrained(other_dir)
    HeadCLIPProcessor.from_pretrained(base_dir).save_pretrained(other_dir)
    resume = training_args(tmp_path / "run", resume_from_checkpoint="latest", num_train_epochs=2)
    with pytest.raises(ValueError, match=r"comes from a model of another shape: .*normal_context has shape \(6, 32\)"):
        run_training(other_dir, synthetic_set, resume)


def test_accelerate_launch_two_cpu_processes(base_dir, tmp_path):
    """Two processes: the 8 training images are sharded (2 steps of 2 x 2 images), metrics gathered."""
    data = write_generic_folder(tmp_path / "data", num_normal=4, num_anomalous=4)
    output_dir = tmp_path / "run"
    command = [
        # accelerate's multi-process launcher (torchrun); `--use_cpu` makes the processes a gloo CPU group.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "examples" / "train_headclip.py"),
        "--model_name_or_path", str(base_dir), "--image_size", "64", "--train_data", str(data),
        "--eval_data", str(data), "--output_dir", str(output_dir), "--num_train_epochs", "1",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--use_cpu",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in output_dir.iterdir()) == ["adapter", "checkpoints", "eval"]
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == ["step_2"]  # 8 images / (2 x 2) per step
    assert (output_dir / "eval" / "epoch_1" / "data" / "results.json").is_file()
    load_headclip_model(output_dir / "adapter")
    # The two-process checkpoint resumes in one process (parameter names do not depend on the process count).
    resume = training_args(
        output_dir, resume_from_checkpoint="latest", num_train_epochs=2, per_device_train_batch_size=4
    )
    _, _, losses = run_training(base_dir, load_anomaly_dataset(data, cache_dir=str(tmp_path / "cache")), resume)
    assert len(losses) == 2
