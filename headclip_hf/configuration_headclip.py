# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""HeadCLIP model configuration.

This file imports only `transformers`, `huggingface_hub` (its `@strict` dataclass validation, which transformers'
configs use; transformers requires huggingface_hub) and the standard library, so that `save_pretrained` can ship it as
Hub remote code next to `modeling_headclip.py`.
"""

import dataclasses
import json
import math
import numbers
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig

# The backbone of the paper and of AnomalyCLIP, the default everywhere a checkpoint is asked for.
DEFAULT_CLIP_CHECKPOINT = "openai/clip-vit-large-patch14-336"
# AnomalyCLIP's working input size in pixels (37 x 37 patches of ViT-L/14). A backbone of another patch size works at
# the multiple of its patch size nearest to this one (`nearest_image_size`), e.g. 512 for ViT-B/16.
DEFAULT_IMAGE_SIZE = 518

# Token ids of the real CLIP tokenizer (`openai/clip-vit-*`, vocabulary 49,408) for the default prompt templates.
# A test checks them against the tokenizer; use `HeadCLIPProcessor.prompt_token_ids` to compute your own.
CLIP_START_OF_TEXT_ID = 49406
CLIP_END_OF_TEXT_ID = 49407
# "object."
DEFAULT_NORMAL_PROMPT_IDS = [14115, 269]
# "damaged object."
DEFAULT_ABNORMAL_PROMPT_IDS = [13568, 14115, 269]
# "a close-up inspection photo of the whole surface of the" (12 tokens): the context vectors of both prompts start
# as the token embeddings of this phrase, so an untrained HeadCLIP scores "... of the object." against
# "... of the damaged object.", a usable zero-shot CLIP detector.
DEFAULT_PROMPT_INIT_IDS = [320, 2660, 268, 705, 15142, 1125, 539, 518, 2954, 7744, 539, 518]

# The fields that hold calibrated decision thresholds and their record (`headclip calibrate`): they decide labels and
# masks but change no score or map.
CALIBRATION_FIELDS = ("image_threshold", "pixel_threshold", "image_thresholds", "pixel_thresholds", "calibration")

JOINT_POOLING_CHOICES = ("max", "topk_mean")
POSITION_INTERPOLATION_CHOICES = ("bicubic", "bilinear")


def nearest_image_size(image_size: int, patch_size: int) -> int:
    """The multiple of `patch_size` nearest to `image_size` (the smaller one on a tie), at least `patch_size`."""
    return max(patch_size, patch_size * int(image_size / patch_size + 0.5 - 1e-9))


def check_image_size(image_size: int, patch_size: int) -> None:
    """
    Raise a `ValueError` unless `image_size` is a positive multiple of `patch_size`, naming the nearest valid sizes
    (a size between two multiples would leave a strip of pixels outside every patch, or a map from a single patch).

    Raises:
        `ValueError`: e.g. "225 is not a multiple of the patch size 16: use 224 or 240".
    """
    if image_size >= patch_size and image_size % patch_size == 0:
        return
    lower = image_size - image_size % patch_size
    valid = [size for size in (lower, lower + patch_size) if size >= patch_size]
    raise ValueError(
        f"{image_size} is not a multiple of the patch size {patch_size}: use {' or '.join(map(str, valid))}"
    )


def _plain_numbers(value: Any) -> Any:
    """
    `value` with every number that is not a Python `int` or `float` (a numpy scalar such as `np.float32(0.3)`, any
    `numbers.Real`) turned into one, also inside lists and dict values; `bool` and everything else as it is.
    """
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, list):
        return [_plain_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain_numbers(item) for key, item in value.items()}
    return value


def _accepts_real_numbers(config_class: type) -> type:
    """
    Let the HeadCLIP fields of `config_class` take any real number where a number is expected: a value is passed
    through `_plain_numbers` before `@strict` checks its type, so that `np.float32(0.3)` is stored as the Python float
    `0.3000000119...` (and `config.json` stays plain JSON) instead of being refused as "expected float".
    """
    strict_setattr = config_class.__setattr__
    field_names = set(config_class.headclip_field_names())

    def __setattr__(self, name: str, value: Any) -> None:
        strict_setattr(self, name, _plain_numbers(value) if name in field_names else value)

    config_class.__setattr__ = __setattr__
    return config_class


@_accepts_real_numbers
@strict(accept_kwargs=True)
class HeadCLIPConfig(CLIPConfig):
    r"""
    Configuration of a [`HeadCLIPModel`]: a CLIP configuration (`text_config`, `vision_config`, `projection_dim`) plus
    the HeadCLIP fields below. Defaults are the paper's ViT-L/14@336 setting (AnomalyCLIP's protocol). Layer numbers
    are 1-indexed, as in the papers (layer 24 is the last layer of ViT-L/14).

    The config validates itself, as transformers' `@strict` configs do: building it (also through `from_pretrained`,
    whose HeadCLIP keyword arguments are constructor arguments), `validate()` and `save_pretrained` raise a
    `ValueError` naming the field, its value and what is allowed. An assignment checks the field's type only (as in
    transformers); call `validate()` after changing fields one by one, or build a new config. Where a field takes a
    number, any real number is accepted (numpy scalars included) and stored as a Python `int` or `float`.

    Args:
        prompt_length (`int`, *optional*, defaults to 12):
            Learnable context vectors per prompt ("[V1..Vn] object." and "[W1..Wn] damaged object.").
        normal_prompt_ids (`list[int]`, *optional*):
            Token ids of the normal template that follows the context ("object."), without start/end tokens.
        abnormal_prompt_ids (`list[int]`, *optional*):
            Token ids of the abnormal template ("damaged object."), without start/end tokens.
        prompt_init_ids (`list[int]`, *optional*):
            Token ids of the phrase whose token embeddings initialise both prompts' context vectors. The phrase fills
            the last context positions (next to the template); a longer phrase keeps its last `prompt_length` tokens,
            and positions a shorter phrase leaves free start from N(0, 0.02) as in AnomalyCLIP.
        prompt_start_token_id (`int`, *optional*, defaults to 49406):
            CLIP's start-of-text id.
        prompt_end_token_id (`int`, *optional*, defaults to 49407):
            CLIP's end-of-text id; the text embedding is read at the end-of-text position.
        deep_prompt_depth (`int`, *optional*):
            Deep prompts are inserted at text layers 2..`deep_prompt_depth`; 1 switches them off. Defaults to 9 (the
            paper's setting), or the text depth if the text encoder is shallower.
        deep_prompt_length (`int`, *optional*, defaults to 4):
            Learnable tokens per deep layer; they replace the positions right after the start token.
        use_head_weights (`bool`, *optional*, defaults to `True`):
            Whether the per-head weights of the image encoder are applied and trained.
        head_weight_layers (`list[int]`, *optional*):
            Vision layers whose head weights train (all when `None`); the others stay exactly 1.
        vv_start_layer (`int`, *optional*):
            First vision layer with the value-value attention path; defaults to the first feature layer.
        feature_layers (`list[int]`, *optional*):
            Vision layers whose value-value patch tokens make the pixel maps; defaults to four evenly spaced layers
            of the vision encoder ([6, 12, 18, 24] for ViT-L/14).
        temperature (`float`, *optional*, defaults to 0.07):
            Softmax temperature of the cosine similarities with the two prompts, for the pixel maps and the global
            score alike (as in AnomalyCLIP).
        map_sigma (`float`, *optional*, defaults to 4.0):
            Sigma in pixels of the Gaussian that smooths the anomaly map at inference; 0 switches smoothing off.
        joint_alpha (`float`, *optional*, defaults to 0.5):
            Joint anomaly score: `alpha * global + (1 - alpha) * pool(map)`; 1 is plain AnomalyCLIP scoring.
        joint_pooling (`str`, *optional*, defaults to `"max"`):
            How the map is pooled into the joint score: `"max"` or `"topk_mean"` (mean of the top `joint_topk`
            fraction of pixels).
        joint_topk (`float`, *optional*, defaults to 0.01):
            Fraction of pixels averaged by `"topk_mean"` pooling.
        few_shot_weight (`float`, *optional*, defaults to 0.5):
            Few-shot mode (`reference_embeds` given to the model): the anomaly map is `(1 - few_shot_weight) *
            zero-shot map + few_shot_weight * few-shot map`; 0 keeps the zero-shot map, 1 uses the references alone.
        global_feature_layernorm (`bool`, *optional*, defaults to `True`):
            Apply CLIP's post layer norm to the class token before the visual projection (CLIP does; AnomalyCLIP's
            reference code does not).
        focal_gamma (`float`, *optional*, defaults to 2.0):
            Focusing parameter of the focal loss on the pixel maps.
        image_size (`int`, *optional*):
            The working input size in pixels (square), a multiple of the patch size: the one size processors,
            evaluation and the model card use. Defaults to `DEFAULT_IMAGE_SIZE` (518, AnomalyCLIP's) or, for another
            patch size, the nearest multiple of it (512 for ViT-B/16). `vision_config.image_size` is the size CLIP was
            pretrained at (it fixes the grid of pretrained positional embeddings, which are interpolated to the
            working size), never a working size.
        position_interpolation (`str`, *optional*, defaults to `"bicubic"`):
            How the pretrained positional embeddings are resized to the input's patch grid: `"bicubic"` (as
            transformers' `interpolate_pos_encoding`) or `"bilinear"` (as the AnomalyCLIP reference code).
        image_threshold (`float`, *optional*):
            Calibrated decision threshold on the joint anomaly score: an image is labelled "anomaly" when its score is
            `>= image_threshold`. `None` (uncalibrated): the pipeline uses 0.5. Set by `headclip calibrate`
            (`headclip_hf.calibration`).
        pixel_threshold (`float`, *optional*):
            Calibrated threshold on the anomaly map: a pixel is in the mask when its value is `>= pixel_threshold`.
            `None`: the pipeline uses the image threshold.
        image_thresholds (`dict[str, float]`, *optional*):
            Per-category image thresholds, `{category: threshold}`, used instead of `image_threshold` when a call
            names its category.
        pixel_thresholds (`dict[str, float]`, *optional*):
            Per-category pixel thresholds, `{category: threshold}`, as `image_thresholds`.
        calibration (`dict`, *optional*):
            How the thresholds were calibrated (method, target false-positive rates, images and pixels used, the data,
            the precision / recall / false-positive rate achieved on it, package version), as written by
            `headclip_hf.calibration.CalibrationResult`.

    Example:

    ```python
    >>> from headclip_hf import HeadCLIPConfig, HeadCLIPModel

    >>> config = HeadCLIPConfig.from_pretrained("openai/clip-vit-large-patch14-336", joint_alpha=0.5)
    >>> model = HeadCLIPModel(config)  # random weights; use HeadCLIPModel.from_pretrained for CLIP's
    ```
    """

    model_type = "headclip"

    prompt_length: int = 12
    normal_prompt_ids: list[int] | None = None
    abnormal_prompt_ids: list[int] | None = None
    prompt_init_ids: list[int] | None = None
    prompt_start_token_id: int = CLIP_START_OF_TEXT_ID
    prompt_end_token_id: int = CLIP_END_OF_TEXT_ID
    deep_prompt_depth: int | None = None
    deep_prompt_length: int = 4
    use_head_weights: bool = True
    head_weight_layers: list[int] | None = None
    vv_start_layer: int | None = None
    feature_layers: list[int] | None = None
    temperature: float | int = 0.07
    map_sigma: float | int = 4.0
    joint_alpha: float | int = 0.5
    joint_pooling: str = "max"
    joint_topk: float | int = 0.01
    few_shot_weight: float | int = 0.5
    global_feature_layernorm: bool = True
    focal_gamma: float | int = 2.0
    image_size: int | None = None
    position_interpolation: str = "bicubic"
    image_threshold: float | int | None = None
    pixel_threshold: float | int | None = None
    image_thresholds: dict[str, float | int] | None = None
    pixel_thresholds: dict[str, float | int] | None = None
    calibration: dict | None = None

    def __post_init__(self, **kwargs):
        # A plain CLIP config.json (loaded to build a HeadCLIP from CLIP) says model_type "clip": the class decides.
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        if self.normal_prompt_ids is None:
            self.normal_prompt_ids = list(DEFAULT_NORMAL_PROMPT_IDS)
        if self.abnormal_prompt_ids is None:
            self.abnormal_prompt_ids = list(DEFAULT_ABNORMAL_PROMPT_IDS)
        if self.prompt_init_ids is None:
            self.prompt_init_ids = list(DEFAULT_PROMPT_INIT_IDS)
        if self.deep_prompt_depth is None:
            self.deep_prompt_depth = min(9, self.text_config.num_hidden_layers)
        num_vision_layers = self.vision_config.num_hidden_layers
        if self.feature_layers is None:
            self.feature_layers = sorted({max(1, round(num_vision_layers * k / 4)) for k in (1, 2, 3, 4)})
        if self.vv_start_layer is None and self.feature_layers:  # no feature layers: refused by the validation
            self.vv_start_layer = min(self.feature_layers)
        if self.image_size is None:
            self.image_size = nearest_image_size(DEFAULT_IMAGE_SIZE, self.vision_config.patch_size)
        # Here as well as from `validate()` (which `@strict` runs next): a plain `ValueError`, the package's rule for
        # user errors, where `validate()` wraps it in huggingface_hub's `StrictDataclassClassValidationError`.
        self.validate_headclip_fields()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        # A plain CLIP checkpoint is a valid HeadCLIP base (its weights are the backbone): read its config as this
        # class's, so that transformers does not warn about loading a model of type "clip" as "headclip".
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == CLIPConfig.model_type:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "HeadCLIPConfig":
        # transformers sets keyword arguments one by one after building the config; HeadCLIP fields go to the
        # constructor instead, so that they are validated together (e.g. `feature_layers` with `vv_start_layer`).
        field_names = cls.headclip_field_names()
        fields = {name: kwargs.pop(name) for name in list(kwargs) if name in field_names}
        return super().from_dict({**config_dict, **fields}, **kwargs)

    @classmethod
    def headclip_field_names(cls) -> list[str]:
        """The names of the fields this class adds to `CLIPConfig`, in declaration order."""
        clip_fields = {field.name for field in dataclasses.fields(CLIPConfig)}
        return [field.name for field in dataclasses.fields(cls) if field.name not in clip_fields]

    def headclip_fields(self) -> dict:
        """The HeadCLIP fields (those this class adds to `CLIPConfig`) and their values."""
        return {name: getattr(self, name) for name in self.headclip_field_names()}

    def calibrated_thresholds(self, category: str | None = None) -> tuple[float | None, float | None]:
        """
        The calibrated `(image, pixel)` thresholds for `category`: its entries of `image_thresholds` /
        `pixel_thresholds` when present, else `image_threshold` / `pixel_threshold`; `None` where uncalibrated.
        """
        image_thresholds, pixel_thresholds = self.image_thresholds or {}, self.pixel_thresholds or {}
        return (
            image_thresholds.get(category, self.image_threshold),
            pixel_thresholds.get(category, self.pixel_threshold),
        )

    def validate_headclip_fields(self) -> None:
        """
        Part of `@strict`-powered validation, next to transformers' `validate_architecture`: the HeadCLIP fields.

        Raises:
            `ValueError`: naming the field, its value and what is allowed, for the first invalid field.
        """
        num_vision_layers = self.vision_config.num_hidden_layers
        num_text_layers = self.text_config.num_hidden_layers
        context_length = self.text_config.max_position_embeddings

        def fail(field: str, value, allowed: str):
            raise ValueError(f"HeadCLIPConfig.{field}={value!r} is invalid: {allowed}.")

        for field in ("normal_prompt_ids", "abnormal_prompt_ids"):
            if len(getattr(self, field)) < 1:
                fail(field, getattr(self, field), "the template needs at least one token")
        longest_template = max(len(self.normal_prompt_ids), len(self.abnormal_prompt_ids))
        # start token + context + template + end token must fit the text context.
        max_prompt_length = context_length - 2 - longest_template
        if not 1 <= self.prompt_length <= max_prompt_length:
            fail(
                "prompt_length",
                self.prompt_length,
                f"it must lie in [1, {max_prompt_length}] so that start + context + the {longest_template}-token "
                f"template + end fit the text context of {context_length} tokens",
            )
        vocab_size = self.text_config.vocab_size
        for field in (
            "normal_prompt_ids",
            "abnormal_prompt_ids",
            "prompt_init_ids",
            "prompt_start_token_id",
            "prompt_end_token_id",
        ):
            value = getattr(self, field)
            ids = value if isinstance(value, list) else [value]
            if any(not 0 <= i < vocab_size for i in ids):
                fail(field, value, f"token ids must lie in [0, {vocab_size - 1}] (the text vocabulary)")
        if len(self.prompt_init_ids) < 1:
            fail("prompt_init_ids", self.prompt_init_ids, "it needs at least one token")
        if not 1 <= self.deep_prompt_depth <= num_text_layers:
            fail("deep_prompt_depth", self.deep_prompt_depth, f"it must lie in [1, {num_text_layers}] (text layers)")
        if not 0 <= self.deep_prompt_length <= self.prompt_length:
            fail(
                "deep_prompt_length",
                self.deep_prompt_length,
                f"it must lie in [0, prompt_length={self.prompt_length}]",
            )
        if not self.feature_layers:
            fail("feature_layers", self.feature_layers, "the maps need at least one feature layer")
        if any(not 1 <= layer <= num_vision_layers for layer in self.feature_layers):
            fail("feature_layers", self.feature_layers, f"layers must lie in [1, {num_vision_layers}] (vision layers)")
        if sorted(set(self.feature_layers)) != list(self.feature_layers):
            fail("feature_layers", self.feature_layers, "layers must be distinct and in increasing order")
        if not 1 <= self.vv_start_layer <= self.feature_layers[0]:
            fail(
                "vv_start_layer",
                self.vv_start_layer,
                f"it must lie in [1, {self.feature_layers[0]}] (at or before the first feature layer)",
            )
        if self.head_weight_layers is not None and any(
            not 1 <= layer <= num_vision_layers for layer in self.head_weight_layers
        ):
            fail("head_weight_layers", self.head_weight_layers, f"layers must lie in [1, {num_vision_layers}]")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            fail("temperature", self.temperature, "it must be a finite number > 0")
        if not (math.isfinite(self.map_sigma) and self.map_sigma >= 0):
            fail("map_sigma", self.map_sigma, "it must be a finite number >= 0 (0 switches smoothing off)")
        if not 0.0 <= self.joint_alpha <= 1.0:
            fail("joint_alpha", self.joint_alpha, "it must lie in [0, 1]")
        if self.joint_pooling not in JOINT_POOLING_CHOICES:
            fail("joint_pooling", self.joint_pooling, f"choose one of {JOINT_POOLING_CHOICES}")
        if not 0.0 < self.joint_topk <= 1.0:
            fail("joint_topk", self.joint_topk, "it must lie in (0, 1]")
        if not 0.0 <= self.few_shot_weight <= 1.0:
            fail("few_shot_weight", self.few_shot_weight, "it must lie in [0, 1]")
        if not (math.isfinite(self.focal_gamma) and self.focal_gamma >= 0):
            fail("focal_gamma", self.focal_gamma, "it must be a finite number >= 0")
        if self.position_interpolation not in POSITION_INTERPOLATION_CHOICES:
            fail(
                "position_interpolation",
                self.position_interpolation,
                f"choose one of {POSITION_INTERPOLATION_CHOICES}",
            )
        try:
            check_image_size(self.image_size, self.vision_config.patch_size)
        except ValueError as error:
            fail("image_size", self.image_size, str(error))

        def is_threshold(value) -> bool:
            return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value <= 1.0

        for field in ("image_threshold", "pixel_threshold"):
            value = getattr(self, field)
            if value is not None and not is_threshold(value):
                fail(field, value, "a threshold must be a finite number in [0, 1] (scores and maps are probabilities)")
        for field in ("image_thresholds", "pixel_thresholds"):
            value = getattr(self, field)
            if value is not None and not (
                isinstance(value, dict)
                and all(isinstance(name, str) and is_threshold(threshold) for name, threshold in value.items())
            ):
                fail(field, value, "it must map category names to finite numbers in [0, 1]")
        if self.calibration is not None and not _is_json_object(self.calibration):
            fail(
                "calibration",
                self.calibration,
                "it must be None or a dict that JSON can hold (strings, numbers, booleans, None, lists and dicts), "
                "as headclip_hf.calibration writes it",
            )


def _is_json_object(value: Any) -> bool:
    """Whether `value` is a dict that `config.json` can hold as it is."""
    if not isinstance(value, dict):
        return False
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


__all__ = ["HeadCLIPConfig"]
