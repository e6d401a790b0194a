"""Do the demo styles show the CAM behaviour they are made for?  One CAM run per style.

Per style (``wsss demo-data --style``), seed 0 (``--seed`` for another): generate the data, ``wsss prepare voc``, train the demo
recipe's classifier from scratch (its ``[train-cls]`` table: ResNet-18, output stride 8, 12 epochs, plain --
no equivariance, no erasing; ``--weights none``, one thread), ``wsss make-cam`` on train (the recipe's
``[make-cam]`` table: scales 1, 0.5, 1.5, 2 with flips) and ``wsss eval --cams`` on train with a background
threshold sweep 0.05-0.95.  Recorded: the best threshold, the mIoU there, per class IoU, precision and
recall there, their means over the foreground classes, and each step's wall time.

What each style is for (the goals ``styles.md`` checks):

* ``parts``: CAMs that cover only the discriminative part -- best threshold <= 0.3 and mean recall well
  below mean precision.
* ``context``: CAMs that spill onto the co-occurring background -- precision well below recall for the
  classes with a context (bird, boat, cow, train), not for the others (bottle, cat).
* ``voc-size``: VOC's image size (500 px); its row gives the time and threshold at that size.
* ``shapes`` (the default style): the reference (over-activation: a high best threshold).

Every run lives in its own folder ``<work>/<label>`` and resumes: a step whose output exists is not redone
(its time is read from ``times.json``).  ``--json`` keeps the rows of earlier labels (earlier generator
versions), so the table shows what each version gave.

Usage::

    .venv/bin/python bench/styles.py --work work/bench/styles --md bench/styles.md --json bench/styles.json \\
        --run shapes --run parts --run context --run voc-size

``--run NAME`` names a row of ``RUNS`` below (a style, its image counts and size, the recipe's changes);
``--label`` stores the row under another name (``"parts try 1"``: an earlier generator of the style, kept in the
table beside the current one).  Without ``--run`` the tables are only rewritten from ``--json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import REPO, run, write_tables, wsss_command

SWEEP = "0.05:0.95:0.01"
FIXED_THRESHOLDS = (0.15, 0.3, 0.5)  # IRN's CAM threshold on VOC, its confident-foreground one, the middle

# label -> (style, num_train, num_val, size or None for the style's default, train-cls overrides,
# make-cam overrides)
RUNS: dict[str, dict] = {
    "shapes": {"style": "shapes", "num_train": 200, "num_val": 60, "size": 96},  # the demo recipe's size
    "parts": {"style": "parts", "num_train": 200, "num_val": 60, "size": None},
    "context": {"style": "context", "num_train": 200, "num_val": 60, "size": None},
    # 500 px images: the recipe's 80 px crop would see a sixth of an image's side, so the crop is 256 px of the
    # image at scale 0.5-1 (VOC recipes crop 512 at 0.5-1.5), at output stride 16 (IRN's on VOC; 8 would take
    # about 3 times as long), with the per-epoch val CAM score on 10 images; make-cam at scales 0.5 and 1 with
    # flips (the recipe's 1.5 and 2 would take about 5 times as long); fewer images, to fit the time.
    "voc-size": {"style": "voc-size", "num_train": 100, "num_val": 30, "size": None,
                 "train-cls": {"crop_size": 256, "scale_range": [0.5, 1.0], "output_stride": 16,
                               "val_cam_images": 10},
                 "make-cam": {"scales": [0.5, 1.0]}},
}


def recipe_table(stage: str, overrides: dict) -> dict:
    """The demo recipe's table of ``stage`` with ``overrides`` (from scratch for train-cls)."""
    from wsss.stages.pipeline import Recipe, find_recipe

    table = dict(Recipe.load(find_recipe("demo")).stages[stage])
    if stage == "train-cls":
        table["weights"] = "none"
    return {**table, **overrides}


def train_cls_command(config: Path, root: Path, out: Path, seed: int = 0) -> list[str]:
    """``wsss train-cls`` from scratch on train (val for the per-epoch scores), one thread."""
    return [wsss_command(), "-q", "train-cls", "--config", str(config), "--root", str(root), "--out", str(out),
            "--split", "train", "--val-split", "val", "--weights", "none", "--threads", "1", "--workers", "0",
            "--seed", str(seed)]


def make_cam_command(config: Path, root: Path, checkpoint: Path, out: Path) -> list[str]:
    """``wsss make-cam`` of the train split, one thread, without its own evaluation."""
    return [wsss_command(), "-q", "make-cam", "--config", str(config), "--root", str(root), "--checkpoint",
            str(checkpoint), "--out", str(out), "--split", "train", "--threads", "1", "--workers", "0", "--no-eval"]


def eval_cams_command(cams: Path, root: Path, out: Path) -> list[str]:
    """``wsss eval --cams`` on train with the background-threshold sweep, its report in ``out``."""
    return [wsss_command(), "-q", "eval", "--cams", str(cams), "--root", str(root), "--split", "train", "--sweep",
            SWEEP, "--workers", "1", "--out", str(out)]


def timed(step: str, command: list[str], done: Path, folder: Path, times: dict) -> None:
    """Run ``command`` unless ``done`` exists; keep its wall time in ``times[step]`` (and ``times.json``)."""
    if done.exists() and step in times:
        return
    times[step] = round(run(command, folder / "logs" / f"{step}.log"), 1)
    (folder / "times.json").write_text(json.dumps(times, indent=1))


def seed_label(name: str, seed: int) -> str:
    """A run's label (and folder): the ``RUNS`` name for seed 0, ``"<name> seed <seed>"`` for another seed."""
    return name if seed == 0 else f"{name} seed {seed}"


def one_run(label: str, spec: dict, work: Path, seed: int = 0) -> dict:
    """Generate, prepare, train, make CAMs and score them for one row (data and training seeded with
    ``seed``); return the row."""
    from wsss import artifacts

    wsss = wsss_command()
    folder = work / label
    folder.mkdir(parents=True, exist_ok=True)
    times_file = folder / "times.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    root = folder / "data" / "VOC2012"
    size = [] if spec["size"] is None else ["--size", str(spec["size"])]
    demo = [wsss, "-q", "demo-data", str(folder / "data"), "--style", spec["style"], "--num-train",
            str(spec["num_train"]), "--num-val", str(spec["num_val"]), "--seed", str(seed), *size]
    timed("demo-data", demo, root / "demo.json", folder, times)
    timed("prepare", [wsss, "-q", "prepare", "voc", "--root", str(root)], root / "wsss" / "prepare_voc.json", folder,
          times)
    settings = {}
    for stage in ("train-cls", "make-cam"):
        settings[stage] = folder / f"{stage}.json"
        artifacts.write_json(settings[stage], recipe_table(stage, spec.get(stage, {})))
    cls = folder / "cls"
    timed("train-cls", train_cls_command(settings["train-cls"], root, cls, seed), cls / "metrics.json", folder, times)
    cams = folder / "cams"
    timed("make-cam", make_cam_command(settings["make-cam"], root, cls / "last.pth", cams), cams / "metrics.json",
          folder, times)
    report_file = folder / "eval_train.json"
    timed("eval", eval_cams_command(cams, root, report_file), report_file, folder, times)
    result = row(label, spec, json.loads(report_file.read_text()), json.loads((root / "demo.json").read_text()), times)
    result["at_threshold"] = at_thresholds(root, cams, result["per_class"])
    return result


def at_thresholds(root: Path, cams: Path, classes: dict) -> dict[str, dict]:
    """mIoU and the mean precision and recall over ``classes`` at each of FIXED_THRESHOLDS."""
    from wsss import evaluation
    from wsss.datasets.prepared import PreparedDataset

    dataset = PreparedDataset.load(root, "voc")
    thresholds, matrices = evaluation.evaluate_cams(dataset, "train", cams, FIXED_THRESHOLDS, workers=1,
                                                    progress=False)
    indices = [dataset.classes.index(name) for name in classes]
    result = {}
    for threshold, matrix in zip(thresholds, matrices):
        result[f"{threshold:.2f}"] = {"miou": round(matrix.miou(), 4),
                                      "mean_precision": round(float(matrix.precision()[indices].mean()), 4),
                                      "mean_recall": round(float(matrix.recall()[indices].mean()), 4)}
    return result


def row(label: str, spec: dict, report: dict, manifest: dict, times: dict) -> dict:
    """The JSON row of one run: the best threshold, per class IoU/precision/recall there, their means, times."""
    classes = {name: values for name, values in report["summary"]["per_class"].items()
               if name != "background" and name in manifest["classes"]}
    mean = {key: round(sum(values[key] for values in classes.values()) / len(classes), 4)
            for key in ("iou", "precision", "recall")}
    return {"label": label, "style": manifest["style"], "generator_version": manifest["version"],
            "size": manifest["size"], "num_train": manifest["num_train"], "num_val": manifest["num_val"],
            "train_cls_overrides": spec.get("train-cls", {}), "make_cam_overrides": spec.get("make-cam", {}),
            "best_threshold": report["best_threshold"], "miou": report["miou"],
            "background_iou": report["summary"]["per_class"]["background"]["iou"],
            "mean_precision": mean["precision"], "mean_recall": mean["recall"], "mean_class_iou": mean["iou"],
            "per_class": classes, "seconds": times}


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


STYLE_ORDER = ("shapes", "parts", "context", "voc-size")


def markdown(rows: dict[str, dict]) -> str:
    """The tables of ``styles.md``: one summary line per run (a style's earlier tries before it), then each run's
    classes."""
    order = sorted(rows, key=lambda label: (STYLE_ORDER.index(rows[label]["style"]), "try" not in label, label))
    rows = {label: rows[label] for label in order}
    lines = ["| run | style | images (train/val) | size | best threshold | mIoU | mean class IoU | "
             "mean precision | mean recall | seconds: data / train-cls / make-cam / eval |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for result in rows.values():
        seconds = result["seconds"]
        lines.append(
            f"| {result['label']} | {result['style']} | "
            f"{result['num_train']}/{result['num_val']} | {result['size']} | {result['best_threshold']:.2f} | "
            f"{pct(result['miou'])} | {pct(result['mean_class_iou'])} | {pct(result['mean_precision'])} | "
            f"{pct(result['mean_recall'])} | {seconds.get('demo-data', 0) + seconds.get('prepare', 0):.0f} / "
            f"{seconds.get('train-cls', 0):.0f} / {seconds.get('make-cam', 0):.0f} / {seconds.get('eval', 0):.0f} |")
    lines += ["", "Mean precision / recall over the classes (%) and mIoU at fixed thresholds:", "",
              "| run | " + " | ".join(f"at {threshold:.2f}" for threshold in FIXED_THRESHOLDS) + " |",
              "|---|" + "---|" * len(FIXED_THRESHOLDS)]
    for result in rows.values():
        cells = [result.get("at_threshold", {}).get(f"{threshold:.2f}") for threshold in FIXED_THRESHOLDS]
        lines.append(f"| {result['label']} | " + " | ".join(
            "–" if cell is None else f"{pct(cell['mean_precision'])} / {pct(cell['mean_recall'])}, mIoU "
            f"{pct(cell['miou'])}" for cell in cells) + " |")
    notes = [f"- {result['label']}: {result['note']}" for result in rows.values() if result.get("note")]
    if notes:
        lines += ["", "What each try of a style drew:", "", *notes]
    lines += ["", "Per class at each run's best threshold (IoU / precision / recall, %):", ""]
    for result in rows.values():
        lines += [f"**{result['label']}** (background IoU {pct(result['background_iou'])})", "",
                  "| class | IoU | precision | recall |", "|---|---|---|---|"]
        lines += [f"| {name} | {pct(values['iou'])} | {pct(values['precision'])} | {pct(values['recall'])} |"
                  for name, values in result["per_class"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "work" / "bench" / "styles")
    parser.add_argument("--run", action="append", choices=sorted(RUNS), default=[],
                        help="a row of RUNS to run (or resume); none: only write --md from --json")
    parser.add_argument("--seed", type=int, default=0, help="the data's and the training's seed")
    parser.add_argument("--label", help="store the (single) run's row under this label (an earlier version's)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "styles.json")
    parser.add_argument("--md", type=Path, help="write the tables here (between the markers of an existing file)")
    args = parser.parse_args()
    rows = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for name in args.run:
        label = args.label or seed_label(name, args.seed)
        note = rows.get(label, {}).get("note")
        rows[label] = one_run(label, RUNS[name], args.work.resolve(), args.seed)
        if note:
            rows[label]["note"] = note
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(markdown({label: rows[label]}), flush=True)
    if args.md:
        write_tables(args.md, markdown(rows))


if __name__ == "__main__":
    main()
