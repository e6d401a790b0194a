"""Can the CAM network learn one class on its own?  The demo's images with only that class labelled.

``class_evidence.md`` shows the demo's bottle is never learned by the pipeline's classifier (its logit does
not move when the bottle is painted out, pseudo-label IoU 0-8) although a colour-histogram probe finds it
at val AP 1.0.  This bench asks whether that is the other classes' doing (shared trunk, look-alike pairs,
"nothing else here" as evidence) or the class's own: it relabels the demo's train and val images (the
ablation's data, ``--source``) with the one class only -- its pixels class 1, every other pixel background,
the 255 band kept -- and trains the pipeline's demo classifier on that (ResNet-18 from scratch, output
stride 8, 80 px crops, 12 epochs, plain: no equivariance, no erasing), then make-cam ``--eval`` (train, best
background threshold).

The multi-label soft-margin loss is a mean over the network's outputs: the pipeline's VOC network has 20,
this one 1, so the same learning rate would take 20 times the pipeline's step for this class.  ``--lr`` is
therefore the pipeline's 0.05 / 20 = 0.0025 by default: the class's own gradient moves head and trunk as
far as in the pipeline (the trunk there also moves with the other classes' gradients, which this run
lacks).  At 0.05 and 0.01 (seed 0) the epoch losses first rose to 23 and 9 and ended at chance.

Per seed: the last epoch's training loss against the loss of always predicting the class's frequency
(chance), val AP against the class's val frequency (a random ranking's AP), and the class's CAM IoU at the
background threshold of make-cam's best mIoU (background and the class; the background's IoU barely
moves, so this is close to the class's own best).

Usage::

    .venv/bin/python bench/one_class.py --source work/bench/ablation/plain_scratch/seed0/data/VOC2012 \\
        --name bottle --work work/bench --md bench/one_class.md
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from harness import fmt, in_parallel, per_seed, quality_arguments, read_json, run, wsss_command

from wsss import artifacts
from wsss.datasets.prepared import PreparedDataset, SplitSpec, write_prepared

# the demo recipe's train-cls table (wsss/recipes/demo.toml), plain, with the step it had when one_class.md was made:
# train-cls's default x10 head and colour jitter (the recipe has since moved to head_lr_mult 1 and no jitter, with
# which this run learns the bottle: bench/README.md, the classifier's step); --weights none: from scratch
def cls_settings(out: Path) -> Path:
    """The classifier's settings as a file for ``wsss train-cls --config`` (the recipe's table, three changes)."""
    from wsss.stages.pipeline import Recipe, find_recipe

    table = {**Recipe.load(find_recipe("demo")).stages["train-cls"], "head_lr_mult": 10.0, "jitter": True,
             "weights": "none"}
    path = out / "train_cls_settings.json"
    artifacts.write_json(path, table)
    return path


def one_class_dataset(source: Path, index: int, name: str, out: Path) -> dict[str, float]:
    """Write the relabelled dataset under ``out`` (once); return the class's image frequency per split."""
    dataset = PreparedDataset.load(source)
    labels, splits = {}, {}
    for split in ("train", "val"):
        ids = dataset.ids(split)
        for image_id in ids:
            if not (out / "masks" / f"{image_id}.png").is_file():
                mask = dataset.read_mask(split, image_id)
                relabelled = np.where(mask == artifacts.IGNORE_INDEX, artifacts.IGNORE_INDEX, mask == index)
                artifacts.write_image(out / "images" / f"{image_id}.png", dataset.read_image(split, image_id))
                artifacts.write_label_png(out / "masks" / f"{image_id}.png", relabelled.astype(np.uint8))
            labels[image_id] = [1] if index in dataset.image_labels(image_id) else []
        splits[split] = (SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks"), ids)
    write_prepared(out, "folder", ["background", name], splits, labels)
    return {split: float(np.mean([bool(labels[i]) for i in spec[1]])) for split, spec in splits.items()}


def chance_loss(frequency: float) -> float:
    """Binary cross-entropy of always predicting ``frequency``."""
    return -(frequency * math.log(frequency) + (1 - frequency) * math.log(1 - frequency))


def measure(root: Path, out: Path, seed: int, lr: float) -> dict:
    cls_dir, cam_dir = out / "cls", out / "cams"
    run([wsss_command(), "-q", "train-cls", "--config", str(cls_settings(out)), "--root", str(root), "--out",
         str(cls_dir), "--lr", str(lr), "--seed", str(seed)], out / "train_cls.log")
    if not (cam_dir / "metrics_eval_train.json").is_file():
        run([wsss_command(), "-q", "make-cam", "--root", str(root), "--split", "train", "--checkpoint",
             str(cls_dir / "last.pth"), "--out", str(cam_dir), "--eval", "--sweep", "0.05:0.95:0.01",
             "--erase-steps", "0", "--workers", "1"], out / "make_cam.log")
    last = read_json(cls_dir / "metrics.json")["history"][-1]
    per_class = read_json(cam_dir / "metrics_eval_train.json")["summary"]["per_class"]
    name = next(key for key in per_class if key != "background")
    return {"loss": last["loss_cls"], "val_ap": last["val_map"], "iou": per_class[name]["iou"]}


def main() -> None:
    parser = quality_arguments(__doc__.splitlines()[0], "one_class.md")
    parser.add_argument("--source", type=Path, required=True, help="a prepared demo dataset (the ablation's data)")
    parser.add_argument("--name", default="bottle", help="the class to keep")
    parser.add_argument("--lr", type=float, default=0.0025)
    args = parser.parse_args()
    classes = PreparedDataset.load(args.source).classes
    index = classes.index(args.name)
    work = args.work / "one_class" / args.name
    frequency = one_class_dataset(args.source, index, args.name, work / "data")
    results = in_parallel([lambda seed=seed: measure(work / "data", work / f"seed{seed}", seed, args.lr)
                           for seed in args.seeds], args.jobs)
    column = {key: [result[key] for result in results] for key in ("loss", "val_ap", "iou")}
    lines = [f"# Is the {args.name} learnable on its own? (`one_class.py`)", "",
             f"Seeds {', '.join(map(str, args.seeds))}; mean ± sample std (per seed). The demo's train/val images with "
             f"only the {args.name} labelled; the pipeline's plain demo classifier at lr {args.lr}. See the "
             "script's docstring.", "",
             "| measure | result | reference |", "|---|---|---|",
             f"| training loss, last epoch | {fmt(column['loss'], 1, 3)} ({per_seed(column['loss'], 1, 3)}) | "
             f"chance {chance_loss(frequency['train']):.3f} (train frequency {frequency['train']:.2f}) |",
             f"| val AP | {fmt(column['val_ap'], 1, 2)} ({per_seed(column['val_ap'], 1, 2)}) | "
             f"random ranking {frequency['val']:.2f} |",
             f"| {args.name} CAM IoU % (train, threshold of the best mIoU) | {fmt(column['iou'])} "
             f"({per_seed(column['iou'])}) | |", ""]
    args.md.write_text("\n".join(lines))
    args.md.with_suffix(".json").write_text(json.dumps({"frequency": frequency, "lr": args.lr, "seeds": args.seeds,
                                                        "results": results}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
