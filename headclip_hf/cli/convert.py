# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""`headclip convert`: checkpoints of other methods (AnomalyCLIP) to HeadCLIP."""

import argparse
import logging

from ..configuration_headclip import DEFAULT_CLIP_CHECKPOINT
from ..conversion import ANOMALYCLIP_SETTINGS, convert_anomalyclip_checkpoint
from ._common import add_output_dir_argument, check_model_location, positive_int

logger = logging.getLogger(__name__)

EPILOG = """examples:
  headclip convert anomalyclip checkpoints/9_12_4_multiscale_visa/epoch_15.pth --output_dir anomalyclip-visa
  headclip convert anomalyclip epoch_15.pth --model /models/clip-vit-large-patch14-336 --output_dir adapter/ \\
      --adapter_only

Writes a HeadCLIP save_pretrained folder (or, with --adapter_only, a HeadCLIP adapter of --model) that computes what
AnomalyCLIP computes; use it with --model in the other commands. The output folder is checked before anything loads;
an earlier output there is replaced, a folder with other files is refused unless --overwrite. The checkpoint is read
with torch.load(weights_only=True): tensors only, nothing is unpickled. AnomalyCLIP's own flag names (--n_ctx, --depth,
--t_n_ctx) are accepted too, and so are --base and --adapter, the earlier names of --model and --adapter_only."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert checkpoints of other methods (AnomalyCLIP) to HeadCLIP",
        description="Convert checkpoints of other methods to HeadCLIP.",
    )
    sources = parser.add_subparsers(dest="source", required=True, metavar="source")
    anomalyclip = sources.add_parser(
        "anomalyclip",
        help="an AnomalyCLIP prompt-learner checkpoint (.pth of its train.py)",
        description="Convert an AnomalyCLIP checkpoint to a HeadCLIP that computes what AnomalyCLIP computes.",
        epilog=EPILOG,
    )
    anomalyclip.add_argument(
        "checkpoint", help="AnomalyCLIP checkpoint, e.g. checkpoints/9_12_4_multiscale/epoch_15.pth"
    )
    anomalyclip.add_argument(
        "--model",
        "--base",
        default=DEFAULT_CLIP_CHECKPOINT,
        help="the CLIP the checkpoint was trained on, a Hub id or a local folder (%(default)s)",
    )
    add_output_dir_argument(
        anomalyclip, None, "a complete HeadCLIP save_pretrained folder (with --adapter_only: an adapter)"
    )
    anomalyclip.add_argument(
        "--adapter_only",
        "--adapter",
        action="store_true",
        help="write only the HeadCLIP parameters, as a HeadCLIP adapter of --model (as push --adapter_only)",
    )
    anomalyclip.add_argument(
        "--feature_layers",
        type=int,
        nargs="+",
        default=None,
        help="vision layers whose maps are averaged (default: the last, as the reference's --features_list 24)",
    )
    anomalyclip.add_argument(
        "--vv_start_layer", type=int, default=None, help="first value-value layer (default: depth / 4, 6 for ViT-L/14)"
    )
    for flags, field, meaning in (
        (("--prompt_length", "--n_ctx"), "prompt_length", "context vectors per prompt"),
        (("--deep_prompt_depth", "--depth"), "deep_prompt_depth", "deep prompts at text layers 2..depth"),
        (("--deep_prompt_length", "--t_n_ctx"), "deep_prompt_length", "tokens per deep prompt"),
    ):
        anomalyclip.add_argument(
            *flags, type=int, default=ANOMALYCLIP_SETTINGS[field], help=f"{meaning} (default: %(default)s)"
        )
    anomalyclip.add_argument(
        "--image_size",
        type=positive_int,
        help=f"working image size in pixels, a multiple of the patch size (default: AnomalyCLIP's "
        f"{ANOMALYCLIP_SETTINGS['image_size']} on the base's patch grid: {ANOMALYCLIP_SETTINGS['image_size']} on "
        "ViT-L/14, the nearest multiple of the patch size on other bases, e.g. 512 on ViT-B/16)",
    )
    anomalyclip.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run `headclip convert anomalyclip`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_model_location(args.model)
    convert_anomalyclip_checkpoint(
        args.checkpoint,
        base=args.model,
        output_dir=args.output_dir,
        feature_layers=args.feature_layers,
        vv_start_layer=args.vv_start_layer,
        prompt_length=args.prompt_length,
        deep_prompt_depth=args.deep_prompt_depth,
        deep_prompt_length=args.deep_prompt_length,
        image_size=args.image_size,
        adapter=args.adapter_only,
        overwrite=args.overwrite,
    )
    logger.info("Converted %s (base %s) to %s", args.checkpoint, args.model, args.output_dir)
    return 0
