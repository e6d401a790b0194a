"""Throughput of train-cls, train-seg, make-cam and predict against plain PyTorch loops, same run, same device.

For every stage the bench times the wsss stage (its ``run`` function, in this process) and a
plain loop of the same model and settings written below with torch/torchvision/OpenCV only
(no wsss import): read the images, augment or resize, forward (+ backward), write the outputs.
Images/s and the ratio stage / plain loop are printed as a Markdown table and written as JSON.

* On a GPU the plain loops run twice, in float32 and in bfloat16 autocast with channels-last
  memory; the stage runs with its defaults (``--amp auto`` = bf16).  Goal: stage >= 0.8 of the
  plain bf16 loop.
* On the CPU the plain loop runs in float32 and the stage with its defaults (``--amp auto`` =
  float32 there).  Goal: stage >= 0.9 of the plain loop.

The plain loops are plain training and inference: no equivariance branch, no erasing.  So the
stages run with those methods off too (``--er-weight 0`` for train-cls, ``--erase-steps 0`` for
make-cam), and the ratio measures what the engine costs or saves on the same work.
``--methods on`` times the stages with those methods on instead (train-cls's equivariance view at
``--er-weight 0.3``, make-cam's inference-time erasing step, ``--erase-steps 1``; both are off by
default since ``ablation.md``): what the methods cost, not a like-for-like ratio.

Each measurement runs once untimed for warm-up work that only the first call pays (cuDNN
autotuning, allocator growth) only where ``--warmup`` is given; stage and plain loop alternate over
``--rounds`` and the median images/s is reported.

Usage::

    .venv/bin/python bench/throughput.py --device cpu --images 16 --size 160 --backbone resnet18 \\
        --threads 2 --rounds 2 --json bench/throughput_cpu.json
    python bench/throughput.py --device cuda --images 256 --size 500x375 --backbone resnet50 --crop 448 \\
        --batch 16 --workers 8 --rounds 3 --warmup --json bench/throughput_cuda.json

The JSON is rewritten after every stage, so a run cut short keeps the stages it finished; each
round's line also gives every call's wall time (model build and loader start included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
NUM_CLASSES = 21  # background + 20, as VOC
CAM_SCALES = (1.0, 0.5, 1.5, 2.0)
PREDICT_SCALES = (0.75, 1.0, 1.25)


# --------------------------------------------------------------------------- data (written with numpy/OpenCV)


def write_dataset(root: Path, images: int, size: tuple[int, int], seed: int = 0) -> dict[str, list[int]]:
    """Random images with 1-3 coloured rectangles; masks; labels.  Returns {id: [class, ...]}."""
    rng = np.random.default_rng(seed)
    height, width = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    labels = {}
    for index in range(images):
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), np.uint8)
        classes = sorted(set(int(c) for c in rng.integers(1, NUM_CLASSES, rng.integers(1, 4))))
        for cls in classes:
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            mask[top:top + height // 3, left:left + width // 3] = cls
            image[mask == cls] = rng.integers(0, 255, 3)
        image_id = f"img{index:04d}"
        cv2.imwrite(str(root / "images" / f"{image_id}.jpg"), image[..., ::-1])
        cv2.imwrite(str(root / "masks" / f"{image_id}.png"), mask)
        labels[image_id] = sorted(set(np.unique(mask).tolist()) - {0})
    return labels


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- plain models (torchvision only)


def plain_trunk(name: str) -> nn.Module:
    """A torchvision ResNet with the last stage dilated (output stride 16), no pooling/fc."""
    net = getattr(torchvision.models, name)(weights=None)
    for module in net.layer4.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride == (2, 2):
                module.stride = (1, 1)
            elif module.kernel_size == (3, 3):
                module.dilation, module.padding = (2, 2), (2, 2)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


def channels(name: str) -> int:
    return 512 if name in ("resnet18", "resnet34") else 2048


class PlainCam(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.trunk = plain_trunk(name)
        self.classifier = nn.Conv2d(channels(name), NUM_CLASSES - 1, 1, bias=False)

    def forward(self, images):
        return self.classifier(self.trunk(images))


class PlainDeepLab(nn.Module):
    """The DeepLab of ``wsss train-seg``'s defaults: torchvision's DeepLabV3 (output stride 8, ASPP
    rates 12/24/36, no auxiliary head) for ResNet-50/101; ResNet-18 at output stride 16, rates 6/12/18."""

    def __init__(self, name: str):
        super().__init__()
        from torchvision.models import segmentation
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead

        if name == "resnet18":
            self.net = None
            self.trunk = plain_trunk(name)
            self.head = DeepLabHead(channels(name), NUM_CLASSES, atrous_rates=(6, 12, 18))
        else:
            self.net = getattr(segmentation, f"deeplabv3_{name}")(weights=None, weights_backbone=None,
                                                                  num_classes=NUM_CLASSES, aux_loss=False)

    def forward(self, images):
        if self.net is not None:
            return self.net(images)["out"]
        return F.interpolate(self.head(self.trunk(images)), size=images.shape[-2:], mode="bilinear",
                             align_corners=False)


# --------------------------------------------------------------------------- plain loops


class CropSet(torch.utils.data.Dataset):
    """Random crop + flip of each image (and its mask), as uint8 tensors."""

    def __init__(self, root: Path, ids: list[str], crop: int, masks: bool = False):
        self.root, self.ids, self.crop, self.masks = root, ids, crop, masks

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image = read_rgb(self.root / "images" / f"{self.ids[index]}.jpg")
        mask = cv2.imread(str(self.root / "masks" / f"{self.ids[index]}.png"), cv2.IMREAD_GRAYSCALE)
        # smaller sides are padded up to the crop (torchvision's reference does the same), so every
        # crop is crop x crop pixels: the mean colour for the image, 255 (ignored) for the mask
        pad_h, pad_w = max(self.crop - image.shape[0], 0), max(self.crop - image.shape[1], 0)
        if pad_h or pad_w:
            fill = tuple(round(255 * float(m)) for m in MEAN.flatten())
            image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=fill)
            mask = cv2.copyMakeBorder(mask, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=255)
        top = np.random.randint(0, max(1, image.shape[0] - self.crop + 1))
        left = np.random.randint(0, max(1, image.shape[1] - self.crop + 1))
        image = image[top:top + self.crop, left:left + self.crop]
        mask = mask[top:top + self.crop, left:left + self.crop]
        if np.random.rand() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        out = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return (out, torch.from_numpy(np.ascontiguousarray(mask)).long()) if self.masks else (out, index)


def _normalise(images: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    batch = (images.to(device, non_blocking=True).float() / 255 - MEAN.to(device)) / STD.to(device)
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


def _autocast(device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)


def plain_train(kind: str, root: Path, ids, labels, args, device, bf16: bool) -> float:
    """Images/s of a plain training loop (train-cls or train-seg)."""
    torch.manual_seed(0)
    model = (PlainCam(args.backbone) if kind == "cls" else PlainDeepLab(args.backbone)).to(device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    targets = torch.zeros(len(ids), NUM_CLASSES - 1)
    for row, image_id in enumerate(ids):
        targets[row, [c - 1 for c in labels[image_id]]] = 1
    loader = torch.utils.data.DataLoader(CropSet(root, ids, args.crop, masks=kind == "seg"), batch_size=args.batch,
                                         shuffle=True, drop_last=True, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    seen, started = 0, time.perf_counter()
    for _ in range(args.epochs):
        for images, extra in loader:
            images = _normalise(images, device, bf16)
            with _autocast(device, bf16):
                out = model(images)
            if kind == "cls":
                loss = F.multilabel_soft_margin_loss(out.float().mean(dim=(2, 3)), targets[extra].to(device))
            else:
                loss = F.cross_entropy(out.float(), extra.to(device), ignore_index=255)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def plain_infer(kind: str, root: Path, ids, labels, args, device, bf16: bool, out: Path) -> float:
    """Images/s of a plain inference loop: make-cam (CAMs, 4 scales + flip) or predict (3 scales + flip)."""
    torch.manual_seed(0)
    model = (PlainCam(args.backbone) if kind == "cam" else PlainDeepLab(args.backbone)).to(device).eval()
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    out.mkdir(parents=True, exist_ok=True)
    scales = CAM_SCALES if kind == "cam" else PREDICT_SCALES
    # batches of equal-size images, as a careful hand-written loop would do
    order = sorted(ids, key=lambda image_id: read_rgb(root / "images" / f"{image_id}.jpg").shape)
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(order), args.infer_batch):
            batch_ids = order[start:start + args.infer_batch]
            pictures = [read_rgb(root / "images" / f"{image_id}.jpg") for image_id in batch_ids]
            if len({picture.shape for picture in pictures}) > 1:
                raise SystemExit("plain loop expects images of one size per batch")
            images = _normalise(torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2), device, bf16)
            size = images.shape[-2:]
            total = None
            for scale in scales:
                scaled = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
                both = torch.cat([scaled, scaled.flip(-1)])
                with _autocast(device, bf16):
                    maps = model(both)
                maps = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
                maps = torch.relu(maps) if kind == "cam" else maps.softmax(1)
                maps = maps[:len(batch_ids)] + maps[len(batch_ids):].flip(-1)
                total = maps if total is None else total + maps
            if kind == "cam":
                for row, image_id in enumerate(batch_ids):
                    keys = np.asarray(labels[image_id])
                    cams = total[row, keys - 1]
                    cams = cams / cams.amax(dim=(1, 2), keepdim=True).clamp_min(1e-5)
                    np.savez(out / f"{image_id}.npz", keys=keys.astype(np.int16),
                             cams=cams.half().cpu().numpy())
            else:
                labels_out = total.argmax(1).to(torch.uint8).cpu().numpy()
                for row, image_id in enumerate(batch_ids):
                    cv2.imwrite(str(out / f"{image_id}.png"), labels_out[row])
    return len(ids) / (time.perf_counter() - started)


# --------------------------------------------------------------------------- the wsss stages


def stage_throughput(kind: str, root: Path, args, device, out: Path) -> float:
    """Images/s of the wsss stage over the same images (its own timing of the loop)."""
    from wsss.stages import make_cam, predict, train_cls, train_seg

    common = {"root": root, "device": device.type, "workers": args.workers, "threads": args.threads}
    methods = args.methods == "on"
    if kind == "cls":
        same_work = {"er_weight": 0.3 if methods else 0.0}
        cfg = train_cls.TrainClsConfig(out_dir=out, backbone=args.backbone, weights="none", crop_size=args.crop,
                                       batch_size=args.batch, epochs=args.epochs, val_split=None, jitter=False,
                                       scale_range=(1.0, 1.0), overwrite=True, **same_work, **common)
        metrics = train_cls.run(cfg)
        return metrics["step"] * args.batch / metrics["seconds"]
    if kind == "seg":
        cfg = train_seg.TrainSegConfig(out_dir=out, labels="gt", model=f"deeplabv3_{args.backbone}",
                                       weights_backbone="none", crop_size=args.crop, batch_size=args.batch,
                                       epochs=float(args.epochs), iterations=None, val_split=None, eval_every=0,
                                       scale_range=(1.0, 1.0), overwrite=True, **common)
        metrics = train_seg.run(cfg)
        return metrics["iteration"] * args.batch / metrics["seconds"]
    if kind == "cam":
        cls_out = out.parent / "cls_for_cam"
        if not (cls_out / "last.pth").is_file():
            torch.manual_seed(0)
            train_cls.run(train_cls.TrainClsConfig(out_dir=cls_out, backbone=args.backbone, weights="none",
                                                   crop_size=args.crop, batch_size=2, epochs=1, val_split=None,
                                                   **common))
        same_work = {"erase_steps": 1 if methods else 0}
        cfg = make_cam.MakeCamConfig(checkpoint=cls_out / "last.pth", out_dir=out, scales=CAM_SCALES,
                                     batch_size=args.infer_batch, overwrite=True, **same_work, **common)
        return make_cam.run(cfg)["images_per_second"]
    seg_out = out.parent / "seg_for_predict"
    if not (seg_out / "last.pth").is_file():
        train_seg.run(train_seg.TrainSegConfig(out_dir=seg_out, labels="gt", model=f"deeplabv3_{args.backbone}",
                                               weights_backbone="none", crop_size=args.crop, batch_size=2,
                                               iterations=1, val_split=None, **common))
    cfg = predict.PredictConfig(checkpoint=seg_out / "last.pth", out_dir=out, scales=PREDICT_SCALES,
                                batch_size=args.infer_batch, overwrite=True, **common)
    return predict.run(cfg)["images_per_second"]


# --------------------------------------------------------------------------- main


def parse_size(text: str) -> tuple[int, int]:
    if "x" in text:
        width, height = (int(part) for part in text.split("x"))
        return height, width
    return int(text), int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", default="160", help="S (square) or WxH, e.g. 500x375")
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet50", "resnet101"])
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--infer-batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (both sides)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stages", default="cls,seg,cam,predict")
    parser.add_argument("--warmup", action="store_true", help="one untimed run of each side first")
    parser.add_argument("--methods", choices=["off", "on"], default="off",
                        help="off: the stages without equivariance and erasing, the plain loops' work (the ratio); "
                             "on: equivariance (--er-weight 0.3) and one erasing step (their cost)")
    parser.add_argument("--plain", default=None,
                        help="plain loops to time: fp32,bf16 (default: both on a GPU, fp32 on the CPU); the "
                             "reference of the ratio must be among them")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    plain_modes = [False, True] if device.type == "cuda" else [False]
    if args.plain:
        plain_modes = [{"fp32": False, "bf16": True}[name] for name in args.plain.split(",")]
    if (device.type == "cuda") not in plain_modes:
        parser.error("--plain must include the reference loop (bf16 on a GPU, fp32 on the CPU)")

    from wsss.datasets.prepared import SplitSpec, write_prepared

    work = Path(tempfile.mkdtemp(prefix="wsss_throughput_"))
    labels = write_dataset(work / "data", args.images, parse_size(args.size))
    ids = sorted(labels)
    classes = ["background"] + [f"class{index}" for index in range(1, NUM_CLASSES)]
    spec = SplitSpec(image_dir="images", image_ext=".jpg", mask_dir="masks")
    write_prepared(work / "data", "folder", classes, {"train": (spec, ids), "val": (spec, ids)}, labels)

    title = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    names = {"cls": "train-cls", "seg": "train-seg", "cam": "make-cam", "predict": "predict"}
    rows = []
    for kind in args.stages.split(","):
        samples = {"wsss": [], **{("plain bf16" if bf16 else "plain fp32"): [] for bf16 in plain_modes}}
        for round_index in range(args.rounds + (1 if args.warmup else 0)):
            started = time.perf_counter()
            measured = {"wsss": stage_throughput(kind, work / "data", args, device, work / f"out_{kind}")}
            walls = {"wsss": time.perf_counter() - started}
            for bf16 in plain_modes:
                started = time.perf_counter()
                if kind in ("cls", "seg"):
                    value = plain_train(kind, work / "data", ids, labels, args, device, bf16)
                else:
                    value = plain_infer(kind, work / "data", ids, labels, args, device, bf16, work / f"plain_{kind}")
                measured["plain bf16" if bf16 else "plain fp32"] = value
                walls["plain bf16" if bf16 else "plain fp32"] = time.perf_counter() - started
            # the call's wall time (set-up included) beside the timed loop's images/s
            print(f"{names[kind]} round {round_index}{' (warm-up)' if args.warmup and round_index == 0 else ''}: "
                  + ", ".join(f"{k} {v:.2f} img/s ({walls[k]:.1f} s)" for k, v in measured.items()), flush=True)
            if args.warmup and round_index == 0:
                continue
            for key, value in measured.items():
                samples[key].append(value)
        medians = {key: statistics.median(values) for key, values in samples.items()}
        reference = "plain bf16" if device.type == "cuda" else "plain fp32"
        rows.append({"stage": names[kind], **{key: round(value, 3) for key, value in medians.items()},
                     "ratio": round(medians["wsss"] / medians[reference], 3), "reference": reference,
                     "rounds": {key: [round(v, 3) for v in values] for key, values in samples.items()}})
        if args.json:  # after every stage: a run cut short keeps the stages it finished
            args.json.write_text(json.dumps({"device": title, "args": {k: str(v) for k, v in vars(args).items()},
                                             "rows": rows}, indent=2) + "\n")

    goal = 0.8 if device.type == "cuda" else 0.9
    print(f"\n{title}; stage methods {args.methods}; {args.images} images {args.size}, {args.backbone}, "
          f"crop {args.crop}, batch {args.batch}, inference batch {args.infer_batch}; median of {args.rounds} rounds")
    columns = ["stage", "wsss"] + [key for key in rows[0] if key.startswith("plain")] + ["ratio"]
    print("images/s (median of the rounds); ratio = wsss / the reference loop")
    print("| " + " | ".join(columns + ["goal"]) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for row in rows:
        print("| " + " | ".join(str(row[column]) for column in columns) + f" | >= {goal} vs {row['reference']} |")


if __name__ == "__main__":
    main()
