"""Does the random walk on learned affinities (train-aff + refine --random-walk) beat GMM + CRF?

For every seed, on the CAMs of ``bench/ablation.py``'s *plain* run with the pretrained trunk (the
default pipeline; same ``--work`` folder, made there first): its run folder is linked into
``<work>/affinity/seed<N>`` and ``wsss pipeline demo --set pipeline.affinity=true --stop-after refine`` with the same
options continues it (train-cls and make-cam are found finished), training the affinity network
from the classifier's trunk on the CAMs' confident regions and walking the CAMs before the GMM
threshold and the CRF.  Then, on the same CAMs and walk:

* CAM (best background threshold, ground-truth-picked: a reference);
* GMM + CRF without the walk (the pipeline without ``--affinity``: the ablation run's labels);
* the walk alone (GMM threshold, no CRF) and the walk + CRF (the pipeline's ``--affinity`` labels);
* AffinityNet's own walk (256 steps, beta 8) + CRF, for reference.

DeepLab is trained on the best of these in ``ablation_earlier_step.md`` (GMM + CRF, unless the walk wins).
Pseudo-label mIoU on train, 255 counted as background.  Writes ``bench/affinity_quality.md`` and
``.json``.

Usage::

    .venv/bin/python bench/affinity_quality.py --work work/bench --seeds 0,1,2 --jobs 2
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ablation import VARIANTS, backbone_file
from harness import (fmt, in_parallel, label_miou, per_seed, pipeline, quality_arguments, read_json, recipe_set,
                     refine_and_score, stage_set)


def link_run(source: Path, out: Path) -> None:
    """Hard-link the ablation run's data, classifier and CAMs into ``out`` (the pipeline resumes them)."""
    for part in ("data", "run/cls", "run/cams"):
        if not (out / part).exists():
            shutil.copytree(source / part, out / part, copy_function=os.link)


def measure(work: Path, seed: int) -> dict:
    source = work / "ablation" / "plain_pretrained" / f"seed{seed}"
    if not (source / "run" / "pseudo" / "metrics_eval_train.json").is_file():
        raise SystemExit(f"{source}: run bench/ablation.py (its plain run with the pretrained trunk) first")
    out = work / "affinity" / f"seed{seed}"
    link_run(source, out)
    cls_options, cam_options, _ = VARIANTS["plain"]  # the linked classifier and CAMs are the plain run's
    pipeline(out, *recipe_set(seed=seed, affinity=True, pretrained=backbone_file(work, seed)), "--stop-after",
             "refine", *stage_set("train-cls", cls_options), *stage_set("make-cam", cam_options))
    run_dir, root = out / "run", out / "data" / "VOC2012"
    return {
        "cam": read_json(run_dir / "cams" / "metrics_eval_train.json")["miou"],
        "gmm_crf": label_miou(source / "run" / "pseudo", "train"),
        "walk": refine_and_score(run_dir, root, "pseudo_walk_no_crf", "--random-walk", str(run_dir / "aff"),
                               "--rw-steps", "16", "--rw-beta", "32"),
        "walk_crf": label_miou(run_dir / "pseudo", "train"),
        "walk_affinitynet_crf": refine_and_score(run_dir, root, "pseudo_walk_256_beta8", "--random-walk",
                                               str(run_dir / "aff"), "--rw-steps", "256", "--rw-beta", "8", "--crf"),
        "deeplab_val_gmm_crf": label_miou(source / "run" / "pred", "val"),
        "aff_seconds": read_json(run_dir / "aff" / "metrics.json")["seconds"],
    }


def main() -> None:
    args = quality_arguments(__doc__.split("\n")[0], "affinity_quality.md").parse_args()
    seeds = args.seeds
    results = dict(zip(seeds, in_parallel([lambda seed=seed: measure(args.work, seed) for seed in seeds], args.jobs)))
    rows = [("CAM (best threshold, gt-picked)", "cam"), ("GMM + CRF (no walk; the default pipeline)", "gmm_crf"),
            ("random walk, 16 steps, beta 32 (GMM, no CRF)", "walk"),
            ("random walk + CRF (the demo recipe with `affinity = true`)", "walk_crf"),
            ("AffinityNet's walk, 256 steps, beta 8, + CRF", "walk_affinitynet_crf"),
            ("DeepLab val, trained on GMM + CRF (ablation_earlier_step.md, plain)", "deeplab_val_gmm_crf")]
    lines = ["# Affinity refinement on the demo data", "",
             f"Seeds {', '.join(map(str, seeds))}; mIoU %, mean ± sample std (per seed in brackets). "
             "`bench/affinity_quality.py`, see its docstring for the protocol.", "",
             "| labels | mIoU | per seed |", "|---|---|---|"]
    for title, key in rows:
        values = [results[seed][key] for seed in seeds]
        lines.append(f"| {title} | {fmt(values)} | {per_seed(values)} |")
    gain = [results[seed]["walk_crf"] - results[seed]["gmm_crf"] for seed in seeds]
    lines += ["", f"random walk + CRF − GMM + CRF: {fmt(gain)} points; train-aff "
              f"{fmt([results[seed]['aff_seconds'] for seed in seeds], scale=1, digits=0)} s."]
    args.md.write_text("\n".join(lines) + "\n")
    args.md.with_suffix(".json").write_text(json.dumps({"seeds": seeds, "results": results}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
