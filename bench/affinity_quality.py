"""Does the random walk on learned affinities (train-aff + refine --random-walk) beat GMM + CRF?

For every seed, ``run_pipeline.sh --affinity`` on the demo data (the default pipeline, with the
affinity network trained from the classifier's trunk on the CAMs' confident regions and refine
walking the CAMs before the GMM threshold and the CRF), then on the same CAMs and walk:

* CAM (best background threshold, ground-truth-picked: a reference);
* GMM + CRF without the walk (what the pipeline does without ``--affinity``);
* the walk alone (GMM threshold, no CRF) and the walk + CRF (the pipeline's ``--affinity`` labels);
* DeepLab val mIoU trained on the walk + CRF labels (the pipeline's) and weak/full.

Pseudo-label mIoU on train, 255 counted as background.  Writes ``bench/affinity_quality.md`` and
``.json``.

Usage::

    .venv/bin/python bench/affinity_quality.py --work work/bench --seeds 0,1,2 --jobs 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import fmt, in_parallel, label_miou, per_seed, pipeline, read_json, run, wsss_command
from ablation import backbone_file


def refine_variant(run_dir: Path, root: Path, name: str, *options: str) -> float:
    """Pseudo-label mIoU of ``wsss refine OPTIONS`` on the run's CAMs (train)."""
    out = run_dir / name
    if not (out / "metrics_eval_train.json").is_file():
        run([wsss_command(), "-q", "refine", "--root", str(root), "--split", "train", "--cams", str(run_dir / "cams"),
             "--out", str(out), "--workers", "1", "--device", "cpu", *options], out / "refine.log")
        run([wsss_command(), "-q", "eval", "--root", str(root), "--split", "train", "--pred", str(out),
             "--workers", "1"], out / "eval.log")
    return label_miou(out, "train")


def measure(work: Path, seed: int) -> dict:
    out = work / "affinity" / f"seed{seed}"
    gt_dir = work / "ablation" / "gt_pretrained" / f"seed{seed}"
    pipeline(out, "--seed", str(seed), "--affinity", "--upper-bound-dir", str(gt_dir),
             "--pretrained", str(backbone_file(work, seed)))
    run_dir, root = out / "run", out / "data" / "VOC2012"
    seg = read_json(run_dir / "seg" / "metrics.json")
    return {
        "cam": read_json(run_dir / "cams" / "metrics_eval_train.json")["miou"],
        "gmm_crf": refine_variant(run_dir, root, "pseudo_no_walk", "--crf"),
        "walk": refine_variant(run_dir, root, "pseudo_walk_no_crf", "--random-walk", str(run_dir / "aff")),
        "walk_crf": label_miou(run_dir / "pseudo", "train"),
        "deeplab_val": label_miou(run_dir / "pred", "val"),
        "weak_full": seg.get("weak_full_ratio"),
        "aff_seconds": read_json(run_dir / "aff" / "metrics.json")["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("work/bench"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--md", type=Path, default=Path(__file__).with_name("affinity_quality.md"))
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results = dict(zip(seeds, in_parallel([lambda seed=seed: measure(args.work, seed) for seed in seeds], args.jobs)))
    rows = [("CAM (best threshold, gt-picked)", "cam"), ("GMM + CRF (no walk)", "gmm_crf"),
            ("random walk (GMM, no CRF)", "walk"), ("random walk + CRF (`--affinity`)", "walk_crf"),
            ("DeepLab val, trained on random walk + CRF", "deeplab_val")]
    lines = ["# Affinity refinement on the demo data", "",
             f"Seeds {', '.join(map(str, seeds))}; mIoU %, mean ± sample std (per seed in brackets). "
             "`bench/affinity_quality.py`, see its docstring for the protocol.", "",
             "| labels | mIoU | per seed |", "|---|---|---|"]
    for title, key in rows:
        values = [results[seed][key] for seed in seeds]
        lines.append(f"| {title} | {fmt(values)} | {per_seed(values)} |")
    gain = [results[seed]["walk_crf"] - results[seed]["gmm_crf"] for seed in seeds]
    lines += ["", f"random walk + CRF − GMM + CRF: {fmt(gain)} points; weak/full "
              f"{fmt([results[seed]['weak_full'] for seed in seeds], scale=1, digits=2)}; train-aff "
              f"{fmt([results[seed]['aff_seconds'] for seed in seeds], scale=1, digits=0)} s."]
    args.md.write_text("\n".join(lines) + "\n")
    args.md.with_suffix(".json").write_text(json.dumps({"seeds": seeds, "results": results}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
