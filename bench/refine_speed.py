"""Throughput of ``wsss refine`` at VOC size (500x375): images/s with 1 and 2 workers, scaling efficiency.

Builds a synthetic prepared dataset in a temporary folder (smooth random
images with two or three objects, CAMs that blur past the objects), then runs
the refine stage with each worker count and each CRF setting and prints a
markdown table.  Timings include the start of the worker pool, as a user sees
them.  Scaling efficiency = (images/s with N workers) / (N x images/s with 1).

    .venv/bin/python bench/refine_speed.py --images 24 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsss.stages.refine import RefineConfig, run  # noqa: E402
from wsss import artifacts  # noqa: E402
from wsss.crf import CrfParams  # noqa: E402
from wsss.datasets.prepared import SplitSpec, write_prepared  # noqa: E402

WIDTH, HEIGHT = 500, 375
CLASSES = ["background", "cat", "dog", "car"]


def make_dataset(folder: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``count`` synthetic 500x375 images, masks and CAMs; return (dataset root, CAM folder)."""
    import cv2

    rng = np.random.default_rng(seed)
    root, cam_dir = folder / "data", folder / "cams"
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    ids, labels = [], {}
    for index in range(count):
        image_id = f"img{index:04d}"
        # smooth textured background
        noise = rng.random((HEIGHT // 25, WIDTH // 25, 3)) * 255
        image = cv2.resize(noise.astype(np.float32), (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
        mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        keys, cams = [], []
        for cls in rng.choice([1, 2, 3], size=rng.integers(1, 3), replace=False):
            cy, cx = rng.uniform(80, HEIGHT - 80), rng.uniform(100, WIDTH - 100)
            ry, rx = rng.uniform(40, 90), rng.uniform(50, 120)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            image[inside] = rng.uniform(0, 255, 3)
            mask[inside] = cls
            bump = np.exp(-0.5 * (((yy - cy) / (0.8 * ry)) ** 2 + ((xx - cx) / (0.8 * rx)) ** 2))
            cam = np.clip(bump + rng.normal(0, 0.03, bump.shape), 0, None)
            keys.append(int(cls))
            cams.append(cam / cam.max())
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        artifacts.write_image(root / "images" / f"{image_id}.jpg", image)
        artifacts.write_label_png(root / "masks" / f"{image_id}.png", mask)
        order = np.argsort(keys)
        artifacts.write_cam(artifacts.cam_path(cam_dir, image_id), np.array(keys)[order], np.stack(cams)[order])
        ids.append(image_id)
        labels[image_id] = sorted(keys)
    write_prepared(root, "folder", CLASSES, {"train": (SplitSpec("images", ".jpg", "masks"), ids)}, labels)
    return root, cam_dir


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="synthetic images per run")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--crf-scale", type=float, default=1.0, help="--crf-scale of the CRF runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    worker_counts = [int(part) for part in args.workers.split(",")]

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, cam_dir = make_dataset(tmp, args.images)
        settings = {
            "GMM, no CRF": {},
            "GMM + CRF": {"crf": True, "crf_params": CrfParams(scale=args.crf_scale)},
        }
        for name, options in settings.items():
            base = None
            for workers in worker_counts:
                out = tmp / f"out_{len(results)}"
                metrics = run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=out, **options, workers=workers,
                                           overwrite=True, progress=False))
                speed = metrics["refined"] / metrics["seconds"]
                base = speed if workers == worker_counts[0] else base
                efficiency = speed / (base * workers / worker_counts[0]) if base else None
                results.append({"setting": name, "workers": workers, "images": metrics["refined"],
                                "seconds": metrics["seconds"], "images_per_second": round(speed, 3),
                                "scaling_efficiency": round(efficiency, 3) if efficiency else None})
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"refine throughput at {WIDTH}x{HEIGHT}, {args.images} images, crf scale {args.crf_scale}; "
          f"{os.cpu_count()} CPUs visible, load average {load}, python {platform.python_version()}")
    print()
    print("| setting | workers | images/s | s/image | scaling efficiency |")
    print("|---|---|---|---|---|")
    for row in results:
        print(f"| {row['setting']} | {row['workers']} | {row['images_per_second']:.2f} | "
              f"{1 / row['images_per_second']:.3f} | {row['scaling_efficiency']:.2f} |")
    report = {"width": WIDTH, "height": HEIGHT, "images": args.images, "crf_scale": args.crf_scale,
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
