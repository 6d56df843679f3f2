"""Reports of anomaly detection results: a markdown table, a JSON file and ROC / PR / PRO curve plots per category.

Everything here reads an `AnomalyDetectionResults` (from `headclip_hf.metrics`); no metric is computed here.

- Markdown: one row per category plus the mean, values in percent with one decimal like the papers. An undefined
  value is "n/a [k]", footnote k giving the reason; a mean over fewer than all categories says over how many. Then
  the F1-optimal image and pixel thresholds per category and, for a calibrated model, the decisions at its thresholds
  (confusion counts, precision, recall, false-positive rate, accuracy).
- JSON: `results.to_dict()`: fractions in [0, 1], `null` plus the reason for an undefined value; with the run's
  provenance (`headclip_hf.provenance.evaluation_provenance`: model, parameter hash, size, data, version, date) when
  given.
- PNG: per category a 2 x 3 grid: image ROC, image PR, image score distributions; pixel ROC, pixel PR, PRO curve up to
  the AUPRO FPR limit. Figures are drawn with `matplotlib.figure.Figure` and saved by the Agg renderer, without pyplot,
  so the caller's matplotlib backend and open figures are left alone.
- k-shot (`KShotResults` of `headclip_hf.evaluation`): every seed's run as above under `seed_<seed>/`, and a summary,
  `k_shot_results.md` (mean ± standard deviation over the seeds) and `k_shot_results.json` (also the reference files
  used per seed and category).

`save_results` / `save_k_shot_results` write a folder of their own through `headclip_hf.files.output_folder` (staged,
then moved into place; an earlier output of the same kind is replaced, a folder holding other files only with
`overwrite=True`). `write_results` / `write_k_shot_results` write into a folder being staged by the caller, which may
add more (`headclip evaluate --report`); `evaluate_output_kind` says what such a folder holds.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .files import OutputKind, output_folder
from .metrics import METRIC_NAMES, AnomalyDetectionResults, CategoryResult, MetricResult, OperatingPoint, f1_scores

if TYPE_CHECKING:
    from .evaluation import KShotResults

RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
# The key of the run's provenance in results.json (`headclip_hf.provenance`).
PROVENANCE_KEY = "provenance"
PLOTS_DIR = "plots"
K_SHOT_JSON = "k_shot_results.json"
K_SHOT_MARKDOWN = "k_shot_results.md"
# The HTML report of `headclip evaluate --report` (`headclip_hf.evaluation_report`), next to the results.
REPORT_HTML = "report.html"
REPORT_FILES_DIR = "report_files"
PER_IMAGE_CSV = "per_image.csv"

EVALUATE_OUTPUT = OutputKind(
    "headclip evaluate output",
    frozenset({RESULTS_JSON, RESULTS_MARKDOWN, PLOTS_DIR, REPORT_HTML, REPORT_FILES_DIR, PER_IMAGE_CSV}),
)
K_SHOT_OUTPUT = OutputKind(
    "headclip evaluate --k_shot output", frozenset({K_SHOT_JSON, K_SHOT_MARKDOWN}), patterns=("seed_*",)
)


def evaluate_output_kind(k_shot: int | None) -> OutputKind:
    """What an evaluation folder holds: zero-shot results (`save_results`), or k-shot ones (`save_k_shot_results`)."""
    return EVALUATE_OUTPUT if k_shot is None else K_SHOT_OUTPUT


METRIC_TITLES = {
    "image_auroc": "Image AUROC",
    "image_ap": "Image AP",
    "image_f1_max": "Image F1-max",
    "mad_image": "mAD image",
    "pixel_auroc": "Pixel AUROC",
    "pixel_ap": "Pixel AP",
    "pixel_f1_max": "Pixel F1-max",
    "pixel_aupro": "Pixel AUPRO",
    "mad_pixel": "mAD pixel",
}


def _undefined_cell(reason: str, footnotes: dict[str, int]) -> str:
    """An undefined value's cell, "n/a [k]": footnote k gives the reason (one footnote per distinct reason)."""
    return f"n/a [{footnotes.setdefault(reason, len(footnotes) + 1)}]"


def _metrics_markdown(
    rows: dict[str, list[str]], note: str, footnotes: dict[str, int], sections: Sequence[str] = ()
) -> str:
    """
    A table with one row per name (cells in `METRIC_NAMES` order), then `note`, the lines of further `sections` and
    the footnotes of n/a cells.
    """
    header = ["Category"] + [METRIC_TITLES[name] for name in METRIC_NAMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * len(METRIC_NAMES)) + "|"]
    lines += ["| " + " | ".join([name, *cells]) + " |" for name, cells in rows.items()]
    lines += ["", note, *sections]
    if footnotes:
        lines.append("")
        lines.extend(f"- [{number}] undefined: {reason}" for reason, number in footnotes.items())
    return "\n".join(lines) + "\n"


def results_to_markdown(results: AnomalyDetectionResults) -> str:
    """
    A markdown table of every category and the mean, in percent with one decimal; the F1-optimal thresholds and the
    decisions at a calibrated model's thresholds per category; then footnotes for n/a cells.
    """
    footnotes: dict[str, int] = {}  # reason -> footnote number, so a reason shared by several cells is listed once

    def cell(result: MetricResult, num_categories: int | None = None, scale: float = 100, digits: int = 1) -> str:
        if not result.is_defined:
            return _undefined_cell(result.reason, footnotes)
        text = f"{scale * result.value:.{digits}f}"
        if num_categories is not None and result.num_categories != num_categories:
            text += f" ({result.num_categories}/{num_categories})"
        return text

    rows = {name: [cell(category.metrics[m]) for m in METRIC_NAMES] for name, category in results.categories.items()}
    total = len(results.categories)
    rows[f"**Mean** ({total} categories)"] = [cell(results.mean[m], total) for m in METRIC_NAMES]
    note = (
        f"Values in percent. AUPRO: per-region overlap integrated up to FPR {results.fpr_limit:g}, divided by "
        f"{results.fpr_limit:g}. Pixel metrics from {results.num_bins:,}-bin score histograms. A mean marked (k/n) "
        "averages the k of n categories on which the metric is defined."
    )
    sections = [
        "",
        "F1-optimal thresholds (anomalous when score >= threshold; the operating points of the F1-max):",
        "",
        "| Category | Image threshold | Pixel threshold |",
        "|:---|---:|---:|",
    ]
    for name, category in results.categories.items():
        thresholds = [cell(category.f1_max_thresholds[level], scale=1, digits=4) for level in ("image", "pixel")]
        sections.append("| " + " | ".join([name, *thresholds]) + " |")
    decisions = [
        (name, level, point)
        for name, category in results.categories.items()
        for level, point in category.operating_points.items()
    ]
    if decisions:
        sections += _decisions_table(decisions)
    return _metrics_markdown(rows, note, footnotes, sections)


def _decisions_table(decisions: list[tuple[str, str, OperatingPoint]]) -> list[str]:
    """The rows (category, level, decisions at the model's threshold) of the calibrated-decisions table."""

    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    lines = [
        "",
        "Decisions at the model's calibrated thresholds (what a line would see): TP / FP / TN / FN count images or "
        "pixels (positive = anomalous), rates in percent, n/a where a rate has no denominator.",
        "",
        "| Category | Level | Threshold | TP | FP | TN | FN | Precision | Recall | FPR | Accuracy |",
        "|:---|:---|" + "---:|" * 9,
    ]
    for name, level, point in decisions:
        counts = [point.true_positives, point.false_positives, point.true_negatives, point.false_negatives]
        rates = [point.precision, point.recall, point.false_positive_rate, point.accuracy]
        cells = [name, level, f"{point.threshold:.4f}", *map(str, counts), *map(rate, rates)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _write_json_and_markdown(
    output_dir: Path, json_name: str, data: dict, markdown_name: str, markdown: str
) -> dict[str, Path]:
    """Write `data` as JSON and the `markdown` text into `output_dir`; returns their paths ("json", "markdown")."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / json_name, "markdown": output_dir / markdown_name}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["markdown"].write_text(markdown)
    return paths


def _saved(output_dir: str | Path, kind: OutputKind, overwrite: bool, write, *args, **kwargs) -> dict[str, Path]:
    """Run `write(staging, *args, **kwargs)` in an `output_folder` for `output_dir`; the paths of the written files."""
    output_dir = Path(output_dir).expanduser()
    with output_folder(output_dir, kind, overwrite) as staging:
        written = write(staging, *args, **kwargs)
    return {key: output_dir / path.relative_to(staging) for key, path in written.items()}


def save_results(
    results: AnomalyDetectionResults,
    output_dir: str | Path,
    *,
    plots: bool = True,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write `results.json`, `results.md` and (if `plots`) `plots/<category>.png` as the folder `output_dir`.

    The folder is written through `headclip_hf.files.output_folder`: complete or not at all; an earlier evaluation
    output there is replaced, and a folder that holds other files is refused unless `overwrite`, which replaces only
    the evaluation's own files and keeps the others.

    Args:
        results (`AnomalyDetectionResults`):
            The metrics to write.
        output_dir (`str` or `Path`):
            The folder to write (created if missing).
        plots (`bool`, *optional*, defaults to `True`):
            Whether to draw the curves of every category.
        provenance (`dict`, *optional*):
            The run's provenance (`headclip_hf.provenance.evaluation_provenance`), stored in `results.json` under
            "provenance"; `headclip push --results` requires it.
        overwrite (`bool`, *optional*, defaults to `False`):
            Write into a folder that also holds files other than an evaluation's.

    Returns:
        `dict[str, Path]`: the written paths, keys "json", "markdown" and "plot/<category>".

    Raises:
        `FileExistsError`: `output_dir` holds other files and `overwrite` is false (nothing is written).
        `NotADirectoryError` / `PermissionError`: `output_dir` cannot be written.
    """
    return _saved(output_dir, EVALUATE_OUTPUT, overwrite, write_results, results, plots=plots, provenance=provenance)


def write_results(
    output_dir: Path, results: AnomalyDetectionResults, *, plots: bool = True, provenance: dict[str, Any] | None = None
) -> dict[str, Path]:
    """
    The files of `save_results`, written into the existing folder `output_dir` (a staging folder of
    `headclip_hf.files.output_folder` with kind `EVALUATE_OUTPUT`, which the caller may add its report to).
    """
    paths = _write_json_and_markdown(
        output_dir,
        RESULTS_JSON,
        _with_provenance(results.to_dict(), provenance),
        RESULTS_MARKDOWN,
        results_to_markdown(results),
    )
    if plots:
        for name, file_name in category_file_names(results.categories).items():
            path = output_dir / PLOTS_DIR / f"{file_name}.png"
            paths[f"plot/{name}"] = plot_category_curves(results.categories[name], path, fpr_limit=results.fpr_limit)
    return paths


def k_shot_results_to_markdown(results: KShotResults) -> str:
    """
    A markdown table of every category and the mean over categories: per metric the mean ± standard deviation over
    the seeds, in percent with one decimal; then the protocol (k, seeds, where each category's references came from).
    """
    summary = results.summary()
    num_seeds = len(results.seeds)
    footnotes: dict[str, int] = {}

    def cell(entry: dict) -> str:
        if entry["mean"] is None:
            return _undefined_cell(entry["reason"], footnotes)
        text = f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"
        return text if entry["num_seeds"] == num_seeds else f"{text} ({entry['num_seeds']}/{num_seeds} seeds)"

    rows = {
        f"**Mean** ({len(summary) - 1} categories)" if row == "mean" else row: [cell(metrics[m]) for m in METRIC_NAMES]
        for row, metrics in summary.items()
    }
    sources = ", ".join(f"{category}: {source}" for category, source in results.reference_sources.items())
    note = (
        f"{results.k_shot}-shot: {results.k_shot} normal reference images per category, drawn with each of the seeds "
        f"{results.seeds}; values in percent, mean ± standard deviation over the seeds. References from the training "
        f"normals (train) or from the test normals, then left out of the evaluation (test): {sources}. The files used "
        f"are listed in {K_SHOT_JSON}; each seed's full results are in seed_<seed>/."
    )
    return _metrics_markdown(rows, note, footnotes)


def save_k_shot_results(
    results: KShotResults,
    output_dir: str | Path,
    *,
    plots: bool = True,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write `k_shot_results.json`, `k_shot_results.md` and every seed's results (`save_results`) under `seed_<seed>/`
    as the folder `output_dir`, through `headclip_hf.files.output_folder` as `save_results` does.

    Args:
        results (`KShotResults`):
            The k-shot protocol's results.
        output_dir (`str` or `Path`):
            The folder to write (created if missing).
        plots (`bool`, *optional*, defaults to `True`):
            Whether to draw the curves of every category of every seed.
        provenance (`dict`, *optional*):
            The run's provenance, stored in every JSON file under "provenance" (see `save_results`).
        overwrite (`bool`, *optional*, defaults to `False`):
            Write into a folder that also holds files other than a k-shot evaluation's.

    Returns:
        `dict[str, Path]`: the written paths, keys "json", "markdown" and "seed_<seed>/<key of save_results>".

    Raises:
        `FileExistsError`: `output_dir` holds other files and `overwrite` is false (nothing is written).
        `NotADirectoryError` / `PermissionError`: `output_dir` cannot be written.
    """
    return _saved(
        output_dir, K_SHOT_OUTPUT, overwrite, write_k_shot_results, results, plots=plots, provenance=provenance
    )


def write_k_shot_results(
    output_dir: Path, results: KShotResults, *, plots: bool = True, provenance: dict[str, Any] | None = None
) -> dict[str, Path]:
    """The files of `save_k_shot_results`, written into the existing folder `output_dir` (kind `K_SHOT_OUTPUT`)."""
    markdown = k_shot_results_to_markdown(results)
    data = _with_provenance(results.to_dict(), provenance)
    paths = _write_json_and_markdown(output_dir, K_SHOT_JSON, data, K_SHOT_MARKDOWN, markdown)
    for seed, run in results.runs.items():
        seed_dir = output_dir / f"seed_{seed}"
        seed_dir.mkdir()
        for key, path in write_results(seed_dir, run, plots=plots, provenance=provenance).items():
            paths[f"seed_{seed}/{key}"] = path
    return paths


def _with_provenance(data: dict[str, Any], provenance: dict[str, Any] | None) -> dict[str, Any]:
    """`data` with the run's provenance first, under `PROVENANCE_KEY` (unchanged without one)."""
    return data if provenance is None else {PROVENANCE_KEY: provenance, **data}


def safe_file_name(name: str) -> str:
    """`name` (a category, a data set) made safe as a file or folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "category"


def category_file_names(names: Iterable[str]) -> dict[str, str]:
    """
    One distinct file name per category of one results, `{name: file name}` (without extension): `safe_file_name`,
    followed by `-` and the first 8 hex digits of the name's SHA-256 where two names would otherwise share a file
    (e.g. "a b" and "a_b"; or "Screw" and "screw", one file on a case-insensitive file system).
    """
    stems = {name: safe_file_name(name) for name in names}
    uses = Counter(stem.lower() for stem in stems.values())
    return {
        name: stem if uses[stem.lower()] == 1 else f"{stem}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        for name, stem in stems.items()
    }


def plot_category_curves(category: CategoryResult, path: str | Path, *, fpr_limit: float = 0.3) -> Path:
    """Plot one category's ROC, PR and PRO curves (image and pixel level) into the PNG `path`."""
    metrics, curves = category.metrics, category.curves
    figure = Figure(figsize=(15, 9.5), layout="constrained")
    axes = figure.subplots(2, 3)
    counts = category.counts
    figure.suptitle(
        f"{category.name}: {counts['num_images']} images ({counts['num_normal_images']} normal, "
        f"{counts['num_anomalous_images']} anomalous), {counts['num_pixel_images']} with masks, "
        f"{counts['num_regions']} anomalous regions",
        fontsize=13,
    )

    for row, level in enumerate(("image", "pixel")):
        roc_axes, pr_axes = axes[row, 0], axes[row, 1]
        level_title = level.capitalize()
        if f"{level}_roc" in curves:
            fpr, tpr = curves[f"{level}_roc"]
            roc_axes.plot(fpr, tpr, color="tab:blue", label=f"AUROC {_percent(metrics[f'{level}_auroc'])}")
            roc_axes.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="chance")
            recall, precision = curves[f"{level}_pr"]
            # Recall ascending; the precision at recall r_i holds on (r_(i-1), r_i], which is what AP sums.
            ap_label = f"AP {_percent(metrics[f'{level}_ap'])}"
            pr_axes.step(recall, precision, where="pre", color="tab:orange", label=ap_label)
            best = int(np.argmax(f1_scores(precision, recall)))
            pr_axes.plot(
                recall[best],
                precision[best],
                "o",
                color="tab:red",
                label=f"F1-max {_percent(metrics[f'{level}_f1_max'])}",
            )
            prevalence = _prevalence(category, level)
            pr_axes.axhline(prevalence, color="gray", linestyle="--", linewidth=1, label=f"chance ({prevalence:.1%})")
        else:
            _undefined(roc_axes, metrics[f"{level}_auroc"])
            _undefined(pr_axes, metrics[f"{level}_ap"])
        _style(roc_axes, f"{level_title} ROC", "False positive rate", "True positive rate")
        _style(pr_axes, f"{level_title} precision-recall", "Recall", "Precision")

    _plot_score_distributions(axes[0, 2], category)

    pro_axes = axes[1, 2]
    if "pixel_pro" in curves:
        fpr, pro = curves["pixel_pro"]
        shown = np.searchsorted(fpr, fpr_limit, side="right") + 1  # up to the first point past the limit
        pro_axes.plot(fpr[:shown], pro[:shown], color="tab:green", label=f"AUPRO {_percent(metrics['pixel_aupro'])}")
        pro_axes.fill_between(fpr[:shown], pro[:shown], where=fpr[:shown] <= fpr_limit, color="tab:green", alpha=0.15)
        pro_axes.axvline(fpr_limit, color="gray", linestyle="--", linewidth=1, label=f"FPR limit {fpr_limit:g}")
    else:
        _undefined(pro_axes, metrics["pixel_aupro"])
    _style(pro_axes, "Per-region overlap (PRO)", "False positive rate (pixels)", "Mean per-region overlap", fpr_limit)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def _percent(result: MetricResult) -> str:
    return f"{100 * result.value:.1f}%"


def _prevalence(category: CategoryResult, level: str) -> float:
    counts = category.counts
    if level == "image":
        return counts["num_anomalous_images"] / counts["num_images"]
    return counts["num_anomalous_pixels"] / (counts["num_anomalous_pixels"] + counts["num_normal_pixels"])


def _plot_score_distributions(axes, category: CategoryResult) -> None:
    labels, scores = category.image_labels, category.image_scores
    bins = np.histogram_bin_edges(scores, bins=30)
    for value, name, color in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
        selected = scores[labels == value]
        if selected.size:
            axes.hist(selected, bins=bins, alpha=0.55, color=color, label=f"{name} ({selected.size})")
    axes.set_title("Image score distribution")
    axes.set_xlabel("Image anomaly score")
    axes.set_ylabel("Images")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(loc="upper center")
    axes.grid(alpha=0.3)


def _undefined(axes, result: MetricResult) -> None:
    text = "\n".join(textwrap.wrap(f"undefined: {result.reason}", width=40))
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, fontsize=10, color="dimgray")


def _style(axes, title: str, xlabel: str, ylabel: str, x_max: float = 1.0) -> None:
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_xlim(0, x_max * 1.02)
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(loc="lower left" if "precision" in title else "lower right")
