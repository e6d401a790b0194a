"""Does `wsss pretrain` help?  Linear-probe mAP and CAM mIoU from random init, rotation and contrastive trunks.

For every seed, ``wsss pipeline demo`` on the demo data (120 train / 40 val images, 96 px, ResNet-18,
data seed 0) up to ``make-cam`` (``--stop-after make-cam``), once per trunk:

* random init (``--pretrain none --weights none``) with the pipeline's train-cls recipe, and, as
  a check that the recipe is not unfair to it, with the learning rate that suits training from
  scratch better (``--cls-opts "--lr 0.01"``);
* rotation prediction (``--pretrain rotation``, the demo default, 40 epochs);
* contrastive, SimCLR (``--pretrain contrastive``, 60 epochs: two views per image cost about what
  four rotations do in 40).

Reports the linear-probe mAP (val) of the trunk before train-cls and the CAM mIoU (train, best
background threshold) after it, mean ± sample std over seeds; writes ``bench/pretrain_quality.md``
and ``.json``.

Usage::

    .venv/bin/python bench/pretrain_quality.py --work work/bench --seeds 0,1,2 --jobs 2
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import cam_miou, fmt, in_parallel, per_seed, pipeline, quality_arguments, read_json, recipe_set, stage_set

ROWS = {
    "random init": recipe_set(pretrain=False, weights="none"),
    "random init, train-cls lr 0.01": [*recipe_set(pretrain=False, weights="none"), *stage_set("train-cls", "--lr 0.01")],
    "rotation (40 epochs)": recipe_set(pretrain=True),
    "contrastive, SimCLR (60 epochs)": [*recipe_set(pretrain=True), *stage_set("pretrain", "--method contrastive "
                                                                                          "--epochs 60 --lr 0.05 "
                                                                                          "--temperature 0.2")],
}
FOLDERS = {"random init": "scratch", "random init, train-cls lr 0.01": "scratch_lr01",
           "rotation (40 epochs)": "rotation", "contrastive, SimCLR (60 epochs)": "contrastive"}


def row_dir(work: Path, row: str, seed: int) -> Path:
    return work / FOLDERS[row] / f"seed{seed}"


def measure(work: Path, row: str, seed: int) -> dict:
    out = row_dir(work, row, seed)
    seconds = pipeline(out, *recipe_set(seed=seed), "--stop-after", "make-cam", *ROWS[row])
    run = out / "run"
    result = {"cam_miou": cam_miou(run), "seconds": round(seconds, 1)}
    pretrain_metrics = run / "pretrain" / "metrics.json"
    if pretrain_metrics.is_file():
        metrics = read_json(pretrain_metrics)
        result["probe_random"] = metrics["probe"]["random_init"]["map"]
        result["probe_pretrained"] = metrics["probe"]["pretrained"]["map"]
        result["pretrain_seconds"] = metrics["seconds"]
    return result


def main() -> None:
    args = quality_arguments(__doc__.split("\n")[0], "pretrain_quality.md").parse_args()
    seeds = args.seeds
    tasks = [(row, seed) for seed in seeds for row in ROWS]
    results = in_parallel([lambda row=row, seed=seed: measure(args.work, row, seed) for row, seed in tasks], args.jobs)
    table = {row: {seed: result for (r, seed), result in zip(tasks, results) if r == row} for row in ROWS}
    lines = ["# Self-supervised pretraining on the demo data", "",
             f"Seeds {', '.join(map(str, seeds))}; mean ± sample std (per seed in brackets). "
             "`bench/pretrain_quality.py`, see its docstring for the protocol.", "",
             "| trunk | linear-probe mAP (val) | CAM mIoU % (train) | vs random init |", "|---|---|---|---|"]
    scratch = [table["random init"][seed]["cam_miou"] for seed in seeds]
    for row in ROWS:
        cams = [table[row][seed]["cam_miou"] for seed in seeds]
        probes = [table[row][seed].get("probe_pretrained") for seed in seeds]
        if row.startswith("random init"):
            probes = [table["rotation (40 epochs)"][seed].get("probe_random") for seed in seeds]
        gain = [c - s for c, s in zip(cams, scratch)]
        lines.append(f"| {row} | {fmt(probes)} | {fmt(cams)} ({per_seed(cams)}) | "
                     f"{'–' if row == 'random init' else fmt(gain)} |")
    pretrain_seconds = [table["rotation (40 epochs)"][seed].get("pretrain_seconds") for seed in seeds]
    lines += ["", f"Rotation pretraining took {fmt(pretrain_seconds, scale=1, digits=0)} s per run "
              f"(one thread, {args.jobs} runs at a time on the machine)."]
    args.md.write_text("\n".join(lines) + "\n")
    args.md.with_suffix(".json").write_text(json.dumps({"seeds": seeds, "rows": {
        row: {str(seed): values for seed, values in per.items()} for row, per in table.items()}}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
