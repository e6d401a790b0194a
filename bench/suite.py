"""The benchmark suite: the demo recipe and each method variant on every dataset style, over seeds.

A default is chosen on the suite's mean, never on one style (issue 37).  Each run is ``wsss pipeline
demo`` with ``--set demo-data.style=STYLE`` and the variant's ``--set`` overrides, in its own folder
under ``--work`` (resumable: run the suite again and finished runs are read, not redone), ``--jobs``
at a time, each on one CPU thread.  Per style and seed, a DeepLab trained on the ground truth with the
same recipe (``[pipeline] upper_bound``, trained once by the ``default`` run and shared by the
variants) gives weak/full, both DeepLabs predicted alike (the recipe's scales + flip + CRF).

Per run: CAM mIoU (train, best background threshold of ``make-cam --eval``: picked with masks, a
measurement only), pseudo-label mIoU (train, the pipeline's pooled GMM + CRF: label-free), DeepLab val
mIoU (the pipeline's prediction) and weak/full.  Tables: one per style and the mean over styles, mean
± sample std over seeds; then each goal of issue 37 met or missed.

Usage::

    .venv/bin/python bench/suite.py --work work/suite --jobs 2              # every style x variant x 3 seeds
    .venv/bin/python bench/suite.py --work work/suite --quick               # seed 0 only
    .venv/bin/python bench/suite.py --styles parts --variants default,ER --seeds 0,1,2
    # a smoke run of the harness itself (minutes): tiny data and schedules, every run overridden
    .venv/bin/python bench/suite.py --work work/suite_smoke --quick --styles shapes --variants default \\
        --set demo-data.num_train=8 --set demo-data.num_val=4 --set demo-data.size=48 --set pretrain.epochs=1 \\
        --set train-cls.epochs=1 --set train-seg.iterations=4 --set train-seg.eval_every=2 --md /tmp/smoke.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import (fmt, in_parallel, label_miou, mean_std, per_seed, pipeline, predict_and_score, read_json,
                     recipe_set, stage_set)

# The mission's methods, each switched on alone over the demo recipe (plain CAM network, rotation pretraining,
# pooled GMM + CRF); the option values are bench/ablation.py's.
VARIANTS = {
    "default": [],
    "ER": stage_set("train-cls", "--er-weight 0.3"),
    "erasing": stage_set("make-cam", "--erase-steps 1"),
    "ER+erasing": stage_set("train-cls", "--er-weight 0.3") + stage_set("make-cam", "--erase-steps 1"),
    "random walk": recipe_set(affinity=True),
    "no pretraining": recipe_set(pretrain=False),
}
# What a style needs beyond the demo recipe (whose 96 px are the shapes style's): every other style draws at its
# own size; voc-size's 500 px images take bench/styles.py's crops and scales (a crop of 256 at scale 0.5-1 and
# output stride 16 for the classifier, CAMs at 0.5 and 1, DeepLab's crop 256: hours per run on a CPU)
STYLE_SETS = {
    "parts": ["--set", "demo-data.size=none"],
    "context": ["--set", "demo-data.size=none"],
    "voc-size": ["--set", "demo-data.size=none", "--set", "train-cls.crop_size=256", "--set",
                 "train-cls.scale_range=0.5,1.0", "--set", "train-cls.output_stride=16", "--set",
                 "train-cls.val_cam_images=10", "--set", "make-cam.scales=0.5,1.0", "--set", "train-seg.crop_size=256",
                 "--set", "pretrain.crop_size=224"],
}
COLUMNS = (("cam", "CAM"), ("pseudo", "pseudo-labels"), ("deeplab", "DeepLab val"), ("weak_full", "weak/full"))


def styles() -> tuple[str, ...]:
    """The dataset styles of ``wsss demo-data --style`` (their one owner is the generator)."""
    from wsss.datasets.demo import STYLES

    return tuple(STYLES)


def run_dir(work: Path, style: str, variant: str, seed: int) -> Path:
    return work / style / variant.replace(" ", "_").replace("+", "_") / f"seed{seed}"


def gt_dir(work: Path, style: str, seed: int) -> Path:
    return work / style / "ground_truth" / f"seed{seed}"


def measure(work: Path, style: str, variant: str, seed: int, extra: list[str]) -> dict:
    """One run (resumed if it exists) and its figures."""
    out = run_dir(work, style, variant, seed)
    pipeline(out, "--set", f"demo-data.style={style}", *recipe_set(seed=seed, upper_bound=True,
                                                                     upper_bound_dir=gt_dir(work, style, seed)),
             *STYLE_SETS.get(style, []), *VARIANTS[variant], *extra)
    run, root = out / "run", out / "data" / "VOC2012"
    result = {"cam": read_json(run / "cams" / "metrics_eval_train.json")["miou"],
              "pseudo": label_miou(run / "pseudo", "train"), "deeplab": label_miou(run / "pred", "val")}
    full = predict_and_score(gt_dir(work, style, seed) / "last.pth", root, gt_dir(work, style, seed) / "pred_crf",
                             "--crf")
    result["full"], result["weak_full"] = full, result["deeplab"] / full if full else None
    return result


def run_suite(work: Path, style_names: list[str], variants: list[str], seeds: list[int], jobs: int,
              extra: list[str]) -> dict:
    """Every run, the ``default`` ones first (they train the shared ground-truth DeepLabs)."""
    results = {}
    first = [(style, "default", seed) for style in style_names for seed in seeds]
    rest = [(style, variant, seed) for style in style_names for variant in variants if variant != "default"
            for seed in seeds]
    for keys in (first, rest):
        values = in_parallel([lambda key=key: measure(work, *key, extra) for key in keys], jobs)
        results.update(dict(zip(keys, values)))
    return results


def table(results: dict, rows: list[str], seeds: list[int], cell) -> list[str]:
    lines = ["| variant | " + " | ".join(name for _, name in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for variant in rows:
        lines.append(f"| {variant} | " + " | ".join(cell(variant, key) for key, _ in COLUMNS) + " |")
    return lines


def report(results: dict, style_names: list[str], variants: list[str], seeds: list[int]) -> list[str]:
    """Markdown: a table per style, the mean over styles, the per-seed values and the goals."""
    lines = [f"Seeds {', '.join(map(str, seeds))}; mean ± sample std over seeds (mIoU x 100; weak/full as a ratio).", ""]

    def values(style, variant, key):
        return [results[(style, variant, seed)][key] for seed in seeds if (style, variant, seed) in results]

    for style in style_names:
        lines += [f"### {style}", ""]
        lines += table(results, variants, seeds, lambda variant, key: fmt(
            values(style, variant, key), 1.0 if key == "weak_full" else 100.0, 2 if key == "weak_full" else 1))
        lines += [""]
    lines += ["### Mean over styles", "", "Each seed's value averaged over the styles, then mean ± std over seeds.", ""]

    def style_mean(variant, key, seed):
        found = [results[(style, variant, seed)][key] for style in style_names if (style, variant, seed) in results]
        return sum(found) / len(found) if found and None not in found else None

    lines += table(results, variants, seeds, lambda variant, key: fmt(
        [style_mean(variant, key, seed) for seed in seeds], 1.0 if key == "weak_full" else 100.0,
        2 if key == "weak_full" else 1))
    lines += ["", "### Per seed", ""]
    for style in style_names:
        for variant in variants:
            lines.append(f"- {style}, {variant}: " + "; ".join(
                f"{name} {per_seed(values(style, variant, key), *((1.0, 2) if key == 'weak_full' else (100.0, 1)))}"
                for key, name in COLUMNS))
    lines += ["", "### Goals (issue 37; the default recipe, mean over seeds)", ""]
    for style in style_names:
        mean = {key: mean_std(values(style, "default", key))[0] for key, _ in COLUMNS if values(style, "default", key)}
        if len(mean) < len(COLUMNS):
            continue
        checks = [("pseudo-labels >= CAM + 5", mean["pseudo"] >= mean["cam"] + 0.05,
                   f"{100 * mean['pseudo']:.1f} vs {100 * mean['cam']:.1f}"),
                  ("DeepLab val >= pseudo - 3", mean["deeplab"] >= mean["pseudo"] - 0.03,
                   f"{100 * mean['deeplab']:.1f} vs {100 * mean['pseudo']:.1f}"),
                  ("weak/full >= 0.85", mean["weak_full"] >= 0.85, f"{mean['weak_full']:.2f}")]
        lines.append(f"- {style}: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'} ({figure})"
                                                 for name, ok, figure in checks))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("work/suite"))
    parser.add_argument("--styles", default=None, help="comma-separated (default: every style)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="seed 0 only")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="an override for every run (e.g. smaller data for a smoke run)")
    parser.add_argument("--md", type=Path, default=Path(__file__).with_name("suite.md"))
    args = parser.parse_args()
    style_names = args.styles.split(",") if args.styles else list(styles())
    unknown = sorted(set(style_names) - set(styles())) + sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown style or variant: {', '.join(unknown)}")
    variants = [variant for variant in VARIANTS if variant in args.variants.split(",")]
    seeds = [0] if args.quick else args.seeds
    extra = [item for text in args.sets for item in ("--set", text)]
    results = run_suite(args.work, style_names, variants, seeds, args.jobs, extra)
    lines = [f"# The suite: {', '.join(style_names)} x {', '.join(variants)}", "",
             "Measured with `python bench/suite.py " + " ".join(
                 f"--{name} {value}" for name, value in (("styles", ",".join(style_names)),
                                                        ("variants", ",".join(variants)),
                                                        ("seeds", ",".join(map(str, seeds))))) +
             "`" + (" with " + " ".join(f"`--set {text}`" for text in args.sets) if args.sets else "") +
             " on a 2-core CPU, one thread per run.", "", *report(results, style_names, variants, seeds)]
    args.md.write_text("\n".join(lines) + "\n")
    args.md.with_suffix(".json").write_text(json.dumps(
        {"seeds": seeds, "sets": args.sets, "results": [{"style": s, "variant": v, "seed": k, **r}
                                                         for (s, v, k), r in results.items()]}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
