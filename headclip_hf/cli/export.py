# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""`headclip export`: a HeadCLIP as an ONNX, OpenVINO or TorchScript graph with its preprocessing, for deployment."""

import argparse

from ..export import EXPORT_CONFIG_NAME, EXPORT_FORMATS, check_export_arguments, export_model
from ._common import CommandError, add_model_arguments, add_output_dir_argument, load_model_and_processor, positive_int

EPILOG = f"""examples:
  headclip export --model runs/mvtec/adapter --format onnx --output_dir exports/headclip-onnx
  headclip export --model /models/headclip-mvtec --format openvino --dynamic_batch --output_dir exports/headclip-ov
  headclip detect images/ --model exports/headclip-onnx       # runs the export with ONNX Runtime

Writes OUTPUT_DIR/{EXPORT_CONFIG_NAME} (graph inputs and outputs, image size, preprocessing, calibrated thresholds,
source model) and the graph: model.onnx + model.onnx.data (onnx, needs `pip install "headclip_hf[onnx]"`),
model.xml + model.bin (openvino, the openvino extra) or model.pt (torchscript). The graph takes pixel_values
(B, 3, S, S) and returns anomaly_map (B, S, S), image_score (B,) and global_score (B,), with the prompt embeddings
baked in. In Python: headclip_hf.export.ExportedDetector(OUTPUT_DIR)(images) returns the pipeline's results."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="export to ONNX, OpenVINO or TorchScript for deployment",
        description="Export a HeadCLIP with its preprocessing to a folder that runs without the training stack.",
        epilog=EPILOG,
    )
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="onnx", help="graph format (default: onnx)")
    add_output_dir_argument(parser, None, "the export")
    parser.add_argument(
        "--dynamic_batch", action="store_true", help="the graph takes any batch size (default: one image per run)"
    )
    parser.add_argument("--opset", type=positive_int, help="ONNX opset (onnx, openvino; default: torch's choice)")
    add_model_arguments(parser, device=False)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        check_export_arguments(args.format, args.opset, args.output_dir, args.overwrite)
    except ImportError as error:  # the format's extra is not installed
        raise CommandError(str(error)) from error
    model, processor = load_model_and_processor(args.model, args.adapter, args.image_size, "cpu")
    folder = export_model(
        model,
        processor,
        args.output_dir,
        format=args.format,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        overwrite=args.overwrite,
    )
    print(f"Exported {args.model} ({args.format}) to {folder}. Run it with: headclip detect IMAGES --model {folder}")
    return 0
