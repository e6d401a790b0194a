"""Label-free signals for the background threshold, tried against the masks' choice (issue 37).

The pooled GMM's threshold suits CAMs that cover their objects and loses where they cover a part
(``partial_cams.md``).  A rule that adapts the threshold must tell the two apart without masks.  For
the plain CAMs of a ``bench/styles.py`` run, over fixed thresholds 0.10-0.80, this computes per
threshold:

* **CRF growth**: foreground pixels after the dense CRF / before it.  The CRF moves a region's border
  to colour edges; at the threshold where it neither grows nor shrinks the foreground (growth 1) the
  thresholded region would already agree with the image.
* **Border contrast**: the mean colour gradient (Sobel in CIELAB) on the border of the thresholded
  region, before the CRF: a border on object edges has a high contrast.
* the mIoU after the CRF, from the masks (scoring only: it says which threshold each signal should pick).

Usage::

    .venv/bin/python bench/threshold_signals.py --style parts --style shapes --images 60 --md bench/threshold_signals.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from harness import REPO, write_tables

THRESHOLDS = np.round(np.arange(0.10, 0.81, 0.05), 2)


def signals(folder: Path, count: int) -> list[dict]:
    """Per threshold: CRF growth, border contrast and mIoU after the CRF on the first ``count`` train images."""
    import cv2

    from wsss import artifacts
    from wsss.crf import CrfParams
    from wsss.datasets.prepared import PreparedDataset
    from wsss.metrics import ConfusionMatrix
    from wsss.refine import label_from_thresholds

    dataset = PreparedDataset.load(folder / "data" / "VOC2012", "voc")
    crf = CrfParams()  # the recipe's CRF: the demo's [refine] table sets none of its kernels
    kernel = np.ones((3, 3), np.uint8)
    sums = {t: {"before": 0, "after": 0, "contrast": 0.0, "border": 0} for t in THRESHOLDS}
    matrices = {t: ConfusionMatrix(dataset.num_classes) for t in THRESHOLDS}
    for image_id in dataset.ids("train")[:count]:
        image = dataset.read_image("train", image_id)
        truth = dataset.read_mask("train", image_id)
        keys, cams = artifacts.read_cam(folder / "cams" / f"{image_id}.npz")
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
        gradient = np.sqrt(sum(cv2.Sobel(lab[..., c], cv2.CV_32F, 1, 0) ** 2 + cv2.Sobel(lab[..., c], cv2.CV_32F, 0, 1)
                               ** 2 for c in range(3)))
        classes = np.concatenate([[0], keys])
        for t in THRESHOLDS:
            thresholds = np.full(len(keys), t, np.float32)
            before = label_from_thresholds(cams, thresholds)
            after = label_from_thresholds(cams, thresholds, image=image, crf=crf)
            border = cv2.morphologyEx(before.astype(np.uint8), cv2.MORPH_GRADIENT, kernel) > 0
            found = sums[t]
            found["before"] += int((before > 0).sum())
            found["after"] += int((after > 0).sum())
            found["contrast"] += float(gradient[border].sum())
            found["border"] += int(border.sum())
            matrices[t].update(truth, classes[after])
    return [{"threshold": float(t), "growth": sums[t]["after"] / max(sums[t]["before"], 1),
             "contrast": sums[t]["contrast"] / max(sums[t]["border"], 1), "miou": matrices[t].miou()}
            for t in THRESHOLDS]


def markdown(rows: dict[str, list[dict]]) -> str:
    lines = []
    for style, found in rows.items():
        best = max(found, key=lambda row: row["miou"])
        fixed_point = min(found, key=lambda row: abs(row["growth"] - 1))
        sharpest = max(found, key=lambda row: row["contrast"])
        lines += [f"### {style}", "",
                  f"Best after the CRF (masks): {best['threshold']:.2f} ({100 * best['miou']:.1f}); growth nearest 1: "
                  f"{fixed_point['threshold']:.2f} ({100 * fixed_point['miou']:.1f}); highest border contrast: "
                  f"{sharpest['threshold']:.2f} ({100 * sharpest['miou']:.1f}).", "",
                  "| threshold | CRF growth | border contrast | mIoU after the CRF |", "|---|---|---|---|"]
        lines += [f"| {row['threshold']:.2f} | {row['growth']:.2f} | {row['contrast']:.1f} | {100 * row['miou']:.1f} |"
                  for row in found]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--styles-work", type=Path, default=REPO / "work" / "bench" / "styles")
    parser.add_argument("--style", action="append", default=[], help="a bench/styles.py run (its folder name)")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "threshold_signals.json")
    parser.add_argument("--md", type=Path, help="write the tables here (between the markers of an existing file)")
    args = parser.parse_args()
    rows = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for style in args.style:
        rows[style] = signals(args.styles_work / style, args.images)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    tables = markdown(rows)
    print(tables)
    if args.md:
        write_tables(args.md, tables)


if __name__ == "__main__":
    main()
