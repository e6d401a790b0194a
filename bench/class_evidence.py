"""Does the classifier look at the object?  Per class: what removing the object does to its logit.

For each class of a pipeline run's CAM classifier (``run/cls/last.pth``) on its prepared dataset:

* **logit drop**: the class logit of a train image minus the logit of the same image with that class's
  ground-truth region (and its 1 px 255 band, dilated by one pixel) inpainted away (OpenCV Telea), mean
  over the train images holding the class.  A classifier that recognises the object loses its evidence;
  one that learned the class from the scenes it appears in keeps it.  The CAM of such a class can only
  light the context, so no threshold, CRF or DeepLab after it can find the object.
* **AP** (image-level, train and val) of the network on the whole image.
* **colour-histogram probe AP** (val): a logistic regression on a 16 x 4 x 4 HSV histogram of the whole
  image, trained on the train split -- how separable the class is with no spatial model at all.
* **pseudo-label IoU** of the class (train, the run's ``pseudo`` folder, when it was scored).

Usage::

    .venv/bin/python bench/class_evidence.py --md bench/class_evidence.md \\
        --runs "from scratch, plain=work/bench/ablation/plain_scratch/seed{0,1,2}" \\
        --runs "from scratch, default=work/bench/ablation/ER_erasing_without_RAW_scratch/seed{0,1,2}"

(``{0,1,2}`` is expanded here into the seeds' run folders, written by ``bench/ablation.py``.)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import cv2
import numpy as np
import torch

from harness import fmt

from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset
from wsss.metrics import average_precision
from wsss.models.classifier import load_classifier
from wsss.transforms import normalize_image

HIST_BINS = (16, 4, 4)


def expand(pattern: str) -> list[Path]:
    """``a/seed{0,1,2}`` -> [a/seed0, a/seed1, a/seed2]."""
    match = re.search(r"\{([^}]*)\}", pattern)
    if not match:
        return [Path(pattern)]
    return [Path(pattern[:match.start()] + part + pattern[match.end():]) for part in match.group(1).split(",")]


def logits_of(net, images: list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return np.stack([net(normalize_image(image)[None])[0].float().numpy() for image in images])


def without(image: np.ndarray, mask: np.ndarray, index: int) -> np.ndarray:
    """The image with class ``index``'s region (and the ignore band) inpainted."""
    region = ((mask == index) | (mask == artifacts.IGNORE_INDEX)).astype(np.uint8)
    region = cv2.dilate(region, np.ones((3, 3), np.uint8))
    return cv2.inpaint(image, region, 5, cv2.INPAINT_TELEA)


def colour_histogram(image: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL).reshape(-1, 3)
    counts = np.histogramdd(hsv, bins=HIST_BINS, range=((0, 256),) * 3)[0].ravel()
    return np.log1p(counts)


def probe_ap(dataset: PreparedDataset, classes: list[int]) -> dict[int, float]:
    """Val AP of a per-class logistic regression on colour histograms (fitted on train)."""
    from sklearn.linear_model import LogisticRegression

    def features(split):
        ids = dataset.ids(split)
        x = np.stack([colour_histogram(dataset.read_image(split, i)) for i in ids])
        return x, np.stack([dataset.multi_hot(i) for i in ids])

    x_train, y_train = features("train")
    x_val, y_val = features("val")
    out = {}
    for index in classes:
        probe = LogisticRegression(max_iter=5000).fit(x_train, y_train[:, index - 1])
        out[index] = float(average_precision(probe.decision_function(x_val)[:, None], y_val[:, index - 1:index])[0])
    return out


def measure(run: Path) -> dict:
    dataset = PreparedDataset.load(run / "data" / "VOC2012")
    net = load_classifier(artifacts.load_checkpoint(run / "run" / "cls" / "last.pth"))
    classes = sorted({c for i in dataset.ids("train") for c in dataset.image_labels(i)})
    result = {"classes": {dataset.classes[c]: {} for c in classes}}
    for split in ("train", "val"):
        ids = dataset.ids(split)
        images = [dataset.read_image(split, i) for i in ids]
        logits = logits_of(net, images)
        targets = np.stack([dataset.multi_hot(i) for i in ids])
        ap = average_precision(logits, targets)
        for c in classes:
            result["classes"][dataset.classes[c]][f"ap_{split}"] = float(ap[c - 1])
        if split != "train":
            continue
        for c in classes:
            drops = []
            for row, (image_id, image) in enumerate(zip(ids, images)):
                if c in dataset.image_labels(image_id):
                    erased = without(image, dataset.read_mask(split, image_id, image.shape[:2]), c)
                    drops.append(float(logits[row, c - 1] - logits_of(net, [erased])[0, c - 1]))
            result["classes"][dataset.classes[c]]["logit_drop"] = float(np.mean(drops))
    pseudo = run / "run" / "pseudo" / "metrics_eval_train.json"
    if pseudo.is_file():
        per_class = json.loads(pseudo.read_text())["summary"]["per_class"]
        for c in classes:
            result["classes"][dataset.classes[c]]["pseudo_iou"] = per_class[dataset.classes[c]]["iou"]
    for c, value in probe_ap(dataset, classes).items():
        result["classes"][dataset.classes[c]]["probe_ap_val"] = value
    return result


def table(groups: dict[str, list[dict]]) -> list[str]:
    lines = ["| runs | class | logit drop (object removed) | AP train | AP val | colour-histogram probe AP val "
             "| pseudo-label IoU |", "|---|---|---|---|---|---|---|"]
    for name, results in groups.items():
        for cls in results[0]["classes"]:
            def col(key, scale=100.0, digits=1):
                return fmt([r["classes"][cls].get(key) for r in results], scale, digits)
            lines.append(f"| {name} | {cls} | {col('logit_drop', 1.0, 2)} | {col('ap_train')} | {col('ap_val')} "
                         f"| {col('probe_ap_val')} | {col('pseudo_iou')} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", action="append", required=True,
                        help='"NAME=RUN_DIR_PATTERN" (a pipeline --out folder; {a,b} expands), repeatable')
    parser.add_argument("--md", type=Path, default=Path(__file__).with_name("class_evidence.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    groups = {}
    for spec in args.runs:
        name, _, pattern = spec.partition("=")
        runs = expand(pattern)
        missing = [str(r) for r in runs if not (r / "run" / "cls" / "last.pth").is_file()]
        if missing:
            parser.error(f"--runs {name}: no run/cls/last.pth under {', '.join(missing)}")
        groups[name] = [measure(run) for run in runs]
        print(f"{name}: {len(runs)} runs measured", flush=True)
    lines = ["# Does the classifier look at the object? (`class_evidence.py`)", "",
             "Mean ± sample std over the runs (seeds) of each row; AP and IoU in %; the logit drop in logit units. "
             "See the script's docstring for the protocol.", "", *table(groups), ""]
    args.md.write_text("\n".join(lines))
    args.md.with_suffix(".json").write_text(json.dumps(groups, indent=1, allow_nan=False) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
