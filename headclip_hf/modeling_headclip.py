# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""PyTorch HeadCLIP model: zero-shot anomaly detection by domain adaptation of CLIP's text prompts and attention heads.

This file imports only `torch`, `transformers` and `configuration_headclip` (relatively), so that `save_pretrained`
can ship it as Hub remote code and `AutoModel.from_pretrained(..., trust_remote_code=True)` works without
`headclip_hf` installed.

Shapes: B images, C=3 channels, H x W input pixels, N = (H / patch) * (W / patch) patch tokens, L feature layers,
D vision width, P projection width, T prompt tokens, M reference patch embeddings (few-shot mode).
"""

import logging as std_logging
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, modeling_utils
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoderLayer,
    CLIPPreTrainedModel,
    CLIPTextModel,
    CLIPVisionModel,
    eager_attention_forward,
)
from transformers.utils import ModelOutput, logging

from .configuration_headclip import HeadCLIPConfig, check_image_size

logger = logging.get_logger(__name__)

# Few-shot mode: reference patch embeddings compared with the images' patches at once in the nearest-neighbour search
# (`max_reference_similarity`). The similarity matrix of one chunk is (B * N, chunk) float32: 22 MB per image for
# ViT-L/14 at 518 px (N = 1369), whatever the number of references.
REFERENCE_CHUNK_SIZE = 4096
# Few-shot mode: reference images run through the vision encoder at once by `encode_references`.
REFERENCE_ENCODE_BATCH_SIZE = 8


@dataclass
class HeadCLIPOutput(ModelOutput):
    r"""
    Output of [`HeadCLIPModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `masks` and/or `labels` are passed):
            Training loss: per feature layer focal + Dice(abnormal, mask) + Dice(normal, 1 - mask) (with `masks`), plus
            the cross-entropy of `global_logits` against `labels` (with `labels`).
        anomaly_map (`torch.FloatTensor` of shape `(B, H, W)`):
            The pixel anomaly map, in [0, 1]: zero-shot, the mean of `layer_maps`; in few-shot mode (with
            `reference_embeds`), `(1 - few_shot_weight) * zero_shot_map + few_shot_weight * few_shot_map`.
            Gaussian-smoothed (sigma `config.map_sigma`) unless in training mode.
        image_score (`torch.FloatTensor` of shape `(B,)`):
            Joint anomaly score `alpha * global_score + (1 - alpha) * pool(anomaly_map)`, in [0, 1].
        global_score (`torch.FloatTensor` of shape `(B,)`):
            Probability of the abnormal prompt for the image embedding.
        layer_maps (`torch.FloatTensor` of shape `(B, L, H, W)`):
            Abnormal probability per feature layer, bilinearly upsampled to the input size (not smoothed).
        global_logits (`torch.FloatTensor` of shape `(B, 2)`):
            Cosine similarity of the image embedding with (normal, abnormal) prompt embeddings over `temperature`.
        image_embeds (`torch.FloatTensor` of shape `(B, P)`):
            L2-normalised image embedding (class token of the original attention path).
        text_embeds (`torch.FloatTensor` of shape `(2, P)`):
            L2-normalised (normal, abnormal) prompt embeddings.
        zero_shot_map (`torch.FloatTensor` of shape `(B, H, W)`, *optional*, returned with `reference_embeds`):
            The zero-shot map (the mean of `layer_maps`, smoothed like `anomaly_map`), in [0, 1].
        few_shot_map (`torch.FloatTensor` of shape `(B, H, W)`, *optional*, returned with `reference_embeds`):
            Per feature layer and patch `(1 - max cosine similarity to the layer's reference embeddings) / 2`,
            averaged over layers, bilinearly upsampled and smoothed like `anomaly_map`, in [0, 1].
    """

    loss: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None
    image_score: torch.FloatTensor | None = None
    global_score: torch.FloatTensor | None = None
    layer_maps: torch.FloatTensor | None = None
    global_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    zero_shot_map: torch.FloatTensor | None = None
    few_shot_map: torch.FloatTensor | None = None


def l2_normalize(features: torch.Tensor) -> torch.Tensor:
    """Divide by the L2 norm over the last dimension, as CLIP does (`x / x.norm(dim=-1, keepdim=True)`)."""
    return features / features.norm(p=2, dim=-1, keepdim=True)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """
    Separable Gaussian smoothing of `maps` of shape `(B, H, W)`, matching `scipy.ndimage.gaussian_filter(map, sigma)`
    per map: kernel radius `int(4 * sigma + 0.5)` (clipped to the map size minus one), half-sample symmetric padding
    (scipy's "reflect" mode), computed in the dtype of `maps`.
    """
    radius = int(4.0 * sigma + 0.5)
    radius = min(radius, maps.shape[-2] - 1, maps.shape[-1] - 1)
    if sigma <= 0 or radius < 1:
        return maps
    # Built in float64 on the CPU (some accelerators, e.g. MPS, have no float64), then moved.
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=maps.device, dtype=maps.dtype)

    def blur_last_dim(x: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([x[..., :radius].flip(-1), x, x[..., -radius:].flip(-1)], dim=-1)
        rows = padded.reshape(-1, 1, padded.shape[-1])
        return F.conv1d(rows, kernel.view(1, 1, -1)).reshape(x.shape)

    smoothed = blur_last_dim(maps)
    return blur_last_dim(smoothed.transpose(-1, -2)).transpose(-1, -2).contiguous()


def max_reference_similarity(
    patch_embeds: torch.Tensor, reference_embeds: torch.Tensor, chunk_size: int = REFERENCE_CHUNK_SIZE
) -> torch.Tensor:
    """
    The nearest-neighbour search of the few-shot mode: per feature layer and patch, the largest cosine similarity to
    that layer's reference embeddings.

    Layer by layer, the references are compared in chunks of at most `chunk_size`, so memory stays at one
    `(B * N, chunk)` similarity matrix whatever the number of references. The maximum over the chunks' maxima is the
    maximum over all references, so the result does not depend on `chunk_size` (16 or more), bit for bit: the chunks
    have near-equal widths (`torch.tensor_split`), never a narrow remainder, because BLAS libraries compute narrow
    products (below about 12 columns) with other kernels that round differently in the last bit.

    Args:
        patch_embeds (`torch.FloatTensor` of shape `(L, B, N, P)`):
            L2-normalised patch embeddings of the images.
        reference_embeds (`torch.FloatTensor` of shape `(L, M, P)`):
            L2-normalised patch embeddings of the references (`HeadCLIPModel.encode_references`).
        chunk_size (`int`, *optional*, defaults to `REFERENCE_CHUNK_SIZE`):
            Reference embeddings compared at once.

    Returns:
        `torch.FloatTensor` of shape `(L, B, N)`: float32 maximum cosine similarities.
    """
    reference_embeds = reference_embeds.to(device=patch_embeds.device, dtype=patch_embeds.dtype)
    _, batch_size, num_patches, _ = patch_embeds.shape
    layers = []
    for layer_patches, layer_references in zip(patch_embeds, reference_embeds, strict=True):
        queries = layer_patches.reshape(batch_size * num_patches, -1)  # (B * N, P)
        best = None
        for chunk in layer_references.tensor_split(math.ceil(len(layer_references) / chunk_size)):
            similarity = (queries @ chunk.T).float().amax(dim=-1)  # (B * N, chunk) -> (B * N,)
            best = similarity if best is None else torch.maximum(best, similarity)
        layers.append(best.reshape(batch_size, num_patches))
    return torch.stack(layers)


def focal_loss(abnormal_prob: torch.Tensor, masks: torch.Tensor, gamma: float, eps: float = 1e-6) -> torch.Tensor:
    """
    Focal loss (Lin et al. 2017) of a 2-class pixel map, averaged over pixels.

    Args:
        abnormal_prob (`torch.Tensor` of shape `(B, H, W)`):
            Probability of the abnormal class.
        masks (`torch.Tensor` of shape `(B, H, W)`):
            Binary ground truth (1 = anomalous pixel).
        gamma (`float`):
            The focusing parameter.
        eps (`float`, *optional*, defaults to 1e-6):
            Lower clamp of the probability of the true class, before its logarithm.
    """
    prob_true = torch.where(masks > 0.5, abnormal_prob, 1.0 - abnormal_prob).clamp(min=eps, max=1.0)
    return (-((1.0 - prob_true) ** gamma) * prob_true.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss `1 - (2|p*t| + s) / (|p| + |t| + s)` per image of `(B, H, W)` maps, averaged over images."""
    prob, target = prob.flatten(1), target.flatten(1)
    dice = (2.0 * (prob * target).sum(1) + smooth) / (prob.sum(1) + target.sum(1) + smooth)
    return (1.0 - dice).mean()


class HeadCLIPPromptLearner(nn.Module):
    """
    The learnable text side: context vectors of the normal and abnormal prompts and the deep prompts.

    The prompts are `[SOT] [V1..Vn] <normal template> [EOT]` and `[SOT] [W1..Wn] <abnormal template> [EOT]`, padded
    with EOT to a common length T. `prompt_token_ids` holds them with the context positions filled by
    `prompt_init_ids`, so that CLIP applied to these ids computes what an untrained HeadCLIP computes.

    Parameters:
        normal_context, abnormal_context: `(prompt_length, text width)`.
        deep_prompts: `(deep_prompt_depth - 1, deep_prompt_length, text width)`, for text layers 2..depth; `None`
            when deep prompts are off.
    """

    def __init__(self, config: HeadCLIPConfig):
        super().__init__()
        width = config.text_config.hidden_size
        self.prompt_length = config.prompt_length
        self.normal_context = nn.Parameter(torch.empty(config.prompt_length, width))
        self.abnormal_context = nn.Parameter(torch.empty(config.prompt_length, width))
        num_deep_layers = config.deep_prompt_depth - 1
        if num_deep_layers > 0 and config.deep_prompt_length > 0:
            self.deep_prompts = nn.Parameter(torch.empty(num_deep_layers, config.deep_prompt_length, width))
        else:
            self.deep_prompts = None

        self.num_random_context = config.prompt_length - len(config.prompt_init_ids[-config.prompt_length :])
        token_ids, end_positions = self.build_prompt_token_ids(config)
        self.register_buffer("prompt_token_ids", token_ids, persistent=False)
        self.register_buffer("end_positions", end_positions, persistent=False)

    @staticmethod
    def build_prompt_token_ids(config: HeadCLIPConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The two prompts' token ids `(2, T)`, the context positions holding the init phrase right-aligned next to the
        template (its last `prompt_length` tokens if longer, its first token repeated in front if shorter), and the
        end-of-text position of each prompt `(2,)`.
        """
        init_ids = list(config.prompt_init_ids)[-config.prompt_length :]
        placeholder_ids = [init_ids[0]] * (config.prompt_length - len(init_ids)) + init_ids
        rows = [
            [config.prompt_start_token_id, *placeholder_ids, *template, config.prompt_end_token_id]
            for template in (config.normal_prompt_ids, config.abnormal_prompt_ids)
        ]
        length = max(len(row) for row in rows)
        padded = [row + [config.prompt_end_token_id] * (length - len(row)) for row in rows]
        end_positions = [len(row) - 1 for row in rows]
        return torch.tensor(padded, dtype=torch.long), torch.tensor(end_positions, dtype=torch.long)

    def context(self) -> torch.Tensor:
        """The (normal, abnormal) context vectors stacked: `(2, prompt_length, text width)`."""
        return torch.stack([self.normal_context, self.abnormal_context])


class HeadCLIPHeadWeights(nn.Module):
    """
    One learnable scalar per attention head of the image encoder: `weight` `(vision layers, heads)` multiplies each
    head's output before the attention output projection. Initialised to 1 (the image encoder is then CLIP's).
    Layers outside `config.head_weight_layers` stay at exactly 1 whatever `weight` holds: calling the module gives the
    weights actually applied.
    """

    def __init__(self, config: HeadCLIPConfig):
        super().__init__()
        vision_config = config.vision_config
        self.weight = nn.Parameter(torch.empty(vision_config.num_hidden_layers, vision_config.num_attention_heads))
        self.register_buffer("trainable_layers", self.build_trainable_layers(config), persistent=False)

    @staticmethod
    def build_trainable_layers(config: HeadCLIPConfig) -> torch.Tensor:
        """`(layers, 1)` booleans: True for the vision layers in `config.head_weight_layers` (all when `None`)."""
        num_layers = config.vision_config.num_hidden_layers
        trainable = torch.zeros(num_layers, 1, dtype=torch.bool)
        layers = range(1, num_layers + 1) if config.head_weight_layers is None else config.head_weight_layers
        trainable[[layer - 1 for layer in layers]] = True
        return trainable

    def forward(self) -> torch.Tensor:
        """The `(layers, heads)` weights applied to the heads: `weight` in trainable layers, 1 elsewhere."""
        return torch.where(self.trainable_layers, self.weight, torch.ones_like(self.weight))


# The HeadCLIP parameters (what training changes) are those of these modules of `HeadCLIPModel`.
HEADCLIP_MODULES = ("prompt_learner", "attention_head_weights")
HEADCLIP_PARAMETER_PREFIXES = tuple(f"{name}." for name in HEADCLIP_MODULES)


class _HeldLoadReport(std_logging.Filter):
    """Holds back the load report that transformers logs for `model_class`; every other record passes."""

    def __init__(self, model_class: type):
        super().__init__()
        self.title = f"{model_class.__name__} LOAD REPORT"
        self.records: list[std_logging.LogRecord] = []

    def filter(self, record: std_logging.LogRecord) -> bool:
        if self.title in record.getMessage():
            self.records.append(record)
            return False
        return True


@contextmanager
def _held_load_report(model_class: type) -> Iterator[list[std_logging.LogRecord]]:
    """
    Hold back transformers' load report for `model_class` while the block runs, and log it unchanged at the end unless
    the block cleared the yielded list of held records (a report it replaces with its own message).
    """
    report_logger = modeling_utils.logger
    held = _HeldLoadReport(model_class)
    report_logger.addFilter(held)
    try:
        yield held.records
    finally:
        report_logger.removeFilter(held)
        for record in held.records:
            report_logger.handle(record)


class _PromptCacheInvalidator:
    """
    The load-state-dict post hook of the modules the prompt embeddings depend on (`HeadCLIPModel.prompt_learner`,
    `text_model`, `text_projection`): loading weights into one of them, however the load is reached (the model, a
    wrapper such as a `ModuleDict` or a PEFT model, or the submodule itself), forgets the model's cached embeddings.

    It holds the model weakly. A deep copy of the whole model gets hooks on the copy; a deep copy of one submodule
    (PEFT's `modules_to_save` copies the prompt learner) keeps the hook on the same model, which the copy is part of,
    instead of copying the model with it.
    """

    def __init__(self, model: "HeadCLIPModel | None"):
        self.model_reference = None if model is None else weakref.ref(model)

    def model(self) -> "HeadCLIPModel | None":
        """The model, or `None` once it no longer exists."""
        return None if self.model_reference is None else self.model_reference()

    def __call__(self, module: nn.Module, incompatible_keys) -> None:
        model = self.model()
        if model is not None:
            model.invalidate_prompt_cache()

    def __deepcopy__(self, memo: dict) -> "_PromptCacheInvalidator":
        model = self.model()
        return _PromptCacheInvalidator(memo.get(id(model), model))

    def __reduce__(self):
        # Pickled (`torch.save(model)`) with a strong reference to the model, which pickle restores once.
        return _PromptCacheInvalidator, (self.model(),)


class HeadCLIPModel(CLIPModel):
    r"""
    HeadCLIP (Jeong et al., "Domain Adaptation of Attention Heads for Zero-shot Anomaly Detection"): a frozen CLIP with
    learnable prompts in the text encoder, a learnable weight per attention head in the image encoder, value-value
    attention patch features for pixel maps, and a joint anomaly score.

    `HeadCLIPModel.from_pretrained("openai/clip-vit-large-patch14-336")` loads a plain CLIP checkpoint: CLIP's weights
    load and only the HeadCLIP parameters (`attention_head_weights.weight`, `prompt_learner.*`) initialise: head
    weights at exactly 1 (the image encoder is CLIP's) and prompts from the embeddings of a real phrase (a usable
    zero-shot detector).
    Only the HeadCLIP parameters require gradients; the CLIP backbone is frozen.

    Head weights, one concept: `model.head_weights` is the learnable `(vision layers, heads)` parameter. It lives in
    the submodule `model.attention_head_weights` ([`HeadCLIPHeadWeights`]), hence its name in checkpoints and adapters,
    `attention_head_weights.weight`; calling that submodule, `model.attention_head_weights()`, gives the weights
    actually applied (1 in the layers outside `config.head_weight_layers`).

    Prompt embeddings: they do not depend on the image, so in eval mode they are computed once and cached. The cache is
    cleared by switching between training and eval mode (`train()` / `eval()` when the mode changes), loading weights
    into the prompt learner, the text encoder or the text projection (`load_state_dict` of the model, of a wrapper
    around it or of those modules themselves), and moving or casting the model (`to`, `half`, ...); after changing a
    text-side parameter in place in eval mode (e.g. `model.prompt_learner.normal_context.add_(...)`), call
    `model.invalidate_prompt_cache()`.
    """

    config_class = HeadCLIPConfig
    config: HeadCLIPConfig
    # transformers' `gradient_checkpointing_enable()` (`activation_checkpointing_enable()`) flags every CLIP encoder
    # layer; `encode_image` honours the flags in its own layer loop (both attention paths), the prompt encoder runs
    # CLIP's layers themselves.
    supports_gradient_checkpointing = True

    def __init__(self, config: HeadCLIPConfig):
        # CLIPModel.__init__ would run post_init (weight initialisation) before the HeadCLIP parameters exist, so the
        # CLIP modules are built here exactly as CLIPModel builds them, and post_init runs once at the end.
        CLIPPreTrainedModel.__init__(self, config)
        self._prompt_embeds_cache: tuple[bool, torch.Tensor] | None = None
        text_config, vision_config = config.text_config, config.vision_config
        self.projection_dim = config.projection_dim
        self.text_embed_dim = text_config.hidden_size
        self.vision_embed_dim = vision_config.hidden_size
        self.text_model = CLIPTextModel._from_config(text_config)
        self.vision_model = CLIPVisionModel._from_config(vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

        self.prompt_learner = HeadCLIPPromptLearner(config)
        self.attention_head_weights = HeadCLIPHeadWeights(config)
        for module in (self.prompt_learner, self.text_model, self.text_projection):
            module.register_load_state_dict_post_hook(_PromptCacheInvalidator(self))
        self.post_init()
        self.freeze_backbone()

    @property
    def head_weights(self) -> nn.Parameter:
        """The learnable head weights, `(vision layers, heads)` (stored as `attention_head_weights.weight`)."""
        return self.attention_head_weights.weight

    def freeze_backbone(self) -> None:
        """Freeze every CLIP weight; only the prompt learner and (if `use_head_weights`) the head weights train."""
        self.requires_grad_(False)
        self.prompt_learner.requires_grad_(True)
        self.attention_head_weights.requires_grad_(self.config.use_head_weights)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""
        [`~PreTrainedModel.from_pretrained`] for a HeadCLIP or a plain CLIP checkpoint, which loads as an untrained
        HeadCLIP. transformers' load report would list the HeadCLIP parameters of a CLIP checkpoint as "newly
        initialized ... Consider training on your downstream task"; here that case logs one info line instead,
        "loaded CLIP weights from X; HeadCLIP parameters initialised (untrained)". Any other loading problem (a CLIP
        weight missing or mismatched, some HeadCLIP parameters present and others not) keeps transformers' report.
        With `output_loading_info=True` the caller receives the facts (the HeadCLIP parameters among `missing_keys`)
        and nothing is logged for them, as when an adapter is loaded on top next.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        with _held_load_report(cls) as held_reports:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
            headclip_parameters = {
                name for name, _ in model.named_parameters() if name.startswith(HEADCLIP_PARAMETER_PREFIXES)
            }
            untrained = set(loading_info["missing_keys"]) == headclip_parameters
            if untrained and not loading_info["unexpected_keys"] and not loading_info["mismatched_keys"]:
                held_reports.clear()  # the report says only that the HeadCLIP parameters were initialised
                if not output_loading_info:
                    logger.info(
                        f"loaded CLIP weights from {pretrained_model_name_or_path}; HeadCLIP parameters initialised "
                        "(untrained)"
                    )
        # Loading may create new Parameter objects; re-apply the trainable/frozen split afterwards.
        model.freeze_backbone()
        return (model, loading_info) if output_loading_info else model

    def invalidate_prompt_cache(self) -> None:
        """Forget the cached prompt embeddings: the next eval-mode forward encodes the prompts again."""
        self._prompt_embeds_cache = None

    def train(self, mode: bool = True) -> "HeadCLIPModel":
        if mode != self.training:  # the text side may have been trained in between
            self.invalidate_prompt_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # Every move or cast (`to`, `cuda`, `half`, ...) goes through `_apply`.
        self.invalidate_prompt_cache()
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Non-persistent buffers are rebuilt here too: loading leaves them uninitialised.
        if isinstance(module, HeadCLIPHeadWeights):
            init.ones_(module.weight)
            init.copy_(module.trainable_layers, module.build_trainable_layers(self.config))
        elif isinstance(module, HeadCLIPPromptLearner):
            token_ids, end_positions = module.build_prompt_token_ids(self.config)
            init.copy_(module.prompt_token_ids, token_ids)
            init.copy_(module.end_positions, end_positions)
            self._init_prompt_learner(module)

    def _init_prompt_learner(self, prompt_learner: HeadCLIPPromptLearner) -> None:
        """
        Context vectors start as the token embeddings of `config.prompt_init_ids` (free leading positions: N(0, 0.02),
        shared by both prompts). Deep prompts start as the hidden states that those prompts produce at the positions
        they replace, so the untrained prompt embeddings equal CLIP's text embeddings of the init prompts exactly.
        """
        token_embedding = self.text_model.embeddings.token_embedding
        init_context = token_embedding(prompt_learner.prompt_token_ids[0, 1 : 1 + prompt_learner.prompt_length])
        if prompt_learner.num_random_context > 0:
            random_context = torch.randn_like(init_context[: prompt_learner.num_random_context]) * 0.02
            init_context = torch.cat([random_context, init_context[prompt_learner.num_random_context :]])
        init.copy_(prompt_learner.normal_context, init_context)
        init.copy_(prompt_learner.abnormal_context, init_context)
        if prompt_learner.deep_prompts is not None:
            _, layer_inputs = self._run_prompt_encoder(prompt_learner.context(), deep_prompts=None)
            length = prompt_learner.deep_prompts.shape[1]
            deep_init = torch.stack(
                [layer_inputs[index][0, 1 : 1 + length] for index in range(1, 1 + len(prompt_learner.deep_prompts))]
            )
            init.copy_(prompt_learner.deep_prompts, deep_init)

    def _run_prompt_encoder(
        self, context: torch.Tensor, deep_prompts: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Run CLIP's text encoder on the two prompts with `context` `(2, n, width)` in place of the context tokens and
        `deep_prompts` `(depth - 1, k, width)` replacing positions 1..k at the input of text layers 2..depth.

        Returns:
            The final hidden states `(2, T, width)` (before the final layer norm) and the hidden states entering each
            text layer (a list of `(2, T, width)`).
        """
        text_model = self.text_model
        token_ids = self.prompt_learner.prompt_token_ids
        token_embeds = text_model.embeddings.token_embedding(token_ids)
        num_context = context.shape[1]
        inputs_embeds = torch.cat(
            [token_embeds[:, :1], context.to(token_embeds.dtype), token_embeds[:, 1 + num_context :]], dim=1
        )
        hidden_states = text_model.embeddings(inputs_embeds=inputs_embeds)
        causal_mask = create_causal_mask(
            config=text_model.config, inputs_embeds=hidden_states, attention_mask=None, cache=None
        )
        layer_inputs = []
        for index, layer in enumerate(text_model.encoder.layers):
            if deep_prompts is not None and 1 <= index <= len(deep_prompts):
                deep = deep_prompts[index - 1].to(hidden_states.dtype).expand(hidden_states.shape[0], -1, -1)
                hidden_states = torch.cat([hidden_states[:, :1], deep, hidden_states[:, 1 + deep.shape[1] :]], dim=1)
            layer_inputs.append(hidden_states)
            hidden_states = layer(hidden_states, causal_mask, is_causal=True)
        return hidden_states, layer_inputs

    def _compute_prompt_embeds(self) -> torch.Tensor:
        # Outside autocast: the two prompts cost little, and their embeddings then have one precision (the weights').
        with torch.autocast(device_type=self.text_projection.weight.device.type, enabled=False):
            prompt_learner = self.prompt_learner
            hidden_states, _ = self._run_prompt_encoder(prompt_learner.context(), prompt_learner.deep_prompts)
            hidden_states = self.text_model.final_layer_norm(hidden_states)
            pooled = hidden_states[
                torch.arange(hidden_states.shape[0], device=hidden_states.device), prompt_learner.end_positions
            ]
            return l2_normalize(self.text_projection(pooled))

    def _text_side_parameters(self) -> list[torch.Tensor]:
        """Every parameter the prompt embeddings depend on (prompt learner, text encoder, text projection)."""
        return [*self.prompt_learner.parameters(), *self.text_model.parameters(), self.text_projection.weight]

    @torch.compiler.disable
    def get_prompt_embeds(self) -> torch.Tensor:
        """
        The L2-normalised (normal, abnormal) prompt embeddings, `(2, P)`, computed outside autocast.

        In eval mode, when no gradient can flow to a text-side parameter, they are cached (see the class docstring for
        what clears the cache); a cache filled under `torch.inference_mode` is only reused there, as its tensors
        cannot enter autograd. Otherwise (training mode, or gradients flowing to the prompts) they are computed on
        every call. A compiled model (`torch.compile`) runs this method eagerly: the cache is Python state, which
        compiled graphs would otherwise guard on.
        """
        if self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in self._text_side_parameters())):
            return self._compute_prompt_embeds()
        inference_mode = torch.is_inference_mode_enabled()
        if self._prompt_embeds_cache is None or self._prompt_embeds_cache[0] != inference_mode:
            self._prompt_embeds_cache = (inference_mode, self._compute_prompt_embeds())
        return self._prompt_embeds_cache[1]

    def _attention(
        self,
        attention: CLIPAttention,
        hidden_states: torch.Tensor,
        head_weights: torch.Tensor | None,
        value_value: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        CLIP's multi-head attention on `hidden_states` `(B, N, D)` with each head's output scaled by `head_weights`
        `(heads,)` before the output projection; with `value_value`, also the value-value attention
        softmax(v v^T * scale) v of the same values, through the same head weights and output projection.

        Returns:
            The attention output `(B, N, D)` and the value-value output `(B, N, D)` (or `None`).
        """
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, attention.head_dim)
        queries = attention.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        keys = attention.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        values = attention.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            attention.config._attn_implementation, eager_attention_forward
        )
        dropout = attention.dropout if self.training else 0.0

        def heads_to_output(heads_output: torch.Tensor) -> torch.Tensor:
            # heads_output: (B, N, heads, head_dim), as returned by the attention interface.
            if head_weights is not None:
                heads_output = heads_output * head_weights.to(heads_output.dtype)[:, None]
            return attention.out_proj(heads_output.reshape(*input_shape, -1).contiguous())

        attn_output, _ = attention_interface(
            attention, queries, keys, values, None, scaling=attention.scale, dropout=dropout
        )
        output = heads_to_output(attn_output)
        if not value_value:
            return output, None
        vv_output, _ = attention_interface(
            attention, values, values, values, None, scaling=attention.scale, dropout=dropout
        )
        return output, heads_to_output(vv_output)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        CLIP's patch + class embeddings of `pixel_values` `(B, 3, H, W)` (H and W multiples of the patch size, else a
        `ValueError` naming the nearest valid sizes) with the positional embeddings of the
        pretrained grid resized to the (H / patch) x (W / patch) grid (`config.position_interpolation`, without
        corner alignment; unchanged when the grids match). Returns `(B, 1 + N, D)`.
        """
        embeddings = self.vision_model.embeddings
        batch_size, _, height, width = pixel_values.shape
        for side, size in (("height", height), ("width", width)):
            try:
                check_image_size(size, embeddings.patch_size)
            except ValueError as error:
                raise ValueError(f"pixel_values {side} {error} (HeadCLIPProcessor prepares valid sizes)") from None
        patch_embeds = embeddings.patch_embedding(pixel_values.to(dtype=embeddings.patch_embedding.weight.dtype))
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        class_embeds = embeddings.class_embedding.expand(batch_size, 1, -1)
        position_embeds = embeddings.position_embedding.weight.unsqueeze(0)  # (1, 1 + pretrained grid^2, D)
        grid = (height // embeddings.patch_size, width // embeddings.patch_size)
        pretrained_side = int(math.sqrt(position_embeds.shape[1] - 1))
        if grid != (pretrained_side, pretrained_side):
            dim = position_embeds.shape[-1]
            patch_positions = position_embeds[:, 1:].reshape(1, pretrained_side, pretrained_side, dim)
            patch_positions = F.interpolate(
                patch_positions.permute(0, 3, 1, 2),
                size=grid,
                mode=self.config.position_interpolation,
                align_corners=False,
            )
            patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(1, -1, dim)
            position_embeds = torch.cat([position_embeds[:, :1], patch_positions], dim=1)
        return torch.cat([class_embeds, patch_embeds], dim=1) + position_embeds

    def _vision_layer(
        self,
        layer: CLIPEncoderLayer,
        hidden_states: torch.Tensor,
        vv_states: torch.Tensor | None,
        head_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        One vision encoder layer on both paths: CLIP's layer on `hidden_states` `(B, 1 + N, D)` with the heads scaled
        by `head_weights` `(heads,)`, and, when `vv_states` `(B, 1 + N, D)` is given, the value-value attention of the
        same layer added to it (no MLP). Returns the new `(hidden_states, vv_states)`.
        """
        attn_output, vv_output = self._attention(
            layer.self_attn, layer.layer_norm1(hidden_states), head_weights, value_value=vv_states is not None
        )
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + layer.mlp(layer.layer_norm2(hidden_states))
        if vv_states is not None:
            vv_states = vv_states + vv_output
        return hidden_states, vv_states

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The vision encoder with head weights and the value-value path.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`):
                Any H, W that are multiples of the patch size (positional embeddings are interpolated).

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: the class token of the last layer's original path `(B, D)` and the
            value-value patch tokens at the feature layers `(L, B, N, D)`.
        """
        config = self.config
        vision_model = self.vision_model
        hidden_states = self.embed_image(pixel_values)
        hidden_states = vision_model.pre_layrnorm(hidden_states)
        head_weights = self.attention_head_weights() if config.use_head_weights else None
        feature_layers = set(config.feature_layers)
        vv_states = None
        patch_tokens = []
        for index, layer in enumerate(vision_model.encoder.layers):
            layer_number = index + 1
            value_value = config.vv_start_layer <= layer_number <= config.feature_layers[-1]
            if not value_value:
                vv_states = None  # before the value-value path starts, or after the last feature layer
            elif vv_states is None:
                vv_states = hidden_states
            layer_inputs = (layer, hidden_states, vv_states, None if head_weights is None else head_weights[index])
            if layer.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Activation checkpointing (`gradient_checkpointing_enable()`): the layer's activations, both paths,
                # are recomputed in the backward pass instead of being kept.
                hidden_states, vv_states = layer._gradient_checkpointing_func(self._vision_layer, *layer_inputs)
            else:
                hidden_states, vv_states = self._vision_layer(*layer_inputs)
            if layer_number in feature_layers:
                patch_tokens.append(vv_states[:, 1:])
        return hidden_states[:, 0], torch.stack(patch_tokens)

    def project_patch_tokens(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """
        The patch embeddings the maps compare: patch tokens `(L, B, N, D)` -> post layer norm -> visual projection ->
        L2 norm. Returns `(L, B, N, P)`.
        """
        return l2_normalize(self.visual_projection(self.vision_model.post_layernorm(patch_tokens)))

    def upsample_patch_scores(self, patch_scores: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """
        Patch scores `(L, B, N)` on the patch grid of an `image_size` (H, W) input -> bilinear upsampling to the input
        size (`align_corners=False`). Returns `(B, L, H, W)`.
        """
        num_layers, batch_size, _ = patch_scores.shape
        patch_size = self.config.vision_config.patch_size
        grid = (image_size[0] // patch_size, image_size[1] // patch_size)
        patch_scores = patch_scores.reshape(num_layers, batch_size, *grid).transpose(0, 1)
        return F.interpolate(patch_scores, size=image_size, mode="bilinear", align_corners=False)

    def compute_layer_maps(
        self, patch_embeds: torch.Tensor, prompt_embeds: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """
        Per-layer zero-shot pixel maps: cosine of the patch embeddings `(L, B, N, P)` (`project_patch_tokens`) with
        `prompt_embeds` `(2, P)` / temperature -> softmax -> abnormal probability on the patch grid -> bilinear
        upsampling to `image_size` (H, W). Returns `(B, L, H, W)` float32 maps in [0, 1].
        """
        logits = (patch_embeds @ prompt_embeds.to(patch_embeds.dtype).T).float() / self.config.temperature
        return self.upsample_patch_scores(logits.softmax(dim=-1)[..., 1], image_size)

    def compute_few_shot_map(
        self, patch_embeds: torch.Tensor, reference_embeds: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """
        The few-shot pixel map: per feature layer and patch `(1 - max cosine similarity to the layer's references) / 2`
        (`max_reference_similarity`, clamped to [0, 1] against rounding), averaged over the layers, then bilinearly
        upsampled to `image_size` once (upsampling is linear, so this is the mean of the upsampled layer maps up to
        float rounding, at a quarter of the cost for four layers).

        Args:
            patch_embeds (`torch.FloatTensor` of shape `(L, B, N, P)`):
                Patch embeddings of the images (`project_patch_tokens`).
            reference_embeds (`torch.FloatTensor` of shape `(L, M, P)`):
                Reference embeddings (`encode_references`).
            image_size (`tuple[int, int]`):
                The input size (H, W).

        Returns:
            `torch.FloatTensor` of shape `(B, H, W)`: float32 map in [0, 1], 0 where every layer's patch equals a
            reference patch.
        """
        similarity = max_reference_similarity(patch_embeds, reference_embeds)
        patch_scores = ((1.0 - similarity) / 2.0).clamp(0.0, 1.0).mean(dim=0, keepdim=True)  # (1, B, N)
        return self.upsample_patch_scores(patch_scores, image_size)[:, 0]

    def check_reference_embeds(self, reference_embeds: torch.Tensor) -> None:
        """
        Raise a `ValueError` unless `reference_embeds` is a floating-point tensor of the `(L, M, P)` shape this
        model's features have.
        """
        num_layers, projection_dim = len(self.config.feature_layers), self.config.projection_dim
        if not isinstance(reference_embeds, torch.Tensor) or not reference_embeds.is_floating_point():
            kind = type(reference_embeds).__name__
            described = f"a {reference_embeds.dtype} tensor" if isinstance(reference_embeds, torch.Tensor) else kind
            raise ValueError(
                f"reference_embeds must be a floating-point torch.Tensor of shape (L={num_layers}, M, "
                f"P={projection_dim}), got {described}. Compute them with this model's `encode_references("
                "pixel_values)` (or convert an array with torch.from_numpy)."
            )
        shape = tuple(reference_embeds.shape)
        if len(shape) != 3 or shape[0] != num_layers or shape[2] != projection_dim or shape[1] < 1:
            raise ValueError(
                f"reference_embeds has shape {shape}, expected (L={num_layers}, M, P={projection_dim}) with M >= 1: "
                f"one set of projected patch embeddings per feature layer {self.config.feature_layers}. Compute them "
                "with this model's `encode_references(pixel_values)`."
            )

    def encode_references(self, pixel_values: torch.Tensor) -> torch.Tensor:
        r"""
        The few-shot references: the L2-normalised projected value-value patch embeddings of normal reference images
        at the feature layers, exactly the features the zero-shot maps compare with the prompts. Pass them to
        `forward(..., reference_embeds=...)`. The images run through the vision encoder in batches of
        `REFERENCE_ENCODE_BATCH_SIZE`, so any number of references fits.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(K, 3, H, W)`):
                K normal images preprocessed by [`HeadCLIPProcessor`] at the size the model will run at.

        Returns:
            `torch.FloatTensor` of shape `(L, M, P)`: M = K x N patch embeddings per feature layer, image by image.

        Example:

        ```python
        >>> references = processor(images=[Image.open(f"good/{i:03d}.png") for i in range(4)], return_tensors="pt")
        >>> reference_embeds = model.encode_references(references["pixel_values"])
        >>> inputs = processor(images=Image.open("test.png"), return_tensors="pt")
        >>> outputs = model(**inputs, reference_embeds=reference_embeds)
        >>> outputs.few_shot_map.shape, outputs.image_score
        ```
        """
        if pixel_values.ndim != 4 or pixel_values.shape[0] < 1:
            raise ValueError(
                f"encode_references needs pixel_values of shape (K, 3, H, W) with K >= 1 reference images, got "
                f"{tuple(pixel_values.shape)}."
            )
        embeds = []
        for batch in pixel_values.split(REFERENCE_ENCODE_BATCH_SIZE):
            _, patch_tokens = self.encode_image(batch)
            with torch.autocast(device_type=batch.device.type, enabled=False):
                embeds.append(self.project_patch_tokens(patch_tokens))
        embeds = torch.cat(embeds, dim=1)  # (L, K, N, P)
        return embeds.flatten(1, 2)

    def pool_map(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Pool `(B, H, W)` maps to `(B,)`: the maximum, or the mean of the top `joint_topk` fraction of pixels."""
        flat = anomaly_map.flatten(1)
        if self.config.joint_pooling == "max":
            return flat.amax(dim=1)
        k = max(1, math.ceil(self.config.joint_topk * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(dim=1)

    def compute_loss(
        self,
        layer_maps: torch.Tensor,
        global_logits: torch.Tensor,
        masks: torch.Tensor | None,
        labels: torch.Tensor | None,
        mask_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        The training loss: per feature layer, focal loss + Dice(abnormal map, mask) + Dice(normal map, 1 - mask) on
        the images with known masks (`masks` `(B, H, W)`, `mask_valid` `(B,)`), plus the cross-entropy of
        `global_logits` `(B, 2)` against `labels` `(B,)`. Either part is left out when its targets are `None`.
        """
        loss = layer_maps.new_zeros(())
        if masks is not None:
            masks = masks.to(device=layer_maps.device, dtype=layer_maps.dtype)
            if masks.shape != (layer_maps.shape[0], *layer_maps.shape[2:]):
                raise ValueError(
                    f"masks have shape {tuple(masks.shape)}, expected "
                    f"{(layer_maps.shape[0], *layer_maps.shape[2:])} (B, H, W)"
                )
            if mask_valid is not None:
                known = mask_valid.to(device=layer_maps.device, dtype=torch.bool)
                layer_maps, masks = layer_maps[known], masks[known]
            if masks.shape[0] > 0:
                for layer_index in range(layer_maps.shape[1]):
                    abnormal = layer_maps[:, layer_index]
                    loss = loss + focal_loss(abnormal, masks, self.config.focal_gamma)
                    loss = loss + dice_loss(abnormal, masks) + dice_loss(1.0 - abnormal, 1.0 - masks)
        if labels is not None:
            loss = loss + F.cross_entropy(global_logits, labels.to(global_logits.device).long())
        return loss

    def forward(
        self,
        pixel_values: torch.Tensor,
        masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_valid: torch.Tensor | None = None,
        reference_embeds: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> HeadCLIPOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`):
                Images preprocessed by [`HeadCLIPProcessor`] (H and W multiples of the patch size; by default the
                working size `config.image_size`).
            masks (`torch.FloatTensor` of shape `(B, H, W)`, *optional*):
                Binary ground-truth masks (1 = anomalous pixel); adds the pixel losses.
            labels (`torch.LongTensor` of shape `(B,)`, *optional*):
                Image labels (0 normal, 1 anomalous); adds the image cross-entropy.
            mask_valid (`torch.BoolTensor` of shape `(B,)`, *optional*):
                Which `masks` are known (see `load_anomaly_dataset`); the pixel losses use only those images.
            reference_embeds (`torch.FloatTensor` of shape `(L, M, P)`, *optional*):
                Few-shot mode: patch embeddings of normal reference images from `encode_references` (at the same input
                size). The anomaly map becomes `(1 - few_shot_weight) * zero-shot map + few_shot_weight * few-shot
                map`, the image score follows the joint rule on it, and the output gains `zero_shot_map` and
                `few_shot_map`. Without them every output is the zero-shot model's. The loss uses the zero-shot
                `layer_maps` only.
            prompt_embeds (`torch.FloatTensor` of shape `(2, P)`, *optional*):
                The (normal, abnormal) prompt embeddings to use instead of `get_prompt_embeds()`; the text encoder is
                then not run. An exported graph holds them as constants (`headclip_hf.export`).

        Returns:
            [`HeadCLIPOutput`].

        Example:

        ```python
        >>> from PIL import Image
        >>> from headclip_hf import HeadCLIPModel, HeadCLIPProcessor

        >>> model = HeadCLIPModel.from_pretrained("openai/clip-vit-large-patch14-336").eval()
        >>> processor = HeadCLIPProcessor.from_pretrained("openai/clip-vit-large-patch14-336")
        >>> inputs = processor(images=Image.open("bottle.png"), return_tensors="pt")
        >>> outputs = model(**inputs)
        >>> outputs.anomaly_map.shape, outputs.image_score
        ```
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        config = self.config
        if reference_embeds is not None:
            self.check_reference_embeds(reference_embeds)
        image_size = tuple(pixel_values.shape[-2:])
        class_token, patch_tokens = self.encode_image(pixel_values)
        if prompt_embeds is None:
            prompt_embeds = self.get_prompt_embeds()

        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            patch_embeds = self.project_patch_tokens(patch_tokens)
            layer_maps = self.compute_layer_maps(patch_embeds, prompt_embeds, image_size)
            if config.global_feature_layernorm:
                class_token = self.vision_model.post_layernorm(class_token)
            image_embeds = l2_normalize(self.visual_projection(class_token))
            global_logits = (image_embeds @ prompt_embeds.to(image_embeds.dtype).T).float() / config.temperature
            global_score = global_logits.softmax(dim=-1)[:, 1]
            smooth = not self.training and config.map_sigma > 0
            anomaly_map = layer_maps.mean(dim=1)
            if smooth:
                anomaly_map = gaussian_blur(anomaly_map, config.map_sigma)
            zero_shot_map = few_shot_map = None
            if reference_embeds is not None:
                zero_shot_map = anomaly_map
                few_shot_map = self.compute_few_shot_map(patch_embeds, reference_embeds, image_size)
                if smooth:
                    few_shot_map = gaussian_blur(few_shot_map, config.map_sigma)
                anomaly_map = (1.0 - config.few_shot_weight) * zero_shot_map + config.few_shot_weight * few_shot_map
            image_score = config.joint_alpha * global_score + (1.0 - config.joint_alpha) * self.pool_map(anomaly_map)

            loss = None
            if masks is not None or labels is not None:
                loss = self.compute_loss(layer_maps, global_logits, masks, labels, mask_valid)

        output = HeadCLIPOutput(
            loss=loss,
            anomaly_map=anomaly_map,
            image_score=image_score,
            global_score=global_score,
            layer_maps=layer_maps,
            global_logits=global_logits,
            image_embeds=image_embeds,
            text_embeds=prompt_embeds,
            zero_shot_map=zero_shot_map,
            few_shot_map=few_shot_map,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "REFERENCE_CHUNK_SIZE",
    "REFERENCE_ENCODE_BATCH_SIZE",
    "HeadCLIPHeadWeights",
    "HeadCLIPModel",
    "HeadCLIPOutput",
    "HeadCLIPPromptLearner",
    "max_reference_similarity",
]
