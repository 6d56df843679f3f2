"""AnomalyCLIP compatibility: the preset, checkpoint conversion, refusal of bad checkpoints, and numerical parity with
the reference implementation's outputs stored in tests/fixtures/anomalyclip (see its README.md)."""

import argparse
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from headclip_hf import HeadCLIPConfig, HeadCLIPModel, HeadCLIPProcessor
from headclip_hf.adapters import load_headclip_model
from headclip_hf.cli import build_parser, main
from headclip_hf.cli import convert as convert_command
from headclip_hf.configuration_headclip import nearest_image_size
from headclip_hf.conversion import (
    HEADCLIP_MODEL_OUTPUT,
    anomalyclip_config,
    convert_anomalyclip_checkpoint,
    load_anomalyclip_checkpoint,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "anomalyclip"
CHECKPOINT = FIXTURE / "anomalyclip_prompt_learner.pth"
REAL_CONFIGS = Path(__file__).resolve().parent.parent.parent / "shared" / "configs"
# The sizes the fixture checkpoint was trained with (the reference's --n_ctx 4 --depth 3 --t_n_ctx 2), its value-value
# start (DAPM_replace(DPAM_layer=4) on 4 vision layers: layers 2..4) and the fixture's image size.
FIXTURE_SIZES = dict(prompt_length=4, deep_prompt_depth=3, deep_prompt_length=2, vv_start_layer=2, image_size=32)
ATOL = 1e-5


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The fixture's tiny CLIP as a `CLIPModel` folder (its token embedding rebuilt from the stored rows)."""
    stored = load_file(FIXTURE / "clip" / "weights.safetensors")
    config = CLIPConfig.from_pretrained(FIXTURE / "clip")
    state_dict = {name: tensor.float() for name, tensor in stored.items() if not name.startswith("token_embedding_")}
    token_embedding = torch.zeros(config.text_config.vocab_size, config.text_config.hidden_size)
    token_embedding[stored["token_embedding_ids"]] = stored["token_embedding_rows"].float()
    state_dict["text_model.embeddings.token_embedding.weight"] = token_embedding
    clip = CLIPModel(config)
    clip.load_state_dict(state_dict, strict=True)
    path = tmp_path_factory.mktemp("anomalyclip") / "base"
    clip.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "reference_outputs.safetensors")


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    return load_file(FIXTURE / "inputs.safetensors")["pixel_values"].float()


def convert(checkpoint=CHECKPOINT, base=None, **kwargs) -> HeadCLIPModel:
    return convert_anomalyclip_checkpoint(checkpoint, base=base, **{**FIXTURE_SIZES, **kwargs})


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_fixture_stays_small():
    size = sum(path.stat().st_size for path in FIXTURE.rglob("*") if path.is_file())
    assert size < 320_000, f"the AnomalyCLIP fixture grew to {size} bytes"


@pytest.mark.parametrize("feature_layers", [[2, 3, 4], [4]])
def test_converted_checkpoint_matches_the_reference(base_dir, reference, pixel_values, feature_layers):
    model = convert(base=base_dir, feature_layers=feature_layers)
    key = "features_" + "_".join(map(str, feature_layers))
    with torch.no_grad():
        out = model(pixel_values=pixel_values)
    num_layers = len(feature_layers)
    assert_close(out.text_embeds, reference["text_features"])
    # Global feature: class token of the original path @ projection, without the post layer norm.
    assert_close(out.image_embeds, reference["image_embeds"])
    # Image score = the global score (joint alpha 1).
    assert_close(out.image_score, reference["image_score"])
    assert_close(out.global_score, reference["image_score"])
    # The reference sums the layer maps, HeadCLIP averages them.
    assert_close(out.layer_maps.sum(dim=1), reference[f"{key}.anomaly_map"])
    assert_close(out.anomaly_map * num_layers, reference[f"{key}.anomaly_map_smoothed"])
    if num_layers > 1:
        assert_close(out.layer_maps, reference[f"{key}.layer_maps"])
    else:
        # One feature layer (the reference's --features_list 24): the maps are the reference's, unscaled.
        assert_close(out.anomaly_map, reference[f"{key}.anomaly_map_smoothed"])


def test_fixture_outputs_are_sensitive_to_the_compatibility_choices(base_dir, reference, pixel_values):
    """The fixture tells the AnomalyCLIP choices apart: changing one moves the outputs well beyond the tolerance."""
    model = convert(base=base_dir, feature_layers=[2, 3, 4])

    def errors():
        with torch.no_grad():
            out = model(pixel_values=pixel_values)
        return (
            (out.image_score - reference["image_score"]).abs().max().item(),
            (out.layer_maps - reference["features_2_3_4.layer_maps"]).abs().max().item(),
        )

    assert max(errors()) < ATOL
    model.config.global_feature_layernorm = True
    assert errors()[0] > 100 * ATOL
    model.config.global_feature_layernorm = False
    model.config.position_interpolation = "bicubic"
    assert errors()[1] > 100 * ATOL
    model.config.position_interpolation = "bilinear"
    # Deep prompts as stored, without the reference's fp16 rounding.
    state_dict = load_anomalyclip_checkpoint(CHECKPOINT)
    with torch.no_grad():
        model.prompt_learner.deep_prompts.copy_(
            torch.stack([state_dict["compound_prompts_text.0"], state_dict["compound_prompts_text.1"]])
        )
    model.invalidate_prompt_cache()  # an in-place edit in eval mode: the prompts are encoded again on request
    assert errors()[1] > 2 * ATOL


def test_tensor_mapping(base_dir):
    model = convert(base=base_dir)
    state_dict = load_anomalyclip_checkpoint(CHECKPOINT)
    prompt_learner = model.prompt_learner
    assert torch.equal(prompt_learner.normal_context, state_dict["ctx_pos"][0, 0])
    assert torch.equal(prompt_learner.abnormal_context, state_dict["ctx_neg"][0, 0])
    deep = torch.stack([state_dict["compound_prompts_text.0"], state_dict["compound_prompts_text.1"]])
    assert torch.equal(prompt_learner.deep_prompts, deep.half().float())
    assert not torch.equal(prompt_learner.deep_prompts, deep), "the fixture's deep prompts are not fp16 values"
    # Templates read from the checkpoint's tokenized prompts: "X X X X object." / "X X X X damaged object."
    assert model.config.normal_prompt_ids == [14115, 269]
    assert model.config.abnormal_prompt_ids == [13568, 14115, 269]
    assert prompt_learner.end_positions.tolist() == [7, 8]
    assert not model.training
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        "prompt_learner.normal_context",
        "prompt_learner.abnormal_context",
        "prompt_learner.deep_prompts",
    }


def test_unused_projections_are_ignored_with_a_log_line(base_dir, caplog):
    with caplog.at_level(logging.INFO, logger="headclip_hf.conversion"):
        convert(base=base_dir)
    assert "Ignoring 4 compound_prompt_projections.* tensors" in caplog.text


def test_preset_fields_on_vit_l14_336(clip_tokenizer_dir):
    path = REAL_CONFIGS / "clip-vit-large-patch14-336"
    if not (path / "config.json").is_file():
        pytest.skip(f"real CLIP configs not found at {path}")
    config = anomalyclip_config(HeadCLIPConfig.from_pretrained(path))
    assert config.feature_layers == [24] and config.vv_start_layer == 6
    assert (config.prompt_length, config.deep_prompt_depth, config.deep_prompt_length) == (12, 9, 4)
    assert config.use_head_weights is False and config.joint_alpha == 1.0
    assert config.global_feature_layernorm is False and config.position_interpolation == "bilinear"
    assert (config.temperature, config.map_sigma, config.image_size) == (0.07, 4.0, 518)
    assert config.vision_config.hidden_size == 1024 and config.text_config.hidden_size == 768
    # The reference's prompts, tokenised by the real CLIP tokenizer: [SOT, "X" x 12, template, EOT].
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    x12 = " ".join(["X"] * 12)
    for template, ids in (("object.", config.normal_prompt_ids), ("damaged object.", config.abnormal_prompt_ids)):
        tokens = tokenizer(f"{x12} {template}").input_ids
        assert tokens == [config.prompt_start_token_id, *[343] * 12, *ids, config.prompt_end_token_id]
    # The reference's argparse default: four layers (HeadCLIP averages where the reference sums).
    config = anomalyclip_config(HeadCLIPConfig.from_pretrained(path), feature_layers=[6, 12, 18, 24])
    assert config.feature_layers == [6, 12, 18, 24] and config.vv_start_layer == 6


def test_preset_without_a_base_and_with_overrides(tiny_config_factory):
    tiny = tiny_config_factory()
    architecture = dict(text_config=tiny.text_config.to_dict(), vision_config=tiny.vision_config.to_dict())
    config = anomalyclip_config(deep_prompt_depth=3, map_sigma=0.0, image_size=64, **architecture)
    assert config.feature_layers == [4] and config.vv_start_layer == 1
    assert config.map_sigma == 0.0 and config.joint_alpha == 1.0
    with pytest.raises(ValueError, match=r"HeadCLIPConfig.vv_start_layer=3 is invalid"):
        anomalyclip_config(tiny, feature_layers=[2, 4], vv_start_layer=3, deep_prompt_depth=3, image_size=64)
    # AnomalyCLIP's 518 px fit ViT-L/14's patches; on another patch size the preset takes the nearest multiple.
    assert anomalyclip_config(tiny, deep_prompt_depth=3).image_size == 520
    with pytest.raises(ValueError, match=r"image_size=60 is invalid: 60 is not a multiple of the patch size 8"):
        anomalyclip_config(tiny, deep_prompt_depth=3, image_size=60)


def save_modified_checkpoint(path: Path, edit) -> Path:
    checkpoint = torch.load(CHECKPOINT, weights_only=True)
    edit(checkpoint["prompt_learner"])
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda sd: sd.pop("ctx_neg"), r"missing tensor 'ctx_neg' of shape \(1, 1, 4, 12\)"),
        (lambda sd: sd.pop("compound_prompts_text.1"), r"missing tensor 'compound_prompts_text.1'"),
        (lambda sd: sd.update(meta_net=torch.zeros(3)), r"unexpected tensor 'meta_net' of shape \(3,\)"),
        (
            lambda sd: sd.update({"compound_prompts_text.2": torch.zeros(2, 12)}),
            r"unexpected tensor 'compound_prompts_text.2'",
        ),
        (
            lambda sd: sd.update({"compound_prompts_text.1": torch.zeros(3, 12)}),
            r"'compound_prompts_text.1' has shape \(3, 12\), expected \(2, 12\)",
        ),
        (
            lambda sd: sd.update(tokenized_prompts_pos=sd["tokenized_prompts_pos"].float()),
            r"'tokenized_prompts_pos' has dtype torch.float32, expected integer",
        ),
    ],
)
def test_mismatching_checkpoints_are_refused_naming_the_tensor(base_dir, tmp_path, edit, message):
    checkpoint = save_modified_checkpoint(tmp_path / "bad.pth", edit)
    with pytest.raises(ValueError, match=message):
        convert(checkpoint, base=base_dir)


def test_wrong_sizes_are_refused(base_dir):
    with pytest.raises(ValueError, match=r"'ctx_pos' has shape \(1, 1, 4, 12\), expected \(1, 1, 5, 12\)"):
        convert(base=base_dir, prompt_length=5)
    with pytest.raises(ValueError, match=r"unexpected tensor 'compound_prompts_text.1'"):
        convert(base=base_dir, deep_prompt_depth=2)


def test_checkpoint_of_another_clip_is_refused(base_dir, tmp_path):
    other = CLIPModel.from_pretrained(base_dir)
    with torch.no_grad():
        other.text_model.embeddings.token_embedding.weight[49406] += 0.5  # the start token
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"token_prefix_pos, token_suffix_pos\) differ .* trained on another CLIP"):
        convert(base=tmp_path / "other")


def test_base_missing_clip_weights_is_refused(base_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(base_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["visual_projection.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights \['visual_projection.weight'\]"):
        convert(base=broken)


def test_malformed_tokenized_prompt_is_refused(base_dir, tmp_path):
    def drop_start_token(state_dict):
        state_dict["tokenized_prompts_neg"][..., 0] = 320

    checkpoint = save_modified_checkpoint(tmp_path / "bad.pth", drop_start_token)
    with pytest.raises(ValueError, match=r"'tokenized_prompts_neg' = \[320, 343, .* is not laid out as \[start 49406"):
        convert(checkpoint, base=base_dir)


class CreatesAFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickled_objects_are_never_unpickled(base_dir, tmp_path):
    marker = tmp_path / "unpickled"
    checkpoint = tmp_path / "evil.pth"
    torch.save({"prompt_learner": {"ctx_pos": CreatesAFileWhenUnpickled(marker)}}, checkpoint)
    with pytest.raises(ValueError, match=r"Refused to load .*evil.pth.*weights_only=True"):
        convert(checkpoint, base=base_dir)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b""])
def test_files_that_are_not_checkpoints_are_refused(base_dir, tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"Refused to load .*notes.pth"):
        convert(path, base=base_dir)


def test_checkpoint_without_prompt_learner_is_refused(base_dir, tmp_path):
    path = tmp_path / "state_dict.pth"
    torch.save(torch.load(CHECKPOINT, weights_only=True)["prompt_learner"], path)
    with pytest.raises(ValueError, match=r"expected a dict with the key 'prompt_learner'.*found \['compound_prompt"):
        convert(path, base=base_dir)


def parse_convert_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["convert", "anomalyclip", *argv])


def test_convert_command_writes_a_loadable_model_folder(base_dir, tmp_path, pixel_values, reference, caplog):
    out = tmp_path / "converted"
    args = parse_convert_args(
        [str(CHECKPOINT), "--model", str(base_dir), "--out", str(out), "--n_ctx", "4", "--depth", "3"]
        + ["--t_n_ctx", "2", "--vv-start-layer", "2", "--image-size", "32"]
    )
    assert args.feature_layers is None and not args.adapter_only
    with caplog.at_level(logging.WARNING, logger="headclip_hf.conversion"):
        convert_command.run(args)
    assert "No processor saved" in caplog.text  # the tiny base has no tokenizer
    loaded = HeadCLIPModel.from_pretrained(out).eval()
    assert loaded.config.feature_layers == [4] and loaded.config.joint_alpha == 1.0
    with torch.no_grad():
        output = loaded(pixel_values=pixel_values)
    assert_close(output.image_score, reference["image_score"])
    assert_close(output.anomaly_map, reference["features_4.anomaly_map_smoothed"])


def test_convert_command_adapter(base_dir, tmp_path, pixel_values, reference):
    out = tmp_path / "adapter"
    args = parse_convert_args(
        [str(CHECKPOINT), "--model", str(base_dir), "--out", str(out), "--adapter-only"]
        + ["--feature-layers", "2", "3", "4", "--prompt-length", "4", "--deep-prompt-depth", "3"]
        + ["--deep-prompt-length", "2", "--vv-start-layer", "2", "--image_size", "32"]
    )
    convert_command.run(args)
    assert not (out / "model.safetensors").exists()
    loaded = load_headclip_model(out).eval()
    with torch.no_grad():
        output = loaded(pixel_values=pixel_values)
    assert_close(output.layer_maps, reference["features_2_3_4.layer_maps"])
    assert_close(output.image_score, reference["image_score"])


def test_convert_command_takes_the_nearest_working_size_of_the_base_by_default(base_dir, tmp_path):
    """518 px on the base's patch grid: 516 on the patch-4 fixture (518 itself is no multiple of 4)."""
    out = tmp_path / "converted"
    flags = ["--n_ctx", "4", "--depth", "3", "--t_n_ctx", "2"]
    args = parse_convert_args([str(CHECKPOINT), "--model", str(base_dir), "--out", str(out), *flags])
    assert args.image_size is None
    convert_command.run(args)
    config = HeadCLIPModel.from_pretrained(out).config
    assert config.vision_config.patch_size == 4 and config.image_size == 516 == nearest_image_size(518, 4)


def test_convert_flags_match_the_other_commands_and_keep_their_earlier_names(base_dir, capsys):
    args = parse_convert_args([str(CHECKPOINT), "--model", str(base_dir), "--out", "x", "--adapter_only"])
    assert (args.model, args.adapter_only) == (str(base_dir), True)
    args = parse_convert_args([str(CHECKPOINT), "--base", str(base_dir), "--out", "x", "--adapter"])
    assert (args.model, args.adapter_only) == (str(base_dir), True)
    with pytest.raises(SystemExit):
        main(["convert", "anomalyclip", "--help"])
    options = capsys.readouterr().out.split("examples:")[0]
    assert "--model MODEL" in options and "--adapter_only" in options and "--base" not in options


def test_processor_is_saved_when_the_base_has_one(base_dir, tmp_path, clip_tokenizer_dir):
    image_processor_config = REAL_CONFIGS / "clip-vit-large-patch14-336" / "preprocessor_config.json"
    if not image_processor_config.is_file():
        pytest.skip(f"real CLIP image processor config not found at {image_processor_config}")
    base = tmp_path / "base_with_processor"
    shutil.copytree(base_dir, base)
    for path in [*clip_tokenizer_dir.iterdir(), image_processor_config]:
        shutil.copy(path, base)
    out = tmp_path / "converted"
    convert(base=base, output_dir=out)
    processor = HeadCLIPProcessor.from_pretrained(out)
    assert processor.image_size == 32 and processor.image_processor.size == {"height": 32, "width": 32}
    # The real (CLIP checkpoint) image processor class resizes to the working size without cropping.
    assert processor.image_processor.do_center_crop is False
    pixels = processor(images=Image.new("RGB", (50, 30)))["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)


# The command line with the fixture's sizes.
FIXTURE_FLAGS = ["--n_ctx", "4", "--depth", "3", "--t_n_ctx", "2", "--vv_start_layer", "2", "--image_size", "32"]


def run_convert(capsys, base_dir, checkpoint, out, *extra) -> tuple[int, str]:
    argv = ["convert", "anomalyclip", str(checkpoint), "--model", str(base_dir), "--output_dir", str(out)]
    status = main([*argv, *FIXTURE_FLAGS, *map(str, extra)])
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return status, stderr


def user_folder(path: Path) -> Path:
    """A folder holding the user's files, and a stale `config.json` (a name the model writer owns)."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("adapter", [False, True], ids=["full_model", "adapter"])
def test_convert_never_deletes_or_mixes_the_users_files(base_dir, tmp_path, capsys, pixel_values, reference, adapter):
    out = user_folder(tmp_path / "out")
    extra = ["--adapter_only"] if adapter else []
    kind = "HeadCLIP adapter" if adapter else "HeadCLIP model"
    status, stderr = run_convert(capsys, base_dir, CHECKPOINT, out, *extra)
    assert status == 1
    assert f"headclip: error: {out} holds files that are not part of a {kind} (" in stderr and "notes.txt" in stderr
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "notes.txt", "sub"]
    assert (out / "config.json").read_text() == "{}"

    status, _ = run_convert(capsys, base_dir, CHECKPOINT, out, "--overwrite", *extra)
    assert status == 0
    assert (out / "notes.txt").read_text() == "my notes" and (out / "sub" / "data.csv").read_text() == "a,b\n1,2\n"
    # config.json is the model writer's own (replaced), not the adapter writer's (kept).
    assert ((out / "config.json").read_text() == "{}") == adapter
    loaded = (load_headclip_model(out) if adapter else HeadCLIPModel.from_pretrained(out)).eval()
    with torch.no_grad():
        assert_close(loaded(pixel_values=pixel_values).image_score, reference["image_score"])

    earlier = tmp_path / "earlier"
    assert run_convert(capsys, base_dir, CHECKPOINT, earlier, *extra)[0] == 0
    assert run_convert(capsys, base_dir, CHECKPOINT, earlier, *extra)[0] == 0  # an earlier output is replaced


def test_headclip_model_output_lists_what_save_pretrained_writes(tiny_model, clip_tokenizer, tmp_path):
    processor = HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64)
    tiny_model.save_pretrained(tmp_path / "whole")
    processor.save_pretrained(tmp_path / "whole")
    tiny_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    whole = {path.name for path in (tmp_path / "whole").iterdir()}
    sharded = {path.name for path in (tmp_path / "sharded").iterdir()}
    assert any(name.startswith("model-00001-of-") for name in sharded)
    assert all(HEADCLIP_MODEL_OUTPUT.owns(name) for name in whole | sharded)
    assert HEADCLIP_MODEL_OUTPUT.entries == whole | {"model.safetensors.index.json"}
    assert not HEADCLIP_MODEL_OUTPUT.owns("notes.txt") and not HEADCLIP_MODEL_OUTPUT.owns("model.bin")


def test_convert_errors_are_one_line_without_traceback(base_dir, tmp_path, capsys):
    status, stderr = run_convert(capsys, base_dir, tmp_path / "missing.pth", tmp_path / "out")
    missing = tmp_path / "missing.pth"
    assert status == 1 and f"headclip: error: The AnomalyCLIP checkpoint '{missing}' does not exist" in stderr

    wrong_keys = save_modified_checkpoint(tmp_path / "keys.pth", lambda sd: sd.update(meta_net=torch.zeros(3)))
    status, stderr = run_convert(capsys, base_dir, wrong_keys, tmp_path / "out")
    assert status == 1 and "headclip: error: The checkpoint does not match" in stderr
    assert "unexpected tensor 'meta_net' of shape (3,)" in stderr

    status, stderr = run_convert(capsys, base_dir, CHECKPOINT, tmp_path / "out", "--n_ctx", "5")
    assert status == 1 and "'ctx_pos' has shape (1, 1, 4, 12), expected (1, 1, 5, 12)" in stderr

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    status, stderr = run_convert(capsys, base_dir, CHECKPOINT, a_file / "out")
    assert status == 1 and f"headclip: error: Cannot write {a_file / 'out'}: {a_file} is a file" in stderr
    assert not (tmp_path / "out").exists()
