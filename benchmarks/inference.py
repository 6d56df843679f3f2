"""Per-image inference time of HeadCLIP (anomaly map + joint score), zero-shot and few-shot, against a bare CLIP
vision forward.

Builds the real architectures from their CLIP configs (`--configs-dir`, or the `HEADCLIP_CONFIGS_DIR` environment
variable: a folder holding `clip-vit-base-patch16/config.json` and `clip-vit-large-patch14-336/config.json`) with
random weights (only the cost matters here), and times, in one run and interleaved, on the same weights, input size
and batch:

- bare: `CLIPVisionModel` forward (`interpolate_pos_encoding=True`), the floor any CLIP-based detector pays;
- zero-shot: `HeadCLIPModel` forward in eval mode (head weights, value-value path, 4 pixel maps, Gaussian smoothing,
  global and joint scores; the prompt embeddings are cached after the first call);
- k-shot (k = 1, 4, 16 by default): the same forward with `reference_embeds` of k reference images. The references
  are encoded once beforehand (`encode_references`, as the pipeline and `headclip references` do) and that encoding
  is NOT timed: the time is the forward with precomputed references (zero-shot forward + nearest-neighbour search +
  few-shot maps). The table also gives the size of the reference embeddings (float32).

Usage:
    python benchmarks/inference.py --configs-dir DIR     # ViT-B/16 @ 224 and ViT-L/14@336 @ 518, batch 1 and 4
    python benchmarks/inference.py --configs-dir DIR --cases base:224 --batch-sizes 1 --k-shots 4 --repeats 5
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from headclip_hf import HeadCLIPConfig, HeadCLIPModel
from headclip_hf.modeling_headclip import REFERENCE_CHUNK_SIZE

ARCHITECTURES = {"base": "clip-vit-base-patch16", "large": "clip-vit-large-patch14-336"}
CONFIGS_DIR_VARIABLE = "HEADCLIP_CONFIGS_DIR"


def seconds(module: torch.nn.Module, **inputs) -> float:
    """Wall time of one forward of `module`."""
    start = time.perf_counter()
    module(**inputs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs-dir",
        type=Path,
        default=os.environ.get(CONFIGS_DIR_VARIABLE),
        help=f"folder with the real CLIP configs, one subfolder per architecture (default: ${CONFIGS_DIR_VARIABLE})",
    )
    parser.add_argument("--cases", nargs="+", default=["base:224", "large:518"], help="architecture:image_size")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument(
        "--k-shots", nargs="*", type=int, default=[1, 4, 16], help="few-shot rows (none: zero-shot only)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model and case (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.configs_dir is None:
        parser.error(
            f"pass --configs-dir DIR or set {CONFIGS_DIR_VARIABLE}: a folder holding the CLIP config.json of each "
            f"architecture ({', '.join(f'{folder}/' for folder in ARCHITECTURES.values())})"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(
        f"torch {torch.__version__}, device cpu, float32, threads {torch.get_num_threads()}, "
        f"repeats {args.repeats} (median reported), inference_mode; k-shot: forward with precomputed references "
        f"(encoding them not timed), nearest-neighbour search in chunks of {REFERENCE_CHUNK_SIZE} reference patches"
    )
    print()
    print(
        "| model | image | batch | mode | references (MB) | bare CLIP vision (s/img) | HeadCLIP (s/img) | ratio "
        "| vs zero-shot |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        name, size = case.split(":")
        size = int(size)
        config = HeadCLIPConfig.from_pretrained(args.configs_dir / ARCHITECTURES[name], image_size=size)
        model = HeadCLIPModel(config).eval()
        bare = model.vision_model  # a CLIPVisionModel holding the very same weights
        with torch.inference_mode():
            references = {0: None}  # k -> reference embeddings (L, k * N, P); k = 0 is zero-shot
            for k in args.k_shots:
                references[k] = model.encode_references(torch.randn(k, 3, size, size))
        for batch_size in args.batch_sizes:
            pixel_values = torch.randn(batch_size, 3, size, size)
            bare_inputs = dict(pixel_values=pixel_values, interpolate_pos_encoding=True)
            with torch.inference_mode():
                seconds(bare, **bare_inputs)  # warm-up
                for reference_embeds in references.values():  # warm-up, prompt encoding
                    seconds(model, pixel_values=pixel_values, reference_embeds=reference_embeds)
                bare_times, headclip_times = [], {k: [] for k in references}
                for _ in range(args.repeats):  # interleaved, so drift hits every mode alike
                    bare_times.append(seconds(bare, **bare_inputs))
                    for k, reference_embeds in references.items():
                        headclip_times[k].append(
                            seconds(model, pixel_values=pixel_values, reference_embeds=reference_embeds)
                        )
            bare_s = statistics.median(bare_times) / batch_size
            zero_shot_s = statistics.median(headclip_times[0]) / batch_size
            for k, reference_embeds in references.items():
                headclip_s = statistics.median(headclip_times[k]) / batch_size
                mode = "zero-shot" if k == 0 else f"{k}-shot"
                megabytes = "-" if reference_embeds is None else f"{reference_embeds.numel() * 4 / 2**20:.1f}"
                print(
                    f"| {config.vision_config.num_hidden_layers}-layer ViT/{config.vision_config.patch_size} ({name}) "
                    f"| {size} | {batch_size} | {mode} | {megabytes} | {bare_s:.3f} | {headclip_s:.3f} "
                    f"| {headclip_s / bare_s:.2f}x | {headclip_s / zero_shot_s:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
