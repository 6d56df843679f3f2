# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""PyTorch speed options for inference: the weights' dtype and `torch.compile`, in one place for the commands, the
benchmark and Python users.

Maps and scores stay float32 whatever the dtype: the model computes the cosine logits, the maps, their smoothing and
the scores in float32 (as it does under autocast). The pipeline takes the dtype as every transformers pipeline does:
`pipeline("zero-shot-anomaly-detection", model=..., dtype="bfloat16")`.
"""

import torch

from .modeling_headclip import HeadCLIPModel

INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def prepare_for_inference(
    model: HeadCLIPModel,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    compile: bool = False,
) -> HeadCLIPModel:
    """
    Put `model` (in place) in eval mode on `device` with its weights in `dtype`, optionally compiled.

    Args:
        model ([`HeadCLIPModel`]): the model.
        device (`str` or `torch.device`, *optional*): where to run it (default: where it is).
        dtype (`str`, *optional*, defaults to `"float32"`): `"float32"`, `"bfloat16"` or `"float16"`, the dtype of
            the weights and of the vision encoder's computation. Maps and scores stay float32.
        compile (`bool`, *optional*, defaults to `False`): compile the forward with `torch.compile` (the first call
            of each batch shape compiles; the prompt embeddings stay eager and cached).

    Returns:
        The model.

    Raises:
        `ValueError`: an unknown dtype.
    """
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}: use one of {', '.join(INFERENCE_DTYPES)}.")
    if device is not None and torch.device(device).type == "cpu":
        device = "cpu"  # accelerate's CPU process groups say "cpu:0": the same memory, but `.to` would copy weights
    model = model.to(device=device, dtype=INFERENCE_DTYPES[dtype]).eval()
    if compile:
        model.compile()
    return model


__all__ = ["INFERENCE_DTYPES", "prepare_for_inference"]
