"""Pseudo-label quality on the demo data: fixed threshold vs GMM, CRF off vs on, with the CAM mIoU for reference.

Protocol (the field's: pseudo-label and CAM mIoU on the *train* split against
its ground-truth masks): generate the synthetic demo dataset, train a ResNet-18
classifier from scratch (``--weights none``), compute multi-scale + flip CAMs of
the train split, then run ``wsss refine --eval`` with each setting.  Every step
runs the ``wsss`` command line in a subprocess (``OMP_NUM_THREADS=1``); the
commands are printed with the table.  ``--cams DIR --root DIR`` skips the first
steps and refines existing CAMs.

Columns: mIoU with 255 counted as background (comparable with the CAM row),
mIoU and pixel precision on the labelled pixels only, the share of labelled
ground-truth pixels marked 255, the median threshold and the GMM fallbacks.

Usage::

    .venv/bin/python bench/refine_quality.py --work /tmp/wsss_refine_quality
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> extra `wsss refine` options ({oracle} = the CAM's best sweep threshold)
VARIANTS = {
    "fixed 0.20": ["--threshold", "fixed", "--bg-thresh", "0.20"],
    "fixed 0.20 + CRF": ["--threshold", "fixed", "--bg-thresh", "0.20", "--crf"],
    "fixed oracle": ["--threshold", "fixed", "--bg-thresh", "{oracle}"],
    "fixed oracle + CRF": ["--threshold", "fixed", "--bg-thresh", "{oracle}", "--crf"],
    "GMM pooled per class, 255 band (earlier default), no CRF": ["--threshold", "gmm", "--gmm-per-class",
                                                                 "--confidence", "0.9"],
    "GMM pooled per class, 255 band (earlier default) + CRF": ["--threshold", "gmm", "--gmm-per-class",
                                                               "--confidence", "0.9", "--crf"],
    "GMM pooled per class, no 255 band + CRF": ["--threshold", "gmm", "--gmm-per-class", "--confidence", "0", "--crf"],
    "GMM pooled over classes, 255 band + CRF": ["--threshold", "gmm", "--gmm-overall", "--confidence", "0.9",
                                                "--crf"],
    "GMM pooled over classes, no 255 band (default), no CRF": ["--threshold", "gmm", "--gmm-overall",
                                                               "--confidence", "0"],
    "GMM pooled over classes, no 255 band (default) + CRF": ["--threshold", "gmm", "--gmm-overall",
                                                             "--confidence", "0", "--crf"],
    "GMM per image, 3 components, 255 band + CRF": ["--threshold", "gmm-image", "--gmm-overall", "--confidence",
                                                    "0.9", "--crf"],
    "GMM per image, 2 components, 255 band (the first default) + CRF": [
        "--threshold", "gmm-image", "--gmm-overall", "--gmm-components", "2", "--confidence", "0.9", "--crf"],
    "IRN confident 0.05/0.30 + CRF": ["--threshold", "fixed", "--bg-thresh", "0.05", "--fg-thresh", "0.30", "--crf"],
}


def wsss_executable() -> str:
    candidate = Path(sys.executable).parent / "wsss"
    return str(candidate) if candidate.is_file() else "wsss"


def run(command: list[str], log: list[dict]) -> float:
    """Run one ``wsss`` command (one BLAS thread per process); return its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(f"failed: {shlex.join(command)}")
    # the record names the command, not where this machine keeps its environment
    log.append({"command": ["wsss", *command[1:]], "seconds": round(seconds, 1)})
    print(f"[{seconds:6.1f} s] {shlex.join(command)}", flush=True)
    return seconds


def build_cams(args, work: Path, wsss: str, log: list[dict]) -> tuple[Path, Path]:
    """Demo data -> classifier -> CAMs of the train split; finished steps are resumed."""
    root = work / "demo" / "VOC2012"
    if not (root / "wsss" / "dataset.json").is_file():
        run([wsss, "-q", "demo-data", str(work / "demo"), "--num-train", str(args.num_train), "--num-val",
             str(args.num_val), "--size", str(args.size), "--seed", str(args.seed)], log)
        run([wsss, "-q", "prepare", "voc", "--root", str(root)], log)
    cls_dir, cam_dir = work / "cls", work / "cams"
    if not (cls_dir / "last.pth").is_file():
        run([wsss, "-q", "train-cls", "--root", str(root), "--out", str(cls_dir), "--backbone", "resnet18",
             "--weights", "none", "--crop-size", str(args.crop_size), "--scale-range", "0.7,1.3", "--batch-size",
             str(args.batch_size), "--epochs", str(args.epochs), "--lr", str(args.lr), "--val-cam-images", "0",
             "--device", "cpu", "--workers", "0", "--seed", str(args.seed)], log)
    run([wsss, "-q", "make-cam", "--root", str(root), "--split", "train", "--checkpoint", str(cls_dir / "last.pth"),
         "--out", str(cam_dir), "--device", "cpu", "--workers", "0"], log)
    return root, cam_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--cams", type=Path, default=None, help="refine these CAMs instead of making new ones")
    parser.add_argument("--root", type=Path, default=None, help="prepared dataset root of --cams")
    parser.add_argument("--num-train", type=int, default=100)
    parser.add_argument("--num-val", type=int, default=20)
    parser.add_argument("--size", type=int, default=96, help="demo image long side")
    parser.add_argument("--crop-size", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--sweep", default="0.05:0.95:0.01",
                        help="CAM background thresholds; wider than eval's default because CAMs of small "
                             "from-scratch networks over-activate and peak above 0.6")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=";".join(VARIANTS), help="semicolon-separated names")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="wsss_refine_quality_"))
    wsss = wsss_executable()
    log: list[dict] = []
    if args.cams is not None:
        if args.root is None:
            raise SystemExit("--cams needs --root")
        root, cam_dir = args.root, args.cams
    else:
        root, cam_dir = build_cams(args, work, wsss, log)

    # the CAM reference: the sweep's best threshold (oracle) and the literature's 0.20
    cam_report = work / "cam_eval.json"
    run([wsss, "-q", "eval", "--cams", str(cam_dir), "--root", str(root), "--split", "train", "--sweep", args.sweep,
         "--out", str(cam_report), "--workers", str(args.workers)], log)
    cam_eval = json.loads(cam_report.read_text())
    oracle = cam_eval["best_threshold"]
    at_020 = min(cam_eval["sweep"], key=lambda entry: abs(entry["threshold"] - 0.20))
    rows = [{"setting": f"CAM, best threshold {oracle:.2f} (oracle)", "miou": cam_eval["miou"]},
            {"setting": f"CAM, threshold {at_020['threshold']:.2f}", "miou": at_020["miou"]}]

    for name in args.variants.split(";"):
        extra = [part.format(oracle=f"{oracle:.2f}") for part in VARIANTS[name]]
        out = work / "pseudo" / name.replace(" ", "_").replace("/", "-").replace(",", "").replace("+", "plus")
        seconds = run([wsss, "-q", "refine", "--cams", str(cam_dir), "--root", str(root), "--split", "train", "--out",
                       str(out), "--eval", "--overwrite", "--workers", str(args.workers), "--seed", str(args.seed),
                       *extra], log)
        metrics = json.loads((out / "metrics.json").read_text())
        report = metrics["eval"]
        rows.append({"setting": name, "miou": report["miou"], "miou_labelled": report["miou_labelled"],
                     "precision_labelled": report["precision_labelled"], "ignore_share": report["ignore_share"],
                     "threshold_median": metrics["threshold"].get("median"),
                     "fallbacks": f"{metrics['fallbacks']['total']}/{metrics['threshold']['fits']}"
                     if metrics["threshold"]["fits"] else "-", "seconds": round(seconds, 1)})

    num_images = len((Path(root) / "wsss" / "train.txt").read_text().split())
    print()
    print(f"train split, {num_images} images; CAMs from {cam_dir}; refine with --workers {args.workers}, "
          f"--seed {args.seed}; mIoU in %")
    print()
    print("| setting | mIoU (255 = bg) | mIoU labelled | precision labelled | 255 share | median ξ | fallbacks |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        def pct(key):
            return f"{100 * row[key]:.1f}" if row.get(key) is not None else "-"
        median = f"{row['threshold_median']:.3f}" if row.get("threshold_median") is not None else "-"
        print(f"| {row['setting']} | {pct('miou')} | {pct('miou_labelled')} | {pct('precision_labelled')} | "
              f"{pct('ignore_share')} | {median} | {row.get('fallbacks', '-')} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "commands": log, "args": vars(args)}, indent=2, default=str))


if __name__ == "__main__":
    main()
