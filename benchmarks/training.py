"""Time and peak memory of one HeadCLIP training step, without and with activation checkpointing, against a
prompts-only step.

HeadCLIP's head weights sit inside the image encoder, so every training step back-propagates through the whole ViT;
AnomalyCLIP's reference trains only the text prompts and runs the image encoder under `no_grad`. Three modes per case,
on the real architectures built from `--configs_dir` (or the `HEADCLIP_CONFIGS_DIR` environment variable, as
benchmarks/inference.py) with random weights (only the cost matters here), the same
input, batch and optimizer (Adam, AnomalyCLIP's):

- plain: HeadCLIP's step (prompts and head weights train), every activation of the image encoder kept;
- checkpointing: the same step with `activation_checkpointing_enable()` (`--gradient_checkpointing` in training);
- prompts_only: head weights off (`use_head_weights=False`): nothing in the image encoder requires a gradient, so
  autograd records nothing there, what AnomalyCLIP's `no_grad` image encoder costs.

Each (case, mode) runs in its own subprocess, so that its memory is its own. Time: the median of `--repeats` steps
(forward, backward, optimizer step) after one warm-up step. Peak memory: on the CPU the peak resident set size of the
steps (`resource.getrusage(RUSAGE_SELF).ru_maxrss` of the child, its high-water mark reset through
`/proc/self/clear_refs` after the model is built, so it covers the steps with the weights resident); on CUDA
`torch.cuda.max_memory_allocated`. On Linux glibc's allocator keeps freed blocks of up to 32 MiB in the process (its
dynamic mmap threshold), so the resident set also counts tensors already freed; each child therefore runs with
`MALLOC_MMAP_THRESHOLD_=131072`, which hands every block of 128 KiB or more back to the system when it is freed, so
that the CPU peak counts live memory, as the CUDA figure does (`--glibc_default_malloc` keeps glibc's default; the
header says which). The issue's goal: with checkpointing, peak <= 1.3x prompts-only and time <= 1.5x plain.

A case is `config_folder:image_size:batch_size`, the folder under `--configs_dir` (as the cases of
benchmarks/inference.py, with the batch). Flags as `headclip`'s: underscore spelling, dashes accepted.

Usage:
    python benchmarks/training.py --configs_dir path/to/configs   # ViT-B/16 @ 224 batch 8, ViT-L/14 @ 518 batch 2
    python benchmarks/training.py --configs_dir DIR --cases clip-vit-base-patch16:224:8 --device cuda --repeats 3
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import MMAP_THRESHOLD, add_configs_dir_argument, check_cases, run_child

from headclip_hf import HeadCLIPConfig, HeadCLIPModel
from headclip_hf.cli._common import apply_flag_convention

MODES = ("plain", "checkpointing", "prompts_only")
DEFAULT_CASES = ("clip-vit-base-patch16:224:8", "clip-vit-large-patch14-336:518:2")


def reset_peak_memory(device: torch.device) -> bool:
    """Start the peak-memory count here; False when the CPU peak cannot be reset (then it covers the model build)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the resident high-water mark
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure(config_dir: str, image_size: int, batch_size: int, mode: str, device: str, repeats: int) -> dict:
    """One (case, mode) in this process: the median step time and the peak memory of the steps."""
    device = torch.device(device)
    torch.manual_seed(0)
    config = HeadCLIPConfig.from_pretrained(config_dir, image_size=image_size, use_head_weights=mode != "prompts_only")
    model = HeadCLIPModel(config).to(device).train()
    if mode == "checkpointing":
        model.activation_checkpointing_enable()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.5, 0.999))
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, device=device)
    masks = (torch.rand(batch_size, image_size, image_size, device=device) > 0.9).float()
    labels = torch.arange(batch_size, device=device) % 2

    def step() -> float:
        start = time.perf_counter()
        model(pixel_values=pixel_values, masks=masks, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    peak_is_steps_only = reset_peak_memory(device)
    step()  # warm-up
    seconds = statistics.median(step() for _ in range(repeats))
    return {"seconds": seconds, "peak_bytes": peak_memory_bytes(device), "peak_is_steps_only": peak_is_steps_only}


def run_in_subprocess(case: str, mode: str, args: argparse.Namespace) -> dict:
    name, image_size, batch_size = case.split(":")
    child = {
        "config_dir": str(args.configs_dir / name),
        "image_size": int(image_size),
        "batch_size": int(batch_size),
        "mode": mode,
        "device": args.device,
        "repeats": args.repeats,
    }
    return run_child(__file__, child, f"{case} {mode}", live_memory=not args.glibc_default_malloc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_configs_dir_argument(parser)
    parser.add_argument(
        "--cases", nargs="+", default=list(DEFAULT_CASES), help="config_folder:image_size:batch_size, one per case"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per mode (after one warm-up step)")
    parser.add_argument(
        "--glibc_default_malloc",
        action="store_true",
        help="CPU: keep glibc's dynamic mmap threshold (the peak resident set then also counts freed memory it keeps)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = apply_flag_convention(parser).parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    check_cases(parser, args.configs_dir, args.cases, ("image_size", "batch_size"))

    if args.device.startswith("cuda"):
        memory = "max allocated"
    else:
        allocator = "glibc default" if args.glibc_default_malloc else f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
        memory = f"peak resident set size of the steps ({allocator})"
    print(
        f"torch {torch.__version__}, device {args.device}, float32, threads {torch.get_num_threads()}, one training "
        f"step (forward, backward, Adam), median of {args.repeats} after one warm-up, each mode in its own process; "
        f"peak memory: {memory}"
    )
    print()
    print(
        "| case | image | batch | plain (s, GiB) | checkpointing (s, GiB) | prompts only (s, GiB) "
        "| checkpointing peak / prompts only | checkpointing time / plain |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        name, image_size, batch_size = case.split(":")
        results = {mode: run_in_subprocess(case, mode, args) for mode in MODES}
        cells = [f"{results[m]['seconds']:.2f} s, {results[m]['peak_bytes'] / 2**30:.2f} GiB" for m in MODES]
        memory_ratio = results["checkpointing"]["peak_bytes"] / results["prompts_only"]["peak_bytes"]
        time_ratio = results["checkpointing"]["seconds"] / results["plain"]["seconds"]
        print(
            f"| {name} | {image_size} | {batch_size} | {' | '.join(cells)} | {memory_ratio:.2f}x (goal <= 1.3x) "
            f"| {time_ratio:.2f}x (goal <= 1.5x) |",
            flush=True,
        )
        if not all(result["peak_is_steps_only"] for result in results.values()):
            print("(the peak could not be reset after the model build: it covers building the model too)")


if __name__ == "__main__":
    main()
