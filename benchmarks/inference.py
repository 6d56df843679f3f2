"""Per-image inference time of HeadCLIP (anomaly map + joint score) on each execution path, zero-shot and few-shot,
against a bare CLIP vision forward.

Builds the real architectures from their CLIP configs (`--configs_dir`, or the `HEADCLIP_CONFIGS_DIR` environment
variable: a folder holding one config folder per architecture, e.g. `clip-vit-base-patch16/config.json` and
`clip-vit-large-patch14-336/config.json`; a case names its folder, `clip-vit-base-patch16:224`) with random weights
(only the cost matters here), and times, in one run and interleaved, on the same weights, input size and batch:

- bare: `CLIPVisionModel` forward (`interpolate_pos_encoding=True`), the floor any CLIP-based detector pays;
- eager float32 (zero-shot): `HeadCLIPModel` forward in eval mode (head weights, value-value path, 4 pixel maps,
  Gaussian smoothing, global and joint scores; the prompt embeddings are cached after the first call);
- bfloat16: the same with bfloat16 weights (`prepare_for_inference(dtype="bfloat16")`; maps stay float32);
- torch.compile: the float32 model compiled (`prepare_for_inference(compile=True)`, inductor);
- ONNX Runtime / OpenVINO: `export_model(..., dynamic_batch=True)` run by `ExportedDetector.run` (float32);
- k-shot (k = 1, 4, 16 by default): the eager float32 forward with `reference_embeds` of k reference images. The
  references are encoded once beforehand (`encode_references`, as the pipeline and `headclip references` do) and
  that encoding is NOT timed: the time is the forward with precomputed references (zero-shot forward +
  nearest-neighbour search + few-shot maps). The table also gives the size of the reference embeddings (float32).

Each row reports the median time per image, its ratio to the bare pass and to eager float32, and, for the paths that
compute the zero-shot map (not k-shot, whose map is another one by design), the largest |anomaly map difference| to
eager float32 on the same input. Exports, compilation and reference encoding happen before timing; one untimed
warm-up call per path.

The exports take their preprocessing from a `HeadCLIPProcessor`, which needs CLIP's tokenizer files
(`--tokenizer_dir`, or `HEADCLIP_TOKENIZER_DIR`). Flags as `headclip`'s: underscore spelling, dashes accepted.

Usage:
    python benchmarks/inference.py --configs_dir DIR --tokenizer_dir TOK   # ViT-B/16 @ 224 and ViT-L/14@336 @ 518
    python benchmarks/inference.py --configs_dir DIR --cases clip-vit-base-patch16:224 --batch_sizes 1 --paths \\
        --k_shots 4
    python benchmarks/inference.py --tokenizer_dir TOK --cases tiny:64 --repeats 1   # a tiny CLIP: the script runs
"""

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import add_configs_dir_argument, check_cases
from transformers import CLIPTokenizer

from headclip_hf import HeadCLIPConfig, HeadCLIPModel, HeadCLIPProcessor
from headclip_hf.cli._common import apply_flag_convention
from headclip_hf.export import ExportedDetector, export_model
from headclip_hf.inference import prepare_for_inference
from headclip_hf.modeling_headclip import REFERENCE_CHUNK_SIZE

DEFAULT_CASES = ("clip-vit-base-patch16:224", "clip-vit-large-patch14-336:518")
# The case "tiny:<size>": not a real CLIP, only to check that the script runs.
TINY_CONFIG = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=8, image_size=32
    ),
    projection_dim=16,
)
TOKENIZER_DIR_VARIABLE = "HEADCLIP_TOKENIZER_DIR"
# Paths beyond the two that always run (bare and eager float32), in the order of the table.
PATHS = ("bfloat16", "compile", "onnxruntime", "openvino")
PATH_TITLES = {
    "bare": "bare CLIP vision",
    "eager": "HeadCLIP eager float32",
    "bfloat16": "HeadCLIP bfloat16",
    "compile": "HeadCLIP torch.compile",
    "onnxruntime": "HeadCLIP ONNX Runtime",
    "openvino": "HeadCLIP OpenVINO",
}

# A path: pixel values (B, 3, S, S) float32 -> the anomaly map (B, S, S) as numpy, or None for the bare pass.
Runner = Callable[[torch.Tensor], np.ndarray | None]


def bare_runner(model: HeadCLIPModel) -> Runner:
    def run(pixel_values: torch.Tensor) -> None:
        model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True)  # the very same weights

    return run


def torch_runner(model: HeadCLIPModel, reference_embeds: torch.Tensor | None = None) -> Runner:
    def run(pixel_values: torch.Tensor) -> np.ndarray:
        outputs = model(pixel_values=pixel_values.to(model.dtype), reference_embeds=reference_embeds)
        return outputs.anomaly_map.numpy()

    return run


def build_runners(
    model: HeadCLIPModel,
    processor: HeadCLIPProcessor,
    paths: list[str],
    k_shots: list[int],
    export_root: Path,
    threads: int | None,
) -> tuple[dict[str, Runner], dict[str, float]]:
    """One runner per path and per k-shot mode, all from the weights of `model`; and the k-shot references' sizes."""
    runners: dict[str, Runner] = {"bare": bare_runner(model), "eager": torch_runner(model)}
    for path in paths:
        if path in ("bfloat16", "compile"):
            options = {"dtype": "bfloat16"} if path == "bfloat16" else {"compile": True}
            runners[path] = torch_runner(prepare_for_inference(copy.deepcopy(model), **options))
        else:
            format = "onnx" if path == "onnxruntime" else "openvino"
            folder = export_model(model, processor, export_root / format, format=format, dynamic_batch=True)
            detector = ExportedDetector(folder, num_threads=threads)
            runners[path] = lambda pixel_values, detector=detector: detector.run(pixel_values.numpy())["anomaly_map"]
    reference_megabytes = {}
    size = processor.image_size
    for k in k_shots:
        with torch.inference_mode():
            reference_embeds = model.encode_references(torch.randn(k, 3, size, size))
        runners[f"{k}-shot"] = torch_runner(model, reference_embeds)
        reference_megabytes[f"{k}-shot"] = reference_embeds.numel() * 4 / 2**20
    return runners, reference_megabytes


def seconds(runner: Runner, pixel_values: torch.Tensor) -> tuple[float, np.ndarray | None]:
    """Wall time of one call of `runner`, and its map."""
    start = time.perf_counter()
    anomaly_map = runner(pixel_values)
    return time.perf_counter() - start, anomaly_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_configs_dir_argument(parser)
    parser.add_argument(
        "--tokenizer_dir",
        type=Path,
        default=os.environ.get(TOKENIZER_DIR_VARIABLE),
        help=f"folder with CLIP's tokenizer files, for the exports' processor (default: ${TOKENIZER_DIR_VARIABLE})",
    )
    parser.add_argument(
        "--cases", nargs="+", default=list(DEFAULT_CASES), help="config_folder:image_size (or tiny:image_size)"
    )
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument(
        "--paths", nargs="*", choices=PATHS, default=list(PATHS), help="paths besides bare and eager float32"
    )
    parser.add_argument(
        "--k_shots", nargs="*", type=int, default=[1, 4, 16], help="few-shot rows (none: zero-shot only)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path and case (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every path (default: each's own)")
    args = apply_flag_convention(parser).parse_args()
    check_cases(parser, args.configs_dir, args.cases, ("image_size",), allow_tiny=True)
    if args.tokenizer_dir is None:
        parser.error(f"pass --tokenizer_dir DIR or set {TOKENIZER_DIR_VARIABLE}: a folder holding CLIP's tokenizer")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_dir)

    print(
        f"torch {torch.__version__}, device cpu, threads {torch.get_num_threads() if args.threads else 'default'}, "
        f"repeats {args.repeats} (median reported), interleaved, inference_mode; k-shot: forward with precomputed "
        f"references (encoding them not timed), nearest-neighbour search in chunks of {REFERENCE_CHUNK_SIZE} "
        "reference patches"
    )
    print()
    print(
        "| model | image | batch | path | references (MiB) | s/img | vs bare | vs eager float32 "
        "| max map diff to eager float32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        name, size = case.split(":")
        size = int(size)
        if name == "tiny":
            config = HeadCLIPConfig(**TINY_CONFIG, image_size=size)
        else:
            config = HeadCLIPConfig.from_pretrained(args.configs_dir / name, image_size=size)
        model = HeadCLIPModel(config).eval()
        processor = HeadCLIPProcessor(tokenizer=tokenizer, image_size=size)  # for the exports' preprocessing
        title = f"{config.vision_config.num_hidden_layers}-layer ViT/{config.vision_config.patch_size} ({name})"
        with tempfile.TemporaryDirectory(prefix="headclip-benchmark-") as export_root:
            runners, reference_megabytes = build_runners(
                model, processor, args.paths, args.k_shots, Path(export_root), args.threads
            )
            for batch_size in args.batch_sizes:
                pixel_values = torch.randn(batch_size, 3, size, size)
                times = {path: [] for path in runners}
                maps = {}
                with torch.inference_mode():
                    for path, runner in runners.items():  # warm-up: prompt encoding, compilation per batch shape
                        maps[path] = seconds(runner, pixel_values)[1]
                    for _ in range(args.repeats):  # interleaved, so drift hits every path alike
                        for path, runner in runners.items():
                            times[path].append(seconds(runner, pixel_values)[0])
                per_image = {path: statistics.median(path_times) / batch_size for path, path_times in times.items()}
                for path in runners:
                    same_map = path not in reference_megabytes and maps[path] is not None
                    difference = f"{np.abs(maps[path] - maps['eager']).max():.1e}" if same_map else "-"
                    megabytes = f"{reference_megabytes[path]:.1f}" if path in reference_megabytes else "-"
                    print(
                        f"| {title} | {size} | {batch_size} | {PATH_TITLES.get(path, f'HeadCLIP {path}')} "
                        f"| {megabytes} | {per_image[path]:.3f} | {per_image[path] / per_image['bare']:.2f}x "
                        f"| {per_image[path] / per_image['eager']:.2f}x | {difference} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
