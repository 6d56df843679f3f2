# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""
AnomalyCLIP compatibility: the AnomalyCLIP configuration preset and the conversion of AnomalyCLIP prompt-learner
checkpoints to HeadCLIP.

AnomalyCLIP (Zhou et al., ICLR 2024; reference code github.com/zqhang/AnomalyCLIP) is HeadCLIP with the head weights
fixed at 1, the image score taken from the global feature alone (joint alpha 1) and the global feature read without
CLIP's post layer norm. [`anomalyclip_config`] sets these fields, and [`convert_anomalyclip_checkpoint`] maps the
tensors of a reference checkpoint (`{"prompt_learner": state_dict}`, as the reference's `train.py` saves it) onto
HeadCLIP's prompt learner (n = `--n_ctx` 12, k = `--t_n_ctx` 4, d = `--depth` 9, W = text width 768,
C = text context length 77):

| AnomalyCLIP tensor                 | shape                  | HeadCLIP                                        |
|------------------------------------|------------------------|-------------------------------------------------|
| `ctx_pos`                          | `(1, 1, n, W)`         | `prompt_learner.normal_context` `(n, W)`        |
| `ctx_neg`                          | `(1, 1, n, W)`         | `prompt_learner.abnormal_context` `(n, W)`      |
| `compound_prompts_text.{0..d-2}`   | `(k, W)` each          | `prompt_learner.deep_prompts` `(d-1, k, W)`     |
| `tokenized_prompts_{pos,neg}`      | `(1, 1, C)` integers   | the templates (`{normal,abnormal}_prompt_ids`)  |
| `token_prefix_{pos,neg}`           | `(1, 1, 1, W)`         | checked against the base's token embeddings     |
| `token_suffix_{pos,neg}`           | `(1, 1, C - 1 - n, W)` | checked against the base's token embeddings     |
| `compound_prompt_projections.*`    | any                    | ignored (AnomalyCLIP never uses them)           |

The reference casts the deep prompts with `.half()` when it inserts them, so the converter stores them rounded to fp16:
HeadCLIP then computes what the reference computes.
"""

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import CLIPConfig

from .adapters import ADAPTER_OUTPUT, HEADCLIP_PARAMETER_PREFIXES, HUB_KWARGS, save_headclip_adapter
from .configuration_headclip import (
    DEFAULT_ABNORMAL_PROMPT_IDS,
    DEFAULT_CLIP_CHECKPOINT,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NORMAL_PROMPT_IDS,
    HeadCLIPConfig,
    nearest_image_size,
)
from .files import OutputKind, check_output_folder, output_folder
from .modeling_headclip import HeadCLIPModel
from .processing_headclip import HeadCLIPProcessor

logger = logging.getLogger(__name__)

# AnomalyCLIP's settings (the reference's train.py / test.py defaults). The architecture-dependent fields
# (`feature_layers`, `vv_start_layer`) are set by `anomalyclip_config` from the vision depth.
ANOMALYCLIP_SETTINGS = {
    "prompt_length": 12,  # --n_ctx
    "deep_prompt_depth": 9,  # --depth: deep prompts at text layers 2..9
    "deep_prompt_length": 4,  # --t_n_ctx
    "normal_prompt_ids": list(DEFAULT_NORMAL_PROMPT_IDS),  # "[V1..V12] object."
    "abnormal_prompt_ids": list(DEFAULT_ABNORMAL_PROMPT_IDS),  # "[W1..W12] damaged object."
    "use_head_weights": False,
    "temperature": 0.07,
    "map_sigma": 4.0,  # --sigma
    "joint_alpha": 1.0,  # image score = global score
    "global_feature_layernorm": False,  # global feature = class token @ projection, without ln_post
    "image_size": DEFAULT_IMAGE_SIZE,  # --image_size
    "position_interpolation": "bilinear",
}

# What a complete HeadCLIP model folder holds: the files of `HeadCLIPModel.save_pretrained` (config, weights, remote
# code) and of `HeadCLIPProcessor.save_pretrained` (processor and tokenizer configs, remote code). Weights above the
# shard size are split into numbered shards with an index.
HEADCLIP_MODEL_OUTPUT = OutputKind(
    "HeadCLIP model",
    frozenset(
        {
            "config.json",
            "model.safetensors",
            "model.safetensors.index.json",
            "configuration_headclip.py",
            "modeling_headclip.py",
            "processing_headclip.py",
            "image_utils_headclip.py",
            "processor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        }
    ),
    patterns=("model-*-of-*.safetensors",),
)

# Tolerance, relative to the largest magnitude, of the check that the checkpoint's frozen token embeddings are the
# base's: an fp16 or bf16 copy of the base passes, another CLIP does not.
_TOKEN_EMBEDDING_RTOL = 1e-2


def anomalyclip_config(
    base_config: CLIPConfig | None = None,
    feature_layers: list[int] | None = None,
    vv_start_layer: int | None = None,
    **kwargs,
) -> HeadCLIPConfig:
    r"""
    A [`HeadCLIPConfig`] that makes [`HeadCLIPModel`] compute what AnomalyCLIP computes (`ANOMALYCLIP_SETTINGS`): no
    head weights, image score = global score, global feature without post layer norm, bilinear positional-embedding
    resize, 12 context vectors per prompt, deep prompts of 4 tokens at text layers 2..9, temperature 0.07, Gaussian
    sigma 4, 518 px (on another patch size: the nearest multiple of it, unless `image_size` is given).

    Args:
        base_config ([`CLIPConfig`], *optional*):
            The CLIP architecture (`text_config`, `vision_config`, `projection_dim`); HeadCLIP fields it may hold are
            not used. Without it the architecture comes from `kwargs` (`text_config=...`, `vision_config=...`).
        feature_layers (`list[int]`, *optional*):
            Vision layers whose value-value maps are averaged. Defaults to the last layer, as the current reference
            scripts (`--features_list 24`) and the published results. `[6, 12, 18, 24]` is the reference's argparse
            default; HeadCLIP averages the layer maps where the reference sums them.
        vv_start_layer (`int`, *optional*):
            First vision layer of the value-value path. Defaults to a quarter of the vision depth: layer 6 of the 24
            of ViT-L/14, where the reference (`DPAM_layer=20`) starts it.
        kwargs:
            Any other [`HeadCLIPConfig`] field, overriding the preset (e.g. `prompt_length`, `deep_prompt_depth`).

    Example:

    ```python
    >>> from headclip_hf import HeadCLIPConfig, HeadCLIPModel
    >>> from headclip_hf.conversion import anomalyclip_config

    >>> config = anomalyclip_config(HeadCLIPConfig.from_pretrained("openai/clip-vit-large-patch14-336"))
    >>> model = HeadCLIPModel.from_pretrained("openai/clip-vit-large-patch14-336", config=config)
    ```
    """
    architecture = {}
    if base_config is not None:
        architecture = {
            "text_config": base_config.text_config.to_dict(),
            "vision_config": base_config.vision_config.to_dict(),
            "projection_dim": base_config.projection_dim,
            "logit_scale_init_value": base_config.logit_scale_init_value,
        }
    fields = {**ANOMALYCLIP_SETTINGS, **architecture, **kwargs}
    vision_config = CLIPConfig(vision_config=fields.get("vision_config")).vision_config
    num_vision_layers = vision_config.num_hidden_layers
    if "image_size" not in kwargs:  # AnomalyCLIP's 518 px on this backbone's patch grid (518 itself on ViT-L/14)
        fields["image_size"] = nearest_image_size(ANOMALYCLIP_SETTINGS["image_size"], vision_config.patch_size)
    return HeadCLIPConfig(
        **fields,
        feature_layers=list(feature_layers) if feature_layers is not None else [num_vision_layers],
        vv_start_layer=vv_start_layer if vv_start_layer is not None else max(1, round(num_vision_layers / 4)),
    )


def load_anomalyclip_checkpoint(checkpoint_path: str | Path) -> dict[str, torch.Tensor]:
    """
    Read an AnomalyCLIP checkpoint (`{"prompt_learner": state_dict}`) with `torch.load(..., weights_only=True)`: only
    tensors and plain containers are accepted, no pickled object is ever constructed. Returns the prompt learner's
    state dict, on the CPU. Raises `ValueError` for a file that is not such a checkpoint, `FileNotFoundError` for a
    missing one.
    """
    path = str(checkpoint_path)
    if not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"The AnomalyCLIP checkpoint {path!r} does not exist (or is not a file).")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError) as error:
        raise ValueError(
            f"Refused to load {path!r}: torch.load(weights_only=True) accepts only tensors and plain containers, and "
            f"this file holds other objects or is not a PyTorch checkpoint ({type(error).__name__}). AnomalyCLIP's "
            "train.py saves checkpoints that load this way."
        ) from error
    if not isinstance(checkpoint, Mapping) or "prompt_learner" not in checkpoint:
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(
            f"{path!r} is not an AnomalyCLIP checkpoint: expected a dict with the key 'prompt_learner' (as "
            f"AnomalyCLIP's train.py saves it), found {found}."
        )
    state_dict = checkpoint["prompt_learner"]
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path!r}: 'prompt_learner' holds a {type(state_dict).__name__}, expected a state dict.")
    return dict(state_dict)


def expected_anomalyclip_shapes(config: HeadCLIPConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the tensors of AnomalyCLIP's prompt learner for the sizes in `config`."""
    width = config.text_config.hidden_size
    context_length = config.text_config.max_position_embeddings
    num_context = config.prompt_length
    shapes = {}
    for side in ("pos", "neg"):
        shapes[f"ctx_{side}"] = (1, 1, num_context, width)
        shapes[f"token_prefix_{side}"] = (1, 1, 1, width)
        shapes[f"token_suffix_{side}"] = (1, 1, context_length - 1 - num_context, width)
        shapes[f"tokenized_prompts_{side}"] = (1, 1, context_length)
    for index in range(config.deep_prompt_depth - 1):
        shapes[f"compound_prompts_text.{index}"] = (config.deep_prompt_length, width)
    return shapes


def check_anomalyclip_state_dict(state_dict: Mapping[str, torch.Tensor], config: HeadCLIPConfig) -> None:
    """
    Raise a `ValueError` naming every missing tensor, unknown tensor, non-tensor value and wrong shape or dtype of
    `state_dict` against AnomalyCLIP's prompt learner for the sizes in `config`. The `compound_prompt_projections.*`
    (in every AnomalyCLIP checkpoint, never used by its forward) are ignored, with a log line.
    """
    expected = expected_anomalyclip_shapes(config)
    problems = []
    for name, shape in expected.items():
        if name not in state_dict:
            problems.append(f"missing tensor {name!r} of shape {shape}")
            continue
        tensor = state_dict[name]
        is_token_ids = name.startswith("tokenized_prompts")
        if not isinstance(tensor, torch.Tensor):
            problems.append(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        elif tuple(tensor.shape) != shape:
            problems.append(f"{name!r} has shape {tuple(tensor.shape)}, expected {shape}")
        elif tensor.is_floating_point() == is_token_ids:
            problems.append(f"{name!r} has dtype {tensor.dtype}, expected {'integer' if is_token_ids else 'float'}")
    ignored = [name for name in state_dict if name.startswith("compound_prompt_projections.")]
    for name, value in state_dict.items():
        if name not in expected and name not in ignored:
            shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
            problems.append(f"unexpected tensor {name!r}{shape}")
    if problems:
        raise ValueError(
            "The checkpoint does not match AnomalyCLIP's prompt learner with "
            f"n_ctx={config.prompt_length}, depth={config.deep_prompt_depth}, t_n_ctx={config.deep_prompt_length} on "
            f"a text encoder of width {config.text_config.hidden_size} and context length "
            f"{config.text_config.max_position_embeddings} (pass the n_ctx / depth / t_n_ctx it was trained with, and "
            "its base CLIP):\n  - " + "\n  - ".join(problems)
        )
    if ignored:
        logger.info(
            "Ignoring %d compound_prompt_projections.* tensors: AnomalyCLIP creates them but never uses them.",
            len(ignored),
        )


def read_prompt_template(state_dict: Mapping[str, torch.Tensor], name: str, config: HeadCLIPConfig) -> list[int]:
    """
    The template ids of the reference prompt `state_dict[name]`, `(1, 1, C)` token ids laid out as
    `[start, n context placeholders, template..., end, 0, ...]`: the ids between the context and the end token, which
    the reference finds with `argmax` (the end id is the largest of CLIP's vocabulary).
    """
    token_ids = state_dict[name].reshape(-1)
    end = int(token_ids.argmax())
    ids = token_ids.tolist()
    start_id, end_id, num_context = config.prompt_start_token_id, config.prompt_end_token_id, config.prompt_length
    if ids[0] != start_id or ids[end] != end_id or end < num_context + 2:
        raise ValueError(
            f"{name!r} = {ids[: end + 1]} is not laid out as [start {start_id}, {num_context} context tokens, "
            f"template, end {end_id}], as AnomalyCLIP tokenises its prompts."
        )
    return ids[1 + num_context : end]


def check_token_embeddings(state_dict: Mapping[str, torch.Tensor], model: HeadCLIPModel, base: str | Path) -> None:
    """
    The reference stores the frozen token embeddings of its prompts (`token_prefix_*`, `token_suffix_*`); they must be
    the base CLIP's embeddings of the start, template and end tokens, or the checkpoint was trained on another CLIP.
    The padding after the end token is not compared (it never reaches the text embedding).
    """
    config = model.config
    width = config.text_config.hidden_size
    token_embedding = model.text_model.embeddings.token_embedding.weight.detach().float()
    for side, template in (("pos", config.normal_prompt_ids), ("neg", config.abnormal_prompt_ids)):
        suffix_ids = [*template, config.prompt_end_token_id]
        stored = torch.cat(
            [
                state_dict[f"token_prefix_{side}"].reshape(1, width),
                state_dict[f"token_suffix_{side}"].reshape(-1, width)[: len(suffix_ids)],
            ]
        ).float()
        expected = token_embedding[[config.prompt_start_token_id, *suffix_ids]]
        difference = (stored - expected).abs().max().item()
        if difference > _TOKEN_EMBEDDING_RTOL * expected.abs().max().item():
            raise ValueError(
                f"The checkpoint's frozen prompt token embeddings (token_prefix_{side}, token_suffix_{side}) differ "
                f"from those of the base {str(base)!r} by up to {difference:.3g}: the checkpoint was trained on "
                f"another CLIP. Pass that CLIP as the base (AnomalyCLIP's checkpoints use {DEFAULT_CLIP_CHECKPOINT})."
            )


def load_base_model(base: str | Path, config: HeadCLIPConfig, **from_pretrained_kwargs) -> HeadCLIPModel:
    """
    `HeadCLIPModel.from_pretrained(base, config=config)`, raising a `ValueError` naming the weights when any CLIP
    weight is missing from `base` or has another shape (only the HeadCLIP parameters may be missing: the checkpoint
    provides them).
    """
    model, info = HeadCLIPModel.from_pretrained(
        base, config=config, output_loading_info=True, **from_pretrained_kwargs
    )
    missing = sorted(name for name in info["missing_keys"] if not name.startswith(HEADCLIP_PARAMETER_PREFIXES))
    mismatched = sorted(str(entry) for entry in info["mismatched_keys"])
    if missing or mismatched:
        raise ValueError(
            f"{str(base)!r} is not a CLIP of the architecture its config describes: missing weights {missing}, "
            f"mismatched weights {mismatched}."
        )
    return model


def convert_anomalyclip_checkpoint(
    checkpoint_path: str | Path,
    base: str | Path = DEFAULT_CLIP_CHECKPOINT,
    output_dir: str | Path | None = None,
    feature_layers: list[int] | None = None,
    vv_start_layer: int | None = None,
    prompt_length: int = ANOMALYCLIP_SETTINGS["prompt_length"],
    deep_prompt_depth: int = ANOMALYCLIP_SETTINGS["deep_prompt_depth"],
    deep_prompt_length: int = ANOMALYCLIP_SETTINGS["deep_prompt_length"],
    image_size: int | None = None,
    adapter: bool = False,
    overwrite: bool = False,
    **from_pretrained_kwargs,
) -> HeadCLIPModel:
    r"""
    Convert an AnomalyCLIP prompt-learner checkpoint into a [`HeadCLIPModel`] with the AnomalyCLIP preset.

    The base CLIP loads as HeadCLIP with [`anomalyclip_config`]; the checkpoint's context vectors and deep prompts
    replace the prompt learner's, and the prompt templates come from the checkpoint's tokenized prompts. The checkpoint
    is refused (`ValueError` naming each problem) when a tensor is missing, unknown or of the wrong shape for the given
    sizes, or when its frozen token embeddings are not the base's.

    Args:
        checkpoint_path (`str` or `Path`):
            An AnomalyCLIP checkpoint, e.g. `checkpoints/9_12_4_multiscale_visa/epoch_15.pth` (trained on MVTec AD).
        base (`str` or `Path`, defaults to `"openai/clip-vit-large-patch14-336"`):
            The CLIP the checkpoint was trained on (Hub id or folder).
        output_dir (`str` or `Path`, *optional*):
            Where to write the converted model: a complete `save_pretrained` folder (CLIP weights, HeadCLIP parameters
            and config with remote code: it loads with `HeadCLIPModel.from_pretrained`, or `AutoModel` with
            `trust_remote_code=True`), plus the processor when one loads from `base`.
        feature_layers (`list[int]`, *optional*), vv_start_layer (`int`, *optional*):
            See [`anomalyclip_config`]; by default the last vision layer, and a quarter of the vision depth.
        prompt_length (`int`, defaults to 12), deep_prompt_depth (`int`, defaults to 9),
        deep_prompt_length (`int`, defaults to 4):
            The reference's `--n_ctx`, `--depth` and `--t_n_ctx` that the checkpoint was trained with.
        image_size (`int`, *optional*):
            The reference's `--image_size`; by default AnomalyCLIP's 518 on the base's patch grid (518 itself on
            ViT-L/14, the nearest multiple of the patch size on other bases; see [`anomalyclip_config`]).
        adapter (`bool`, defaults to `False`):
            Write only the HeadCLIP parameters and fields to `output_dir`, as a HeadCLIP adapter of `base`
            (`headclip_hf.adapters`; load with `load_headclip_model(output_dir)`): 170 KB instead of 1.7 GB for
            ViT-L/14@336.
        overwrite (`bool`, defaults to `False`):
            Replace the model (or adapter) files in an `output_dir` that also holds other files (those stay). An
            earlier output of the same kind is replaced without it.
        from_pretrained_kwargs:
            Passed to `HeadCLIPModel.from_pretrained` (e.g. `cache_dir`, `revision`, `local_files_only`).

    Returns:
        The converted [`HeadCLIPModel`], in eval mode.

    Raises:
        `ValueError`: the checkpoint does not match (see above).
        `FileNotFoundError`: the checkpoint does not exist.
        `FileExistsError`, `NotADirectoryError`, `PermissionError`: `output_dir` cannot be written (checked before
            anything is loaded; see [`headclip_hf.files.check_output_folder`]).
    """
    output_kind = ADAPTER_OUTPUT if adapter else HEADCLIP_MODEL_OUTPUT
    if output_dir is not None:
        check_output_folder(output_dir, output_kind, overwrite)
    state_dict = load_anomalyclip_checkpoint(checkpoint_path)
    hub_kwargs = {key: value for key, value in from_pretrained_kwargs.items() if key in HUB_KWARGS}
    base_config = HeadCLIPConfig.from_pretrained(base, **hub_kwargs)
    preset = dict(
        feature_layers=feature_layers,
        vv_start_layer=vv_start_layer,
        prompt_length=prompt_length,
        deep_prompt_depth=deep_prompt_depth,
        deep_prompt_length=deep_prompt_length,
        **({} if image_size is None else {"image_size": image_size}),
    )
    config = anomalyclip_config(base_config, **preset)
    check_anomalyclip_state_dict(state_dict, config)
    # The same preset with the checkpoint's prompt templates (a config validates its fields when it is built).
    templates = {
        "normal_prompt_ids": read_prompt_template(state_dict, "tokenized_prompts_pos", config),
        "abnormal_prompt_ids": read_prompt_template(state_dict, "tokenized_prompts_neg", config),
    }
    config = anomalyclip_config(base_config, **preset, **templates)

    model = load_base_model(base, config, **from_pretrained_kwargs)
    check_token_embeddings(state_dict, model, base)
    prompt_learner = model.prompt_learner
    width = config.text_config.hidden_size
    with torch.no_grad():
        prompt_learner.normal_context.copy_(state_dict["ctx_pos"].reshape(prompt_length, width))
        prompt_learner.abnormal_context.copy_(state_dict["ctx_neg"].reshape(prompt_length, width))
        if prompt_learner.deep_prompts is not None:
            deep_prompts = torch.stack(
                [state_dict[f"compound_prompts_text.{index}"] for index in range(deep_prompt_depth - 1)]
            )
            # The reference rounds the deep prompts to fp16 (`.half()`) when it inserts them.
            prompt_learner.deep_prompts.copy_(deep_prompts.half())
    model.eval()

    if output_dir is not None and adapter:
        save_headclip_adapter(model, output_dir, base_model_name_or_path=str(base), overwrite=overwrite)
    elif output_dir is not None:
        processor = _base_processor(base, output_dir, config.image_size, hub_kwargs)
        with output_folder(output_dir, HEADCLIP_MODEL_OUTPUT, overwrite) as staging:
            model.save_pretrained(staging)
            if processor is not None:
                processor.save_pretrained(staging)
    return model


def _base_processor(
    base: str | Path, output_dir: str | Path, image_size: int, hub_kwargs: dict
) -> HeadCLIPProcessor | None:
    """The processor of `base` at `image_size`, or `None` with a warning when `base` has none."""
    try:
        return HeadCLIPProcessor.from_pretrained(base, image_size=image_size, **hub_kwargs)
    except (OSError, ValueError) as error:
        logger.warning(
            "No processor saved in %s: none loads from %r (%s). Save one with "
            "HeadCLIPProcessor.from_pretrained(<a CLIP checkpoint>).save_pretrained(...).",
            output_dir,
            str(base),
            error,
        )
        return None


__all__ = [
    "ANOMALYCLIP_SETTINGS",
    "HEADCLIP_MODEL_OUTPUT",
    "anomalyclip_config",
    "check_anomalyclip_state_dict",
    "convert_anomalyclip_checkpoint",
    "load_anomalyclip_checkpoint",
]
