"""HeadCLIPProcessor: images in any mode to normalised RGB tensors, masks to binary tensors, errors for bad input."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPConfig, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from headclip_hf import HeadCLIPConfig, HeadCLIPProcessor
from headclip_hf.processing_headclip import to_binary_mask, to_rgb_image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture
def processor(clip_tokenizer):
    return HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64)


def expected_pixels(rgb: Image.Image, size: int) -> np.ndarray:
    """Independent preprocessing: bicubic resize to size x size, scale to [0, 1], CLIP normalisation, CHW."""
    resized = np.asarray(rgb.resize((size, size), resample=Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    return ((resized - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def test_real_images_png_and_odd_size_jpeg(processor, test_data_dir):
    png = Image.open(test_data_dir / "mvtec_ad/bottle/broken_large/000.png")
    jpegs = sorted((test_data_dir / "kvasir_seg/colon/polyp").glob("*.jpg"))[:2]
    images = [png, *[Image.open(p) for p in jpegs]]
    assert png.size == (900, 900) and len({im.size for im in images}) == 3
    out = processor(images=images, return_tensors="pt")
    assert out["pixel_values"].shape == (3, 3, 64, 64) and out["pixel_values"].dtype == torch.float32
    for image, pixels in zip(images, out["pixel_values"], strict=True):
        np.testing.assert_allclose(pixels.numpy(), expected_pixels(image.convert("RGB"), 64), atol=1e-4)


def test_real_masks_are_binary_at_the_working_size(processor, test_data_dir):
    root = test_data_dir / "mvtec_ad/bottle"
    image = Image.open(root / "broken_large/000.png")
    mask = Image.open(root / "ground_truth/broken_large/000_mask.png")
    out = processor(images=[image, image], masks=[mask, None])
    masks = out["masks"]
    assert masks.shape == (2, 64, 64) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks[1].sum() == 0
    # The anomalous fraction is preserved by the resize (within the resolution of a 64 x 64 grid).
    fraction = (np.asarray(mask) > 127).mean()
    assert abs(masks[0].mean().item() - fraction) < 0.01 and masks[0].sum() > 0


def rgb_reference(seed=0, size=(20, 12)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "RGB"])
def test_pil_modes_become_rgb(mode):
    source = Image.fromarray(rgb_reference())
    image = source.convert(mode)
    rgb = to_rgb_image(image)
    assert rgb.mode == "RGB" and rgb.size == (20, 12)
    if mode in ("RGB", "RGBA", "CMYK"):
        np.testing.assert_array_equal(np.asarray(rgb), np.asarray(source))
    if mode in ("L", "LA"):
        gray = np.asarray(source.convert("L"))
        np.testing.assert_array_equal(np.asarray(rgb), np.repeat(gray[..., None], 3, axis=-1))


def test_16_bit_images_scale_to_8_bits():
    values = np.array([[0, 257, 65535], [32896, 1000, 514]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    rgb = np.asarray(to_rgb_image(image))
    np.testing.assert_array_equal(rgb[..., 0], np.round(values / 257.0).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(to_rgb_image(values)), rgb)


@pytest.mark.parametrize(
    "array",
    [
        rgb_reference(),
        rgb_reference()[..., :1],
        rgb_reference()[..., 0],
        np.concatenate([rgb_reference(), np.full((12, 20, 1), 7, np.uint8)], axis=-1),
        rgb_reference().astype(np.float32) / 255.0,
        rgb_reference().astype(np.float64),
        rgb_reference().astype(np.uint16) * 257,
    ],
    ids=["HxWx3", "HxWx1", "HxW", "HxWx4", "float01", "float255", "uint16"],
)
def test_numpy_arrays_become_rgb(array):
    rgb = np.asarray(to_rgb_image(array))
    assert rgb.shape == (12, 20, 3) and rgb.dtype == np.uint8
    reference = rgb_reference()
    if array.ndim == 2 or array.shape[-1] == 1:
        np.testing.assert_array_equal(rgb, np.repeat(reference[..., :1], 3, axis=-1))
    else:
        np.testing.assert_array_equal(rgb, reference)


@pytest.mark.parametrize(
    "mask",
    [
        Image.fromarray(np.array([[0, 255], [128, 127]], np.uint8)),
        Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1", dither=Image.Dither.NONE),
        Image.fromarray(np.array([[0, 255], [128, 127]], np.uint8)).convert("RGB"),
        Image.fromarray(np.array([[0, 65535], [40000, 20000]], np.uint16)),
        np.array([[0, 1], [1, 0]], np.uint8),
        np.array([[0, 2], [1, 0]], np.uint8),
        np.array([[False, True], [True, False]]),
        np.array([[0.0, 1.0], [0.9, 0.2]], np.float32),
    ],
    ids=["L-0-255", "mode-1", "RGB", "I;16", "0-1", "label-map", "bool", "float"],
)
def test_masks_in_any_format_binarise(mask):
    np.testing.assert_array_equal(to_binary_mask(mask), np.array([[False, True], [True, False]]))


def test_mask_of_another_size_raises_naming_both_sizes(processor):
    image = Image.new("RGB", (30, 20))
    mask = Image.new("L", (20, 30))
    with pytest.raises(ValueError, match=r"Mask size 20x30 \(width x height\) differs from its image's size 30x20"):
        processor(images=image, masks=mask)
    with pytest.raises(ValueError, match="Got 1 images but 2 masks"):
        processor(images=image, masks=[None, None])


def test_bad_inputs_raise_clear_errors(processor, tmp_path):
    with pytest.raises(ValueError, match="HeadCLIPProcessor needs CLIP's tokenizer"):
        HeadCLIPProcessor()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"Cannot read image file '.*broken.png'"):
        processor(images=str(broken))
    with pytest.raises(ValueError, match=r"Image array of shape \(3, 8, 8\) is not supported"):
        to_rgb_image(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="Expected a PIL image, a numpy array or a file path, got Tensor"):
        to_rgb_image(torch.zeros(8, 8, 3))
    with pytest.raises(ValueError, match=r"images is an empty list: pass at least one image"):
        processor(images=[])
    with pytest.raises(ValueError, match="Expected a PIL image, a numpy array or a file path, got int"):
        processor(images=[np.zeros((8, 8), np.uint8), 3])
    with pytest.raises(ValueError, match="return_tensors must be 'pt', not 'np'"):
        processor(images=np.zeros((8, 8), np.uint8), return_tensors="np")
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_rgb_image(np.full((4, 4), np.nan))


def test_save_load_round_trip_keeps_the_working_size(tmp_path, clip_tokenizer):
    processor = HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=96)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, HeadCLIPProcessor)
    assert loaded.image_size == 96 and loaded.image_processor.size == {"height": 96, "width": 96}
    assert loaded.image_processor.do_center_crop is False
    assert loaded.prompt_token_ids("damaged object.") == [13568, 14115, 269]
    image = Image.fromarray(rgb_reference())
    assert torch.equal(loaded(images=image)["pixel_values"], processor(images=image)["pixel_values"])


@pytest.fixture
def clip_folder(tmp_path, clip_tokenizer_dir):
    """A plain CLIP checkpoint's processing files and config (ViT with patch 16), as on the Hub."""
    path = tmp_path / "clip"
    CLIPConfig(vision_config=dict(patch_size=16)).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    CLIPTokenizer.from_pretrained(clip_tokenizer_dir).save_pretrained(path)
    return path


def test_working_size_comes_from_the_checkpoints_config(clip_folder, tmp_path, clip_tokenizer, tiny_config_factory):
    processor = HeadCLIPProcessor.from_pretrained(clip_folder)
    assert processor.image_size == HeadCLIPConfig.from_pretrained(clip_folder).image_size == 512  # patch 16
    assert processor.patch_size == 16 and processor.image_processor.size == {"height": 512, "width": 512}
    # A HeadCLIP checkpoint: its config's working size, whatever size the processor was saved at.
    headclip = tmp_path / "headclip"
    tiny_config_factory(image_size=96).save_pretrained(headclip)
    HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=64).save_pretrained(headclip)
    assert HeadCLIPProcessor.from_pretrained(headclip).image_size == 96


@pytest.mark.parametrize("size", [224, {"height": 224, "width": 224}])
def test_size_keyword_sets_the_working_size(clip_folder, tmp_path, size):
    HeadCLIPProcessor.from_pretrained(clip_folder).save_pretrained(tmp_path / "headclip")
    for processor in (
        HeadCLIPProcessor.from_pretrained(clip_folder, size=size),
        AutoProcessor.from_pretrained(tmp_path / "headclip", size=size),
    ):
        assert isinstance(processor, HeadCLIPProcessor) and processor.image_size == 224
        pixel_values = processor(images=Image.fromarray(rgb_reference()))["pixel_values"]
        assert pixel_values.shape == (1, 3, 224, 224)
    assert HeadCLIPProcessor.from_pretrained(clip_folder, image_size=224).image_size == 224


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(size=225), "image_size=225 is invalid: 225 is not a multiple of the patch size 16: use 224 or 240"),
        (dict(image_size=31), "image_size=31 is invalid: 31 is not a multiple of the patch size 16: use 16 or 32"),
        (dict(size={"shortest_edge": 224}), "is not a HeadCLIP working size: images are resized to a square"),
        (dict(size={"height": 224, "width": 320}), "is not a HeadCLIP working size"),
        (dict(size=224, image_size=256), "size=224 and image_size=256 disagree"),
        (dict(crop_size=224), r"unknown keyword arguments \['crop_size'\]: it takes size, image_size, cache_dir"),
    ],
)
def test_sizes_and_keywords_that_would_be_ignored_are_refused(clip_folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        HeadCLIPProcessor.from_pretrained(clip_folder, **kwargs)


def test_processor_built_for_a_patch_size_checks_its_size(clip_tokenizer):
    with pytest.raises(ValueError, match="image_size=60 is invalid: 60 is not a multiple of the patch size 8"):
        HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=60, patch_size=8)
    assert HeadCLIPProcessor(tokenizer=clip_tokenizer, image_size=60).image_size == 60  # patch size unknown
