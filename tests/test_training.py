"""Training with accelerate: loss goes down, only HeadCLIP (and LoRA) parameters change, exact resume that never
unpickles, activation checkpointing, schedules, clipping, evaluation and best model, records, logging, publishing,
adapters, PEFT LoRA, multi-process launch, the reproduction script, and the bad-input rules."""

import builtins
import json
import os
import pickle
import re
import runpy
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file, save_file
from test_hub import RecordingHfApi
from transformers import get_scheduler

from headclip_hf import HeadCLIPModel, HeadCLIPProcessor, load_anomaly_dataset
from headclip_hf.adapters import (
    ADAPTER_WEIGHTS_NAME,
    HEADCLIP_PARAMETER_PREFIXES,
    headclip_state_dict,
    load_headclip_adapter,
    load_headclip_model,
    save_headclip_adapter,
)
from headclip_hf.cli import main as headclip_main
from headclip_hf.cli.train import main as training_main
from headclip_hf.cli.train import parse_config_overrides
from headclip_hf.configuration_headclip import HeadCLIPConfig
from headclip_hf.data import AnomalyCollator
from headclip_hf.modeling_headclip import HeadCLIPHeadWeights, HeadCLIPPromptLearner
from headclip_hf.training import HeadCLIPTrainingArguments, _build_optimizer, train

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
    with pytest.raises(ValueError, match=r"saved in the middle of epoch 2 by 1 process\(es\) with batches of 3"):
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
    # A real short card, not PEFT's boilerplate; a local base path is not Hub metadata.
    card = ModelCard.load(adapter / "README.md")
    assert "More Information Needed" not in card.text and "rank 2, alpha 16" in card.text
    assert "load_headclip_model" in card.text and card.data.base_model is None
    assert (card.data.library_name, card.data.pipeline_tag) == ("headclip_hf", "image-segmentation")
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


def save_base(path, model, base_dir):
    model.save_pretrained(path)
    HeadCLIPProcessor.from_pretrained(base_dir).save_pretrained(path)
    return path


def test_checkpoint_from_another_model_shape_is_refused(base_dir, tmp_path, synthetic_set, tiny_config_factory):
    run_training(base_dir, synthetic_set, training_args(tmp_path / "run"))
    resume = training_args(tmp_path / "run", resume_from_checkpoint="latest", num_train_epochs=2)
    # Same HeadCLIP fields, wider text encoder: the tensors do not fit.
    wider_text = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    other = save_base(tmp_path / "wider", HeadCLIPModel(tiny_config_factory(text_config=wider_text)), base_dir)
    with pytest.raises(ValueError, match=r"comes from a model of another shape: .*normal_context has shape \(6, 32\)"):
        run_training(other, synthetic_set, resume)


def test_checkpoint_with_another_configuration_is_refused(base_dir, tmp_path, synthetic_set, tiny_config_factory):
    """Same shapes, other HeadCLIP fields (issue 9, item 10): refused with the differing fields named."""
    run_training(base_dir, synthetic_set, training_args(tmp_path / "run"))
    resume = training_args(tmp_path / "run", resume_from_checkpoint="latest", num_train_epochs=2)
    other = save_base(
        tmp_path / "other", HeadCLIPModel(tiny_config_factory(joint_alpha=1.0, feature_layers=[2, 4])), base_dir
    )
    expected = (
        r"another HeadCLIP configuration: feature_layers \(checkpoint \[1, 2, 3, 4\], now \[2, 4\]\); "
        r"joint_alpha \(checkpoint 0.5, now 1.0\)"
    )
    with pytest.raises(ValueError, match=expected) as error:
        run_training(other, synthetic_set, resume)
    assert "vv_start_layer" in str(error.value)  # follows the first feature layer
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_2" / "training_state.json").read_text())
    assert state["model_config"]["joint_alpha"] == 0.5 and state["model_config"]["lora_rank"] == 0


class CreatesMarker:
    """Unpickling this object opens (creates) the marker file: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.parametrize(
    "file_name, message",
    [
        ("custom_checkpoint_0.pkl", "holds files that are not part of a HeadCLIP checkpoint: custom_checkpoint_0.pkl"),
        ("random_states_0.pkl", "holds files that are not part of a HeadCLIP checkpoint: random_states_0.pkl"),
        ("rng_state_0.safetensors", "rng_state_0.safetensors is not a random-number-generator state"),
        ("optimizer.pt", r"optimizer.pt cannot be read as plain tensors \(torch.load with weights_only=True\)"),
        ("training_state.json", "training_state.json is not valid JSON"),
    ],
)
def test_resuming_never_unpickles(base_dir, tmp_path, synthetic_set, file_name, message):
    """Issue 9, item 2: a pickle that would create a marker file, placed in a checkpoint, is never unpickled."""
    run_training(base_dir, synthetic_set, training_args(tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    marker = tmp_path / "marker"
    (checkpoint / file_name).write_bytes(pickle.dumps(CreatesMarker(marker)))
    with pickle.loads(pickle.dumps(CreatesMarker(tmp_path / "proof"))):  # the pickle works: it creates its file
        pass
    assert (tmp_path / "proof").exists()
    resume = training_args(tmp_path / "run", resume_from_checkpoint="latest", num_train_epochs=2)
    with pytest.raises(ValueError, match=message):
        run_training(base_dir, synthetic_set, resume)
    assert not marker.exists()


def test_checkpoint_with_non_finite_parameters_is_refused(base_dir, tmp_path, synthetic_set):
    """Issue 9, item 3: resuming from a checkpoint whose parameters hold NaN stops, naming the file and the tensor."""
    run_training(base_dir, synthetic_set, training_args(tmp_path / "run"))
    weights = tmp_path / "run" / "checkpoints" / "step_2" / "model.safetensors"
    tensors = load_file(weights)
    name = next(name for name in tensors if "head_weights" in name)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights)
    resume = training_args(tmp_path / "run", resume_from_checkpoint="latest", num_train_epochs=2)
    with pytest.raises(ValueError, match=rf"Refused to load {re.escape(str(weights))}: the tensors {name} hold NaN"):
        run_training(base_dir, synthetic_set, resume)


def test_checkpoint_files_are_tensors_and_json(base_dir, tmp_path, synthetic_set):
    run_training(base_dir, synthetic_set, training_args(tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "model.safetensors",
        "optimizer.pt",
        "rng_state_0.safetensors",
        "scheduler.json",
        "training_state.json",
    ]
    assert set(load_file(checkpoint / "model.safetensors")) == set(
        headclip_state_dict(HeadCLIPModel.from_pretrained(base_dir))
    )
    torch.load(checkpoint / "optimizer.pt", weights_only=True)  # plain tensors and containers


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    """Activation checkpointing through HeadCLIP's own layer loop: the same gradients, and the layers recomputed."""
    model = tiny_model.train()
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 64, 64)
    masks = (torch.rand(2, 64, 64) > 0.8).float()
    labels = torch.tensor([0, 1])
    mlp_calls = []
    for layer in model.vision_model.encoder.layers:
        layer.mlp.register_forward_pre_hook(lambda module, inputs: mlp_calls.append(module))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        mlp_calls.clear()
        model(pixel_values=pixel_values, masks=masks, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain = gradients()
    assert len(mlp_calls) == 4  # one forward per vision layer
    with pytest.warns(FutureWarning):  # transformers 5 renamed it activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed = gradients()
    assert len(mlp_calls) == 8  # every vision layer ran again in the backward pass
    assert set(checkpointed) == set(plain) and "attention_head_weights.weight" in plain
    for name, gradient in plain.items():
        assert gradient.abs().sum() > 0, name
        assert (checkpointed[name] - gradient).abs().max() <= 1e-6, name
    model.eval()  # no recomputation outside training
    mlp_calls.clear()
    model(pixel_values=pixel_values)
    assert len(mlp_calls) == 4


def test_learning_rate_schedule_grad_norm_and_clipping(base_dir, tmp_path, synthetic_set):
    common = dict(per_device_train_batch_size=2, lr_scheduler_type="linear", warmup_steps=2)  # 4 steps
    _, adapter, _ = run_training(base_dir, synthetic_set, training_args(tmp_path / "run", **common))
    history = json.loads((tmp_path / "run" / "training_state.json").read_text())["log_history"]
    # transformers' schedule for the 4 steps, read from an independent scheduler.
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=4)
    expected = []
    for _ in range(4):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [entry["train/learning_rate"] for entry in history] == expected == [0.0, 5e-4, 1e-3, 5e-4]
    assert all(entry["train/grad_norm"] > 0 and entry["train/images_per_second"] > 0 for entry in history)

    # The logged norm is the norm of the step's gradient: step 1 of a batch holding the whole set.
    args = training_args(tmp_path / "whole", per_device_train_batch_size=8)
    run_training(base_dir, synthetic_set, args)
    first = json.loads((tmp_path / "whole" / "training_state.json").read_text())["log_history"][0]
    model = HeadCLIPModel.from_pretrained(base_dir).train()
    batch = AnomalyCollator(HeadCLIPProcessor.from_pretrained(base_dir))(list(synthetic_set))
    model(**{k: batch[k] for k in ("pixel_values", "masks", "labels", "mask_valid")}).loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.requires_grad]))
    assert first["train/grad_norm"] == pytest.approx(norm.item(), rel=1e-4)

    # Clipping to a tiny norm: Adam's first step is about lr * sign(g) unclipped, almost nothing clipped.
    def first_step_change(max_grad_norm: float, name: str) -> float:
        args = training_args(tmp_path / name, per_device_train_batch_size=8, max_grad_norm=max_grad_norm)
        trained, _, _ = run_training(base_dir, synthetic_set, args)
        before = HeadCLIPModel.from_pretrained(base_dir)
        return (trained.head_weights - before.head_weights).abs().max().item()

    assert first_step_change(0.0, "unclipped") == pytest.approx(1e-3, rel=1e-2)
    assert first_step_change(1e-12, "clipped") < 1e-5


def test_head_weights_are_not_weight_decayed(tiny_model):
    args = training_args("unused", weight_decay=0.1)
    groups = _build_optimizer(tiny_model, args).param_groups
    decays = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    assert decays[id(tiny_model.head_weights)] == 0.0
    assert decays[id(tiny_model.prompt_learner.normal_context)] == 0.1
    assert all(group["decoupled_weight_decay"] for group in groups)


def test_evaluation_steps_best_model_limit_and_records(base_dir, tmp_path, synthetic_set):
    """Evaluations every 2 steps and at a mid-epoch end, the best model loaded, older checkpoints deleted."""
    args = training_args(
        tmp_path / "run",
        num_train_epochs=2,
        per_device_train_batch_size=2,  # 4 steps per epoch
        max_steps=5,  # stops in the middle of epoch 2
        eval_steps=2,
        metric_for_best_model="synthetic/image_auroc",
        load_best_model_at_end=True,
        save_total_limit=1,
    )
    _, adapter, _ = run_training(base_dir, synthetic_set, args, eval_datasets={"synthetic": synthetic_set})
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step_2", "step_4", "step_5"]  # 5: the end
    assert (run / "eval" / "step_5" / "synthetic" / "results.json").is_file()
    state = json.loads((run / "training_state.json").read_text())
    evaluations = {
        e["step"]: e["eval/synthetic/image_auroc"] for e in state["log_history"] if "eval/synthetic/mad_image" in e
    }
    assert sorted(evaluations) == [2, 4, 5]
    best_step = max(evaluations, key=lambda step: (evaluations[step], -step))  # the first of equal values
    assert state["best_model_checkpoint"] == f"step_{best_step}" and state["best_metric"] == evaluations[best_step]
    # save_total_limit 1: the newest checkpoint, and the best one.
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"step_5", f"step_{best_step}"}
    best = load_file(run / "checkpoints" / f"step_{best_step}" / "model.safetensors")
    saved = load_file(adapter / ADAPTER_WEIGHTS_NAME)
    assert set(saved) == set(best) and all(torch.equal(saved[name], best[name]) for name in best)
    summary = json.loads((run / "all_results.json").read_text())
    assert summary["model_evaluation_step"] == best_step and summary["global_step"] == 5
    assert summary["eval/synthetic/image_auroc"] == evaluations[best_step]
    assert summary["epoch"] == 1.25 and summary["train_loss"] > 0
    results = json.loads((run / "eval" / f"step_{best_step}" / "synthetic" / "results.json").read_text())
    assert results["mean"]["image_auroc"]["value"] == evaluations[best_step]


def write_run(tmp_path, base_dir, **overrides) -> tuple[Path, Path]:
    """A finished run in tmp_path/run, trained on the generic folder tmp_path/data."""
    data = tmp_path / "data"
    if not data.exists():
        write_generic_folder(data)
    dataset = load_anomaly_dataset(data, cache_dir=str(tmp_path / "cache"))
    run_training(base_dir, dataset, training_args(tmp_path / "run", **overrides))
    return data, tmp_path / "run"


def headclip_train(capsys, *argv) -> tuple[int, str, str]:
    """Run `headclip train` in this process; returns the exit status, the last line on stderr, and stdout."""
    capsys.readouterr()
    code = headclip_main(["train", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and err.count("headclip: error:") == (code == 1), err
    return code, err.strip().splitlines()[-1] if err.strip() else "", out


@pytest.fixture
def cli_environment(tmp_path, monkeypatch):
    """`headclip train` in this process: the data set cache in tmp_path, no model loading unless allowed."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr("headclip_hf.cli.train.load_headclip_model_and_processor", no_model)
    return monkeypatch


def test_train_command_user_errors_before_the_model_loads(base_dir, tmp_path, capsys, cli_environment):
    """Issue 9, item 6 and issue 14's bad inputs: one `headclip: error:` line each, no traceback, no model loaded."""
    data, run = write_run(tmp_path, base_dir, save_steps=1, per_device_train_batch_size=3)  # 3 steps, 1 epoch
    model = ("--model_name_or_path", base_dir, "--image_size", 64)
    common = (*model, "--train_data", data, "--num_train_epochs", 2)
    cases = [
        (
            (*common, "--output_dir", run),
            re.escape(f"{run} holds a previous run (checkpoints, adapter, training_state.json, all_results.json)"),
        ),
        ((*model, "--train_data", tmp_path / "missing", "--output_dir", tmp_path / "new"), "missing does not exist"),
        (
            (*common, "--output_dir", tmp_path / "empty", "--resume_from_checkpoint", "latest"),
            "No checkpoint to resume from: 'latest'",
        ),
        (
            (*common, "--output_dir", run, "--resume_from_checkpoint", run / "checkpoints" / "step_1"),
            r"saved in the middle of epoch 1 by 1 process\(es\) with batches of 3; resuming mid-epoch needs the same "
            r"layout \(now 1 process\(es\), batches of 8\)",
        ),
        (
            (*common, "--output_dir", tmp_path / "new", "--metric_for_best_model", "pixel_auc", "--eval_data", data),
            "--metric_for_best_model 'pixel_auc': evaluation reports no metric 'pixel_auc'. Use one of image_auroc",
        ),
        (
            (*common, "--output_dir", tmp_path / "new", "--metric_for_best_model", "mad", "--load_best_model_at_end"),
            "--metric_for_best_model and --load_best_model_at_end need.* evaluation data",
        ),
        (
            (*common, "--output_dir", tmp_path / "new", "--lr_scheduler_type", "linear", "--warmup_steps", 10),
            r"The warmup \(10 optimizer steps\) is longer than the run \(2 steps of 8 x 1 x 1 images\)",
        ),
        ((*common, "--output_dir", tmp_path / "new", "--max_grad_norm", -1), "--max_grad_norm -1.0 is invalid"),
        ((*common, "--output_dir", tmp_path / "new", "--report_to", "nonsense"), "--report_to 'nonsense' is not a"),
        (
            (*common, "--output_dir", tmp_path / "new", "--warmup_steps", 1),
            "The 'constant' schedule has no warmup: use --lr_scheduler_type constant_with_warmup",
        ),
        (
            (*common, "--output_dir", tmp_path / "new", "--eval_data", data, "--push_to_hub"),
            "--push_to_hub needs --hub_model_id",
        ),
        (
            (*common, "--output_dir", tmp_path / "new", "--push_to_hub", "--hub_model_id", "not a valid id!!"),
            "Repo id must use alphanumeric chars",
        ),
    ]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases += [
        ((*common, "--output_dir", a_file), f"{a_file} is a file, not a folder: choose a folder for the training run"),
        ((*common, "--output_dir", a_file / "run"), f"Cannot write {a_file / 'run'}: {a_file} is a file"),
        (
            (*common, "--output_dir", tmp_path / "new", "--eval_data", data, "--push_to_hub", "--hub_model_id", "a/b"),
            "headclip: error: Cannot upload to the Hugging Face Hub: no token. Uploading needs the network .* log in "
            "with `hf auth login` or pass --hub_token. To work without uploading, leave out --push_to_hub.",
        ),
    ]

    class NotLoggedIn:
        def __init__(self, token=None):
            pass

        def whoami(self):
            raise OSError("no token")

    cli_environment.setattr("headclip_hf.hub.HfApi", NotLoggedIn)
    (run / "checkpoints" / "step_2" / "optimizer.pt").unlink()
    cases.append(
        (
            (*common, "--output_dir", run, "--resume_from_checkpoint", run / "checkpoints" / "step_2"),
            "step_2 is incomplete: optimizer.pt missing",
        )
    )
    for argv, message in cases:
        code, err, out = headclip_train(capsys, *argv)
        assert code == 1, (argv, err)
        assert err.startswith("headclip: error: "), err
        assert re.search(message, err), (message, err)
    assert not (tmp_path / "new").exists() and not (tmp_path / "empty").exists()


def test_train_command_shares_the_flags_of_the_other_commands(base_dir, tmp_path, capsys, cli_environment):
    """`--out`, the data flags of every command taking data (applied to --train_data), usage errors named `headclip
    train`."""
    data = write_generic_folder(tmp_path / "data")
    table = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"picture": [str(data / "good" / "000.png")], "anomalous": [0]}).to_parquet(table)
    model = ("--model_name_or_path", base_dir, "--image_size", 64)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ((*model, "--train_data", data, "--out", a_file), f"{a_file} is a file, not a folder"),
        ((*model, "--train_data", data, "--out", tmp_path / "new", "--split", "train"), "has only a test split"),
        ((*model, "--train_data", data, "--out", tmp_path / "new", "--categories", "nuts"), "nuts"),
        (
            (*model, "--train_data", data, "--out", tmp_path / "new", "--image_column", "picture"),
            f"Cannot load the data set {data}: image_column name columns of a table",
        ),
        (
            (*model, "--train_data", table, "--out", tmp_path / "new", "--image_column", "img"),
            r"image_column='img' is not a column of .*\['picture', 'anomalous'\]",
        ),
        (
            (*model, "--train_data", data, "--eval_data", data, "--eval_split", "train", "--out", tmp_path / "new"),
            "has only a test split",
        ),
    ]
    for argv, message in cases:
        code, err, _ = headclip_train(capsys, *argv)
        assert code == 1 and re.search(message, err), (argv, err)
    with pytest.raises(SystemExit) as exit_info:
        headclip_main(["train", "--train_data", str(data)])  # no --output_dir
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: headclip train" in err and "headclip train: error:" in err
    assert "__main__" not in err and not (tmp_path / "new").exists()


def test_train_command_errors_after_the_model_loads(base_dir, tmp_path, capsys, tiny_config_factory, monkeypatch):
    """A checkpoint of another shape or configuration: refused after loading the model, before training."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data, run = write_run(tmp_path, base_dir)
    common = ("--train_data", data, "--image_size", 64, "--output_dir", run, "--resume_from_checkpoint", "latest")
    wider_text = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    wider = save_base(tmp_path / "wider", HeadCLIPModel(tiny_config_factory(text_config=wider_text)), base_dir)
    code, err, out = headclip_train(capsys, "--model_name_or_path", wider, "--num_train_epochs", 2, *common)
    assert code == 1 and "comes from a model of another shape" in err and "Traceback" not in err
    code, err, out = headclip_train(
        capsys, "--model_name_or_path", base_dir, "--config_overrides", "joint_alpha=1.0", "--num_train_epochs", 2,
        *common,
    )  # fmt: skip
    assert code == 1 and "another HeadCLIP configuration: joint_alpha (checkpoint 0.5, now 1.0)" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2"]  # nothing trained


class RecordingTrackerCalls:
    """Records what the training sends to accelerate's trackers."""

    def __init__(self, monkeypatch):
        self.config, self.logs = {}, []
        monkeypatch.setattr("accelerate.Accelerator.init_trackers", lambda _, name, config: self.config.update(config))
        monkeypatch.setattr("accelerate.Accelerator.log", lambda _, values, step: self.logs.append((step, values)))


def test_logging_hyperparameters_and_metrics(base_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = write_generic_folder(tmp_path / "data")
    tracker = RecordingTrackerCalls(monkeypatch)
    argv = [
        "--model_name_or_path", base_dir, "--image_size", 64, "--train_data", data, "--eval_data", data,
        "--output_dir", tmp_path / "run", "--num_train_epochs", 1, "--per_device_train_batch_size", 4,
        "--logging_steps", 1, "--report_to", "tensorboard", "--config_overrides", "joint_alpha=0.25",
        "--hub_token", "hf_secret",
    ]  # fmt: skip
    code, err, out = headclip_train(capsys, *argv)
    assert code == 0, err
    config = tracker.config
    assert config["model_name_or_path"] == str(base_dir) and config["train_data"] == str(data)  # model and data
    assert config["learning_rate"] == 1e-3 and config["joint_alpha"] == 0.25 and config["image_size"] == 64
    assert "hub_token" not in config and "hf_secret" not in str(config)
    train_logs = [values for _, values in tracker.logs if "train/loss" in values]
    assert len(train_logs) == 2
    assert set(train_logs[0]) == {"train/loss", "train/learning_rate", "train/grad_norm", "train/images_per_second"}
    (step, evaluation), *_ = [(step, values) for step, values in tracker.logs if "eval/data/pixel_auroc" in values]
    assert step == 2 and "eval/data/mad_image" in evaluation


class CardRecordingHfApi(RecordingHfApi):
    """test_hub's stand-in for `huggingface_hub.HfApi`, also keeping the model card of the uploaded folder."""

    cards: list = []

    def upload_folder(self, **kwargs):
        self.cards.append((Path(kwargs["folder_path"]) / "README.md").read_text())
        return super().upload_folder(**kwargs)


def test_push_to_hub_at_the_end_through_headclip_push(base_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    CardRecordingHfApi.calls, CardRecordingHfApi.cards = [], []
    monkeypatch.setattr("headclip_hf.hub.HfApi", CardRecordingHfApi)
    data = write_generic_folder(tmp_path / "parts")
    argv = [
        "--model_name_or_path", base_dir, "--image_size", 64, "--train_data", data, "--eval_data", data,
        "--output_dir", tmp_path / "run", "--num_train_epochs", 2, "--per_device_train_batch_size", 4,
        "--metric_for_best_model", "image_auroc", "--load_best_model_at_end",
        "--push_to_hub", "--hub_model_id", "someone/headclip-trained", "--hub_private_repo", "--hub_token", "hf_t",
    ]  # fmt: skip
    code, err, out = headclip_train(capsys, *argv)
    assert code == 0, err
    calls = dict(CardRecordingHfApi.calls)
    assert calls["init"] == {"token": "hf_t"}
    assert calls["create_repo"] == {"repo_id": "someone/headclip-trained", "repo_type": "model", "private": True,
                                    "exist_ok": True}  # fmt: skip
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "someone/headclip-trained" and "model.safetensors" in upload["files"]
    # The card holds the evaluation of the pushed (best) model.
    summary = json.loads((tmp_path / "run" / "all_results.json").read_text())
    results_dir = tmp_path / "run" / "eval" / f"step_{summary['model_evaluation_step']}" / "parts"
    (card,) = CardRecordingHfApi.cards
    assert (results_dir / "results.md").read_text().strip() in card
    assert "trained on the labelled test split of **parts**" in card
    assert "commit/abc" in out


def test_two_cpu_processes_equal_one_process(base_dir, tmp_path):
    """
    Two processes (`accelerate launch --num_processes 2`, batches of 2) with activation checkpointing, a schedule,
    clipping, evaluations and best-model selection end with the parameters of one process with batches of 4 (the same
    global batch); the two-process checkpoint then resumes in one process.
    """
    data = write_generic_folder(tmp_path / "data", num_normal=4, num_anomalous=4)
    settings = dict(
        num_train_epochs=2,  # 8 images / 4 per step: 4 steps
        gradient_checkpointing=True,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        max_grad_norm=0.05,
        eval_steps=2,
        per_device_eval_batch_size=4,
        metric_for_best_model="pixel_aupro",
        load_best_model_at_end=True,
        save_total_limit=1,
    )
    output_dir = tmp_path / "two"
    flags = [item for name, value in settings.items() for item in (f"--{name}", str(value))]
    command = [
        # accelerate's multi-process launcher (torchrun); `--use_cpu` makes the processes a gloo CPU group.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "examples" / "train_headclip.py"),
        "--model_name_or_path", str(base_dir), "--image_size", "64", "--train_data", str(data),
        "--eval_data", str(data), "--output_dir", str(output_dir), "--per_device_train_batch_size", "2",
        "--use_cpu", *flags,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    dataset = load_anomaly_dataset(data, cache_dir=str(tmp_path / "cache"))
    one_args = training_args(tmp_path / "one", per_device_train_batch_size=4, **settings)
    run_training(base_dir, dataset, one_args, eval_datasets={"data": dataset})

    two_state = json.loads((output_dir / "training_state.json").read_text())
    one_state = json.loads((tmp_path / "one" / "training_state.json").read_text())
    assert two_state["num_processes"] == 2 and two_state["global_step"] == one_state["global_step"] == 4
    assert two_state["best_model_checkpoint"] == one_state["best_model_checkpoint"] is not None
    assert sorted(p.name for p in output_dir.iterdir()) == [
        "adapter", "all_results.json", "checkpoints", "eval", "training_state.json"
    ]  # fmt: skip
    assert sorted(p.name for p in (output_dir / "checkpoints" / "step_4").iterdir()) == [
        "model.safetensors", "optimizer.pt", "rng_state_0.safetensors", "rng_state_1.safetensors", "scheduler.json",
        "training_state.json",
    ]  # fmt: skip
    two = load_file(output_dir / "adapter" / ADAPTER_WEIGHTS_NAME)
    one = load_file(tmp_path / "one" / "adapter" / ADAPTER_WEIGHTS_NAME)
    assert set(two) == set(one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)

    # The two-process checkpoint (end of epoch 2) resumes in one process: parameter names do not depend on the count.
    resume = training_args(output_dir, resume_from_checkpoint="latest", per_device_train_batch_size=4, **settings)
    resume.num_train_epochs = 3
    _, _, losses = run_training(base_dir, dataset, resume, eval_datasets={"data": dataset})
    assert len(losses) == 2


def test_reproduce_zero_shot_script(clip_checkpoint, clip_tokenizer, tmp_path, test_data_dir):
    """The reproduction script end to end: 4 variants x 2 directions on real images (bottle and Kvasir), tiny size."""
    HeadCLIPProcessor(tokenizer=clip_tokenizer).save_pretrained(clip_checkpoint)  # a plain CLIP folder, as on the Hub
    script = runpy.run_path(str(REPO_ROOT / "examples" / "reproduce_zero_shot.py"))
    output_dir = tmp_path / "reproduction"
    table = script["main"](
        [
            "--mvtec", str(test_data_dir / "mvtec_ad" / "bottle"),
            "--visa", str(test_data_dir / "kvasir_seg" / "colon"),
            "--model_name_or_path", str(clip_checkpoint), "--image_size", "32", "--output_dir", str(output_dir),
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_eval_samples", "6",
            "--cache_dir", str(tmp_path / "cache"), "--config_overrides", "deep_prompt_depth=3",
        ]
    )  # fmt: skip
    variants = ["anomalyclip", "head_weights", "joint_score", "headclip"]
    results = json.loads((output_dir / "reproduction.json").read_text())
    assert list(results["results"]) == variants
    for variant in variants:
        assert set(results["results"][variant]) == {"MVTec AD", "VisA"}  # evaluated on the set it did not train on
        kvasir = results["results"][variant]["VisA"]
        assert kvasir["image_auroc"] is None and kvasir["pixel_auroc"] is not None  # no normal images in Kvasir
        summary = json.loads((output_dir / variant / "train_on_mvtec_ad" / "all_results.json").read_text())
        assert summary["eval/visa/pixel_auroc"] == kvasir["pixel_auroc"]
    configs = {
        variant: json.loads((output_dir / variant / "train_on_visa" / "adapter" / "headclip_adapter_config.json")
                            .read_text())["headclip_config"]
        for variant in variants
    }  # fmt: skip
    assert [(c["use_head_weights"], c["joint_alpha"]) for c in configs.values()] == [
        (False, 1.0), (True, 1.0), (False, 0.5), (True, 0.5)
    ]  # fmt: skip
    assert all(c["global_feature_layernorm"] is False and c["feature_layers"] == [4] for c in configs.values())
    markdown = (output_dir / "reproduction.md").read_text()
    assert markdown == table
    assert "| headclip |" in markdown and "Trained on MVTec AD, evaluated on VisA" in markdown


def test_reproduce_zero_shot_errors_before_any_work(clip_checkpoint, tmp_path, test_data_dir):
    """User errors are one `reproduce_zero_shot.py: error:` line; the table files of the user are never replaced."""
    script_path = REPO_ROOT / "examples" / "reproduce_zero_shot.py"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    data = ["--mvtec", tmp_path / "missing", "--visa", test_data_dir / "kvasir_seg" / "colon"]
    argv = [*data, "--model_name_or_path", clip_checkpoint, "--output_dir", tmp_path / "out"]
    result = subprocess.run(
        [sys.executable, str(script_path), *map(str, argv)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"reproduce_zero_shot.py: error: Data set root {tmp_path / 'missing'} does not exist" in result.stderr

    script = runpy.run_path(str(script_path))
    output_dir = tmp_path / "reproduction"
    output_dir.mkdir()
    (output_dir / "reproduction.md").write_text("my notes on the reproduction\n")
    with pytest.raises(FileExistsError, match="reproduction.md already exists and was not written by this command"):
        script["main"](list(map(str, argv[:-1] + [output_dir])))  # refused before the (missing) data is read
    assert (output_dir / "reproduction.md").read_text() == "my notes on the reproduction\n"
    assert script["is_earlier_table"](output_dir / "reproduction.md") is False
    (output_dir / "reproduction.md").write_text(script["MARKDOWN_TITLE"] + "\n\n| variant |\n")
    (output_dir / "reproduction.json").write_text(json.dumps({"settings": {}, "results": {}}))
    assert script["is_earlier_table"](output_dir / "reproduction.md")
    assert script["is_earlier_table"](output_dir / "reproduction.json")
