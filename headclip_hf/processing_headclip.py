# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""HeadCLIP processor: CLIP's image processor at the HeadCLIP working size, CLIP's tokenizer, ground-truth masks."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedModel, ProcessorMixin
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .configuration_headclip import DEFAULT_IMAGE_SIZE, HeadCLIPConfig, check_image_size
from .image_utils_headclip import ImageLike, anomaly_heatmap, open_image, to_rgb_image

# Keyword arguments of `HeadCLIPProcessor.from_pretrained` that say where and how to fetch the files (the Hub's and
# transformers' own, including those `AutoProcessor` and `pipeline` add).
LOADING_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "subfolder",
    "token",
    "trust_remote_code",
    "code_revision",
    "_from_auto",
    "_from_pipeline",
    "_commit_hash",
)


def to_binary_mask(mask: ImageLike) -> np.ndarray:
    """
    Convert a ground-truth mask (PIL in any mode: 1, L, P, RGB, I;16, ...; a numpy array; or a file path) to a bool
    array `(H, W)`, whatever convention it was saved in:

    - bool masks as they are; masks whose largest value is at most 1 (0/1 integers, float masks in [0, 1]) above 0.5;
    - label maps, masks whose largest value is at most 127 (VisA numbers defect regions 1, 2, ...): any non-zero value;
    - otherwise above half of full scale: above 127 for 8-bit masks (0/255, MVTec AD; JPEG masks such as Kvasir-SEG's
      whose compression leaves values near 0 and 255), above 32767 for 16-bit masks.

    For colour masks any channel counts.
    """
    if isinstance(mask, (str, Path)):
        mask = open_image(mask)
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array[..., :3].max(axis=-1) if array.shape[-1] in (3, 4) else array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"Mask of shape {array.shape} is not supported: use HxW (or HxWxC, any channel counts).")
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"Unsupported mask dtype {array.dtype}: use bool, integers or floats.")
    largest = array.max(initial=0)
    if largest <= 1:
        return array > 0.5
    if largest <= 127:
        return array > 0
    return array > (127.5 if largest <= 255 else 32767.5)


def _requested_working_size(size: int | dict[str, int] | None, image_size: int | None) -> int | None:
    """The working size asked for with `size=` (an int or a square height/width dict) and/or `image_size=`."""
    if isinstance(size, dict):
        if set(size) != {"height", "width"} or size["height"] != size["width"]:
            raise ValueError(
                f"size={size!r} is not a HeadCLIP working size: images are resized to a square without cropping, pass "
                "size=<pixels> or size={'height': <pixels>, 'width': <pixels>}."
            )
        size = size["height"]
    if size is not None and image_size is not None and size != image_size:
        raise ValueError(f"size={size} and image_size={image_size} disagree: pass one working size.")
    return size if size is not None else image_size


def _image_size(image: ImageLike) -> tuple[int, int]:
    """(width, height) of a PIL image or an array."""
    if isinstance(image, Image.Image):
        return image.size
    array = np.asarray(image)
    return array.shape[1], array.shape[0]


class HeadCLIPProcessor(ProcessorMixin):
    r"""
    Prepares images (and optionally ground-truth masks and text) for [`HeadCLIPModel`].

    Images in any PIL mode, numpy arrays or file paths become RGB, are resized (bicubic, aspect ratio not kept, no
    crop, so defects at the border stay in view; as AnomalyCLIP does) to `image_size` x `image_size` and normalised
    with CLIP's mean and std. Masks become binary float tensors at the same size (bilinear resize, threshold 0.5).

    The working size has one source, the model's `HeadCLIPConfig.image_size`: `from_pretrained` reads it from the
    checkpoint's config (a plain CLIP gives the HeadCLIP default, 518 px for ViT-L/14), unless `size=` or
    `image_size=` chooses another one.

    Args:
        image_processor ([`CLIPImageProcessor`], *optional*):
            CLIP's image processor; its size is set to `image_size` and its center crop switched off.
        tokenizer ([`CLIPTokenizer`]):
            CLIP's tokenizer, to compute prompt template ids (`prompt_token_ids`) and tokenise text.
        image_size (`int`, *optional*, defaults to `DEFAULT_IMAGE_SIZE` (518)):
            Working input size in pixels: the model's `HeadCLIPConfig.image_size`.
        patch_size (`int`, *optional*):
            The model's patch size; when given, `image_size` must be a multiple of it.

    Raises:
        `ValueError`: without a tokenizer, or when `image_size` is not a positive multiple of `patch_size`.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_size: int = DEFAULT_IMAGE_SIZE,
        patch_size: int | None = None,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError(
                "HeadCLIPProcessor needs CLIP's tokenizer: use HeadCLIPProcessor.from_pretrained(<a CLIP or HeadCLIP "
                "checkpoint>) or pass tokenizer=CLIPTokenizer.from_pretrained(...)."
            )
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"HeadCLIPProcessor image_size={image_size!r} is invalid: use a positive pixel count.")
        if patch_size is not None:
            try:
                check_image_size(image_size, patch_size)
            except ValueError as error:
                raise ValueError(f"HeadCLIPProcessor image_size={image_size} is invalid: {error}.") from None
        if image_processor is None:
            image_processor = CLIPImageProcessorPil()
        image_processor.size = {"height": image_size, "width": image_size}
        image_processor.do_center_crop = False
        image_processor.do_convert_rgb = True
        self.image_size = image_size
        self.patch_size = patch_size
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        size: int | dict[str, int] | None = None,
        image_size: int | None = None,
        **kwargs,
    ) -> "HeadCLIPProcessor":
        r"""
        Load the processor of a HeadCLIP or plain CLIP checkpoint (its image processor and tokenizer) at the
        checkpoint's working size.

        Args:
            pretrained_model_name_or_path (`str` or `Path`):
                A Hub id or a folder.
            size (`int` or `dict`, *optional*):
                Another working size: pixels, or a square `{"height": s, "width": s}` as transformers' image processors
                write it.
            image_size (`int`, *optional*):
                The same as an `int` `size` (the name of the config field).
            kwargs (`dict[str, Any]`, *optional*):
                Where and how to fetch the files (`cache_dir`, `revision`, `local_files_only`, `token`, ...).

        Raises:
            `ValueError`: for a size that is not square or not a multiple of the model's patch size, or a keyword
                argument this method does not take (the message lists those it takes).
        """
        requested = _requested_working_size(size, image_size)
        if "_from_pipeline" in kwargs:
            # A pipeline hands its model keyword arguments (dtype, device_map, ...) to every loader: not ours.
            kwargs = {key: value for key, value in kwargs.items() if key in LOADING_KWARGS}
        unknown = sorted(set(kwargs) - set(LOADING_KWARGS))
        if unknown:
            accepted = ", ".join(("size", "image_size", *(key for key in LOADING_KWARGS if not key.startswith("_"))))
            raise ValueError(
                f"HeadCLIPProcessor.from_pretrained got unknown keyword arguments {unknown}: it takes {accepted}."
            )
        hub_kwargs = {key: value for key, value in kwargs.items() if not key.startswith("_")}
        hub_kwargs.pop("trust_remote_code", None)
        hub_kwargs.pop("code_revision", None)
        config_dict, _ = HeadCLIPConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
        sizes = {}
        if config_dict:  # else a folder holding the processor alone: its own saved sizes apply
            model_config = HeadCLIPConfig.from_dict(config_dict)
            sizes = {"image_size": model_config.image_size, "patch_size": model_config.vision_config.patch_size}
        if requested is not None:
            sizes["image_size"] = requested
        return super().from_pretrained(pretrained_model_name_or_path, **sizes, **kwargs)

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike] | None = None,
        masks: ImageLike | Sequence[ImageLike | None] | None = None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            images (`ImageLike` or `Sequence[ImageLike]`, *optional*):
                One image or a list (PIL, numpy array or file path).
            masks (`ImageLike` or `Sequence[ImageLike | None]`, *optional*):
                One mask per image (PIL, numpy array, file path, or `None` for an all-normal mask); each must have its
                image's width and height.
            text (`str` or `list[str]`, *optional*):
                Text for the tokenizer.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                Only `"pt"` (or `None`): the processor returns PyTorch tensors.

        Returns:
            [`BatchFeature`]: with `pixel_values` `(B, 3, S, S)`, `masks` `(B, S, S)` float in {0, 1} when masks are
            given, and the tokenizer's outputs when text is given.

        Raises:
            `ValueError`: no images and no text, an empty list of images, an unreadable image, an input that is not an
                image ([`UnsupportedImageTypeError`], also a `TypeError`), masks that do not match their images, or
                `return_tensors` other than "pt".
        """
        if images is None and text is None:
            raise ValueError("Pass `images` (and optionally `masks`) or `text`.")
        if return_tensors not in (None, "pt"):
            raise ValueError(
                f"HeadCLIPProcessor returns PyTorch tensors: return_tensors must be 'pt', not {return_tensors!r}."
            )
        data = {}
        if images is not None:
            image_list = list(images) if isinstance(images, (list, tuple)) else [images]
            if not image_list:
                raise ValueError("images is an empty list: pass at least one image (a PIL image, an array or a path).")
            rgb_images = [to_rgb_image(image) for image in image_list]
            data["pixel_values"] = self.image_processor(images=rgb_images, return_tensors="pt")["pixel_values"]
            if masks is not None:
                mask_list = list(masks) if isinstance(masks, (list, tuple)) else [masks]
                if len(mask_list) != len(rgb_images):
                    raise ValueError(f"Got {len(rgb_images)} images but {len(mask_list)} masks: pass one per image.")
                data["masks"] = torch.stack(
                    [self.preprocess_mask(mask, image.size) for mask, image in zip(mask_list, rgb_images, strict=True)]
                )
        elif masks is not None:
            raise ValueError("Masks need their images: pass `images` together with `masks`.")
        if text is not None:
            data.update(self.tokenizer(text, return_tensors="pt", padding=True, **kwargs))
        return BatchFeature(data=data, tensor_type="pt")

    @staticmethod
    def to_rgb_image(image: ImageLike) -> Image.Image:
        """
        The 8-bit RGB image that `__call__` resizes ([`to_rgb_image`]), for callers that also need the image itself
        (its own size, an overlay), such as the anomaly-detection pipeline.
        """
        return to_rgb_image(image)

    @staticmethod
    def anomaly_heatmap(image: Image.Image, anomaly_map: np.ndarray, alpha: float) -> Image.Image:
        """
        The heatmap of an anomaly map `(H, W)` over its RGB `image` ([`anomaly_heatmap`]), for the anomaly-detection
        pipeline (whose file imports nothing from this package).
        """
        return anomaly_heatmap(image, anomaly_map, alpha)

    def preprocess_mask(self, mask: ImageLike | None, image_size: tuple[int, int]) -> torch.Tensor:
        """
        A mask for an image of `image_size` (width, height) -> float tensor `(S, S)` in {0, 1}; `None` -> zeros.
        Raises `ValueError` naming both sizes when the mask and its image differ in size.
        """
        size = self.image_size
        if mask is None:
            return torch.zeros(size, size)
        if isinstance(mask, (str, Path)):
            mask = open_image(mask)
        if _image_size(mask) != tuple(image_size):
            raise ValueError(
                f"Mask size {_image_size(mask)[0]}x{_image_size(mask)[1]} (width x height) differs from its image's "
                f"size {image_size[0]}x{image_size[1]}: a mask must have its image's size."
            )
        binary = Image.fromarray(to_binary_mask(mask).astype(np.float32))
        resized = np.asarray(binary.resize((size, size), resample=Image.Resampling.BILINEAR))
        return torch.from_numpy((resized > 0.5).astype(np.float32))

    def prompt_token_ids(self, phrase: str) -> list[int]:
        """Token ids of `phrase` without start/end tokens, for `HeadCLIPConfig` prompt fields (e.g. "object.")."""
        return self.tokenizer(phrase, add_special_tokens=False)["input_ids"]


def check_working_size(model: PreTrainedModel, processor: "HeadCLIPProcessor") -> None:
    """
    The one rule for the working size: evaluation, calibration and training run at the model's `config.image_size`.

    Args:
        model (`HeadCLIPModel`): The model; its `config.image_size` is the working size.
        processor (`HeadCLIPProcessor`): The processor that prepares the images and masks.

    Raises:
        `ValueError`: when the processor prepares images at another size, saying how to load both at one size.
    """
    if processor.image_size != model.config.image_size:
        raise ValueError(
            f"The processor prepares {processor.image_size} px images but the model's working size "
            f"(HeadCLIPConfig.image_size) is {model.config.image_size} px: load both at one size, e.g. "
            f"load_headclip_model_and_processor(..., image_size={processor.image_size}) or "
            f"HeadCLIPProcessor.from_pretrained(..., size={model.config.image_size})."
        )


__all__ = ["HeadCLIPProcessor", "check_working_size", "to_binary_mask", "to_rgb_image"]
