"""Which GMM threshold settings and which DeepLab output stride serve the pipeline?  On the ablation's CAMs.

Runs on the finished *plain* runs of ``bench/ablation.py`` (same ``--work`` folder; run that first): their
CAMs (``run/cams``), classifier (``run/cls/last.pth``) and data are read, nothing of them is changed.

* Pseudo-labels (train, 255 counted as background): ``wsss refine --crf`` with the pooled GMM per class or
  over classes (``--gmm-per-class`` / ``--gmm-overall``), with and without the 255 band of unsure pixels
  (``--confidence 0.9`` / ``0``), and fixed thresholds 0.4-0.7 + CRF as references picked afterwards with
  the ground truth.  Every option is spelled out, so the figures do not move when a default does.
* DeepLab (pretrained trunk; the ablation's recipe: ResNet-18, 80 px crops, batch 8, 500 iterations,
  lr 0.05, RAW, started from the classifier's trunk): val mIoU at one scale (train-seg's figure) and with
  the pipeline's predict (scales 0.75/1/1.25 + flip + CRF), on the labels of the GMM over classes (with and
  without the band), and at output stride 8 on the ablation's labels, with the ground-truth DeepLab at
  stride 8 for weak/full.  The ablation's own DeepLab (per class, 255 band, stride 16) is read from its run.

Writes ``bench/threshold_choice.md`` and ``.json``.

Usage::

    .venv/bin/python bench/threshold_choice.py --work work/bench --seeds 0,1,2 --jobs 2
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import (finished, fmt, in_parallel, label_miou, per_seed, predict_and_score, quality_arguments, read_json,
                     refine_and_score, run, wsss_command)

TRUNKS = {"scratch": "from scratch", "pretrained": "pretrained (rotation)"}
REFINE = {
    "per class, 255 band (the ablation's)": ["--gmm-per-class", "--confidence", "0.9"],
    "per class, no band": ["--gmm-per-class", "--confidence", "0"],
    "over classes, 255 band": ["--gmm-overall", "--confidence", "0.9"],
    "over classes, no band": ["--gmm-overall", "--confidence", "0"],
    **{f"fixed {t:.1f} (gt-picked reference)": ["--threshold", "fixed", "--bg-thresh", f"{t:.2f}"]
       for t in (0.4, 0.5, 0.6, 0.7)},
}
# DeepLab settings: (labels: a REFINE name, "ablation" for the ablation's own pseudo-labels, or "gt"; options)
SEG = {
    "ablation's labels, stride 16 (the ablation's run)": ("ablation", None),
    "over classes, 255 band, stride 16": ("over classes, 255 band", []),
    "over classes, no band, stride 16": ("over classes, no band", []),
    "ablation's labels, stride 8": ("ablation", ["--output-stride", "8"]),
    "ground truth, stride 16 (the ablation's run)": ("gt", None),
    "ground truth, stride 8": ("gt", ["--output-stride", "8"]),
}
# weak/full (+ CRF): the weak DeepLab against the ground-truth one of the same stride
RATIOS = {"stride 16": ("ablation's labels, stride 16 (the ablation's run)",
                        "ground truth, stride 16 (the ablation's run)"),
          "stride 8": ("ablation's labels, stride 8", "ground truth, stride 8")}
SEG_RECIPE = ["--model", "deeplabv3_resnet18", "--crop-size", "80", "--batch-size", "8", "--iterations", "500",
              "--lr", "0.05", "--head-lr-mult", "1", "--eval-every", "250", "--workers", "0", "--threads", "1"]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def source(work: Path, trunk: str, seed: int) -> Path:
    path = work / "ablation" / f"plain_{trunk}" / f"seed{seed}"
    if not (path / "run" / "seg" / "metrics.json").is_file():
        raise SystemExit(f"{path}: no finished ablation run; run bench/ablation.py first")
    return path


def refine(work: Path, trunk: str, seed: int, name: str) -> float:
    out = work / "threshold_choice" / trunk / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "cams").exists():
        (out / "cams").symlink_to((source(work, trunk, seed) / "run" / "cams").resolve())
    return refine_and_score(out, source(work, trunk, seed) / "data" / "VOC2012", slug(name), "--crf", *REFINE[name])


def deeplab(work: Path, trunk: str, seed: int, name: str) -> tuple[float, float]:
    """(val mIoU at one scale, val mIoU with scales + flip + CRF) of one DeepLab setting."""
    src = source(work, trunk, seed)
    root = src / "data" / "VOC2012"
    labels, options = SEG[name]
    if options is None:  # the ablation's own runs (its ground-truth DeepLab is shared by the variants)
        seg = work / "ablation" / f"gt_{trunk}" / f"seed{seed}" if labels == "gt" else src / "run" / "seg"
        predicted = seg / "bench_pred_crf" if labels == "gt" else seg.parent / "bench_pred_crf"
        return read_json(seg / "metrics.json")["val_miou"], label_miou(predicted, "val")
    out = work / "threshold_choice" / trunk / f"seed{seed}" / f"seg_{slug(name)}"
    if labels == "gt":
        label_options = ["--labels", "gt"]
    else:
        if labels != "ablation":
            refine(work, trunk, seed, labels)  # queued before every DeepLab task: normally only read here
        folder = src / "run" / "pseudo" if labels == "ablation" else out.parent / slug(labels)
        label_options = ["--labels", str(folder), "--raw"]
    if not finished(out / "seg" / "metrics.json"):
        run([wsss_command(), "-q", "train-seg", "--root", str(root), "--split", "train", "--val-split", "val",
             *label_options, "--out", str(out / "seg"), "--weights", str(src / "run" / "cls" / "last.pth"),
             "--seed", str(seed), *SEG_RECIPE, *options], out / "train_seg.log")
    one_scale = read_json(out / "seg" / "metrics.json")["val_miou"]
    return one_scale, predict_and_score(out / "seg" / "last.pth", root, out / "pred_crf", "--crf")


def main() -> None:
    parser = quality_arguments(__doc__.split("\n")[0], "threshold_choice.md")
    parser.add_argument("--seg-trunks", default="pretrained", help="trunks whose DeepLab settings are trained")
    args = parser.parse_args()
    seeds, work = args.seeds, args.work
    refine_keys = [(trunk, seed, name) for trunk in TRUNKS for seed in seeds for name in REFINE]
    # the label folders the DeepLab settings read are made first (the refine tasks are the first in the queue)
    seg_keys = [(trunk, seed, name) for trunk in args.seg_trunks.split(",") for seed in seeds for name in SEG]
    results = in_parallel([lambda key=key: refine(work, *key) for key in refine_keys] +
                          [lambda key=key: deeplab(work, *key) for key in seg_keys], args.jobs)
    pseudo = dict(zip(refine_keys, results[:len(refine_keys)]))
    seg = dict(zip(seg_keys, results[len(refine_keys):]))
    lines = ["# GMM threshold settings and DeepLab output stride, on the ablation's plain runs", "",
             (f"Seeds {', '.join(map(str, seeds))}; mIoU %, mean ± sample std over seeds (per seed in brackets). "
              "`bench/threshold_choice.py`, see its docstring for the protocol."), "",
             "Pseudo-labels (train, + CRF, 255 counted as background):", "",
             "| refine setting | " + " | ".join(TRUNKS.values()) + " |", "|---|" + "---|" * len(TRUNKS)]
    for name in REFINE:
        cells = [f"{fmt([pseudo[(t, s, name)] for s in seeds])} ({per_seed([pseudo[(t, s, name)] for s in seeds])})"
                 for t in TRUNKS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for trunk in args.seg_trunks.split(","):
        lines += ["", f"DeepLab val, {TRUNKS[trunk]} trunk:", "",
                  "| DeepLab setting | 1 scale | scales + flip + CRF |", "|---|---|---|"]
        for name in SEG:
            one = [seg[(trunk, s, name)][0] for s in seeds]
            crf = [seg[(trunk, s, name)][1] for s in seeds]
            lines.append(f"| {name} | {fmt(one)} ({per_seed(one)}) | {fmt(crf)} ({per_seed(crf)}) |")
        lines.append("")
        for stride, (weak, full) in RATIOS.items():
            ratios = [seg[(trunk, s, weak)][1] / seg[(trunk, s, full)][1] for s in seeds]
            lines.append(f"- weak/full at {stride} (+ CRF): {fmt(ratios, scale=1, digits=2)} "
                         f"({' / '.join(f'{r:.2f}' for r in ratios)})")
    args.md.write_text("\n".join(lines) + "\n")
    args.md.with_suffix(".json").write_text(json.dumps({
        "seeds": seeds, "refine": REFINE,
        "seg": {name: {"labels": labels, "options": options} for name, (labels, options) in SEG.items()},
        "pseudo": [{"trunk": t, "seed": s, "setting": n, "miou": v} for (t, s, n), v in pseudo.items()],
        "deeplab": [{"trunk": t, "seed": s, "setting": n, "val_1scale": v[0], "val_crf": v[1]}
                    for (t, s, n), v in seg.items()]}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
