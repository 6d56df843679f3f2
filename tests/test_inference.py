"""PyTorch speed options: weights in bfloat16 / float16 (maps and scores stay float32), in the pipeline and through
`prepare_for_inference`, and `torch.compile` (same outputs as eager, prompt embeddings still cached)."""

import copy

import numpy as np
import pytest
import torch
from transformers import pipeline

from headclip_hf.inference import INFERENCE_DTYPES, prepare_for_inference
from headclip_hf.pipeline_headclip import TASK

OUTPUT_NAMES = ("anomaly_map", "image_score", "global_score", "layer_maps")


def test_pipeline_dtype_keeps_maps_and_scores_float32(headclip_checkpoint, test_data_dir):
    image = str(test_data_dir / "mvtec_ad" / "bottle" / "broken_large" / "000.png")
    reference = pipeline(TASK, model=str(headclip_checkpoint), device="cpu")(image)
    for dtype in ("bfloat16", "float16"):
        detector = pipeline(TASK, model=str(headclip_checkpoint), device="cpu", dtype=dtype)
        assert detector.model.dtype == INFERENCE_DTYPES[dtype]
        result = detector(image)
        assert result["anomaly_map"].dtype == np.float32 and isinstance(result["score"], float)
        assert np.abs(result["anomaly_map"] - reference["anomaly_map"]).max() < 0.05
        assert abs(result["score"] - reference["score"]) < 0.01


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_prepare_for_inference_casts_the_weights_not_the_outputs(tiny_model, dtype):
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tiny_model(pixel_values=pixel_values)
    model = prepare_for_inference(copy.deepcopy(tiny_model).train(), dtype=dtype)
    assert not model.training and model.dtype == INFERENCE_DTYPES[dtype] == model.head_weights.dtype
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values.to(model.dtype))
    for name in OUTPUT_NAMES:
        assert outputs[name].dtype == torch.float32, name
        assert (outputs[name] - expected[name]).abs().max() < 0.05, name


def test_compiled_model_matches_eager(tiny_model):
    model = prepare_for_inference(copy.deepcopy(tiny_model), compile=True)
    for batch_size in (2, 3):
        pixel_values = torch.randn(batch_size, 3, 64, 64)
        with torch.inference_mode():
            expected = tiny_model(pixel_values=pixel_values)
            outputs = model(pixel_values=pixel_values)
        for name in OUTPUT_NAMES:
            assert (outputs[name] - expected[name]).abs().max() <= 1e-5, name
    assert model._prompt_embeds_cache is not None  # computed eagerly once, then reused


def test_unknown_dtype_is_refused(tiny_model):
    with pytest.raises(ValueError, match="Unknown dtype 'int8': use one of float32, bfloat16, float16"):
        prepare_for_inference(tiny_model, dtype="int8")
