"""Segmentation quality on the demo data: CAMs -> pseudo-labels -> DeepLab (with and without RAW)
against the fully supervised upper bound, and the weak/full ratio.

Runs the whole pipeline through the ``wsss`` command line, one step after the
other, and writes ``bench/seg_quality.md`` (the table and the exact commands)
and ``bench/seg_quality.json``.  Every mIoU in the table comes from
``wsss eval`` reports (``metrics_eval_<split>.json``), so CAMs, pseudo-labels
and predictions are scored by the same code.

Usage (from the repository root; the work folder holds data and outputs)::

    .venv/bin/python bench/seg_quality.py --work /tmp/seg_quality [--fresh]

The settings are CPU-demo sized (ResNet-18, no ImageNet weights, 64-px
images); each training run takes a few minutes on one CPU thread.  Steps
whose outputs exist are skipped by the stages themselves (resume), so an
interrupted benchmark can be restarted; ``--fresh`` deletes the work folder first.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WSSS = str(Path(sys.executable).parent / "wsss")

# Shared by every train-seg run: only --labels / --raw differ between them.
SEG_TRAINING = ["--model", "deeplabv3_resnet18", "--weights-backbone", "none", "--crop-size", "64",
                "--batch-size", "8", "--iterations", "400", "--lr", "0.05", "--head-lr-mult", "1",
                "--eval-every", "100", "--log-every", "50"]
PREDICT = ["--scales", "0.75,1.0,1.25", "--flip"]


def steps(device: str) -> list[tuple[str, list[str]]]:
    """The benchmark as (name, wsss arguments), in order; paths are relative to the work folder."""
    root = "demo/VOC2012"
    common = ["--device", device, "--workers", "0"]
    plan = [
        ("demo-data", ["demo-data", "demo"]),
        ("prepare", ["prepare", "voc", "--root", root, "--workers", "1"]),
        ("train-cls", ["train-cls", "--root", root, "--out", "cls", "--backbone", "resnet18", "--weights", "none",
                       "--crop-size", "64", "--batch-size", "8", "--epochs", "20", "--lr", "0.05",
                       "--val-cam-images", "20", *common]),
        ("make-cam", ["make-cam", "--root", root, "--split", "train", "--checkpoint", "cls", "--out", "cams",
                      "--scales", "1.0,0.5,1.5", *common]),
        ("eval-cams", ["eval", "--root", root, "--split", "train", "--cams", "cams", "--workers", "1"]),
        ("refine", ["refine", "--root", root, "--split", "train", "--cams", "cams", "--out", "pseudo", "--crf",
                    "--workers", "1"]),
        ("eval-pseudo", ["eval", "--root", root, "--split", "train", "--pred", "pseudo", "--workers", "1"]),
        ("train-seg-gt", ["train-seg", "--root", root, "--labels", "gt", "--out", "seg_gt", *SEG_TRAINING, *common]),
        ("train-seg-pseudo", ["train-seg", "--root", root, "--labels", "pseudo", "--out", "seg_pseudo",
                              "--upper-bound", "seg_gt", *SEG_TRAINING, *common]),
        ("train-seg-raw", ["train-seg", "--root", root, "--labels", "pseudo", "--raw", "--out", "seg_raw",
                           "--upper-bound", "seg_gt", *SEG_TRAINING, *common]),
    ]
    for run in ("gt", "pseudo", "raw"):
        for crf in (False, True):
            name = f"pred_{run}" + ("_crf" if crf else "")
            plan.append((f"predict-{run}" + ("-crf" if crf else ""),
                         ["predict", "--root", root, "--split", "val", "--checkpoint", f"seg_{run}/last.pth",
                          "--out", name, *PREDICT, *(["--crf"] if crf else []), *common]))
            plan.append((f"eval-{name}", ["eval", "--root", root, "--split", "val", "--pred", name, "--workers", "1"]))
    return plan


def run_steps(work: Path, device: str, threads: int) -> dict[str, float]:
    """Run every step in ``work``; return wall seconds per step.  Logs go to ``work/logs/<step>.log``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    seconds = {}
    for name, arguments in steps(device):
        if name == "demo-data" and (work / "demo" / "VOC2012").is_dir():
            continue
        print(f"[seg_quality] wsss {shlex.join(arguments)}", flush=True)
        started = time.perf_counter()
        with open(work / "logs" / f"{name}.log", "w") as log:
            result = subprocess.run([WSSS, *arguments], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        seconds[name] = round(time.perf_counter() - started, 1)
        if result.returncode != 0:
            sys.exit(f"step {name} failed (exit {result.returncode}); see {work / 'logs' / (name + '.log')}")
    return seconds


def _miou(path: Path) -> float:
    return float(json.loads(path.read_text())["miou"])


def collect(work: Path) -> dict:
    """Read the eval reports and train-seg metrics into one dict."""
    report = {
        "cam_train": _miou(work / "cams" / "metrics_eval_train.json"),
        "pseudo_train": _miou(work / "pseudo" / "metrics_eval_train.json"),
        "runs": {},
    }
    for run in ("gt", "pseudo", "raw"):
        metrics = json.loads((work / f"seg_{run}" / "metrics.json").read_text())
        report["runs"][run] = {
            "train_seg_val": metrics["val_miou"],
            "predict_val": _miou(work / f"pred_{run}" / "metrics_eval_val.json"),
            "predict_crf_val": _miou(work / f"pred_{run}_crf" / "metrics_eval_val.json"),
            "weak_full_ratio": metrics.get("weak_full_ratio"),
            "train_seconds": metrics["seconds"],
        }
    full = report["runs"]["gt"]
    for run in ("pseudo", "raw"):
        entry = report["runs"][run]
        entry["weak_full_predict"] = entry["predict_val"] / full["predict_val"]
        entry["weak_full_predict_crf"] = entry["predict_crf_val"] / full["predict_crf_val"]
    return report


def markdown(report: dict, seconds: dict[str, float], device: str, threads: int) -> str:
    runs = report["runs"]
    pct = lambda value: f"{100 * value:.1f}"
    ratio = lambda value: "–" if value is None else f"{value:.2f}"
    lines = [
        "# Segmentation quality on the demo data (`bench/seg_quality.py`)",
        "",
        f"Demo dataset (40 train / 20 val synthetic images, 64 px, 6 classes + background), device `{device}`, "
        f"{threads} CPU thread(s). mIoU in %, every value from a `wsss eval` report.",
        "",
        "| stage | split | mIoU | weak/full |",
        "|---|---|---|---|",
        f"| CAMs (best background threshold of the sweep) | train | {pct(report['cam_train'])} | |",
        f"| pseudo-labels (GMM threshold + CRF, 255 counted as background) | train | {pct(report['pseudo_train'])} | |",
    ]
    names = {"pseudo": "DeepLab on pseudo-labels", "raw": "DeepLab on pseudo-labels + RAW",
             "gt": "DeepLab on ground truth (upper bound)"}
    for run in ("pseudo", "raw", "gt"):
        entry = runs[run]
        lines += [
            f"| {names[run]}: train-seg validation (1 scale) | val | {pct(entry['train_seg_val'])} | "
            f"{ratio(entry['weak_full_ratio']) if run != 'gt' else '1'} |",
            f"| {names[run]}: predict, scales 0.75/1/1.25 + flip | val | {pct(entry['predict_val'])} | "
            f"{ratio(entry.get('weak_full_predict')) if run != 'gt' else '1'} |",
            f"| {names[run]}: predict + dense CRF | val | {pct(entry['predict_crf_val'])} | "
            f"{ratio(entry.get('weak_full_predict_crf')) if run != 'gt' else '1'} |",
        ]
    lines += ["", "weak/full = mIoU(DeepLab trained on pseudo-labels) / mIoU(DeepLab trained on ground truth), "
              "same model, schedule and evaluation; the train-seg column is what `metrics.json` records via "
              "`--upper-bound`.", "", "Commands (run in the work folder, `OMP_NUM_THREADS=" + str(threads) + "`):", "",
              "```sh"]
    for name, arguments in steps(device):
        took = f"  # {seconds[name]} s" if name in seconds else ""
        lines.append(f"wsss {shlex.join(arguments)}{took}")
    lines += ["```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Work folder for data and outputs.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every step.")
    parser.add_argument("--fresh", action="store_true", help="Delete the work folder first.")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "seg_quality.md", help="Markdown report.")
    args = parser.parse_args()
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    seconds = run_steps(args.work, args.device, args.threads)
    report = collect(args.work)
    report["seconds"] = seconds
    text = markdown(report, seconds, args.device, args.threads)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
