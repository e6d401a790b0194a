"""Segmentation quality on the demo data: DeepLab on pseudo-labels (with and without RAW) against
the fully supervised upper bound, over several seeds, and the weak/full ratio.

Builds on a ``run_pipeline.sh`` run (its CAMs and GMM + CRF pseudo-labels, with their eval
reports); the run is started first if it is missing (run_pipeline.sh resumes, so a finished run is
only read).  Then, for every seed, three DeepLab trainings with the pipeline's demo settings:

- ``gt``: ``--labels gt``, the fully supervised upper bound;
- ``pseudo``: ``--labels <run>/pseudo``;
- ``raw``: the same pseudo-labels with ``--raw`` (per-pixel reliability weights);

each followed by ``wsss predict`` (scales 0.75/1/1.25 + flip, without and with the dense CRF) and
``wsss eval`` on val.  Every mIoU in the table comes from a ``wsss eval`` report, so CAMs,
pseudo-labels and predictions are scored by the same code.  Seeds differ in initialisation, crop
and batch order; their spread tells how large a difference has to be before it means anything.

Usage (from the repository root)::

    .venv/bin/python bench/seg_quality.py --out work/demo --work work/seg_quality --seeds 0,1,2 --jobs 2

Writes ``bench/seg_quality.md`` (table and exact commands) and ``bench/seg_quality.json``.
Trainings whose output is finished are skipped by train-seg itself, so an interrupted benchmark
can be restarted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WSSS = str(Path(sys.executable).parent / "wsss")

# run_pipeline.sh's demo settings for train-seg and predict; only --labels, --raw and --seed vary.
SEG_TRAINING = ["--model", "deeplabv3_resnet18", "--weights-backbone", "none", "--crop-size", "80",
                "--batch-size", "8", "--iterations", "500", "--lr", "0.05", "--head-lr-mult", "1",
                "--eval-every", "250", "--device", "cpu", "--workers", "0"]
PREDICT = ["--scales", "0.75,1.0,1.25", "--flip", "--device", "cpu", "--workers", "0"]
RUNS = ("gt", "pseudo", "raw")
NAMES = {"pseudo": "DeepLab on pseudo-labels", "raw": "DeepLab on pseudo-labels + RAW",
         "gt": "DeepLab on ground truth (upper bound)"}


def training(run: str, seed: int, root: str, pseudo: str) -> list[str]:
    labels = ["--labels", "gt"] if run == "gt" else ["--labels", pseudo, "--upper-bound", f"seg_gt_s{seed}"]
    raw = ["--raw"] if run == "raw" else []
    return ["train-seg", "--root", root, *labels, *raw, "--out", f"seg_{run}_s{seed}", "--seed", str(seed),
            *SEG_TRAINING]


def scoring(run: str, seed: int, root: str) -> list[list[str]]:
    """predict (without, with CRF) and eval of one training, in order."""
    steps = []
    for crf in (False, True):
        name = f"pred_{run}_s{seed}" + ("_crf" if crf else "")
        steps.append(["predict", "--root", root, "--split", "val", "--checkpoint", f"seg_{run}_s{seed}/last.pth",
                      "--out", name, *PREDICT, *(["--crf"] if crf else [])])
        steps.append(["eval", "--root", root, "--split", "val", "--pred", name, "--workers", "1"])
    return steps


def wsss(arguments: list[str], work: Path, log: Path) -> float:
    """Run one wsss command in ``work`` with one thread; exit the benchmark if it fails; return seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"$ wsss {shlex.join(arguments)}\n")
        handle.flush()
        result = subprocess.run([WSSS, *arguments], cwd=work, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"wsss {arguments[0]} failed (exit {result.returncode}); see {log}")
    return round(time.perf_counter() - started, 1)


def job(run: str, seed: int, work: Path, root: str, pseudo: str) -> float:
    """Train, predict and score one (run, seed); return the training seconds."""
    log = work / "logs" / f"{run}_s{seed}.log"
    print(f"[seg_quality] {run} seed {seed}: training", flush=True)
    seconds = wsss(training(run, seed, root, pseudo), work, log)
    for arguments in scoring(run, seed, root):
        wsss(arguments, work, log)
    print(f"[seg_quality] {run} seed {seed}: done ({seconds} s of training)", flush=True)
    return seconds


def _miou(path: Path) -> float:
    return float(json.loads(path.read_text())["miou"])


def collect(work: Path, run_dir: Path, seeds: list[int]) -> dict:
    """Read the eval reports and train-seg metrics into one dict."""
    report = {"cam_train": _miou(run_dir / "cams" / "metrics_eval_train.json"),
              "pseudo_train": _miou(run_dir / "pseudo" / "metrics_eval_train.json"),
              "seeds": seeds, "runs": {}}
    for run in RUNS:
        per_seed = []
        for seed in seeds:
            metrics = json.loads((work / f"seg_{run}_s{seed}" / "metrics.json").read_text())
            per_seed.append({
                "seed": seed,
                "train_seg_val": metrics["val_miou"],
                "predict_val": _miou(work / f"pred_{run}_s{seed}" / "metrics_eval_val.json"),
                "predict_crf_val": _miou(work / f"pred_{run}_s{seed}_crf" / "metrics_eval_val.json"),
                "weak_full_ratio": metrics.get("weak_full_ratio"),
                "train_seconds": metrics["seconds"],
            })
        report["runs"][run] = per_seed
    return report


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(report: dict, commands: list[str], data: str) -> str:
    runs, seeds = report["runs"], report["seeds"]
    pct = lambda value: f"{100 * value:.1f}"

    def cell(run: str, key: str) -> str:
        mean, sd = _mean_sd([entry[key] for entry in runs[run]])
        each = " / ".join(pct(entry[key]) for entry in runs[run])
        return f"{pct(mean)} ± {pct(sd)} | {each}"

    def ratio(run: str, key: str) -> str:
        if run == "gt":
            return "1"
        weak = statistics.fmean(entry[key] for entry in runs[run])
        full = statistics.fmean(entry[key] for entry in runs["gt"])
        return f"{weak / full:.2f}"

    seed_list = ", ".join(str(seed) for seed in seeds)
    lines = [
        "# Segmentation quality on the demo data (`bench/seg_quality.py`)",
        "",
        f"{data}. DeepLabV3-ResNet-18 from scratch, 500 iterations, CPU, one thread per training; "
        f"seeds {seed_list}. mIoU in %, every value from a `wsss eval` report; mean ± sample standard "
        "deviation over the seeds, then each seed's value.",
        "",
        "| stage | split | mIoU mean ± sd | per seed | weak/full |",
        "|---|---|---|---|---|",
        f"| CAMs (best background threshold of the sweep) | train | {pct(report['cam_train'])} | | |",
        f"| pseudo-labels (GMM threshold + CRF, 255 counted as background) | train | "
        f"{pct(report['pseudo_train'])} | | |",
    ]
    for run in ("pseudo", "raw", "gt"):
        lines += [
            f"| {NAMES[run]}: train-seg validation (1 scale) | val | {cell(run, 'train_seg_val')} | "
            f"{ratio(run, 'train_seg_val')} |",
            f"| {NAMES[run]}: predict, scales 0.75/1/1.25 + flip | val | {cell(run, 'predict_val')} | "
            f"{ratio(run, 'predict_val')} |",
            f"| {NAMES[run]}: predict + dense CRF | val | {cell(run, 'predict_crf_val')} | "
            f"{ratio(run, 'predict_crf_val')} |",
        ]
    raw_gain = [raw["predict_val"] - plain["predict_val"] for raw, plain in zip(runs["raw"], runs["pseudo"])]
    mean, sd = _mean_sd(raw_gain)
    lines += [
        "",
        f"RAW − plain, predict mIoU, paired by seed: {pct(mean)} ± {pct(sd)} points "
        f"({' / '.join(pct(value) for value in raw_gain)}).",
        "",
        "weak/full = mean mIoU of DeepLab trained on pseudo-labels / mean mIoU of DeepLab trained on ground "
        "truth (same model, schedule and evaluation); train-seg's own `metrics.json` records the per-seed "
        "ratio through `--upper-bound`.",
        "",
        "Commands (in the work folder, `OMP_NUM_THREADS=1`; the pipeline run first):",
        "",
        "```sh",
        *commands,
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "work" / "demo",
                        help="run_pipeline.sh output folder (data/ and run/), run first when missing.")
    parser.add_argument("--work", type=Path, required=True, help="Folder for the DeepLab runs of this benchmark.")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds for every training.")
    parser.add_argument("--jobs", type=int, default=2, help="Trainings run at once (one thread each).")
    parser.add_argument("--report", type=Path, default=REPO / "bench" / "seg_quality.md", help="Markdown report.")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    out, work = args.out.resolve(), args.work.resolve()
    run_dir, root = out / "run", out / "data" / "VOC2012"
    pipeline = [str(REPO / "run_pipeline.sh"), "--out", str(out)]
    if not (run_dir / "pseudo" / "metrics_eval_train.json").is_file():
        print(f"[seg_quality] {shlex.join(pipeline)}", flush=True)
        subprocess.run(pipeline, check=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    pseudo = str(run_dir / "pseudo")
    # Upper bounds first: the pseudo-label runs read their val mIoU for weak/full.
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda seed: job("gt", seed, work, str(root), pseudo), seeds))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda item: job(item[0], item[1], work, str(root), pseudo),
                      [(run, seed) for seed in seeds for run in ("pseudo", "raw")]))
    report = collect(work, run_dir, seeds)
    data_config = json.loads((run_dir / "cls" / "config.json").read_text())
    images, val_images = (len((root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split())
                          for split in ("train", "val"))
    data = (f"Demo dataset ({images} train / {val_images} val synthetic images; CAMs and pseudo-labels from "
            f"`./run_pipeline.sh`, classifier {data_config['config'].get('backbone')})")
    placeholder = lambda text: text.replace(str(root), "DATA").replace(pseudo, "RUN/pseudo")
    commands = ["./run_pipeline.sh --out OUT   # DATA = OUT/data/VOC2012, RUN = OUT/run"]
    for run in RUNS:
        steps = [training(run, seeds[0], str(root), pseudo), *scoring(run, seeds[0], str(root))]
        commands += [placeholder(f"wsss {shlex.join(step)}") for step in steps]
    if len(seeds) > 1:
        commands.append(f"# ... and the same with --seed {', '.join(str(seed) for seed in seeds[1:])} "
                        "(folders _s<seed>)")
    text = markdown(report, commands, data)
    args.report.write_text(text)
    args.report.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
