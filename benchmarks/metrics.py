"""Benchmark of the metric step: streaming `AnomalyMetricsAccumulator` vs a straightforward AUPRO.

For N synthetic 518 x 518 anomaly maps and masks (half the images anomalous, one to three elliptic defects each,
maps = blurred mask + smooth noise), it prints how it was run, then:

1. streaming: time of `update` over all batches plus `compute` (every image and pixel metric, AUPRO included), the
   peak memory the metric step allocates on top of the batch it is given (tracemalloc), and the size of its state;
2. straightforward AUPRO, the AnomalyCLIP way: 200 thresholds, and at each one a thresholding and a connected-component
   pass per image. It needs every map in memory and is slow, so it runs on the first `--baseline_images` images and
   its time is scaled linearly to N (its cost is linear in the number of images);
3. the speed ratio, and the AUPRO of both methods on the baseline images.

Data generation is not timed. Flags as `headclip`'s: underscore spelling, dashes accepted. Run from the repository
root:

    python benchmarks/metrics.py --num_images 100
"""

import argparse
import os
import platform
import time
import tracemalloc

import numpy as np
from scipy import ndimage

from headclip_hf import DEFAULT_IMAGE_SIZE
from headclip_hf.cli._common import apply_flag_convention
from headclip_hf.metrics import DEFAULT_FPR_LIMIT, DEFAULT_NUM_BINS, AnomalyMetricsAccumulator, pixel_aupro

MVTEC_AD_TEST_IMAGES = 1725


def synthetic_batch(first: int, batch_size: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images `first` to `first + batch_size - 1`, each from its own seed.

    Returns:
        labels [B] (odd images anomalous), masks [B, H, W] bool, maps [B, H, W] float32 in [0, 1].
    """
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros(batch_size, dtype=np.int64)
    masks = np.zeros((batch_size, size, size), dtype=bool)
    maps = np.empty((batch_size, size, size), dtype=np.float32)
    for row in range(batch_size):
        rng = np.random.default_rng([seed, first + row])
        labels[row] = (first + row) % 2
        for _ in range(rng.integers(1, 4) if labels[row] else 0):
            cy, cx = rng.uniform(0.1 * size, 0.9 * size, 2)
            ry, rx = rng.uniform(0.01 * size, 0.12 * size, 2)
            masks[row] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        noise = ndimage.zoom(rng.random((size // 16 + 1, size // 16 + 1)), size / (size // 16 + 1), order=1)
        signal = ndimage.gaussian_filter(masks[row].astype(np.float32), sigma=4)
        maps[row] = np.clip(0.2 + 0.35 * signal + 0.5 * noise[:size, :size], 0, 1)
    return labels, masks, maps


def straightforward_aupro(masks: np.ndarray, maps: np.ndarray, num_thresholds: int = 200) -> float:
    """AUPRO as commonly coded (AnomalyCLIP's `cal_pro_score`): at each of `num_thresholds` thresholds between the
    smallest and largest score, binarise every map and, per image, label the mask's connected components and measure
    each region's overlap. Integrated like `headclip_hf.metrics` (from (0, 0) up to FPR 0.3, divided by 0.3) so the
    values are comparable; only the sampling of thresholds differs."""
    normal = ~masks
    fprs, pros = [0.0, 1.0], [0.0, 1.0]
    for threshold in np.linspace(maps.min(), maps.max(), num_thresholds, endpoint=False):
        predicted = maps > threshold
        overlaps = []
        for image_predicted, mask in zip(predicted, masks, strict=True):
            regions, num_regions = ndimage.label(mask, structure=np.ones((3, 3)))
            for label, box in enumerate(ndimage.find_objects(regions), start=1):
                overlaps.append(image_predicted[box][regions[box] == label].mean())
        fprs.append(np.sum(predicted & normal) / normal.sum())
        pros.append(np.mean(overlaps))
    order = np.argsort(fprs, kind="stable")
    fprs, pros = np.asarray(fprs)[order], np.asarray(pros)[order]
    pro_at_limit = np.interp(DEFAULT_FPR_LIMIT, fprs, pros)
    inside = fprs < DEFAULT_FPR_LIMIT
    x, y = np.append(fprs[inside], DEFAULT_FPR_LIMIT), np.append(pros[inside], pro_at_limit)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / DEFAULT_FPR_LIMIT)


def run_streaming(args: argparse.Namespace, trace_memory: bool) -> tuple[float, int, AnomalyMetricsAccumulator]:
    """Seconds spent in `update` + `compute`, peak bytes allocated by the metric step beyond its inputs."""
    accumulator = AnomalyMetricsAccumulator(num_bins=args.num_bins)
    seconds, peak = 0.0, 0
    if trace_memory:
        tracemalloc.start()
    for first in range(0, args.num_images, args.batch_size):
        labels, masks, maps = synthetic_batch(
            first, min(args.batch_size, args.num_images - first), args.size, args.seed
        )
        scores = maps.max(axis=(1, 2))
        if trace_memory:
            held, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
        start = time.perf_counter()
        accumulator.update(categories="synthetic", labels=labels, scores=scores, masks=masks, anomaly_maps=maps)
        seconds += time.perf_counter() - start
        if trace_memory:
            peak = max(peak, tracemalloc.get_traced_memory()[1] - held)
    start = time.perf_counter()
    accumulator.compute()
    seconds += time.perf_counter() - start
    if trace_memory:
        tracemalloc.stop()
    return seconds, peak, accumulator


def state_bytes(accumulator: AnomalyMetricsAccumulator) -> int:
    total = 0
    for category in accumulator.state_dict()["categories"].values():
        total += sum(value.nbytes for value in category.values() if isinstance(value, np.ndarray))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=100, help="N synthetic maps and masks (default 100)")
    parser.add_argument(
        "--size", type=int, default=DEFAULT_IMAGE_SIZE, help=f"map height and width (default {DEFAULT_IMAGE_SIZE})"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images per `update` call (default 8)")
    parser.add_argument("--num_bins", type=int, default=DEFAULT_NUM_BINS, help="histogram bins (default 2**16)")
    parser.add_argument("--baseline_images", type=int, default=10, help="images for the straightforward AUPRO")
    parser.add_argument("--thresholds", type=int, default=200, help="thresholds of the straightforward AUPRO")
    parser.add_argument("--seed", type=int, default=0)
    args = apply_flag_convention(parser).parse_args()
    baseline_images = min(args.baseline_images, args.num_images)

    print("Metric step benchmark")
    print(f"  N = {args.num_images} maps and masks of {args.size} x {args.size} (float32 maps, bool masks)")
    print(f"  {args.num_images * args.size**2 / 1e6:.1f} M pixels, batches of {args.batch_size}, {args.num_bins} bins")
    print(
        f"  {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible; the metric step runs on one"
    )
    print("  thread (numpy bincount and scipy.ndimage.label are single-threaded); numpy", np.__version__)

    seconds, _, accumulator = run_streaming(args, trace_memory=False)
    _, peak, _ = run_streaming(args, trace_memory=True)
    per_image = seconds / args.num_images
    print("\nStreaming metrics (all image and pixel metrics, AUPRO included)")
    print(f"  time: {seconds:.2f} s for {args.num_images} images ({1e3 * per_image:.1f} ms an image)")
    print(f"  peak memory of the metric step beyond its input batch: {peak / 2**20:.1f} MiB (tracemalloc)")
    print(f"  state: {state_bytes(accumulator) / 2**20:.2f} MiB, independent of N")
    full = per_image * MVTEC_AD_TEST_IMAGES
    print(f"  MVTec AD test set ({MVTEC_AD_TEST_IMAGES} images) at this size: about {full:.0f} s, same state size")

    labels, masks, maps = synthetic_batch(0, baseline_images, args.size, args.seed)
    tracemalloc.start()
    held, _ = tracemalloc.get_traced_memory()
    start = time.perf_counter()
    baseline_value = straightforward_aupro(masks, maps, args.thresholds)
    baseline_seconds = time.perf_counter() - start
    baseline_peak = tracemalloc.get_traced_memory()[1] - held
    tracemalloc.stop()
    baseline_scaled = baseline_seconds / baseline_images * args.num_images
    print(f"\nStraightforward AUPRO ({args.thresholds} thresholds x per-image connected components)")
    print(f"  time: {baseline_seconds:.2f} s for {baseline_images} images", end="")
    if baseline_images < args.num_images:
        print(f", scaled linearly to N = {args.num_images}: {baseline_scaled:.1f} s", end="")
    print(f"\n  peak memory beyond the maps and masks it needs in memory: {baseline_peak / 2**20:.1f} MiB", end="")
    print(
        f" (plus the inputs: {(maps.nbytes + masks.nbytes) / baseline_images * args.num_images / 2**20:.0f} MiB at N)"
    )

    streaming_value = pixel_aupro(masks, maps, num_bins=args.num_bins)
    print(f"\nSpeed ratio (straightforward AUPRO alone / streaming, all metrics): {baseline_scaled / seconds:.0f}x")
    print(f"AUPRO on the {baseline_images} baseline images: streaming {streaming_value:.5f}, ", end="")
    print(f"straightforward {baseline_value:.5f} (differences come from its {args.thresholds}-threshold sampling)")


if __name__ == "__main__":
    main()
