"""CAM quality on the demo data: plain CAM vs +equivariance (ER) vs +adversarial erasing vs both.

Protocol (the field's: CAM mIoU on the *train* split at the best background
threshold): generate the synthetic demo dataset, train four ResNet-18
classifiers from scratch (``--weights none``) that differ only in the
regularisers, compute multi-scale + flip CAMs of the train split with
``wsss make-cam --eval`` (sweep 0.05..0.95 step 0.01), and also with
inference-time erasing (``--erase-steps 1``).  Every step runs the ``wsss``
command line in a subprocess with ``OMP_NUM_THREADS=1``; the commands are
printed with the table.

Usage::

    .venv/bin/python bench/cam_quality.py --work /tmp/wsss_cam_quality

Use a fresh ``--work`` folder for a clean run: finished stages are resumed, not redone.
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

VARIANTS = {
    "plain": [],
    "+ER": ["--er-weight", "{er_weight}", "--er-scale-range", "{er_scale_range}"],
    "+erasing": ["--erase-weight", "{erase_weight}", "--erase-thresh", "{erase_thresh}"],
    "+both": ["--er-weight", "{er_weight}", "--er-scale-range", "{er_scale_range}",
              "--erase-weight", "{erase_weight}", "--erase-thresh", "{erase_thresh}"],
    # the ER view cut from a random window (a translation as well), see the README
    "+ER-window": ["--er-weight", "{er_weight}", "--er-scale-range", "0.75,1.25", "--er-min-crop", "0.6"],
}


def wsss_executable() -> str:
    candidate = Path(sys.executable).parent / "wsss"
    return str(candidate) if candidate.is_file() else "wsss"


def run(command: list[str], log: list[dict]) -> float:
    """Run one ``wsss`` command (quiet, one thread); return its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(f"failed: {shlex.join(command)}")
    log.append({"command": command, "seconds": round(seconds, 1)})
    print(f"[{seconds:6.1f} s] {shlex.join(command)}", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--num-train", type=int, default=100)
    parser.add_argument("--num-val", type=int, default=20)
    parser.add_argument("--size", type=int, default=96, help="demo image long side")
    parser.add_argument("--crop-size", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--er-weight", default="1.0")
    parser.add_argument("--er-scale-range", default="0.5,0.75")
    parser.add_argument("--erase-weight", default="1.0")
    parser.add_argument("--erase-thresh", default="0.7")
    parser.add_argument("--infer-erase-thresh", default="0.5")
    parser.add_argument("--sweep", default="0.05:0.95:0.01",
                        help="background thresholds; wider than eval's default because CAMs of small from-scratch "
                             "networks over-activate and peak above 0.6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="wsss_cam_quality_"))
    wsss = wsss_executable()
    log: list[dict] = []
    root = work / "demo" / "VOC2012"
    if not (root / "wsss" / "dataset.json").is_file():
        run([wsss, "-q", "demo-data", str(work / "demo"), "--num-train", str(args.num_train), "--num-val",
             str(args.num_val), "--size", str(args.size), "--seed", str(args.seed)], log)
        run([wsss, "-q", "prepare", "voc", "--root", str(root)], log)
    values = {"er_weight": args.er_weight, "er_scale_range": args.er_scale_range, "erase_weight": args.erase_weight,
              "erase_thresh": args.erase_thresh}
    rows = []
    for name in args.variants.split(","):
        folder = work / name.replace("+", "plus_")
        extra = [part.format(**values) for part in VARIANTS[name]]
        run([wsss, "-q", "train-cls", "--root", str(root), "--out", str(folder / "cls"),
                             "--backbone", "resnet18", "--weights", "none", "--crop-size", str(args.crop_size),
                             "--scale-range", "0.7,1.3", "--batch-size", str(args.batch_size), "--epochs",
                             str(args.epochs), "--lr", str(args.lr), "--val-cam-images", str(args.num_val),
                             "--device", "cpu", "--workers", "0", "--seed", str(args.seed), *extra], log)
        train_metrics = json.loads((folder / "cls" / "metrics.json").read_text())
        last = train_metrics["history"][-1]
        # the training time of the run itself (a resumed, finished run returns at once)
        row = {"variant": name, "train_seconds": train_metrics["seconds"], "val_map": last.get("val_map"),
               "val_cam_miou": last.get("val_cam_miou")}
        for steps in (0, 1):
            cam_dir = folder / ("cams" if steps == 0 else "cams_erase1")
            run([wsss, "-q", "make-cam", "--root", str(root), "--split", "train", "--checkpoint",
                 str(folder / "cls" / "last.pth"), "--out", str(cam_dir), "--erase-steps", str(steps),
                 "--erase-thresh", args.infer_erase_thresh, "--eval", "--sweep", args.sweep, "--device", "cpu",
                 "--workers", "0"], log)
            cam_metrics = json.loads((cam_dir / "metrics.json").read_text())
            key = "train_cam" if steps == 0 else "train_cam_erase1"
            row[f"{key}_miou"] = cam_metrics["eval"]["miou"]
            row[f"{key}_threshold"] = cam_metrics["eval"]["best_threshold"]
        rows.append(row)

    print()
    print(f"demo data: {args.num_train} train / {args.num_val} val images, long side {args.size}; ResNet-18 from "
          f"scratch, crop {args.crop_size}, batch {args.batch_size}, {args.epochs} epochs, lr {args.lr}, "
          f"seed {args.seed}; CAMs: scales 1.0,0.5,1.5,2.0 + flip; mIoU on train at the best threshold")
    print()
    print("| training | CAM mIoU (train) | best thr. | + make-cam --erase-steps 1 | best thr. | val mAP | "
          "val CAM mIoU @0.15 | train time |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {100 * row['train_cam_miou']:.1f} | {row['train_cam_threshold']:.2f} | "
              f"{100 * row['train_cam_erase1_miou']:.1f} | {row['train_cam_erase1_threshold']:.2f} | "
              f"{row['val_map']:.3f} | {100 * row['val_cam_miou']:.1f} | {row['train_seconds']:.0f} s |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "commands": log, "args": vars(args)}, indent=2, default=str))


if __name__ == "__main__":
    main()
