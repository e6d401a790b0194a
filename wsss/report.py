"""A run's report: per-stage mIoU, per-class IoU, training curves and a gallery, as Markdown + PNGs.

A run folder (what ``run_pipeline.sh`` writes) holds one folder per stage, named by
:data:`wsss.artifacts.RUN_LAYOUT`::

    <run>/cls     train-cls       metrics.json with the per-epoch history
    <run>/cams    make-cam        metrics_eval_<split>.json (CAM threshold sweep)
    <run>/pseudo  refine          metrics_eval_<split>.json (pseudo-label mIoU)
    <run>/seg     train-seg       metrics.json with the per-iteration history
    <run>/pred    predict         metrics_eval_<split>.json (segmentation mIoU)

Missing folders are skipped, so a partial run still gets a report.  A JSON file of the wrong
shape (a list where an object belongs, a score that is not a number) is a one-line error naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsss import artifacts
from wsss.artifacts import RUN_LAYOUT
from wsss.datasets.prepared import PreparedDataset
from wsss.errors import WsssError
from wsss.visualize import cam_heatmap, colorize_label, grid, labelled_tile

# (stage of RUN_LAYOUT, title, what its mIoU measures) in pipeline order
STAGES = (
    ("cams", "CAM", "best background threshold"),
    ("pseudo", "pseudo-labels", "refine output, 255 counted as background"),
    ("pred", "DeepLab", "predictions of the trained segmentation model"),
)


@dataclass
class StageResult:
    """The evaluation of one stage's output."""

    folder: str
    title: str
    split: str
    miou: float | None
    per_class: dict[str, dict] = field(default_factory=dict)
    note: str = ""


def _eval_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("metrics_eval_*.json"))


# history entries the training curves plot (besides loss*)
_PLOTTED = ("round", "step", "val_map", "val_cam_miou", "val_miou")


def _is_score(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _entry(data: dict, key: str, kind: type | tuple, path: Path, default=None):
    """``data[key]`` when it is of ``kind`` (or absent/null: ``default``); otherwise a WsssError naming the file."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise WsssError(f"{path}: {key!r} is {type(value).__name__} {value!r}, not a "
                        f"{'number' if kind == (int, float) else getattr(kind, '__name__', kind)}")
    return value


def collect_results(run_dir: Path) -> list[StageResult]:
    """Read the evaluation JSON of every stage folder present in ``run_dir``."""
    results = []
    for stage, title, note in STAGES:
        for path in _eval_files(RUN_LAYOUT.folder(run_dir, stage)):
            data = artifacts.read_json(path, expect=dict)
            threshold = _entry(data, "best_threshold", (int, float), path)
            extra = f" (threshold {threshold:.2f})" if threshold is not None else ""
            per_class = _entry(_entry(data, "summary", dict, path, {}), "per_class", dict, path, {})
            if not all(isinstance(scores, dict) and _is_score(scores.get("iou")) for scores in per_class.values()):
                raise WsssError(f"{path}: summary.per_class must map class names to {{'iou': number}} objects")
            results.append(StageResult(folder=getattr(RUN_LAYOUT, stage), title=title,
                                       split=str(_entry(data, "split", str, path, "?")),
                                       miou=_entry(data, "miou", (int, float), path), per_class=per_class,
                                       note=note + extra))
    return results


def _history(run_dir: Path, stage: str) -> list[dict]:
    path = artifacts.metrics_path(RUN_LAYOUT.folder(run_dir, stage))
    if not path.is_file():
        return []
    history = _entry(artifacts.read_json(path, expect=dict), "history", list, path, [])
    if not all(isinstance(record, dict) and all(_is_score(value) for key, value in record.items()
                                                if key in _PLOTTED or key.startswith("loss"))
               for record in history):
        raise WsssError(f"{path}: 'history' must be a list of objects whose step, loss and val_* entries are numbers")
    return history


def plot_stage_miou(results: list[StageResult], path: Path) -> None:
    """Bar chart of mIoU per stage."""
    import matplotlib.pyplot as plt

    labels = [f"{result.title}\n({result.split})" for result in results]
    values = [100 * (result.miou or 0.0) for result in results]
    figure, axis = plt.subplots(figsize=(1.8 + 1.6 * len(results), 3.6))
    bars = axis.bar(labels, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(results)])
    axis.bar_label(bars, fmt="%.1f")
    axis.set_ylabel("mIoU (%)")
    axis.set_ylim(0, 100)
    axis.set_title("mIoU per stage")
    _save(figure, path)


def plot_per_class(results: list[StageResult], path: Path) -> None:
    """Grouped bars: IoU of every class for every stage."""
    import matplotlib.pyplot as plt

    classes = sorted({name for result in results for name in result.per_class},
                     key=lambda name: next(i for r in results for i, n in enumerate(r.per_class) if n == name))
    width = 0.8 / max(1, len(results))
    figure, axis = plt.subplots(figsize=(max(6.0, 0.6 * len(classes) * max(1, len(results)) + 2), 3.8))
    positions = np.arange(len(classes))
    for index, result in enumerate(results):
        values = [100 * ((result.per_class.get(name) or {}).get("iou") or 0.0) for name in classes]
        axis.bar(positions + index * width, values, width, label=f"{result.title} ({result.split})")
    axis.set_xticks(positions + width * (len(results) - 1) / 2, classes, rotation=30, ha="right")
    axis.set_ylabel("IoU (%)")
    axis.set_ylim(0, 100)
    axis.legend(fontsize=8)
    axis.set_title("IoU per class")
    _save(figure, path)


def plot_curves(cls_history: list[dict], seg_history: list[dict], path: Path) -> bool:
    """Training curves: classifier loss terms, mAP and CAM mIoU per epoch; DeepLab loss and val mIoU.

    Returns False (and writes nothing) when there is no history at all.
    """
    import matplotlib.pyplot as plt

    if not cls_history and not seg_history:
        return False
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    cls_history = [record for record in cls_history if "round" in record]  # one record per epoch
    epochs = [record["round"] for record in cls_history]
    for key in sorted({key for record in cls_history for key in record if key.startswith("loss")}):
        axes[0].plot(epochs, [record.get(key) for record in cls_history], marker="o",
                     label="total" if key == "loss" else key[5:])
    axes[0].set(title="train-cls loss", xlabel="epoch")
    for key, label in (("val_map", "val mAP"), ("val_cam_miou", "val CAM mIoU")):
        values = [record.get(key) for record in cls_history]
        if any(value is not None for value in values):
            axes[1].plot(epochs, values, marker="o", label=label)
    axes[1].set(title="train-cls validation", xlabel="epoch", ylim=(0, 1))
    losses = [(record["step"], record["loss"]) for record in seg_history if "loss" in record]
    mious = [(record["step"], record["val_miou"]) for record in seg_history if record.get("val_miou") is not None]
    if losses:
        axes[2].plot(*zip(*losses), label="loss")
    if mious:
        twin = axes[2].twinx()
        twin.plot(*zip(*mious), marker="o", color="#c44e52", label="val mIoU")
        twin.set(ylim=(0, 1), ylabel="val mIoU")
        twin.legend(loc="upper right", fontsize=8)
    axes[2].set(title="train-seg", xlabel="iteration", ylabel="loss")
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8, loc="upper left" if axis is axes[2] else "best")
    _save(figure, path)
    return True


def _stage_config(run_dir: Path, stage: str) -> dict | None:
    path = artifacts.config_path(RUN_LAYOUT.folder(run_dir, stage))
    return _entry(artifacts.read_json(path, expect=dict), "config", dict, path) if path.is_file() else None


def gallery(run_dir: Path, rows: int = 6, tile_height: int = 128) -> tuple[list[str], np.ndarray | None]:
    """A picture of ``rows`` images: image | CAM heatmap | pseudo-label | prediction | ground truth.

    Images come from the split the CAMs were made for; the prediction column uses
    ``<run>/pred_<split>/`` (or ``<run>/pred/`` when it was made for that split).  Nothing is
    written, so a bad file found here leaves no half-made report.

    Returns:
        ``(ids shown, RGB uint8 picture)``; ``([], None)`` when there are no CAMs to show.
    """
    config = _stage_config(run_dir, "cams")
    if config is None:
        return [], None
    cam_config_file = artifacts.config_path(RUN_LAYOUT.folder(run_dir, "cams"))
    if not isinstance(config.get("root"), str) or not isinstance(config.get("split"), str):
        raise WsssError(f"{cam_config_file}: config has no 'root' and 'split' strings")
    dataset = PreparedDataset.load(config["root"], config.get("dataset"))
    split = config["split"]
    cam_dir, pseudo_dir = RUN_LAYOUT.folder(run_dir, "cams"), RUN_LAYOUT.folder(run_dir, "pseudo")
    pred_config = _stage_config(run_dir, "pred")
    pred_dir = RUN_LAYOUT.pred_folder(run_dir, split)
    if not pred_dir.is_dir() and pred_config is not None and pred_config.get("split") == split:
        pred_dir = RUN_LAYOUT.pred_folder(run_dir)
    ids = [image_id for image_id in dataset.ids(split) if artifacts.cam_path(cam_dir, image_id).is_file()]
    # spread the picks over the split so that the gallery is not just the first few images
    picks = [ids[round(i * (len(ids) - 1) / max(1, rows - 1))] for i in range(min(rows, len(ids)))] if ids else []
    picture_rows = []
    for image_id in dict.fromkeys(picks):
        image = dataset.read_image(split, image_id)
        keys, cams = artifacts.read_cam(artifacts.cam_path(cam_dir, image_id), num_classes=dataset.num_classes)
        names = ", ".join(dataset.classes[key] for key in keys)
        tiles = [labelled_tile(image, image_id, tile_height), labelled_tile(cam_heatmap(image, cams), f"CAM {names}", tile_height)]
        for caption, file in (("pseudo-label", artifacts.label_path(pseudo_dir, image_id)),
                              ("prediction", artifacts.label_path(pred_dir, image_id))):
            if file.is_file():
                tiles.append(labelled_tile(colorize_label(artifacts.read_label_png(file, dataset.num_classes)), caption,
                                           tile_height))
            else:
                tiles.append(labelled_tile(np.full_like(image, 255), f"no {caption}", tile_height))
        truth = colorize_label(dataset.read_mask(split, image_id)) if dataset.has_masks(split) else np.full_like(image, 255)
        tiles.append(labelled_tile(truth, "ground truth", tile_height))
        picture_rows.append(tiles)
    return list(dict.fromkeys(picks)), grid(picture_rows) if picture_rows else None


def _save(figure, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    with artifacts.atomic_write(path) as handle:
        handle.write(buffer.getvalue())


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def write_report(run_dir: str | Path, gallery_rows: int = 6) -> dict:
    """Write ``<run>/report.md`` and its figures under ``<run>/report/``; return a summary dict."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise WsssError(f"{run_dir}: run folder not found")
    figures = RUN_LAYOUT.report_figures  # relative to report.md, for the Markdown links
    report_file, figures_dir = run_dir / RUN_LAYOUT.report_file, run_dir / figures
    if report_file.is_dir():
        raise WsssError(f"{report_file}: is a folder; the report is written there as a file (move the folder away)")
    if figures_dir.exists() and not figures_dir.is_dir():
        raise WsssError(f"{figures_dir}: is a file; the report's figures go into a folder of that name")
    results = collect_results(run_dir)
    if not results:
        raise WsssError(f"{run_dir}: no stage evaluation found (expected <stage>/metrics_eval_<split>.json "
                        "from make-cam --eval, wsss eval --pred)")
    # everything is read and checked before anything is written
    histories = {stage: _history(run_dir, stage) for stage in ("cls", "seg")}
    seg_metrics_path = artifacts.metrics_path(RUN_LAYOUT.folder(run_dir, "seg"))
    seg_metrics = artifacts.read_json(seg_metrics_path, expect=dict) if seg_metrics_path.is_file() else {}
    ratio = _entry(seg_metrics, "weak_full_ratio", (int, float), seg_metrics_path)
    shown, picture = gallery(run_dir, rows=gallery_rows)
    figures_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# wsss run report: {run_dir.name}", ""]
    lines += ["## mIoU per stage", "", "| stage | split | mIoU (%) | note |", "|---|---|---|---|"]
    lines += [f"| {r.title} | {r.split} | {_fmt(r.miou)} | {r.note} |" for r in results]
    if ratio is not None:
        lines += ["", f"weak/full ratio (DeepLab on pseudo-labels / on ground truth): {ratio:.3f}"]
    plot_stage_miou(results, figures_dir / "stage_miou.png")
    plot_per_class(results, figures_dir / "per_class_iou.png")
    lines += ["", f"![mIoU per stage]({figures}/stage_miou.png)", "", "## IoU per class", "",
              f"![IoU per class]({figures}/per_class_iou.png)", ""]
    classes = list(dict.fromkeys(name for r in results for name in r.per_class))
    lines += ["| class | " + " | ".join(f"{r.title} ({r.split})" for r in results) + " |",
              "|---|" + "---|" * len(results)]
    lines += [f"| {name} | " + " | ".join(_fmt((r.per_class.get(name) or {}).get("iou")) for r in results) + " |"
              for name in classes]
    if plot_curves(histories["cls"], histories["seg"], figures_dir / "curves.png"):
        lines += ["", "## Training curves", "", f"![training curves]({figures}/curves.png)"]
    if picture is not None:
        artifacts.write_image(figures_dir / "gallery.png", picture)
        lines += ["", "## Gallery", "", "image | CAM heatmap | pseudo-label | prediction | ground truth", "",
                  f"![gallery]({figures}/gallery.png)"]
    with artifacts.atomic_write(report_file, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return {"stages": [{"stage": r.title, "split": r.split, "miou": r.miou} for r in results],
            "gallery": shown, "report": str(report_file)}
