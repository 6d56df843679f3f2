"""Few-shot mode: the model's reference search and maps, references files, the pipeline and the k-shot protocol."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import pipeline

from headclip_hf import HeadCLIPModel, HeadCLIPProcessor, load_anomaly_dataset
from headclip_hf.cli import main as cli_main
from headclip_hf.evaluation import evaluate_k_shot, evaluate_model, load_training_normals
from headclip_hf.metrics import image_auroc, pixel_auroc
from headclip_hf.modeling_headclip import gaussian_blur, max_reference_similarity
from headclip_hf.pipeline_headclip import TASK
from headclip_hf.references import (
    encode_reference_images,
    load_reference_embeds,
    read_reference_metadata,
    save_reference_embeds,
    select_k_shot,
)
from headclip_hf.reporting import K_SHOT_JSON, K_SHOT_MARKDOWN, save_k_shot_results

SIZE = 64  # the tiny model's working size: an 8 x 8 patch grid


@pytest.fixture
def processor(clip_tokenizer):
    return HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=SIZE)


@pytest.fixture
def bottle(test_data_dir):
    return test_data_dir / "mvtec_ad" / "bottle"


@pytest.fixture
def good_images(bottle):
    """Four real normal bottles."""
    return [bottle / "good" / f"{index:03d}.png" for index in range(4)]


def few_shot_outputs(model, pixel_values, reference_embeds):
    with torch.no_grad():
        return model(pixel_values=pixel_values, reference_embeds=reference_embeds)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


def test_reference_image_gets_a_zero_few_shot_map(tiny_model, processor, good_images):
    pixel_values = processor(images=good_images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference_embeds = tiny_model.encode_references(pixel_values[:3])
    assert reference_embeds.shape == (4, 3 * 64, 16)
    torch.testing.assert_close(reference_embeds.norm(dim=-1), torch.ones(4, 3 * 64), rtol=0, atol=1e-6)
    outputs = few_shot_outputs(tiny_model, pixel_values, reference_embeds)
    assert outputs.few_shot_map[:3].abs().max() <= 1e-6
    assert outputs.few_shot_map[3].max() > 1e-3  # the fourth bottle is not a reference


@pytest.mark.parametrize("top,left", [(8, 8), (16, 32), (40, 16), (48, 0)])
def test_pasted_patch_is_where_the_few_shot_map_peaks(tiny_model, processor, good_images, bottle, top, left):
    other = bottle / "contamination" / "000.png"
    pixel_values = processor(images=[*good_images[:3], other], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference_embeds = tiny_model.encode_references(pixel_values[:3])
    pasted = pixel_values[1:2].clone()  # the second reference, with a 16 x 16 pixel patch of another bottle on it
    pasted[..., top : top + 16, left : left + 16] = pixel_values[3:, :, 24:40, 24:40]
    few_shot_map = few_shot_outputs(tiny_model, pasted, reference_embeds).few_shot_map[0]
    row, column = divmod(int(few_shot_map.argmax()), SIZE)
    assert top <= row < top + 16 and left <= column < left + 16


def test_chunked_search_equals_the_unchunked_search_exactly():
    torch.manual_seed(0)
    patch_embeds = F.normalize(torch.randn(4, 3, 64, 16), dim=-1)
    reference_embeds = F.normalize(torch.randn(4, 300, 16), dim=-1)
    unchunked = max_reference_similarity(patch_embeds, reference_embeds, chunk_size=300)
    expected = torch.einsum("lbnp,lmp->lbnm", patch_embeds.double(), reference_embeds.double()).amax(dim=-1)
    torch.testing.assert_close(unchunked.double(), expected, rtol=0, atol=1e-6)
    for chunk_size in (16, 37, 64, 100, 299, 1000):
        assert torch.equal(max_reference_similarity(patch_embeds, reference_embeds, chunk_size=chunk_size), unchunked)


def test_few_shot_maps_and_scores_follow_the_formulas(tiny_model, processor, good_images):
    pixel_values = processor(images=good_images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference_embeds = tiny_model.encode_references(pixel_values[:2])
        zero_shot = tiny_model(pixel_values=pixel_values[2:])
        outputs = tiny_model(pixel_values=pixel_values[2:], reference_embeds=reference_embeds)
        # Independently: the projected value-value features, cosine with every reference patch, per layer.
        _, patch_tokens = tiny_model.encode_image(pixel_values[2:])
        features = tiny_model.visual_projection(tiny_model.vision_model.post_layernorm(patch_tokens))
    features = features / features.norm(dim=-1, keepdim=True)
    similarity = torch.einsum("lbnp,lmp->lbnm", features.double(), reference_embeds.double()).amax(dim=-1)
    scores = ((1 - similarity) / 2).float().reshape(4, 2, 1, 8, 8)
    upsampled = torch.stack([F.interpolate(layer, size=(SIZE, SIZE), mode="bilinear") for layer in scores])
    expected_few_shot = gaussian_blur(upsampled[:, :, 0].mean(dim=0), 4.0)
    torch.testing.assert_close(outputs.few_shot_map, expected_few_shot, rtol=0, atol=1e-6)

    # The zero-shot parts are exactly the zero-shot model's; the map and score combine as documented.
    assert torch.equal(outputs.zero_shot_map, zero_shot.anomaly_map)
    for name in ("layer_maps", "global_score", "global_logits", "image_embeds", "text_embeds"):
        assert torch.equal(getattr(outputs, name), getattr(zero_shot, name)), name
    assert torch.equal(outputs.anomaly_map, 0.5 * outputs.zero_shot_map + 0.5 * outputs.few_shot_map)
    expected_score = 0.5 * outputs.global_score + 0.5 * outputs.anomaly_map.flatten(1).amax(dim=1)
    assert torch.equal(outputs.image_score, expected_score)
    assert outputs.few_shot_map.min() >= 0 and outputs.few_shot_map.max() <= 1


def test_few_shot_weight_zero_keeps_the_zero_shot_outputs_and_one_the_few_shot_map(tiny_config_factory):
    pixel_values = torch.randn(2, 3, SIZE, SIZE)
    outputs = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = HeadCLIPModel(tiny_config_factory(few_shot_weight=weight)).eval()
        with torch.no_grad():
            reference_embeds = model.encode_references(torch.randn(2, 3, SIZE, SIZE))
        outputs[weight] = few_shot_outputs(model, pixel_values, reference_embeds)
        zero_shot = few_shot_outputs(model, pixel_values, None)
    assert torch.equal(outputs[0.0].anomaly_map, zero_shot.anomaly_map)
    assert torch.equal(outputs[0.0].image_score, zero_shot.image_score)
    assert torch.equal(outputs[1.0].anomaly_map, outputs[1.0].few_shot_map)


def test_results_do_not_depend_on_batch_composition(tiny_model, processor, good_images, bottle):
    images = [*good_images[2:], bottle / "broken_large" / "000.png", bottle / "contamination" / "001.png"]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference_embeds = tiny_model.encode_references(processor(images=good_images[:2])["pixel_values"])
    together = few_shot_outputs(tiny_model, pixel_values, reference_embeds)
    order = [3, 0, 2, 1]
    shuffled = few_shot_outputs(tiny_model, pixel_values[order], reference_embeds)
    for name in ("few_shot_map", "zero_shot_map", "anomaly_map", "image_score"):
        assert torch.equal(getattr(shuffled, name), getattr(together, name)[order]), name
    for index in range(4):
        alone = few_shot_outputs(tiny_model, pixel_values[index : index + 1], reference_embeds)
        assert torch.equal(alone.few_shot_map[0], together.few_shot_map[index])
    # The references themselves: encoded together or one by one, the same embeddings.
    with torch.no_grad():
        one_by_one = torch.cat([tiny_model.encode_references(pixel_values[i : i + 1]) for i in range(4)], dim=1)
        assert torch.equal(tiny_model.encode_references(pixel_values), one_by_one)


GOLDEN = Path(__file__).resolve().parent / "fixtures" / "zero_shot_golden"
with safe_open(GOLDEN / "outputs.safetensors", framework="pt") as golden_file:
    # The config overrides of the fixture's variants (its make_fixture.py).
    GOLDEN_VARIANTS = json.loads(golden_file.metadata()["variants"])


def golden_model(tiny_config_factory, **overrides):
    """The golden fixture's tiny model (its weights, the prompts' token embedding rows, the rest zero) in eval mode."""
    state = load_file(GOLDEN / "weights.safetensors")
    model = HeadCLIPModel(tiny_config_factory(**overrides))
    token_embedding = torch.zeros_like(model.text_model.embeddings.token_embedding.weight)
    token_embedding[state.pop("token_embedding_ids")] = state.pop("token_embedding_rows").float()
    state["text_model.embeddings.token_embedding.weight"] = token_embedding
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    return model.eval()


@pytest.mark.parametrize("variant", list(GOLDEN_VARIANTS))
def test_without_references_outputs_are_the_zero_shot_models_of_11e6f51(tiny_config_factory, variant):
    """
    Without references every output is what the model computed before the few-shot mode existed (commit 11e6f51,
    tests/fixtures/zero_shot_golden), whatever `few_shot_weight` is: bit for bit across the weights on this machine,
    and to 1e-5 against the fixture, which another CPU computed (its kernels round differently: up to 2e-6 seen).
    """
    inputs = {name: tensor.float() for name, tensor in load_file(GOLDEN / "inputs.safetensors").items()}
    expected = load_file(GOLDEN / "outputs.safetensors")
    labels, mask_valid = inputs["labels"].long(), inputs["mask_valid"].bool()
    first_outputs = None
    for weight in (0.5, 0.0, 1.0):
        model = golden_model(tiny_config_factory, few_shot_weight=weight, **GOLDEN_VARIANTS[variant])
        with torch.no_grad():
            outputs = {
                "eval": model(inputs["pixel_values"], inputs["masks"], labels, mask_valid, reference_embeds=None),
                "wide": model(pixel_values=inputs["pixel_values_wide"]),
                "train": model.train()(pixel_values=inputs["pixel_values"], masks=inputs["masks"], labels=labels),
            }
        assert outputs["eval"].zero_shot_map is None and outputs["eval"].few_shot_map is None
        assert len(outputs["eval"].to_tuple()) == 8  # the tuple output keeps its positions
        names = [name for name in expected if name.startswith(f"{variant}.")]
        assert len(names) == {"default": 14, "variant": 13}[variant]
        first_outputs = first_outputs or outputs
        for name in names:
            _, mode, field = name.split(".")
            actual = getattr(outputs[mode], field)
            assert torch.equal(actual, getattr(first_outputs[mode], field)), (name, weight)
            torch.testing.assert_close(actual, expected[name], rtol=1e-5, atol=1e-5, msg=f"{name} ({weight})")


def test_bad_reference_embeds_and_weights_are_refused(tiny_model, tiny_config_factory):
    with pytest.raises(ValueError, match=r"reference_embeds has shape \(4, 10, 8\), expected \(L=4, M, P=16\)"):
        tiny_model(pixel_values=torch.randn(1, 3, SIZE, SIZE), reference_embeds=torch.randn(4, 10, 8))
    with pytest.raises(ValueError, match=r"reference_embeds has shape \(4, 0, 16\)"):
        tiny_model(pixel_values=torch.randn(1, 3, SIZE, SIZE), reference_embeds=torch.randn(4, 0, 16))
    for bad, described in (
        (np.zeros((4, 10, 16)), "ndarray"),
        ([[0.0]], "list"),
        (torch.zeros(4, 2, 16).long(), "torch.int64 tensor"),
    ):
        with pytest.raises(
            ValueError, match=rf"reference_embeds must be a floating-point torch.Tensor .* got (a )?{described}"
        ):
            tiny_model(pixel_values=torch.randn(1, 3, SIZE, SIZE), reference_embeds=bad)
    with pytest.raises(ValueError, match=r"encode_references needs pixel_values of shape \(K, 3, H, W\)"):
        tiny_model.encode_references(torch.randn(3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"HeadCLIPConfig.few_shot_weight=1.5 is invalid: it must lie in \[0, 1\]"):
        tiny_config_factory(few_shot_weight=1.5)


REMOTE_FEW_SHOT_SCRIPT = """
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

model_dir, inputs_file, outputs_file = sys.argv[1:4]
model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
assert "transformers_modules" in type(model).__module__
inputs = load_file(inputs_file)
with torch.no_grad():
    out = model(pixel_values=inputs["images"], reference_embeds=model.encode_references(inputs["references"]))
save_file({"few_shot_map": out.few_shot_map, "anomaly_map": out.anomaly_map}, outputs_file)
"""


def test_few_shot_mode_in_remote_code_without_the_package(tiny_model, tmp_path, run_without_headclip):
    tiny_model.save_pretrained(tmp_path / "model")
    inputs = {"images": torch.randn(2, 3, SIZE, SIZE), "references": torch.randn(3, 3, SIZE, SIZE)}
    save_file(inputs, tmp_path / "inputs.safetensors")
    run_without_headclip(REMOTE_FEW_SHOT_SCRIPT, tmp_path / "model", tmp_path / "inputs.safetensors", tmp_path / "out")
    remote = load_file(tmp_path / "out")
    local = few_shot_outputs(tiny_model, inputs["images"], tiny_model.encode_references(inputs["references"]))
    assert torch.equal(remote["few_shot_map"], local.few_shot_map)
    assert torch.equal(remote["anomaly_map"], local.anomaly_map)


# ---------------------------------------------------------------------------------------------------------------------
# References: choice, files
# ---------------------------------------------------------------------------------------------------------------------


def test_select_k_shot_is_seeded_and_checks_k():
    files = [f"good/{index:03d}.png" for index in range(20)]
    first = select_k_shot(files, 4, seed=3)
    assert select_k_shot(files, 4, seed=3) == first
    assert len(first) == 4 and first == sorted(first) and set(first) <= set(files)
    assert select_k_shot(files, 4, seed=4) != first
    assert select_k_shot(files, None) == files and select_k_shot(files, 20, seed=1) == files
    with pytest.raises(ValueError, match=r"k_shot=21 is larger than the 20 reference images available"):
        select_k_shot(files, 21)
    with pytest.raises(ValueError, match=r"k_shot=0 is invalid: it must be at least 1"):
        select_k_shot(files, 0)
    with pytest.raises(ValueError, match=r"There are no reference images to choose from"):
        select_k_shot([], 1)
    for k_shot in (2.5, True, "2"):
        with pytest.raises(ValueError, match=rf"k_shot={k_shot!r} is invalid: it must be a whole number of images"):
            select_k_shot(files, k_shot)
    assert select_k_shot(files, np.int64(4), seed=3) == first


def test_references_file_round_trip(tiny_model, processor, good_images, tmp_path):
    reference_embeds = encode_reference_images(tiny_model, processor, good_images[:2])
    with torch.no_grad():
        direct = tiny_model.encode_references(processor(images=good_images[:2])["pixel_values"])
    assert torch.equal(reference_embeds, direct)
    path = save_reference_embeds(reference_embeds, tmp_path / "refs.safetensors", tiny_model, SIZE, good_images[:2])
    assert torch.equal(load_reference_embeds(path, tiny_model), reference_embeds)
    metadata = read_reference_metadata(path)
    assert metadata["files"] == [str(file) for file in good_images[:2]]
    assert (
        metadata["num_images"] == 2 and metadata["image_size"] == SIZE and metadata["feature_layers"] == [1, 2, 3, 4]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["refs.safetensors"]  # no temporary file left behind

    # An earlier references file is replaced; any other file only with overwrite=True.
    save_reference_embeds(reference_embeds[:, :64], path, tiny_model, SIZE, good_images[:1])
    assert read_reference_metadata(path)["num_images"] == 1
    other = tmp_path / "notes.safetensors"
    other.write_text("the user's file")
    with pytest.raises(FileExistsError, match=r"notes.safetensors already exists and was not written by this command"):
        save_reference_embeds(reference_embeds, other, tiny_model, SIZE, good_images[:2])
    assert other.read_text() == "the user's file"
    save_reference_embeds(reference_embeds, other, tiny_model, SIZE, good_images[:2], overwrite=True)
    assert torch.equal(load_reference_embeds(other, tiny_model), reference_embeds)
    with pytest.raises(ValueError, match=r"holds 128 patch embeddings per layer, which is not 3 images of 64 patches"):
        save_reference_embeds(reference_embeds, tmp_path / "other.safetensors", tiny_model, SIZE, good_images[:3])


def test_references_from_another_size_or_model_are_refused(tiny_model, tiny_config_factory, processor, tmp_path):
    images = [Image.new("RGB", (80, 60), "gray")]
    reference_embeds = encode_reference_images(tiny_model, processor, images)
    path = save_reference_embeds(reference_embeds, tmp_path / "refs.safetensors", tiny_model, SIZE, files=images)
    assert read_reference_metadata(path)["files"] == ["<in-memory image 0>"]
    with pytest.raises(ValueError, match=r"computed at image size 64 px, but the model runs at 32 px here"):
        load_reference_embeds(path, tiny_model, image_size=32)

    retrained = HeadCLIPModel(tiny_model.config).eval()
    retrained.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        retrained.prompt_learner.normal_context.add_(1.0)  # the text side does not change the references
    assert torch.equal(load_reference_embeds(path, retrained), reference_embeds)
    with torch.no_grad():
        retrained.head_weights[2].mul_(0.5)
    with pytest.raises(ValueError, match=r"another model than this one .*Compute the references again"):
        load_reference_embeds(path, retrained)

    torch.manual_seed(1)
    other_layers = HeadCLIPModel(tiny_config_factory(feature_layers=[2, 3, 4])).eval()
    with pytest.raises(ValueError, match=r"at feature layers \[1, 2, 3, 4\], but this model uses feature layers"):
        load_reference_embeds(path, other_layers)


def test_bad_references_files_and_empty_reference_sets(tiny_model, processor, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"References file .*missing.safetensors does not exist"):
        load_reference_embeds(tmp_path / "missing.safetensors", tiny_model)
    not_references = tmp_path / "weights.safetensors"
    tiny_model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").rename(not_references)
    with pytest.raises(ValueError, match=r"weights.safetensors is not a HeadCLIP references file"):
        load_reference_embeds(not_references, tiny_model)
    (tmp_path / "text.safetensors").write_text("not safetensors")
    with pytest.raises(ValueError, match=r"text.safetensors is not a safetensors file"):
        load_reference_embeds(tmp_path / "text.safetensors", tiny_model)
    with pytest.raises(ValueError, match=r"There are no reference images: pass at least one normal image"):
        encode_reference_images(tiny_model, processor, [])
    # A references file whose metadata lost a key, or holds an unreadable value.
    good = tmp_path / "good.safetensors"
    reference_embeds = torch.zeros(4, 64, 16)
    save_reference_embeds(reference_embeds, good, tiny_model, image_size=SIZE)
    metadata = read_reference_metadata(good)
    with safe_open(good, framework="pt") as file:
        raw = file.metadata()
    for name, damaged, message in (
        ("missing.safetensors", {k: v for k, v in raw.items() if k != "image_size"}, r"metadata lacks image_size"),
        ("bad_size.safetensors", {**raw, "image_size": "big"}, r"metadata image_size='big' cannot be read"),
        ("bad_files.safetensors", {**raw, "files": "[oops"}, r"metadata files='\[oops' cannot be read"),
    ):
        save_file({"reference_embeds": reference_embeds}, tmp_path / name, metadata=damaged)
        with pytest.raises(ValueError, match=rf"{name} is a damaged HeadCLIP references file: (its )?{message}"):
            load_reference_embeds(tmp_path / name, tiny_model)
    assert metadata["image_size"] == SIZE and metadata["files"] == []


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------------------------------


def test_pipeline_with_reference_images(headclip_checkpoint, good_images, bottle, monkeypatch):
    model = HeadCLIPModel.from_pretrained(headclip_checkpoint).eval()
    processor = HeadCLIPProcessor.from_pretrained(headclip_checkpoint)
    test_image = bottle / "broken_large" / "000.png"
    with torch.no_grad():
        reference_embeds = model.encode_references(processor(images=good_images[:2])["pixel_values"])
        expected = model(**processor(images=test_image), reference_embeds=reference_embeds)
        zero_shot = model(**processor(images=test_image))

    calls = []
    encode = HeadCLIPModel.encode_references
    monkeypatch.setattr(HeadCLIPModel, "encode_references", lambda self, x: calls.append(len(x)) or encode(self, x))
    detector = pipeline(TASK, model=model, processor=processor, reference_images=[str(p) for p in good_images[:2]])
    assert calls == [2]  # encoded once, at construction
    results = [detector(test_image), detector(str(test_image))]
    assert calls == [2]  # and reused by every call
    for result in results:
        assert result["score"] == pytest.approx(expected.image_score.item(), abs=1e-6)
    assert detector(test_image, reference_embeds=reference_embeds)["score"] == pytest.approx(results[0]["score"])
    # A call's own references replace the cached ones for that call only.
    own = detector(test_image, reference_images=[Image.open(good_images[2])])["score"]
    assert calls == [2, 1] and own != pytest.approx(results[0]["score"], abs=1e-9)
    plain = pipeline(TASK, model=model, processor=processor)
    assert plain(test_image)["score"] == pytest.approx(zero_shot.image_score.item(), abs=1e-6)

    with pytest.raises(ValueError, match=r"Pass either reference_images or reference_embeds, not both"):
        detector(test_image, reference_images=good_images[:1], reference_embeds=reference_embeds)
    with pytest.raises(ValueError, match=r"reference_images must be a non-empty list of normal images"):
        pipeline(TASK, model=model, processor=processor, reference_images=[])
    with pytest.raises(ValueError, match=r"reference_embeds must be a floating-point torch.Tensor .* got ndarray"):
        detector(test_image, reference_embeds=reference_embeds.numpy())
    with pytest.raises(ValueError, match=r"Cannot read image file .*missing.png"):
        detector(test_image, reference_images=["missing.png"])


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: given references, the k-shot protocol
# ---------------------------------------------------------------------------------------------------------------------


def test_evaluate_model_with_references_matches_direct_metrics(tiny_model, processor, bottle, good_images, tmp_path):
    dataset = load_anomaly_dataset(bottle, cache_dir=str(tmp_path)).select(range(1, 83, 6))
    reference_embeds = encode_reference_images(tiny_model, processor, good_images[:2])
    results = evaluate_model(
        tiny_model, processor, dataset, batch_size=5, show_progress=False, reference_embeds=reference_embeds
    )
    inputs = processor(images=list(dataset["image"]), masks=list(dataset["mask"]))
    outputs = few_shot_outputs(tiny_model, inputs["pixel_values"], reference_embeds)
    metrics = results.categories["bottle"].metrics
    labels = np.array(dataset["label"])
    assert metrics["image_auroc"].value == pytest.approx(image_auroc(labels, outputs.image_score.numpy()), abs=1e-9)
    expected_pixel_auroc = pixel_auroc(inputs["masks"].numpy(), outputs.anomaly_map.numpy())
    assert metrics["pixel_auroc"].value == pytest.approx(expected_pixel_auroc, abs=1e-9)


@pytest.fixture
def evaluated_paths(monkeypatch):
    """The image files each `_accumulate` call of the evaluation runs the model on, in call order."""
    from headclip_hf import evaluation

    calls = []
    accumulate = evaluation._accumulate

    def recording(model, processor, dataset, *args, **kwargs):
        calls.append(list(dataset["path"]))
        return accumulate(model, processor, dataset, *args, **kwargs)

    monkeypatch.setattr(evaluation, "_accumulate", recording)
    return calls


def test_k_shot_from_test_normals_never_evaluates_a_reference(
    tiny_model, processor, bottle, tmp_path, evaluated_paths
):
    dataset = load_anomaly_dataset(bottle, cache_dir=str(tmp_path))
    dataset = dataset.select([*range(0, 63, 7), *range(63, 83, 2)])  # 9 anomalous, 10 normal images
    assert load_training_normals(bottle, cache_dir=str(tmp_path)) is None  # the shared layout has no train split
    results = evaluate_k_shot(
        tiny_model, processor, dataset, k_shot=3, seeds=[0, 1], batch_size=8, show_progress=False
    )
    assert results.reference_sources == {"bottle": "test"} and results.seeds == [0, 1]
    normals = [path for path, label in zip(dataset["path"], dataset["label"], strict=True) if label == 0]
    for seed, evaluated in zip([0, 1], evaluated_paths, strict=True):
        references = results.references[seed]["bottle"]
        assert references == select_k_shot(normals, 3, seed)  # the same seed picks the same files
        assert len(set(references)) == 3 and not set(references) & set(evaluated)
        assert sorted(evaluated) == sorted(set(dataset["path"]) - set(references))
        assert results.runs[seed].categories["bottle"].counts["num_normal_images"] == 7
    assert results.references[0] != results.references[1]
    again = evaluate_k_shot(tiny_model, processor, dataset, k_shot=3, seeds=[1], show_progress=False)
    assert again.references[1] == results.references[1]
    assert (
        again.summary()["bottle"]["image_auroc"]["mean"]
        == results.runs[1].categories["bottle"].metrics["image_auroc"].value
    )

    summary = results.summary()
    values = [results.runs[seed].mean["pixel_auroc"].value for seed in (0, 1)]
    assert summary["mean"]["pixel_auroc"]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert summary["mean"]["pixel_auroc"]["std"] == pytest.approx(np.std(values), abs=1e-12)
    paths = save_k_shot_results(results, tmp_path / "eval", plots=False)
    saved = json.loads(paths["json"].read_text())
    assert saved["references"]["0"]["bottle"] == results.references[0]["bottle"] and saved["k_shot"] == 3
    assert "±" in (tmp_path / "eval" / K_SHOT_MARKDOWN).read_text() and (tmp_path / "eval" / K_SHOT_JSON).is_file()
    assert (tmp_path / "eval" / "seed_1" / "results.json").is_file()
    (tmp_path / "eval" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files that are not part of a headclip evaluate --k_shot output"):
        save_k_shot_results(results, tmp_path / "eval", plots=False)
    save_k_shot_results(results, tmp_path / "eval", plots=False, overwrite=True)
    assert (tmp_path / "eval" / "notes.txt").read_text() == "mine" and (tmp_path / "eval" / K_SHOT_JSON).is_file()


def test_k_shot_draws_from_training_normals_when_the_layout_has_them(
    tiny_model, processor, bottle, tmp_path, evaluated_paths
):
    root = tmp_path / "mvtec" / "bottle"  # a small MVTec AD layout: train/good, test/{good,broken_large}, ground_truth
    for folder, sources in {
        "train/good": sorted((bottle / "good").iterdir())[:4],
        "test/good": sorted((bottle / "good").iterdir())[4:7],
        "test/broken_large": sorted((bottle / "broken_large").iterdir())[:3],
        "ground_truth/broken_large": sorted((bottle / "ground_truth" / "broken_large").iterdir())[:3],
    }.items():
        (root / folder).mkdir(parents=True)
        for source in sources:
            Image.open(source).resize((64, 64)).save(root / folder / source.name)
    dataset = load_anomaly_dataset(root, cache_dir=str(tmp_path / "cache"))
    training_normals = load_training_normals(root, cache_dir=str(tmp_path / "cache"))
    assert len(training_normals) == 4
    results = evaluate_k_shot(
        tiny_model, processor, dataset, k_shot=2, seeds=[5], reference_dataset=training_normals, show_progress=False
    )
    assert results.reference_sources == {"bottle": "train"}
    assert set(results.references[5]["bottle"]) <= set(training_normals["path"])
    assert sorted(evaluated_paths[0]) == sorted(dataset["path"])  # every test image is evaluated

    with pytest.raises(ValueError, match=r"k_shot=5 is larger than the 4 normal images of category 'bottle' \(train"):
        evaluate_k_shot(tiny_model, processor, dataset, k_shot=5, reference_dataset=training_normals)
    assert len(evaluated_paths) == 1  # refused before any forward pass


def test_k_shot_on_an_in_memory_data_set_draws_rows_not_files(tiny_model, processor, bottle, evaluated_paths):
    files = [*sorted((bottle / "good").iterdir())[:6], *sorted((bottle / "broken_large").iterdir())[:3]]
    images = [Image.open(file).convert("RGB").resize((64, 64)) for file in files]  # in memory: no file behind them
    table = datasets.Dataset.from_dict(
        {"image": images, "label": [0] * 6 + [1] * 3, "path": ["good.png"] * 6 + ["bad.png"] * 3}
    ).cast_column("image", datasets.Image())
    dataset = load_anomaly_dataset(table)  # a table's paths: names, here repeated, of no file on this machine
    (category,) = set(dataset["category"])
    results = evaluate_k_shot(tiny_model, processor, dataset, k_shot=2, seeds=[0, 1], show_progress=False)
    for seed, evaluated in zip([0, 1], list(evaluated_paths), strict=True):
        rows = select_k_shot(range(6), 2, seed)
        assert results.references[seed][category] == [f"good.png (row {row})" for row in rows]
        assert evaluated == ["good.png"] * 4 + ["bad.png"] * 3  # only the two references are left out
        # The references are those rows' images: the same scores as evaluating the other rows with them.
        reference_embeds = encode_reference_images(tiny_model, processor, [images[row] for row in rows])
        others = dataset.select([index for index in range(9) if index not in rows])
        expected = evaluate_model(
            tiny_model, processor, others, show_progress=False, reference_embeds=reference_embeds
        )
        scores = results.runs[seed].categories[category].image_scores
        np.testing.assert_array_equal(scores, expected.categories[category].image_scores)


def test_evaluations_encode_the_prompts_once_and_restore_the_training_mode(tiny_model, processor, bottle, tmp_path):
    dataset = load_anomaly_dataset(bottle, cache_dir=str(tmp_path)).select([*range(0, 63, 20), *range(63, 83, 4)])
    encodings = []
    compute = tiny_model._compute_prompt_embeds
    tiny_model._compute_prompt_embeds = lambda: encodings.append(1) or compute()
    tiny_model.train()
    evaluate_k_shot(tiny_model, processor, dataset, k_shot=1, seeds=[0, 1, 2], batch_size=2, show_progress=False)
    assert len(encodings) == 1 and tiny_model.training  # one encoding for every seed and category
    evaluate_model(tiny_model, processor, dataset, batch_size=2, show_progress=False)
    assert len(encodings) == 2 and tiny_model.training  # the training mode in between cleared the cache


def test_training_normals_of_sources_without_a_train_split_and_of_broken_ones(bottle, tmp_path):
    root = tmp_path / "meta"
    (root / "good").mkdir(parents=True)
    Image.open(bottle / "good" / "000.png").resize((64, 64)).save(root / "good" / "000.png")
    entry = {"img_path": "good/000.png", "mask_path": "", "cls_name": "bottle", "specie_name": "good", "anomaly": 0}
    (root / "meta.json").write_text(json.dumps({"test": {"bottle": [entry]}}))
    cache = str(tmp_path / "cache")
    assert load_training_normals(root, cache_dir=cache) is None  # no "train" in meta.json
    table = load_anomaly_dataset(root, cache_dir=cache)
    assert load_training_normals(table) is None  # one table: its rows are the test rows
    table.to_parquet(tmp_path / "bottle.parquet")
    assert load_training_normals(tmp_path / "bottle.parquet") is None
    assert len(load_training_normals(datasets.DatasetDict({"test": table, "train": table}))) == 1

    # A broken data set is an error, not a missing split: the references would silently come from elsewhere.
    (root / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta.json"):
        load_training_normals(root, cache_dir=cache)
    (root / "meta.json").write_text(json.dumps({"train": {"bottle": [{**entry, "img_path": "good/none.png"}]}}))
    with pytest.raises(FileNotFoundError, match=r"none.png"):
        load_training_normals(root, cache_dir=cache)


def test_training_normals_load_with_the_test_datas_column_mapping(bottle, tmp_path):
    # A saved DatasetDict with its own column names and label words: the training normals load through the same
    # mapping as the test data (as `headclip evaluate --k_shot` passes its data flags), not with the default columns.
    cache = str(tmp_path / "cache")
    bottle_rows = load_anomaly_dataset(bottle, cache_dir=cache)
    normal = [index for index, label in enumerate(bottle_rows["label"]) if label == 0]
    anomalous = [index for index, label in enumerate(bottle_rows["label"]) if label == 1]
    rows = bottle_rows.select(normal[:3] + anomalous[:2])

    def renamed(table):
        table = table.cast_column("label", datasets.Value("int64"))
        table = table.map(lambda row: {"state": "ok" if row["label"] == 0 else "defect"})
        return table.remove_columns("label").rename_columns({"image": "picture", "mask": "defect_mask"})

    datasets.DatasetDict({"test": renamed(rows), "train": renamed(rows)}).save_to_disk(tmp_path / "saved")
    mapping = {"image_column": "picture", "mask_column": "defect_mask", "label_column": "state"}

    with pytest.raises(ValueError, match=r"No image column .* Name it with image_column="):  # not the defaults
        load_training_normals(tmp_path / "saved")
    normals = load_training_normals(tmp_path / "saved", **mapping)
    for bad in ({"split": "test"}, {"streaming": True}):
        with pytest.raises(ValueError, match=rf"reads the whole 'train' split: leave out {next(iter(bad))}="):
            load_training_normals(tmp_path / "saved", **mapping, **bad)
    assert list(normals["path"]) == [rows["path"][index] for index in range(3)]
    assert set(normals["label"]) == {0}
    test = load_anomaly_dataset(tmp_path / "saved", **mapping)
    assert list(test["label"]) == [0, 0, 0, 1, 1]
    assert np.array_equal(np.asarray(test[3]["mask"]), np.asarray(rows[3]["mask"]))


def test_k_shot_bad_inputs(tiny_model, processor, test_data_dir, bottle, tmp_path):
    colon = load_anomaly_dataset(test_data_dir / "kvasir_seg" / "colon", cache_dir=str(tmp_path)).select(range(4))
    with pytest.raises(ValueError, match=r"There are no normal images of category 'colon' \(test split\)"):
        evaluate_k_shot(tiny_model, processor, colon, k_shot=1)
    dataset = load_anomaly_dataset(bottle, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"k_shot=21 is larger than the 20 normal images of category 'bottle'"):
        evaluate_k_shot(tiny_model, processor, dataset, k_shot=21)
    with pytest.raises(ValueError, match=r"seeds=\[1, 1\] is invalid: pass one or more distinct seeds"):
        evaluate_k_shot(tiny_model, processor, dataset, k_shot=1, seeds=[1, 1])


# ---------------------------------------------------------------------------------------------------------------------
# Command line: headclip references, detect and evaluate in few-shot mode
# ---------------------------------------------------------------------------------------------------------------------


def run_headclip(capsys, *argv):
    status = cli_main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def small_bottle(bottle, tmp_path):
    """A generic-layout copy of the bottle at 64 px: 4 normal images, 3 broken ones with their masks."""
    root = tmp_path / "small" / "bottle"
    for folder, count in (("good", 4), ("broken_large", 3), ("ground_truth/broken_large", 3)):
        (root / folder).mkdir(parents=True)
        for source in sorted((bottle / folder).iterdir())[:count]:
            Image.open(source).resize((64, 64)).save(root / folder / source.name)
    return root


def test_cli_references_then_detect(headclip_checkpoint, small_bottle, tmp_path, capsys):
    refs = tmp_path / "refs.safetensors"
    status, out, err = run_headclip(
        capsys, "references", small_bottle / "good", "--model", headclip_checkpoint, "--output_file", refs,
        "--k_shot", 2, "--k_shot_seed", 1,
    )  # fmt: skip
    assert status == 0, err
    chosen = select_k_shot(sorted((small_bottle / "good").resolve().iterdir()), 2, seed=1)
    metadata = read_reference_metadata(refs)
    assert metadata["files"] == [str(path) for path in chosen] and metadata["image_size"] == SIZE
    assert f"Wrote {refs}: 2 reference images at 64 px" in out

    images = small_bottle / "broken_large"
    status, _, err = run_headclip(
        capsys, "detect", images, "--model", headclip_checkpoint, "--references", refs, "--output_dir", tmp_path / "a"
    )
    assert status == 0, err
    status, _, err = run_headclip(
        capsys, "detect", images, "--model", headclip_checkpoint, "--output_dir", tmp_path / "b",
        "--reference_images", small_bottle / "good", "--k_shot", 2, "--k_shot_seed", 1,
    )  # fmt: skip
    assert status == 0, err
    with_file = json.loads((tmp_path / "a" / "scores.json").read_text())
    with_images = json.loads((tmp_path / "b" / "scores.json").read_text())
    assert with_file["few_shot"] == {"references": str(refs), "files": metadata["files"]}
    assert with_images["few_shot"]["reference_images"] == metadata["files"]

    model = HeadCLIPModel.from_pretrained(headclip_checkpoint).eval()
    processor = HeadCLIPProcessor.from_pretrained(headclip_checkpoint)
    files = sorted(images.iterdir())
    expected = few_shot_outputs(model, processor(images=files)["pixel_values"], load_reference_embeds(refs, model))
    for result in (with_file, with_images):
        scores = [row["score"] for row in result["images"]]
        np.testing.assert_allclose(scores, expected.image_score.numpy(), rtol=0, atol=1e-6)


def test_cli_few_shot_input_errors(headclip_checkpoint, small_bottle, tiny_model, clip_tokenizer, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    model_args = ("--model", headclip_checkpoint)
    status, _, err = run_headclip(capsys, "references", empty, *model_args, "--output_file", tmp_path / "r")
    assert status == 1 and err.startswith("headclip: error: no reference images in ") and "no image files" in err
    status, _, err = run_headclip(capsys, "references", small_bottle / "good", *model_args, "--k_shot", 5)
    assert status == 1 and "k_shot=5 is larger than the 4 reference images available" in err
    users_file = tmp_path / "notes.safetensors"
    users_file.write_text("keep me")
    status, _, err = run_headclip(capsys, "references", small_bottle / "good", *model_args, "--out", users_file)
    assert status == 1 and "notes.safetensors already exists and was not written by this command" in err
    assert users_file.read_text() == "keep me"

    refs = tmp_path / "refs.safetensors"
    assert run_headclip(capsys, "references", small_bottle / "good", *model_args, "--out", refs)[0] == 0
    detect = ("detect", small_bottle / "broken_large", "--output_dir", tmp_path / "out")
    status, _, err = run_headclip(capsys, *detect, *model_args, "--references", refs, "--image_size", 32)
    assert status == 1 and "computed at image size 64 px, but the model runs at 32 px" in err
    other = tmp_path / "other_model"  # the same architecture with other head weights
    with torch.no_grad():
        tiny_model.head_weights.fill_(0.8)
    tiny_model.save_pretrained(other)
    HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=SIZE).save_pretrained(other)
    status, _, err = run_headclip(capsys, *detect, "--model", other, "--references", refs)
    assert status == 1 and "another model than this one" in err
    status, _, err = run_headclip(capsys, *detect, *model_args, "--references", tmp_path / "missing.safetensors")
    assert status == 1 and "missing.safetensors does not exist" in err
    status, _, err = run_headclip(capsys, *detect, *model_args, "--k_shot", 2)
    assert status == 1 and "--k_shot picks among --reference_images" in err
    status, _, err = run_headclip(capsys, *detect, *model_args, "--reference_images", empty)
    assert status == 1 and "no reference images in" in err
    assert not (tmp_path / "out").exists()  # every refusal came before any output


def test_cli_evaluate_k_shot(headclip_checkpoint, small_bottle, tmp_path, capsys):
    out = tmp_path / "eval"
    status, stdout, err = run_headclip(
        capsys, "evaluate", small_bottle, "--model", headclip_checkpoint, "--output_dir", out, "--no_plots",
        "--k_shot", 2, "--k_shot_seeds", 0, 3,
    )  # fmt: skip
    assert status == 0, err
    saved = json.loads((out / K_SHOT_JSON).read_text())
    assert saved["k_shot"] == 2 and saved["seeds"] == [0, 3] and saved["reference_sources"] == {"bottle": "test"}
    normals = sorted(str(path) for path in (small_bottle / "good").resolve().iterdir())
    for seed in (0, 3):
        assert saved["references"][str(seed)]["bottle"] == select_k_shot(normals, 2, seed)
        counts = json.loads((out / f"seed_{seed}" / "results.json").read_text())["categories"]["bottle"]["counts"]
        assert counts["num_normal_images"] == 2 and counts["num_anomalous_images"] == 3
    assert "±" in stdout and (out / K_SHOT_MARKDOWN).is_file()

    status, _, err = run_headclip(
        capsys, "evaluate", small_bottle, "--model", tmp_path / "not_loaded", "--output_dir", tmp_path / "e2",
        "--k_shot", 5,
    )  # fmt: skip
    assert status == 1 and "k_shot=5 is larger than the 4 normal images of category 'bottle' (test split)" in err
    status, _, err = run_headclip(
        capsys, "evaluate", small_bottle, "--k_shot_seeds", 1, "--output_dir", tmp_path / "e3"
    )
    assert status == 1 and "--k_shot_seeds draws few-shot references: pass --k_shot K too" in err
