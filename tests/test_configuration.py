"""HeadCLIPConfig: defaults (checked against the real CLIP tokenizer), derived layers, validation, serialisation."""

from pathlib import Path

import numpy as np
import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from PIL import Image
from transformers import AutoConfig, CLIPConfig, CLIPTokenizer

from headclip_hf import DEFAULT_IMAGE_SIZE, HeadCLIPConfig, HeadCLIPProcessor

REAL_CONFIGS = Path(__file__).resolve().parent.parent.parent / "shared" / "configs"


def test_default_prompt_ids_match_the_real_clip_tokenizer(clip_tokenizer_dir):
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    processor = HeadCLIPProcessor(tokenizer=tokenizer)
    config = HeadCLIPConfig()
    assert config.normal_prompt_ids == processor.prompt_token_ids("object.")
    assert config.abnormal_prompt_ids == processor.prompt_token_ids("damaged object.")
    phrase = "a close-up inspection photo of the whole surface of the"
    assert config.prompt_init_ids == processor.prompt_token_ids(phrase)
    assert len(config.prompt_init_ids) == config.prompt_length == 12
    full = tokenizer("x").input_ids
    assert (config.prompt_start_token_id, config.prompt_end_token_id) == (full[0], full[-1])


def test_paper_defaults_on_the_real_vit_l14_336_architecture():
    path = REAL_CONFIGS / "clip-vit-large-patch14-336"
    if not (path / "config.json").is_file():
        pytest.skip(f"real CLIP configs not found at {path}")
    config = HeadCLIPConfig.from_pretrained(path)
    assert config.model_type == "headclip"
    assert config.feature_layers == [6, 12, 18, 24]
    assert config.vv_start_layer == 6
    assert (config.prompt_length, config.deep_prompt_depth, config.deep_prompt_length) == (12, 9, 4)
    assert (config.temperature, config.map_sigma, config.joint_alpha, config.image_size) == (0.07, 4.0, 0.5, 518)
    assert config.vision_config.num_hidden_layers == 24 and config.text_config.num_hidden_layers == 12


@pytest.mark.parametrize("depth,expected", [(12, [3, 6, 9, 12]), (4, [1, 2, 3, 4]), (2, [1, 2]), (6, [2, 3, 4, 6])])
def test_feature_layers_default_to_four_evenly_spaced_layers(tiny_config_factory, depth, expected):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4, patch_size=8)
    config = tiny_config_factory(vision_config=vision)
    assert config.feature_layers == expected
    assert config.vv_start_layer == expected[0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(feature_layers=[2, 5]), r"feature_layers=\[2, 5\] is invalid: layers must lie in \[1, 4\]"),
        (
            dict(feature_layers=[3, 2]),
            r"feature_layers=\[3, 2\] is invalid: layers must be distinct and in increasing",
        ),
        (dict(feature_layers=[2, 4], vv_start_layer=3), r"vv_start_layer=3 is invalid: it must lie in \[1, 2\]"),
        (dict(joint_alpha=1.5), r"joint_alpha=1.5 is invalid: it must lie in \[0, 1\]"),
        (dict(joint_alpha=-0.1), r"joint_alpha=-0.1 is invalid: it must lie in \[0, 1\]"),
        (dict(prompt_length=73), r"prompt_length=73 is invalid: it must lie in \[1, 72\] so that start \+ context"),
        (dict(deep_prompt_depth=5), r"deep_prompt_depth=5 is invalid: it must lie in \[1, 3\]"),
        (dict(deep_prompt_length=7), r"deep_prompt_length=7 is invalid: it must lie in \[0, prompt_length=6\]"),
        (dict(head_weight_layers=[0]), r"head_weight_layers=\[0\] is invalid: layers must lie in \[1, 4\]"),
        (dict(joint_pooling="mean"), r"joint_pooling='mean' is invalid: choose one of \('max', 'topk_mean'\)"),
        (dict(joint_topk=0.0), r"joint_topk=0.0 is invalid: it must lie in \(0, 1\]"),
        (dict(temperature=0.0), r"temperature=0.0 is invalid: it must be a finite number > 0"),
        (dict(position_interpolation="nearest"), r"position_interpolation=.nearest. is invalid: choose one of"),
        (dict(map_sigma=-1.0), r"map_sigma=-1.0 is invalid: it must be a finite number >= 0"),
        (dict(map_sigma=float("inf")), r"map_sigma=inf is invalid: it must be a finite number >= 0"),
        (dict(temperature=float("inf")), r"temperature=inf is invalid: it must be a finite number > 0"),
        (dict(temperature=float("nan")), r"temperature=nan is invalid: it must be a finite number > 0"),
        (dict(focal_gamma=float("inf")), r"focal_gamma=inf is invalid: it must be a finite number >= 0"),
        (dict(feature_layers=[]), r"feature_layers=\[\] is invalid: the maps need at least one feature layer"),
        (dict(calibration={"a": {1}}), r"calibration=\{'a': \{1\}\} is invalid: it must be None or a dict that JSON"),
        (dict(calibration={"data": Path("x")}), r"calibration=.* is invalid: it must be None or a dict that JSON"),
        (dict(image_threshold=float("inf")), r"image_threshold=inf is invalid: a threshold must be a finite number"),
        (dict(normal_prompt_ids=[]), r"normal_prompt_ids=\[\] is invalid: the template needs at least one token"),
        (dict(abnormal_prompt_ids=[60000]), r"abnormal_prompt_ids=\[60000\] is invalid: token ids must lie in"),
    ],
)
def test_invalid_values_raise_value_error_naming_field_value_and_range(tiny_config_factory, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config_factory(**overrides)


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers(tiny_config_factory, tmp_path):
    config = tiny_config_factory(
        joint_alpha=np.float32(0.25),
        map_sigma=np.float64(2.0),
        prompt_length=np.int64(5),
        feature_layers=[np.int32(2), np.int64(4)],
        image_threshold=np.float32(0.5),
        pixel_thresholds={"bottle": np.float16(0.75)},
        calibration={"target_fpr": np.float32(0.5), "counts": [np.int64(3)]},
    )
    config.few_shot_weight = np.float32(0.75)  # assignments too
    config.validate()
    expected = {
        "joint_alpha": 0.25,
        "map_sigma": 2.0,
        "prompt_length": 5,
        "feature_layers": [2, 4],
        "image_threshold": 0.5,
        "pixel_thresholds": {"bottle": 0.75},
        "calibration": {"target_fpr": 0.5, "counts": [3]},
        "few_shot_weight": 0.75,
    }
    for name, value in expected.items():
        assert getattr(config, name) == value and type(getattr(config, name)) is type(value), name
    assert type(config.feature_layers[0]) is int and type(config.calibration["counts"][0]) is int
    config.save_pretrained(tmp_path)  # plain JSON
    assert HeadCLIPConfig.from_pretrained(tmp_path).headclip_fields() == config.headclip_fields()
    with pytest.raises(StrictDataclassFieldValidationError, match="prompt_length"):
        config.prompt_length = np.float32(5.5)  # a number, but not a whole one


def test_longest_prompt_that_fits_the_text_context_is_accepted(tiny_config_factory):
    # 72 = 77 positions - start - end - 3 tokens of "damaged object.".
    assert tiny_config_factory(prompt_length=72).prompt_length == 72


def test_config_round_trip_and_auto_registration(tiny_config_factory, tmp_path):
    config = tiny_config_factory(joint_alpha=0.25, joint_pooling="topk_mean", head_weight_layers=[1, 3])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, HeadCLIPConfig)
    saved = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
    assert {k: v for k, v in loaded.to_dict().items() if k != "_name_or_path"} == saved


@pytest.mark.parametrize(
    "image_size,patch_size,message",
    [
        (225, 16, "225 is not a multiple of the patch size 16: use 224 or 240"),
        (31, 16, "31 is not a multiple of the patch size 16: use 16 or 32"),
        (7, 8, "7 is not a multiple of the patch size 8: use 8"),
        (60, 8, "60 is not a multiple of the patch size 8: use 56 or 64"),
    ],
)
def test_image_size_must_be_a_multiple_of_the_patch_size(tiny_config_factory, image_size, patch_size, message):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    with pytest.raises(ValueError, match=f"HeadCLIPConfig.image_size={image_size} is invalid: {message}"):
        tiny_config_factory(image_size=image_size, vision_config={**vision, "patch_size": patch_size})


@pytest.mark.parametrize("patch_size,expected", [(14, 518), (16, 512), (32, 512), (8, 520)])
def test_default_working_size_is_the_multiple_of_the_patch_nearest_518(patch_size, expected):
    config = HeadCLIPConfig(vision_config=dict(patch_size=patch_size))
    assert config.image_size == expected == DEFAULT_IMAGE_SIZE + (expected - 518)
    assert config.image_size % patch_size == 0


def test_from_pretrained_keyword_arguments_are_validated_together(tiny_config_factory, tmp_path):
    tiny_config_factory().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"HeadCLIPConfig.joint_alpha=2.0 is invalid: it must lie in \[0, 1\]"):
        HeadCLIPConfig.from_pretrained(tmp_path, joint_alpha=2.0)
    with pytest.raises(ValueError, match=r"image_size=60 is invalid: 60 is not a multiple of the patch size 8"):
        HeadCLIPConfig.from_pretrained(tmp_path, image_size=60)
    # Fields that depend on each other are checked together, not one assignment at a time (vv_start_layer was 1).
    config = HeadCLIPConfig.from_pretrained(tmp_path, feature_layers=[3, 4], vv_start_layer=3)
    assert (config.feature_layers, config.vv_start_layer) == ([3, 4], 3)


def test_assignments_are_checked_by_validate_and_save_pretrained(tiny_config_factory, tmp_path):
    config = tiny_config_factory()
    assert not hasattr(config, "check_headclip_fields")  # the config validates itself; nobody calls a check
    with pytest.raises(StrictDataclassFieldValidationError, match="joint_alpha"):
        config.joint_alpha = "high"  # types are checked on assignment, as in every transformers config
    config.joint_alpha = 1.5
    with pytest.raises(StrictDataclassClassValidationError, match=r"joint_alpha=1.5 is invalid: it must lie in"):
        config.validate()
    with pytest.raises(StrictDataclassClassValidationError, match="validate_headclip_fields"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_a_plain_clip_config_loads_without_a_type_warning(tmp_path, transformers_logs):
    CLIPConfig(vision_config=dict(patch_size=14)).save_pretrained(tmp_path)
    config = HeadCLIPConfig.from_pretrained(tmp_path)
    assert config.model_type == "headclip" and config.image_size == 518
    assert "loading configuration file" in transformers_logs.text  # transformers' records are captured
    assert "to instantiate a model of type" not in transformers_logs.text


def test_image_size_flag_between_patch_multiples_is_a_command_error(clip_checkpoint, tmp_path, capsys, monkeypatch):
    from headclip_hf.cli import main
    from headclip_hf.modeling_headclip import HeadCLIPModel

    image = tmp_path / "image.png"
    Image.new("RGB", (20, 20)).save(image)
    monkeypatch.setattr(HeadCLIPModel, "post_init", lambda self: pytest.fail("the model was built"))
    argv = ["detect", image, "--model", clip_checkpoint, "--image_size", "60", "--out", tmp_path / "out"]
    assert main([str(arg) for arg in argv]) == 1
    error = capsys.readouterr().err
    assert "headclip: error:" in error
    assert "HeadCLIPConfig.image_size=60 is invalid: 60 is not a multiple of the patch size 8: use 56 or 64" in error
