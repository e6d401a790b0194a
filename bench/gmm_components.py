"""How many Gaussian components should the pooled GMM threshold have?  On the ablation's CAMs.

Runs on finished runs of ``bench/ablation.py`` (same ``--work`` folder; ``--cam-only`` is enough): their
CAMs (``run/cams``) and data are read, nothing of them is changed.  For every run and K:

* the pooled threshold ξ* (``wsss refine --gmm-components K``, the pipeline's other refine options:
  GMM over classes, no 255 band, dense CRF, ``--seed`` of the run);
* the pseudo-label mIoU (train, 255 counted as background) of that refine;
* for reference, two thresholds picked with the ground truth: the best fixed threshold of the CAM sweep
  (``make-cam --eval``, the CAMs alone) with its pseudo-labels + CRF (from the ablation's run), and the
  best of fixed thresholds 0.40, 0.45, ..., 0.70 *followed by the CRF* (what the pipeline's threshold
  feeds), with their pseudo-labels.

K = 3 is the pipeline's own ``run/pseudo``.  Beside the real runs, the table gives ξ* of each K on the
synthetic histograms of ``tests/wsss/test_gmm.py`` (measured on plain demo CAMs) against their analytic
best threshold.  Writes ``--md`` and the ``.json`` beside it.

Usage::

    .venv/bin/python bench/ablation.py --work work/bench --trunks scratch --cam-only \\
        --variants "plain,ER+erasing without RAW (default)" --md /tmp/cam.md
    .venv/bin/python bench/gmm_components.py --work work/bench --seeds 0,1,2 --jobs 2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ablation import fixed_crf as fixed_crf_options
from ablation import run_dir_of
from harness import fmt, in_parallel, label_miou, per_seed, quality_arguments, read_json, refine_and_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "wsss"))

# table label -> the ablation variant whose runs are read
RUNS = {"plain": "plain", "ER+erasing (default)": "ER+erasing without RAW (default)"}
COMPONENTS = (2, 3, 4, 5)
SWEEP = tuple(round(0.40 + 0.05 * i, 2) for i in range(7))  # fixed thresholds + CRF


def run_dir(work: Path, variant: str, seed: int) -> Path:
    return run_dir_of(work, RUNS[variant], "from scratch", seed)


def measure(work: Path, variant: str, seed: int, components: int) -> dict:
    """ξ* and pseudo-label mIoU of one run refined with K components."""
    out = run_dir(work, variant, seed)
    run, root = out / "run", out / "data" / "VOC2012"
    if components == 3:  # the pipeline's own refine
        folder, miou = run / "pseudo", label_miou(run / "pseudo", "train")
    else:
        folder = run / f"pseudo_k{components}"
        miou = refine_and_score(run, root, folder.name, "--crf", "--seed", str(seed),
                                "--gmm-components", str(components))
    fit = read_json(folder / "metrics.json")["split_fit"]["overall"]
    return {"miou": miou, "threshold": fit["threshold"], "fallback": fit["fallback"]}


def fixed_crf(work: Path, variant: str, seed: int, threshold: float) -> float:
    """Pseudo-label mIoU of a fixed threshold + CRF on one run's CAMs."""
    out = run_dir(work, variant, seed)
    return refine_and_score(out / "run", out / "data" / "VOC2012", f"pseudo_fixed{round(100 * threshold):03d}_crf",
                            *fixed_crf_options(threshold))


def synthetic_thresholds() -> dict:
    """ξ* per K on the test's synthetic demo-CAM histograms, and their analytic best threshold."""
    from test_gmm import DEMO_BACKGROUND, DEMO_FOREGROUND, _best_miou_threshold, _draw

    from wsss.gmm import GmmParams, gmm_threshold

    rng = np.random.default_rng(0)
    share = DEMO_FOREGROUND.sum() / (DEMO_FOREGROUND.sum() + DEMO_BACKGROUND.sum())
    n = 200_000
    scores = np.concatenate([_draw(DEMO_FOREGROUND, int(n * share), rng),
                             _draw(DEMO_BACKGROUND, n - int(n * share), rng)])
    found = {k: gmm_threshold(scores, GmmParams(components=k), seed=0).threshold for k in COMPONENTS}
    return {"best": float(_best_miou_threshold(DEMO_FOREGROUND, DEMO_BACKGROUND)), "thresholds": found}


def main() -> None:
    parser = quality_arguments(__doc__.split("\n")[0], "gmm_components.md")
    args = parser.parse_args()
    keys = [(variant, seed, k) for variant in RUNS for seed in args.seeds for k in COMPONENTS]
    for variant, seed, _ in keys:
        if not (run_dir(args.work, variant, seed) / "run" / "pseudo" / "metrics.json").is_file():
            parser.error(f"{run_dir(args.work, variant, seed)}: no finished ablation run (run bench/ablation.py)")
    values = in_parallel([lambda key=key: measure(args.work, *key) for key in keys], args.jobs)
    results = dict(zip(keys, values))
    sweep_keys = [(variant, seed, t) for variant in RUNS for seed in args.seeds for t in SWEEP]
    sweep = dict(zip(sweep_keys, in_parallel([lambda key=key: fixed_crf(args.work, *key) for key in sweep_keys],
                                             args.jobs)))
    reference = {}
    for variant in RUNS:
        for seed in args.seeds:
            run = run_dir(args.work, variant, seed) / "run"
            best_for_crf = max(SWEEP, key=lambda t: sweep[(variant, seed, t)])
            reference[(variant, seed)] = {"threshold": read_json(run / "cams" / "metrics_eval_train.json")[
                "best_threshold"], "miou": label_miou(run / "pseudo_bestfixed", "train"),
                "crf_threshold": best_for_crf, "crf_miou": sweep[(variant, seed, best_for_crf)]}
    synthetic = synthetic_thresholds()

    lines = ["# Pooled GMM threshold: number of components K, on the ablation's CAMs (from scratch)", "",
             f"Seeds {', '.join(map(str, args.seeds))}; pseudo-label mIoU % (train, GMM over classes + "
             "CRF), mean ± sample std over seeds (per seed in brackets); ξ*: the pooled threshold. "
             "`bench/gmm_components.py`, see its docstring for the protocol.", "",
             "| CAMs | K | ξ* | pseudo-labels | change against K = 3 |", "|---|---|---|---|---|"]
    for variant in RUNS:
        base = [results[(variant, seed, 3)]["miou"] for seed in args.seeds]
        for k in COMPONENTS:
            rows = [results[(variant, seed, k)] for seed in args.seeds]
            thresholds = " / ".join(f"{row['threshold']:.2f}" + (f" ({row['fallback']})" if row["fallback"] else "")
                                    for row in rows)
            change = [row["miou"] - b for row, b in zip(rows, base)]
            lines.append(f"| {variant} | {k}{' (default)' if k == 3 else ''} | {thresholds} | "
                         f"{fmt([row['miou'] for row in rows])} ({per_seed([row['miou'] for row in rows])}) | "
                         + ("–" if k == 3 else f"{fmt(change)} ({per_seed(change)})") + " |")
        refs = [reference[(variant, seed)] for seed in args.seeds]
        picked = " / ".join(f"{r['threshold']:.2f}" for r in refs)
        lines.append(f"| {variant} | best fixed for the CAMs (gt-picked) | {picked} | "
                     f"{fmt([r['miou'] for r in refs])} ({per_seed([r['miou'] for r in refs])}) | – |")
        picked = " / ".join(f"{r['crf_threshold']:.2f}" for r in refs)
        lines.append(f"| {variant} | best fixed for the CRF (gt-picked) | {picked} | "
                     f"{fmt([r['crf_miou'] for r in refs])} ({per_seed([r['crf_miou'] for r in refs])}) | – |")
    lines += ["", f"Synthetic demo-CAM histograms (`tests/wsss/test_gmm.py`): analytic best {synthetic['best']:.2f}; "
              + ", ".join(f"K = {k}: {t:.3f}" for k, t in synthetic["thresholds"].items()) + "."]
    args.md.write_text("\n".join(lines) + "\n")
    args.md.with_suffix(".json").write_text(json.dumps({
        "seeds": args.seeds, "synthetic": synthetic,
        "results": [{"variant": v, "seed": s, "components": k, **r} for (v, s, k), r in results.items()],
        "reference": [{"variant": v, "seed": s, **r} for (v, s), r in reference.items()],
        "fixed_crf": [{"variant": v, "seed": s, "threshold": t, "miou": m} for (v, s, t), m in sweep.items()],
    }, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
