"""Peak memory of ``wsss refine --random-walk`` on VOC-sized (500x375) images: bounded, not growing with the count.

Writes a folder dataset of synthetic 500x375 images with blob-shaped CAMs, an (untrained)
affinity network checkpoint of the chosen backbone, and runs ``wsss refine --random-walk ...
--crf`` in a fresh process for each image count.  Each process's peak resident set size is read
with ``getrusage(RUSAGE_CHILDREN)`` in a wrapper process (the maximum over the command and its pool
workers), and printed beside the memory the dense transition matrix of AffinityNet/IRN would
need for one such image (``N^2`` float32, N = cells of the stride-8 grid).

Usage::

    .venv/bin/python bench/random_walk_memory.py --counts 4,16 --backbone resnet50 --json bench/random_walk_memory.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsss import artifacts  # noqa: E402
from wsss.datasets.prepared import SplitSpec, write_prepared  # noqa: E402
from wsss.models.affinity import AffinityNet  # noqa: E402

WIDTH, HEIGHT = 500, 375
CLASSES = ["background", "cat", "dog", "car"]

WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def write_data(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    labels = {}
    for index in range(count):
        image_id = f"img{index:03d}"
        image = rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        keys = sorted(rng.choice([1, 2, 3], size=rng.integers(1, 3), replace=False).tolist())
        cams = []
        for _ in keys:
            cy, cx, radius = rng.integers(80, 300), rng.integers(80, 420), rng.integers(40, 120)
            cams.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * radius ** 2)))
        artifacts.write_image(root / "images" / f"{image_id}.jpg", image)
        artifacts.write_cam(root / "cams" / f"{image_id}.npz", np.array(keys), np.stack(cams).astype(np.float32))
        labels[image_id] = keys
    write_prepared(root, "folder", CLASSES, {"train": (SplitSpec(image_dir="images", image_ext=".jpg"),
                                                       sorted(labels))}, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="4,16", help="image counts to compare")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wsss_rw_memory_"))
    torch.manual_seed(0)
    net = AffinityNet(args.backbone, "none")
    artifacts.save_checkpoint(work / "aff" / "last.pth", {
        "model": net.state_dict(), "config": {}, "classes": CLASSES,
        "arch": {"kind": "affinity", "backbone": args.backbone, "embed_dim": net.embed_dim, "radius": 5,
                 "stride": 8}})
    cells = math.ceil(HEIGHT / 8) * math.ceil(WIDTH / 8)
    dense_mb = cells * cells * 4 / 2**20
    wsss = str(Path(sys.executable).parent / "wsss")
    rows = []
    for count in (int(part) for part in args.counts.split(",")):
        root = work / f"data_{count}"
        write_data(root, count)
        command = [sys.executable, "-c", WRAPPER, wsss, "-q", "refine", "--root", str(root), "--cams",
                   str(root / "cams"), "--out", str(root / "pseudo"), "--random-walk", str(work / "aff"),
                   "--threshold", "fixed", "--crf", "--workers", str(args.workers), "--device", "cpu"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise SystemExit(done.stdout + done.stderr)
        seconds = time.perf_counter() - started
        peak_mb = int(done.stdout.strip().splitlines()[-1]) / 1024
        rows.append({"images": count, "peak_rss_mb": round(peak_mb, 1), "seconds": round(seconds, 1),
                     "seconds_per_image": round(seconds / count, 2)})
        print(f"{count} images: peak RSS {peak_mb:.0f} MB, {seconds:.1f} s", flush=True)
    print(f"\n500x375 images, {args.backbone} affinity network, CPU, --crf, {args.workers} refine workers; "
          f"stride-8 grid of {cells} cells, dense transition matrix {dense_mb:.0f} MB per image (not built here)")
    print("| images | peak RSS (MB) | seconds | s/image |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['images']} | {row['peak_rss_mb']} | {row['seconds']} | {row['seconds_per_image']} |")
    if args.json:
        args.json.write_text(json.dumps({"backbone": args.backbone, "cells": cells, "dense_matrix_mb": dense_mb,
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
