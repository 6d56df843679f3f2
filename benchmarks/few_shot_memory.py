"""Peak memory of one HeadCLIP forward, zero-shot and with k reference images (few-shot), on the CPU.

The few-shot forward adds a nearest-neighbour search of every patch against the k x patches reference patches of each
feature layer, in chunks of `REFERENCE_CHUNK_SIZE` reference patches, so that its working memory does not grow with
k. This script measures it: for each mode, in its own process (so that its memory is its own), the model is built on
the real architecture of a CLIP config (`--configs_dir`, or `HEADCLIP_CONFIGS_DIR`, as benchmarks/inference.py; random
weights) and the reference embeddings are made (random, of the shape `encode_references` returns: the search costs
the same whatever their values); then the resident high-water mark is reset and one forward runs under
`inference_mode`. Reported: the peak resident set of that forward, the memory held before it (weights, references),
and the growth over the zero-shot forward. As benchmarks/training.py, each child runs with glibc's
`MALLOC_MMAP_THRESHOLD_=131072`, so that the peak counts live memory, not blocks glibc keeps after a free.

Usage:
    python benchmarks/few_shot_memory.py --configs_dir DIR   # ViT-L/14@336 at 518 px, batch 1, k = 0, 1, 4, 16
    python benchmarks/few_shot_memory.py --configs_dir DIR --case clip-vit-base-patch16:224 --k_shots 0 16 64
"""

import argparse
import json
import os
import resource
from pathlib import Path

import torch
from _common import MMAP_THRESHOLD, add_configs_dir_argument, check_cases, run_child

from headclip_hf import HeadCLIPConfig, HeadCLIPModel
from headclip_hf.cli._common import apply_flag_convention
from headclip_hf.modeling_headclip import REFERENCE_CHUNK_SIZE


def resident_bytes() -> int:
    """The current resident set size of this process (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(config_dir: str, image_size: int, batch_size: int, k_shot: int, threads: int) -> dict:
    """In this process: the memory before and the peak during one forward with `k_shot` references (0: zero-shot)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = HeadCLIPModel(HeadCLIPConfig.from_pretrained(config_dir, image_size=image_size)).eval()
    pixel_values = torch.randn(batch_size, 3, image_size, image_size)
    reference_embeds = None
    with torch.inference_mode():
        model.get_prompt_embeds()  # the cached prompt embeddings: part of the model's standing memory
        if k_shot:
            vision = model.config.vision_config
            patches = (image_size // vision.patch_size) ** 2
            shape = (len(model.config.feature_layers), k_shot * patches, model.config.projection_dim)
            reference_embeds = torch.nn.functional.normalize(torch.randn(shape), dim=-1)
        before = resident_bytes()
        Path("/proc/self/clear_refs").write_text("5")  # resets the resident high-water mark to the current size
        model(pixel_values=pixel_values, reference_embeds=reference_embeds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"before_bytes": before, "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_configs_dir_argument(parser)
    parser.add_argument("--case", default="clip-vit-large-patch14-336:518", help="config_folder:image_size")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--k_shots", nargs="+", type=int, default=[0, 1, 4, 16], help="0: the zero-shot forward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = apply_flag_convention(parser).parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    check_cases(parser, args.configs_dir, [args.case], ("image_size",))
    if not Path("/proc/self/clear_refs").exists():
        parser.error("this benchmark reads Linux's /proc to measure the peak memory of one forward")

    name, image_size = args.case.split(":")
    print(
        f"torch {torch.__version__}, device cpu, float32, threads {args.threads}, {name} at {image_size} px, batch "
        f"{args.batch_size}, inference_mode, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}, each k in its own process; "
        f"nearest-neighbour search in chunks of {REFERENCE_CHUNK_SIZE} reference patches"
    )
    print()
    print(
        "| k | held before the forward (GiB) | peak during the forward (GiB) | forward's growth (MiB) "
        "| vs zero-shot (MiB) |"
    )
    print("|---|---|---|---|---|")
    zero_shot_growth = None
    for k_shot in args.k_shots:
        child = {
            "config_dir": str(args.configs_dir / name),
            "image_size": int(image_size),
            "batch_size": args.batch_size,
            "k_shot": k_shot,
            "threads": args.threads,
        }
        measured = run_child(__file__, child, f"k = {k_shot}")
        growth = (measured["peak_bytes"] - measured["before_bytes"]) / 2**20
        if k_shot == 0:
            zero_shot_growth = growth
        extra = f"{round(growth - zero_shot_growth):+d}" if zero_shot_growth is not None and k_shot else "-"
        before, peak = measured["before_bytes"] / 2**30, measured["peak_bytes"] / 2**30
        print(
            f"| {k_shot or 'zero-shot'} | {before:.2f} | {peak:.2f} | {growth:.0f} | {extra} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
