# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""The PyTorch side of `headclip_hf.export`: the module that is exported and one writer per format.

`headclip_hf.export` imports this module only inside `export_model`, so that the runner (`ExportedDetector`) imports
without PyTorch.
"""

import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .export import INPUT_NAME, ONNX_FILES, OPENVINO_FILES, OUTPUT_NAMES, TORCHSCRIPT_FILES
from .modeling_headclip import HeadCLIPModel


class HeadCLIPExportModule(nn.Module):
    """
    What an export computes: [`HeadCLIPModel`]'s eval-mode forward on `pixel_values` with its prompt embeddings
    computed once and held as a constant buffer, so that the exported graph holds no text encoder.

    Args:
        model ([`HeadCLIPModel`]): the model, in eval mode (its anomaly maps are then Gaussian-smoothed).
    """

    def __init__(self, model: HeadCLIPModel):
        super().__init__()
        if model.training:
            raise ValueError("Export a model in eval mode (`model.eval()`): its maps are then smoothed.")
        self.model = model
        with torch.no_grad():
            self.register_buffer("prompt_embeds", model.get_prompt_embeds().detach().clone())
        self.eval()

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, S, S)`): images prepared by `HeadCLIPProcessor`.

        Returns:
            `anomaly_map` `(B, S, S)`, `image_score` `(B,)` and `global_score` `(B,)`, as the model returns them.
        """
        outputs = self.model(pixel_values=pixel_values, prompt_embeds=self.prompt_embeds, return_dict=True)
        return outputs.anomaly_map, outputs.image_score, outputs.global_score


def _onnx_program(module: HeadCLIPExportModule, example: torch.Tensor, dynamic_batch: bool, opset: int | None):
    """
    The ONNX program of `module` from torch's `torch.export`-based exporter (`dynamo=True`, torch's recommended one;
    it needs `onnxscript`). It matches eager float32 to ~1e-7 on HeadCLIP, and it keeps only the weights the graph
    uses (no text encoder).
    """
    dynamic_shapes = {INPUT_NAME: {0: torch.export.Dim("batch")}} if dynamic_batch else None
    # The exporter logs each step at INFO level and warns about torchvision operators HeadCLIP does not use.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    return torch.onnx.export(
        module,
        (example,),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        dynamic_shapes=dynamic_shapes,
        dynamo=True,
        verbose=False,
    )


def write_onnx(
    module: HeadCLIPExportModule, example: torch.Tensor, folder: Path, dynamic_batch: bool, opset: int | None
) -> tuple[list[str], int]:
    """
    Write `model.onnx` with its weights in `model.onnx.data` (ONNX's external data, so that models past ONNX's 2 GB
    limit export alike). Returns the files written and the opset of the graph.
    """
    program = _onnx_program(module, example, dynamic_batch, opset)
    program.save(folder / ONNX_FILES[0], external_data=True)  # the weights go to ONNX_FILES[1]
    return list(ONNX_FILES), program.model.opset_imports[""]


def write_openvino(
    module: HeadCLIPExportModule, example: torch.Tensor, folder: Path, dynamic_batch: bool, opset: int | None
) -> tuple[list[str], int]:
    """
    Write OpenVINO IR (`model.xml`, `model.bin`, float32 weights), converted by `openvino.convert_model` from the ONNX
    graph of `write_onnx` (which keeps the input and output names and the dynamic batch dimension). Returns the files
    written and the opset of that ONNX graph.
    """
    import openvino

    with tempfile.TemporaryDirectory(prefix="headclip-openvino-") as onnx_folder:
        files, opset = write_onnx(module, example, Path(onnx_folder), dynamic_batch, opset)
        openvino_model = openvino.convert_model(os.path.join(onnx_folder, files[0]))
    openvino.save_model(openvino_model, folder / OPENVINO_FILES[0], compress_to_fp16=False)
    return list(OPENVINO_FILES), opset


def write_torchscript(module: HeadCLIPExportModule, example: torch.Tensor, folder: Path) -> list[str]:
    """
    Write `model.pt`: `torch.jit.trace` of `module`, frozen (`torch.jit.freeze`: weights inlined, unused ones such as
    the text encoder's dropped). The traced graph keeps the batch dimension symbolic. Returns the files written.
    """
    with torch.no_grad(), warnings.catch_warnings():
        # Shapes read as Python numbers (grid size, blur radius) are constants of the export: its image size is fixed.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example)
    torch.jit.freeze(traced).save(str(folder / TORCHSCRIPT_FILES[0]))
    return list(TORCHSCRIPT_FILES)
