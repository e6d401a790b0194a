"""Speed of ``wsss make-cam`` against a straightforward one-view-at-a-time loop, on CPU.

Both compute the same CAMs (ResNet-50, scales 1.0, 0.5, 1.5, 2.0, each with its
horizontal flip, ReLU, summed at full resolution, max-normalised, written as
``.npz``) for the same 500x375 images, in the same process, alternating rounds:

* **loop**: for every image, scale and flip one forward pass of batch 1 under
  ``torch.no_grad``; all 20 class maps brought to full resolution, the present
  classes picked afterwards (the shape of most reference CAM scripts);
* **make-cam**: ``stages.make_cam.run`` (flip in the same batch as the image,
  BatchNorm folded into the convolutions, channels-last memory, only the present
  classes resampled, ``torch.inference_mode``).

The timed span of both is image reading to CAM file written; model building is
excluded.  The CAM files of both are compared at the end.

Usage::

    .venv/bin/python bench/make_cam_speed.py --images 3 --rounds 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.make_cam import MakeCamConfig, run  # noqa: E402
from wsss import artifacts  # noqa: E402
from wsss.cam import DEFAULT_SCALES, feature_to_image, max_normalize, resize_images  # noqa: E402
from wsss.classes import builtin_classes  # noqa: E402
from wsss.datasets.prepared import PreparedDataset, SplitSpec, write_prepared  # noqa: E402
from wsss.models.classifier import CamNet, load_classifier  # noqa: E402
from wsss.transforms import normalize_image  # noqa: E402

HEIGHT, WIDTH = 375, 500


def make_dataset(root: Path, count: int) -> None:
    """``count`` 500x375 JPEGs of smooth random texture with 1-3 random VOC labels each."""
    rng = np.random.default_rng(0)
    labels = {}
    for index in range(count):
        coarse = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
        artifacts.write_image(root / "images" / f"img{index:03d}.jpg", image)
        present = rng.choice(np.arange(1, 21), size=rng.integers(1, 4), replace=False)
        labels[f"img{index:03d}"] = sorted(present.tolist())
    spec = SplitSpec(image_dir="images", image_ext=".jpg")
    write_prepared(root, "folder", builtin_classes("voc"), {"train": (spec, sorted(labels))}, labels)


def loop_cams(model: CamNet, dataset: PreparedDataset, out: Path, scales) -> float:
    """The straightforward loop; returns images/s."""
    ids = dataset.ids("train")
    start = time.perf_counter()
    with torch.no_grad():
        for image_id in ids:
            image = normalize_image(dataset.read_image("train", image_id))[None]
            size = tuple(image.shape[-2:])
            total = torch.zeros(model.num_classes - 1, *size)
            for scale in scales:
                scaled = resize_images(image, scale)
                for flipped in (False, True):
                    maps = torch.relu(model.class_maps(scaled.flip(-1) if flipped else scaled))
                    total += feature_to_image(maps, size, tuple(scaled.shape[-2:]), 16, flipped)[0]
            keys = np.asarray(dataset.image_labels(image_id))
            cams = max_normalize(total[keys - 1])
            artifacts.write_cam(artifacts.cam_path(out, image_id), keys, cams.numpy())
    return len(ids) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the bench machine is shared)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "data", args.images)
        dataset = PreparedDataset.load(tmp / "data")
        net = CamNet("resnet50", num_classes=21).eval()
        checkpoint = tmp / "cls.pth"
        artifacts.save_checkpoint(checkpoint, {"model": net.state_dict(), "config": {}, "classes": dataset.classes,
                                               "arch": net.arch})
        model = load_classifier(artifacts.load_checkpoint(checkpoint), str(checkpoint))
        results = {"loop": [], "make-cam": []}
        for round_index in range(args.rounds):
            results["loop"].append(loop_cams(model, dataset, tmp / "loop", DEFAULT_SCALES))
            metrics = run(MakeCamConfig(root=tmp / "data", checkpoint=checkpoint, out_dir=tmp / "stage",
                                        scales=DEFAULT_SCALES, device="cpu", workers=0, overwrite=True))
            results["make-cam"].append(metrics["images_per_second"])
            print(f"round {round_index + 1}: loop {results['loop'][-1]:.4f} images/s, "
                  f"make-cam {results['make-cam'][-1]:.4f} images/s", flush=True)
        difference = 0.0
        for image_id in dataset.ids("train"):
            keys_a, cams_a = artifacts.read_cam(artifacts.cam_path(tmp / "loop", image_id))
            keys_b, cams_b = artifacts.read_cam(artifacts.cam_path(tmp / "stage", image_id))
            assert keys_a.tolist() == keys_b.tolist()
            difference = max(difference, float(np.abs(cams_a - cams_b).max()))
    loop, stage = np.mean(results["loop"]), np.mean(results["make-cam"])
    print()
    print(f"ResNet-50, {args.images} images of {WIDTH}x{HEIGHT}, scales {','.join(map(str, DEFAULT_SCALES))} + flip, "
          f"CPU, {args.threads} thread(s), {args.rounds} alternating rounds")
    print()
    print("| method | images/s (mean) | s/image | rounds |")
    print("|---|---|---|---|")
    for name, value in (("one-view-at-a-time loop", loop), ("wsss make-cam", stage)):
        rounds = ", ".join(f"{v:.4f}" for v in results["loop" if name.startswith("one") else "make-cam"])
        print(f"| {name} | {value:.4f} | {1 / value:.2f} | {rounds} |")
    print()
    print(f"speed-up x{stage / loop:.2f}; max |CAM difference| between the two: {difference:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "speedup": stage / loop, "max_difference": difference,
                                         "threads": args.threads, "images": args.images}, indent=2))


if __name__ == "__main__":
    main()
