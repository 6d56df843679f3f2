"""HeadCLIPModel: exact CLIP equivalence when untrained, head weights, value-value path, maps, scores, loss, cache."""

import copy as copy_module
import logging
import math
import pickle

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from scipy.ndimage import gaussian_filter
from transformers import CLIPModel

from headclip_hf import HeadCLIPModel, load_headclip_model
from headclip_hf.adapters import save_headclip_adapter
from headclip_hf.modeling_headclip import gaussian_blur


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


def reference_attention(attention, hidden_states, head_weights=None, value_value=False):
    """Multi-head attention written out head by head, independent of the model's code path (no SDPA, no reshapes
    of the model's)."""
    num_heads = attention.num_heads
    head_dim = attention.head_dim
    q = attention.q_proj(hidden_states)
    k = attention.k_proj(hidden_states)
    v = attention.v_proj(hidden_states)
    if value_value:
        q, k = v, v
    heads = []
    for h in range(num_heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        scores = q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(head_dim)
        out = torch.softmax(scores, dim=-1) @ v[..., cols]
        weight = 1.0 if head_weights is None else float(head_weights[h])
        heads.append(out * weight)
    return torch.cat(heads, dim=-1)  # before out_proj


def capture_inputs(module):
    """Register a forward pre-hook that records the first positional input of every call of `module`."""
    records = []
    handle = module.register_forward_pre_hook(lambda _m, args: records.append(args[0].detach().clone()))
    return records, handle


@pytest.mark.parametrize("size", [32, 64])
def test_untrained_headclip_equals_clip_embeddings(tiny_model, clip_checkpoint, size):
    clip = CLIPModel.from_pretrained(clip_checkpoint).eval()
    pixel_values = torch.randn(2, 3, size, size)
    with torch.no_grad():
        outputs = tiny_model(pixel_values=pixel_values)
        image_features = clip.get_image_features(pixel_values=pixel_values, interpolate_pos_encoding=True)
        text_features = clip.get_text_features(input_ids=tiny_model.prompt_learner.prompt_token_ids)
    assert torch.equal(outputs.image_embeds, normalize(image_features.pooler_output))
    assert torch.equal(outputs.text_embeds, normalize(text_features.pooler_output))


def test_from_plain_clip_checkpoint_initialises_only_headclip_parameters(tiny_model, clip_checkpoint):
    # HeadCLIP fields go to from_pretrained as config overrides (the plain CLIP config has none).
    overrides = dict(prompt_length=6, deep_prompt_depth=3, deep_prompt_length=2, image_size=64)
    model, info = HeadCLIPModel.from_pretrained(clip_checkpoint, output_loading_info=True, **overrides)
    assert set(info["missing_keys"]) == {
        "attention_head_weights.weight",
        "prompt_learner.normal_context",
        "prompt_learner.abnormal_context",
        "prompt_learner.deep_prompts",
    }
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = tiny_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert torch.equal(model.head_weights, torch.ones(4, 4))
    # Only the HeadCLIP parameters train after loading.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(info["missing_keys"])
    # The context starts as the token embeddings of the last 6 tokens of the init phrase.
    phrase_ids = torch.tensor(model.config.prompt_init_ids[-6:])
    expected = model.text_model.embeddings.token_embedding.weight[phrase_ids]
    assert torch.equal(model.prompt_learner.normal_context, expected)
    assert torch.equal(model.prompt_learner.abnormal_context, expected)


def test_shorter_init_phrase_leaves_random_leading_context(tiny_config_factory):
    torch.manual_seed(0)
    model = HeadCLIPModel(tiny_config_factory(prompt_init_ids=[320, 1125]))  # "a photo"
    embedding = model.text_model.embeddings.token_embedding.weight
    context = model.prompt_learner.normal_context
    assert torch.equal(context[-2:], embedding[[320, 1125]])
    assert 0.005 < context[:-2].std() < 0.05  # N(0, 0.02)
    assert torch.equal(model.prompt_learner.abnormal_context, context)


def test_zero_head_weight_removes_that_head(tiny_model):
    layer_index, head = 2, 1
    attention = tiny_model.vision_model.encoder.layers[layer_index].self_attn
    with torch.no_grad():
        tiny_model.head_weights[layer_index, head] = 0.0
    layer_inputs, h1 = capture_inputs(attention.q_proj)
    out_proj_inputs, h2 = capture_inputs(attention.out_proj)
    with torch.no_grad():
        tiny_model(pixel_values=torch.randn(2, 3, 64, 64))
    h1.remove(), h2.remove()
    # The first call of the layer is the original path (the second, in value-value layers, is the v-v path).
    with torch.no_grad():
        expected = reference_attention(attention, layer_inputs[0], head_weights=[1, 0, 1, 1])
    torch.testing.assert_close(out_proj_inputs[0], expected, rtol=1e-5, atol=1e-6)
    head_dim = attention.head_dim
    assert torch.count_nonzero(out_proj_inputs[0][..., head * head_dim : (head + 1) * head_dim]) == 0


def test_scaling_a_layers_head_weights_scales_its_attention_output(tiny_model):
    layer_index, scale = 1, 2.5
    attention = tiny_model.vision_model.encoder.layers[layer_index].self_attn
    pixel_values = torch.randn(1, 3, 64, 64)

    def out_proj_input():
        records, handle = capture_inputs(attention.out_proj)
        with torch.no_grad():
            tiny_model(pixel_values=pixel_values)
        handle.remove()
        return records[0]

    before = out_proj_input()
    with torch.no_grad():
        tiny_model.head_weights[layer_index] *= scale
    after = out_proj_input()
    torch.testing.assert_close(after, before * scale, rtol=1e-6, atol=1e-6)


def test_value_value_path_matches_independent_computation(tiny_config_factory):
    torch.manual_seed(0)
    model = HeadCLIPModel(tiny_config_factory(vv_start_layer=2, feature_layers=[2, 4])).eval()
    with torch.no_grad():
        model.head_weights.uniform_(0.5, 1.5)
    layer = model.vision_model.encoder.layers[1]  # layer 2 (1-indexed): the first value-value layer
    stream_inputs, handle = capture_inputs(layer.layer_norm1)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, patch_tokens = model.encode_image(pixel_values)
    handle.remove()
    entering = stream_inputs[0]  # (B, 1 + N, D): the stream entering layer 2
    with torch.no_grad():
        heads = reference_attention(
            layer.self_attn, layer.layer_norm1(entering), head_weights=model.head_weights[1], value_value=True
        )
        expected = entering + layer.self_attn.out_proj(heads)
    # Patch tokens at feature layer 2 = stream entering the first v-v layer + its v-v attention (no MLP).
    torch.testing.assert_close(patch_tokens[0], expected[:, 1:], rtol=1e-5, atol=1e-5)
    assert patch_tokens.shape == (2, 2, 64, 32)


def test_gaussian_blur_matches_scipy():
    maps = torch.rand(2, 40, 56, dtype=torch.float64)
    expected = np.stack([gaussian_filter(m, sigma=4.0) for m in maps.numpy()])
    np.testing.assert_allclose(gaussian_blur(maps, 4.0).numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(gaussian_blur(maps, 0.0), maps)


@pytest.mark.parametrize("height,width,batch", [(64, 64, 1), (48, 80, 3), (32, 32, 2)])
def test_map_shapes_and_ranges_at_any_input_size(tiny_model, height, width, batch):
    with torch.no_grad():
        out = tiny_model(pixel_values=torch.randn(batch, 3, height, width))
    assert out.anomaly_map.shape == (batch, height, width)
    assert out.layer_maps.shape == (batch, 4, height, width)
    assert out.image_score.shape == out.global_score.shape == (batch,)
    for tensor in (out.anomaly_map, out.layer_maps, out.image_score, out.global_score):
        assert tensor.dtype == torch.float32
        assert tensor.min() >= 0.0 and tensor.max() <= 1.0
    # Eval mode: the anomaly map is the Gaussian-smoothed mean of the layer maps.
    torch.testing.assert_close(out.anomaly_map, gaussian_blur(out.layer_maps.mean(dim=1), 4.0))


def test_layer_map_formula(tiny_model):
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = tiny_model(pixel_values=pixel_values)
        _, patch_tokens = tiny_model.encode_image(pixel_values)
        layer = 2
        features = tiny_model.visual_projection(tiny_model.vision_model.post_layernorm(patch_tokens[layer, 0]))
        cosine = normalize(features) @ out.text_embeds.T  # (N, 2)
        abnormal = torch.softmax(cosine / 0.07, dim=-1)[:, 1].reshape(1, 1, 8, 8)
        expected = torch.nn.functional.interpolate(abnormal, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.layer_maps[0, layer], expected[0, 0], rtol=1e-5, atol=1e-6)


def test_joint_score_alpha_extremes_and_pooling(tiny_config_factory):
    pixel_values = torch.randn(3, 3, 64, 64)
    outputs = {}
    for alpha, pooling in [(1.0, "max"), (0.0, "max"), (0.0, "topk_mean"), (0.3, "max")]:
        torch.manual_seed(0)
        model = HeadCLIPModel(tiny_config_factory(joint_alpha=alpha, joint_pooling=pooling, joint_topk=0.05)).eval()
        with torch.no_grad():
            outputs[alpha, pooling] = model(pixel_values=pixel_values)
    out = outputs[1.0, "max"]
    assert torch.equal(out.image_score, out.global_score)
    out = outputs[0.0, "max"]
    flat = out.anomaly_map.flatten(1).numpy()
    np.testing.assert_allclose(out.image_score.numpy(), flat.max(axis=1), rtol=1e-6)
    out = outputs[0.0, "topk_mean"]
    k = math.ceil(0.05 * 64 * 64)
    np.testing.assert_allclose(out.image_score.numpy(), np.sort(flat, axis=1)[:, -k:].mean(axis=1), rtol=1e-5)
    out = outputs[0.3, "max"]
    np.testing.assert_allclose(
        out.image_score.numpy(), 0.3 * out.global_score.numpy() + 0.7 * flat.max(axis=1), rtol=1e-5
    )


def test_loss_backward_reaches_only_headclip_parameters(tiny_model):
    tiny_model.train()
    masks = torch.zeros(2, 64, 64)
    masks[1, 10:30, 20:40] = 1.0
    out = tiny_model(pixel_values=torch.randn(2, 3, 64, 64), masks=masks, labels=torch.tensor([0, 1]))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {name: p.grad for name, p in tiny_model.named_parameters()}
    head_grad = grads["attention_head_weights.weight"]
    assert head_grad is not None and tiny_model.head_weights.grad is head_grad
    assert torch.all(head_grad.abs().sum(dim=1) > 0), "every layer's head weights get a gradient"
    for name in ("normal_context", "abnormal_context", "deep_prompts"):
        grad = grads[f"prompt_learner.{name}"]
        assert grad is not None and grad.abs().sum() > 0, name
    backbone = [
        n for n, g in grads.items() if g is not None and not n.startswith(("attention_head_weights", "prompt_learner"))
    ]
    assert backbone == []


def test_loss_terms(tiny_model):
    """The loss is focal + 2 Dice per layer plus the image cross-entropy, checked from the returned maps."""
    tiny_model.train()
    pixel_values = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64)
    masks[0, :16, :16] = 1.0
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        full = tiny_model(pixel_values=pixel_values, masks=masks, labels=labels)
        image_only = tiny_model(pixel_values=pixel_values, labels=labels)
        pixel_only = tiny_model(pixel_values=pixel_values, masks=masks)
        no_targets = tiny_model(pixel_values=pixel_values)
    assert no_targets.loss is None
    expected_ce = torch.nn.functional.cross_entropy(full.global_logits, labels)
    torch.testing.assert_close(image_only.loss, expected_ce)
    torch.testing.assert_close(full.loss, pixel_only.loss + expected_ce)

    def dice(p, t):
        p, t = p.flatten(1), t.flatten(1)
        return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()

    expected = 0.0
    for layer in range(4):
        p = full.layer_maps[:, layer]
        p_true = torch.where(masks > 0, p, 1 - p)
        expected += (-((1 - p_true) ** 2) * torch.log(p_true)).mean() + dice(p, masks) + dice(1 - p, 1 - masks)
    torch.testing.assert_close(pixel_only.loss, expected, rtol=1e-5, atol=1e-6)
    # Training mode: the map is not smoothed.
    torch.testing.assert_close(full.anomaly_map, full.layer_maps.mean(dim=1))
    with pytest.raises(ValueError, match=r"masks have shape \(2, 32, 32\), expected \(2, 64, 64\)"):
        tiny_model(pixel_values=pixel_values, masks=torch.zeros(2, 32, 32))
    # Unknown masks (mask_valid False) are left out of the pixel losses.
    with torch.no_grad():
        first_only = tiny_model(pixel_values=pixel_values[:1], masks=masks[:1])
        valid_first = tiny_model(pixel_values=pixel_values, masks=masks, mask_valid=torch.tensor([True, False]))
        none_valid = tiny_model(
            pixel_values=pixel_values, masks=masks, labels=labels, mask_valid=torch.zeros(2, dtype=torch.bool)
        )
    torch.testing.assert_close(valid_first.loss, first_only.loss)
    torch.testing.assert_close(none_valid.loss, expected_ce)


def test_head_weight_layers_and_switch(tiny_config_factory):
    torch.manual_seed(0)
    model = HeadCLIPModel(tiny_config_factory(head_weight_layers=[2, 4]))
    model.train()
    out = model(pixel_values=torch.randn(1, 3, 64, 64), labels=torch.tensor([1]))
    out.loss.backward()
    row_has_grad = model.head_weights.grad.abs().sum(dim=1) > 0
    assert row_has_grad.tolist() == [False, True, False, True]
    # Weights of the other layers are fixed at 1 whatever the parameter holds.
    with torch.no_grad():
        model.head_weights[0] = 5.0
    applied = model.attention_head_weights()
    assert torch.equal(applied[0], torch.ones(4)) and torch.equal(applied[1], model.head_weights[1])

    none_trainable = HeadCLIPModel(tiny_config_factory(head_weight_layers=[]))
    assert not none_trainable.attention_head_weights.trainable_layers.any()

    off = HeadCLIPModel(tiny_config_factory(use_head_weights=False)).eval()
    assert not off.head_weights.requires_grad
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = off(pixel_values=pixel_values).anomaly_map
        off.head_weights.fill_(5.0)
        assert torch.equal(off(pixel_values=pixel_values).anomaly_map, before)  # switched off: never applied


def test_head_weights_are_one_parameter_under_the_checkpoint_name(tiny_model):
    assert tiny_model.head_weights is tiny_model.attention_head_weights.weight
    assert tiny_model.state_dict()["attention_head_weights.weight"].data_ptr() == tiny_model.head_weights.data_ptr()
    assert not hasattr(tiny_model, "effective_head_weights")


def count_prompt_encodings(model, monkeypatch) -> list:
    calls = []
    compute = model._compute_prompt_embeds
    monkeypatch.setattr(model, "_compute_prompt_embeds", lambda: calls.append(1) or compute())
    return calls


def test_prompt_embeddings_cached_in_eval_until_invalidated(tiny_model, monkeypatch):
    calls = count_prompt_encodings(tiny_model, monkeypatch)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = tiny_model(pixel_values=pixel_values).text_embeds
        second = tiny_model(pixel_values=pixel_values).text_embeds
    assert len(calls) == 1 and second is first  # one text pass; afterwards one vision pass per image
    with torch.no_grad():
        tiny_model.prompt_learner.abnormal_context.add_(0.5)
        stale = tiny_model(pixel_values=pixel_values).text_embeds
        tiny_model.invalidate_prompt_cache()  # the rule for in-place edits in eval mode
        third = tiny_model(pixel_values=pixel_values).text_embeds
    assert stale is first and len(calls) == 2 and not torch.equal(third, first)
    torch.testing.assert_close(third, tiny_model._compute_prompt_embeds(), rtol=0, atol=0)
    tiny_model.train()
    tiny_model(pixel_values=pixel_values)
    tiny_model(pixel_values=pixel_values)
    assert len(calls) == 5  # always recomputed in training mode (call 3 was the reference just above)


def test_prompt_cache_refreshed_after_training_steps_loading_and_moving(tiny_model, monkeypatch):
    pixel_values = torch.randn(1, 3, 64, 64)

    def eval_embeds():
        with torch.no_grad():
            return tiny_model(pixel_values=pixel_values).text_embeds

    first = eval_embeds()
    # An optimizer step in training mode, then back to eval mode: the new prompts are used.
    tiny_model.train()
    optimizer = torch.optim.SGD([p for p in tiny_model.parameters() if p.requires_grad], lr=1.0)
    tiny_model(pixel_values=pixel_values, labels=torch.tensor([1])).loss.backward()
    optimizer.step()
    tiny_model.eval()
    after_step = eval_embeds()
    assert not torch.equal(after_step, first)
    torch.testing.assert_close(after_step, tiny_model._compute_prompt_embeds(), rtol=0, atol=0)
    # load_state_dict (e.g. an adapter) in eval mode.
    state = {name: tensor.clone() for name, tensor in tiny_model.state_dict().items()}
    state["prompt_learner.normal_context"] += 1.0
    tiny_model.load_state_dict(state)
    after_loading = eval_embeds()
    assert not torch.equal(after_loading, after_step)
    torch.testing.assert_close(after_loading, tiny_model._compute_prompt_embeds(), rtol=0, atol=0)
    # Casting (and moving: `to` goes through the same `_apply`).
    tiny_model.to(torch.float64)
    assert eval_embeds().dtype == torch.float64
    calls = count_prompt_encodings(tiny_model, monkeypatch)
    eval_embeds()
    tiny_model.to("cpu")
    eval_embeds()
    assert len(calls) == 1  # `to` clears the cache even when nothing moves: the rule has no exceptions


def shifted_state(module: torch.nn.Module, name: str) -> dict:
    """`module`'s state dict with the tensor `name` moved by 1."""
    state = {key: tensor.clone() for key, tensor in module.state_dict().items()}
    state[name] += 1.0
    return state


@pytest.mark.parametrize("how", ["module_dict", "prompt_learner", "text_model", "text_projection", "peft"])
def test_prompt_cache_refreshed_however_weights_are_loaded(tiny_model, how):
    pixel_values = torch.randn(1, 3, 64, 64)

    def eval_embeds(model):
        with torch.no_grad():
            return model(pixel_values=pixel_values).text_embeds

    before = eval_embeds(tiny_model)
    if how == "module_dict":  # a wrapper that holds the model (its load_state_dict is not the model's)
        wrapper = torch.nn.ModuleDict({"headclip": tiny_model})
        wrapper.load_state_dict(shifted_state(wrapper, "headclip.prompt_learner.normal_context"))
    elif how == "peft":
        peft_model = get_peft_model(
            tiny_model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["prompt_learner"])
        )
        tiny_model = peft_model.get_base_model()
        before = eval_embeds(tiny_model)
        peft_model.load_state_dict(
            shifted_state(peft_model, "base_model.model.prompt_learner.modules_to_save.default.normal_context")
        )
    else:
        submodule = getattr(tiny_model, how)
        name = {
            "prompt_learner": "abnormal_context",
            "text_model": "final_layer_norm.bias",
            "text_projection": "weight",
        }
        submodule.load_state_dict(shifted_state(submodule, name[how]))
    after = eval_embeds(tiny_model)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, tiny_model._compute_prompt_embeds(), rtol=0, atol=0)


def test_prompt_cache_survives_calls_to_the_mode_the_model_is_in(tiny_model, monkeypatch):
    calls = count_prompt_encodings(tiny_model, monkeypatch)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for _ in range(3):
            tiny_model.eval()  # already in eval mode: nothing to forget
            tiny_model(pixel_values=pixel_values)
        assert len(calls) == 1
        tiny_model.train()
        tiny_model.eval()  # the mode changed twice: the prompts may have been trained in between
        tiny_model(pixel_values=pixel_values)
    assert len(calls) == 2


def test_prompt_cache_hooks_follow_copies_and_pickles(tiny_model):
    pixel_values = torch.randn(1, 3, 64, 64)

    def eval_embeds(model):
        with torch.no_grad():
            return model(pixel_values=pixel_values).text_embeds

    original = eval_embeds(tiny_model)
    for copy in (copy_module.deepcopy(tiny_model), pickle.loads(pickle.dumps(tiny_model))):
        assert torch.equal(eval_embeds(copy), original)
        copy.prompt_learner.load_state_dict(shifted_state(copy.prompt_learner, "normal_context"))
        assert not torch.equal(eval_embeds(copy), original)  # the copy's hook clears the copy's cache
        assert eval_embeds(tiny_model) is original  # and leaves the original's alone
    # A copy of the prompt learner alone (PEFT's modules_to_save) does not copy the model with it.
    learner_copy = copy_module.deepcopy(tiny_model.prompt_learner)
    assert all(hook.model() is tiny_model for hook in learner_copy._load_state_dict_post_hooks.values())


def test_prompt_cache_filled_in_inference_mode_is_not_reused_with_autograd(tiny_model):
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        tiny_model(pixel_values=pixel_values)
    with torch.no_grad():
        embeds = tiny_model(pixel_values=pixel_values).text_embeds
    assert not embeds.is_inference()


def test_given_prompt_embeddings_skip_the_text_encoder(tiny_model, monkeypatch):
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tiny_model(pixel_values=pixel_values)
        prompt_embeds = tiny_model.get_prompt_embeds().clone()
        monkeypatch.setattr(tiny_model, "get_prompt_embeds", lambda: pytest.fail("the text side ran"))
        outputs = tiny_model(pixel_values=pixel_values, prompt_embeds=prompt_embeds)
    for name in ("anomaly_map", "image_score", "global_score", "layer_maps"):
        assert torch.equal(outputs[name], expected[name]), name
    assert outputs.text_embeds is prompt_embeds


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_half_precision(tiny_model, dtype):
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=dtype):
            out = tiny_model(pixel_values=pixel_values)  # first call: the prompts are encoded under autocast
        tiny_model.invalidate_prompt_cache()  # the reference encodes them afresh, without autocast
        reference = tiny_model(pixel_values=pixel_values)
    # The prompt embeddings are computed outside autocast: float32 and the same as without autocast.
    assert out.text_embeds.dtype == torch.float32 and torch.equal(out.text_embeds, reference.text_embeds)
    assert out.anomaly_map.dtype == torch.float32
    assert torch.isfinite(out.anomaly_map).all() and torch.isfinite(out.image_score).all()
    torch.testing.assert_close(out.anomaly_map, reference.anomaly_map, rtol=0, atol=0.05)
    torch.testing.assert_close(out.image_score, reference.image_score, rtol=0, atol=0.05)


def test_save_and_load_round_trip_is_bit_exact(tiny_model, tmp_path):
    with torch.no_grad():
        tiny_model.head_weights.uniform_(0.5, 1.5)
        tiny_model.prompt_learner.deep_prompts.add_(torch.randn_like(tiny_model.prompt_learner.deep_prompts))
    tiny_model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()
    loaded = HeadCLIPModel.from_pretrained(tmp_path / "model").eval()
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = tiny_model(pixel_values=pixel_values), loaded(pixel_values=pixel_values)
    for key in a.keys():
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_position_embeddings_resized_to_the_input_grid(tiny_config_factory, mode):
    torch.manual_seed(0)
    model = HeadCLIPModel(tiny_config_factory(position_interpolation=mode)).eval()
    embeddings = model.vision_model.embeddings
    pixel_values = torch.randn(1, 3, 48, 80)  # a 6 x 10 grid from the pretrained 4 x 4 grid
    with torch.no_grad():
        embedded = model.embed_image(pixel_values)
        patches = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    grid_positions = embeddings.position_embedding.weight[1:].reshape(4, 4, 32).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(grid_positions, size=(6, 10), mode=mode, align_corners=False)
    expected_positions = resized[0].permute(1, 2, 0).reshape(60, 32)
    torch.testing.assert_close(embedded[0, 1:] - patches[0], expected_positions, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        embedded[0, 0], embeddings.class_embedding + embeddings.position_embedding.weight[0], rtol=0, atol=0
    )


# ---------------------------------------------------------------------------------------------------------------------
# What loading says
# ---------------------------------------------------------------------------------------------------------------------

TRANSFORMERS_WARNINGS = ("to instantiate a model of type", "LOAD REPORT", "newly initialized", "downstream task")


def test_loading_a_clip_checkpoint_says_what_happened_in_one_line(clip_checkpoint, transformers_logs):
    HeadCLIPModel.from_pretrained(clip_checkpoint, image_size=64)
    assert not any(warning in transformers_logs.text for warning in TRANSFORMERS_WARNINGS)
    lines = [record for record in transformers_logs.records if "HeadCLIP parameters" in record.getMessage()]
    assert [(record.levelname, record.getMessage()) for record in lines] == [
        ("INFO", f"loaded CLIP weights from {clip_checkpoint}; HeadCLIP parameters initialised (untrained)")
    ]


def test_loading_an_adapter_says_so_in_one_line(clip_checkpoint, transformers_logs, tmp_path):
    model = HeadCLIPModel.from_pretrained(clip_checkpoint, image_size=64)
    save_headclip_adapter(model, tmp_path / "adapter")
    transformers_logs.clear()
    load_headclip_model(tmp_path / "adapter")
    assert not any(warning in transformers_logs.text for warning in (*TRANSFORMERS_WARNINGS, "untrained"))
    assert f"loaded adapter {tmp_path / 'adapter'} onto {clip_checkpoint}" in transformers_logs.text


def test_a_headclip_checkpoint_loads_silently(headclip_checkpoint, transformers_logs):
    HeadCLIPModel.from_pretrained(headclip_checkpoint)
    assert not [record for record in transformers_logs.records if record.levelno >= logging.WARNING]
    assert "HeadCLIP parameters" not in transformers_logs.text


def test_other_loading_problems_keep_transformers_report(clip_checkpoint, transformers_logs):
    weights = load_file(clip_checkpoint / "model.safetensors")
    del weights["visual_projection.weight"]  # a CLIP weight: its absence is a real problem
    save_file(weights, clip_checkpoint / "model.safetensors", metadata={"format": "pt"})
    HeadCLIPModel.from_pretrained(clip_checkpoint, image_size=64)
    reports = [record for record in transformers_logs.records if "LOAD REPORT" in record.getMessage()]
    assert len(reports) == 1 and reports[0].levelname == "WARNING"
    assert "visual_projection.weight" in reports[0].getMessage()
    assert "untrained" not in transformers_logs.text


def test_pixel_values_of_a_size_between_patch_multiples_are_refused(tiny_model):
    with pytest.raises(ValueError, match="pixel_values width 60 is not a multiple of the patch size 8: use 56 or 64"):
        tiny_model(pixel_values=torch.randn(1, 3, 64, 60))
