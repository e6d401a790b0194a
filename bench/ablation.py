"""Do equivariance, erasing and the GMM threshold earn their place?  The full pipeline, variant by variant.

Each variant is a ``wsss pipeline demo`` run on the demo data (120 train / 40 val images, 96 px, ResNet-18;
data seed 0) with its train-cls and make-cam options, from scratch and on the rotation-pretrained trunk
of the seed, with ``--upper-bound-dir``: a DeepLab trained on the ground truth with the same recipe and
seed, started from the baseline variant's classifier trunk (``--baseline``, plain unless named) and
shared by the variants of its trunk and seed, for the weak/full ratio.  Everything not named by a
variant is the pipeline's default (classifier at output stride 8, DeepLab at output stride 8 on plain
cross-entropy, GMM over classes + CRF), so the variants differ only in the method they switch.  Per run:

* CAM mIoU (train, best background threshold; ``make-cam --eval``);
* pseudo-label mIoU (train, 255 counted as background): the pipeline's (pooled GMM + CRF), and two
  references on the same CAMs -- a fixed threshold 0.20 + CRF (the literature's usual value) and the
  best fixed threshold of the CAM sweep + CRF (picked with the ground truth: an upper reference, not
  a method);
* DeepLab val mIoU (``predict``, scales 0.75/1/1.25 + flip, ``last.pth``) without and with the dense-CRF
  post-processing (the pipeline predicts with it), the best val mIoU seen during training (only to show
  whether the last checkpoint lost ground) and weak/full with both DeepLabs predicted alike (scales +
  flip + CRF);
* DeepLab's train mIoU (the pipeline's predictions on the train split): how much of the pseudo-labels'
  quality it keeps.

Variants whose row stops after refine (``STOP``, and those named by ``--cam-only-variants``), and every
variant with ``--cam-only``, are CAM-level comparisons only.  The pretrained trunks
are those of ``bench/pretrain_quality.py`` (same ``--work`` folder), made here if missing.  Writes
``--md`` and the ``.json`` beside it; ``--from`` builds one table from earlier runs' ``.json`` files
without running anything (``bench/ablation_earlier_step.md`` joins the two trunks, each measured in its own run).

Usage::

    # each trunk on its own (about 2 h each on 2 CPU cores), then the joint table
    .venv/bin/python bench/ablation.py --work work/bench --jobs 2 --trunks pretrained \\
        --variants "plain,ER,erasing,ER+erasing,ER+erasing without RAW (default)" \\
        --cam-only-variants "ER,erasing" --md bench/ablation_pretrained.md
    .venv/bin/python bench/ablation.py --work work/bench --jobs 2 --trunks scratch \\
        --variants "plain,ER,erasing,ER+erasing,ER+erasing without RAW (default)" \\
        --cam-only-variants "ER,erasing" --md bench/ablation_scratch.md
    .venv/bin/python bench/ablation.py --from bench/ablation_scratch.json,bench/ablation_pretrained.json \\
        --md bench/ablation_earlier_step.md
    # the classifier trained 30 epochs (bench/ablation_epochs.md); the ground-truth DeepLab's figures are read
    # from the earlier table's runs instead of trained again
    E30="ER+erasing with 30 classifier epochs"
    .venv/bin/python bench/ablation.py --work work/bench --jobs 2 --trunks scratch \\
        --full-from bench/ablation_scratch.json --md bench/ablation_epochs.md \\
        --variants "plain,ER+erasing without RAW (default),plain with 30 classifier epochs,$E30" \\
        --cam-only-variants "plain,ER+erasing without RAW (default)"
    # log-sum-exp pooling of the class maps instead of their mean (bench/ablation_pooling.md)
    .venv/bin/python bench/ablation.py --work work/bench --jobs 2 --cam-only --trunks scratch \\
        --variants "plain,plain with LSE pooling r 5,plain with LSE pooling r 1" --md bench/ablation_pooling.md
    # a bigger demo (400 train images instead of 120; the environment variable reaches run_pipeline.sh)
    WSSS_NUM_TRAIN=400 .venv/bin/python bench/ablation.py --work work/big --jobs 2 --cam-only --trunks scratch \\
        --variants "plain,ER+erasing without RAW (default)" --md bench/ablation_400.md
    # the classifier's step (bench/ablation_step_full.md): plain and the default, both at the new step, through
    # DeepLab, with plain at the new step as the baseline that trains the ground-truth DeepLab (exact weak/full)
    P="plain with lr 0.1 head lr x1 no jitter"; E="ER+erasing with lr 0.1 head lr x1 no jitter"
    .venv/bin/python bench/ablation.py --work work/bench --jobs 2 --trunks scratch --variants "$P,$E" \\
        --baseline "$P" --md bench/ablation_step_full.md
    # the current table (bench/ablation.md): the four methods at the new step on both trunks, all through DeepLab
    # (its parts, each measured on its own first, are listed in bench/README.md)
    A="ER with lr 0.1 head lr x1 no jitter"; B="erasing with lr 0.1 head lr x1 no jitter"
    .venv/bin/python bench/ablation.py --work work/bench --jobs 2 --trunks scratch,pretrained --baseline "$P" \\
        --variants "$P,$E,$A,$B" --md bench/ablation.md
    # CAM and pseudo-label columns only (no DeepLab), as bench/ablation_cam.md:
    .venv/bin/python bench/ablation.py --cam-only --trunks scratch --variants "plain,ER,erasing,ER+erasing" \\
        --md bench/ablation_cam.md
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from pathlib import Path

from harness import (fmt, label_miou, per_seed, pipeline, predict_and_score, quality_arguments, read_json,
                     recipe_set, refine_and_score, score_folder, stage_set)

# per variant: (train-cls options, make-cam options, train-seg options); the pipeline's demo recipe
# otherwise (equivariance views 0.5-0.75 of the image, erasing threshold 0.7)
NO_ER, ER = "--er-weight 0", "--er-weight 0.3"
STEP = "--lr 0.1 --head-lr-mult 1 --no-jitter"  # the demo recipe's step since ablation_step.md
EARLIER_STEP = "--lr 0.05 --head-lr-mult 10 --jitter"
TRAIN_ERASING = "--erase-weight 1 --reg-start 0.3 --reg-ramp 0.3"  # ramped in after 30 % of the schedule
# DeepLab of "plain" and "ER+erasing" weights its loss with refine's reliability maps (RAW, the pipeline's default
# until this table showed no gain); "ER+erasing without RAW" was the demo's default until ablation_step_full.md, and
# the demo now runs the plain CAM network at the new step ("plain with lr 0.1 head lr x1 no jitter" without RAW)
VARIANTS = {
    "plain": (NO_ER, "--erase-steps 0", "--raw"),
    "ER": (ER, "--erase-steps 0", ""),
    "erasing": (NO_ER, "--erase-steps 1", ""),
    "ER+erasing": (ER, "--erase-steps 1", "--raw"),
    "ER+erasing without RAW (default)": (ER, "--erase-steps 1", ""),
    # the CAM head at the backbone's learning rate instead of x10 (SEAM's and IRN's setting for ImageNet trunks)
    "plain with head lr x1": (f"{NO_ER} --head-lr-mult 1", "--erase-steps 0", ""),
    "ER+erasing with head lr x1": (f"{ER} --head-lr-mult 1", "--erase-steps 1", ""),
    "erasing in training": (f"{NO_ER} {TRAIN_ERASING}", "--erase-steps 0", ""),
    "ER+erasing in training": (f"{ER} {TRAIN_ERASING}", "--erase-steps 0", ""),
    "plain at stride 16 (the earlier default)": (f"{NO_ER} --output-stride 16", "--erase-steps 0", ""),
    # the classifier trained 30 epochs instead of the pipeline's 12 (it underfits its training set: class_evidence.md)
    "plain with 30 classifier epochs": (f"{NO_ER} --epochs 30", "--erase-steps 0", ""),
    "ER+erasing with 30 classifier epochs": (f"{ER} --epochs 30", "--erase-steps 1", ""),
    # log-sum-exp pooling of the class maps instead of their mean (so a class's strongest cells decide its score)
    "plain with LSE pooling r 5": (f"{NO_ER} --pooling lse --lse-r 5", "--erase-steps 0", ""),
    "plain with LSE pooling r 1": (f"{NO_ER} --pooling lse --lse-r 1", "--erase-steps 0", ""),
    # the classifier's step: lr 0.1 with the CAM head at the trunk's rate and no colour jitter (the demo's
    # bottle differs from the background's blobs by its saturation, which the jitter blurs)
    "plain with lr 0.1 head lr x1 no jitter": (f"{NO_ER} {STEP}", "--erase-steps 0", ""),
    "ER+erasing with lr 0.1 head lr x1 no jitter": (f"{ER} {STEP}", "--erase-steps 1", ""),
    "ER with lr 0.1 head lr x1 no jitter": (f"{ER} {STEP}", "--erase-steps 0", ""),
    "erasing with lr 0.1 head lr x1 no jitter": (f"{NO_ER} {STEP}", "--erase-steps 1", ""),
    # the step the demo used before ablation_step.md (the tables made before it are at this step)
    "plain with the earlier step": (f"{NO_ER} {EARLIER_STEP}", "--erase-steps 0", ""),
    "ER+erasing with the earlier step": (f"{ER} {EARLIER_STEP}", "--erase-steps 1", ""),
}
# CAM and pseudo-label comparisons only: no DeepLab for these rows
STOP = {"erasing in training", "ER+erasing in training", "plain at stride 16 (the earlier default)",
        "plain with 30 classifier epochs"}
TRUNKS = {"from scratch": "scratch", "pretrained (rotation)": "pretrained"}


def slug(variant: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in variant.split(" (")[0]).strip("_")


def backbone_file(work: Path, seed: int) -> Path:
    """The seed's rotation-pretrained trunk (shared with bench/pretrain_quality.py)."""
    out = work / "rotation" / f"seed{seed}"
    path = out / "run" / "pretrain" / "backbone.pth"
    if not path.is_file():
        pipeline(out, *recipe_set(seed=seed, pretrain=True), "--stop-after", "pretrain")
    return path


def trunk_options(work: Path, trunk: str, seed: int) -> list[str]:
    if TRUNKS[trunk] == "scratch":
        return recipe_set(pretrain=False, weights="none")
    return recipe_set(pretrained=backbone_file(work, seed))


def fixed_crf(threshold: float) -> list[str]:
    """refine options of a fixed background threshold + CRF (a reference on the run's CAMs)."""
    return ["--threshold", "fixed", "--bg-thresh", f"{threshold:.2f}", "--crf"]


def run_dir_of(work: Path, variant: str, trunk: str, seed: int) -> Path:
    return work / "ablation" / f"{slug(variant)}_{TRUNKS[trunk]}" / f"seed{seed}"


def measure(work: Path, variant: str, trunk: str, seed: int, cam_only: bool = False,
            stop_variants: frozenset[str] = frozenset(STOP), upper_bound: bool = True,
            baseline: str = "plain") -> dict:
    """One variant's run (resumed if it exists) and its figures; ``upper_bound=False``: no ground-truth DeepLab."""
    out = run_dir_of(work, variant, trunk, seed)
    gt_dir = work / "ablation" / f"gt_{TRUNKS[trunk]}" / f"seed{seed}"
    cls_options, cam_options, seg_options = VARIANTS[variant]
    cam_only = cam_only or variant in stop_variants
    stop = (["--stop-after", "refine"] if cam_only
            else recipe_set(upper_bound=True, upper_bound_dir=gt_dir) if upper_bound else [])
    pipeline(out, *recipe_set(seed=seed), *stage_set("train-cls", cls_options), *stage_set("make-cam", cam_options),
             *stage_set("train-seg", seg_options), *stop, *trunk_options(work, trunk, seed))
    run_dir, root = out / "run", out / "data" / "VOC2012"
    cams = read_json(run_dir / "cams" / "metrics_eval_train.json")
    result = {
        "cam_miou": cams["miou"], "cam_threshold": cams["best_threshold"],
        "pseudo_gmm_crf": label_miou(run_dir / "pseudo", "train"),
        "pseudo_fixed020_crf": refine_and_score(run_dir, root, "pseudo_fixed020", *fixed_crf(0.20)),
        "pseudo_bestfixed_crf": refine_and_score(run_dir, root, "pseudo_bestfixed",
                                                 *fixed_crf(cams["best_threshold"])),
    }
    if cam_only:
        return result
    seg = read_json(run_dir / "seg" / "metrics.json")
    result.update({
        "deeplab_val": predict_and_score(run_dir / "seg" / "last.pth", root, run_dir / "bench_pred"),
        "deeplab_val_crf": label_miou(run_dir / "pred", "val"),  # the pipeline's predict (scales + flip + CRF)
        "deeplab_train_crf": score_folder(run_dir / "pred_train", root, "train"),  # the pipeline's, for the report
        "deeplab_last_1scale": seg["val_miou"], "deeplab_best_1scale": seg["best_val_miou"],
    })
    if upper_bound:
        result.update({
            "full_val_1scale": (seg.get("upper_bound") or {}).get("val_miou"),
            # the ground-truth DeepLab is shared by the variants: predicted once, by the baseline's run
            "full_val_crf": (predict_and_score(gt_dir / "last.pth", root, gt_dir / "bench_pred_crf", "--crf")
                             if variant == baseline else None),
        })
    return result


COLUMNS = [("cam_miou", "CAM"), ("pseudo_gmm_crf", "pseudo GMM+CRF"), ("pseudo_fixed020_crf", "fixed 0.20+CRF"),
           ("pseudo_bestfixed_crf", "best fixed+CRF (gt-picked)"), ("deeplab_val", "DeepLab val"),
           ("deeplab_val_crf", "DeepLab val + CRF"), ("deeplab_train_crf", "DeepLab train + CRF"),
           ("deeplab_last_1scale", "last (1 scale)"), ("deeplab_best_1scale", "best seen (1 scale)"),
           ("weak_full_crf", "weak/full (+ CRF)")]
RATIOS = ("weak_full_crf",)


def run_variants(args, parser) -> dict:
    """Run (or resume) the chosen variants; results keyed by (variant, trunk, seed)."""
    seeds = args.seeds
    chosen = {"pretrained": args.variants, "scratch": args.scratch_variants or args.variants}
    trunks = [t for t in TRUNKS if TRUNKS[t] in args.trunks.split(",")]
    variants = {t: [v for v in VARIANTS if v in chosen[TRUNKS[t]].split(",")] for t in trunks}
    stop_variants = frozenset(STOP | {v for v in args.cam_only_variants.split(",") if v})
    baseline = args.baseline
    if any(baseline not in names for names in variants.values()):
        parser.error(f"--variants must include the baseline {baseline!r} (it trains the shared ground-truth DeepLab)")
    full = read_full(args.full_from, parser) if args.full_from else None
    upper_bound = full is None
    for seed in seeds if "pretrained (rotation)" in trunks else []:  # each run of a seed shares the trunk
        backbone_file(args.work, seed)
    # the baseline's runs train the ground-truth DeepLab that the other variants of their trunk and seed share:
    # they are queued first, and a variant waits for its baseline run (queued earlier, so running or finished)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        base = {(trunk, seed): pool.submit(measure, args.work, baseline, trunk, seed, args.cam_only,
                                           stop_variants, upper_bound, baseline)
                for trunk in trunks for seed in seeds}

        def after_baseline(variant: str, trunk: str, seed: int) -> dict:
            base[(trunk, seed)].result()
            return measure(args.work, variant, trunk, seed, args.cam_only, stop_variants, upper_bound, baseline)

        others = {(variant, trunk, seed): pool.submit(after_baseline, variant, trunk, seed)
                  for trunk in trunks for seed in seeds for variant in variants[trunk] if variant != baseline}
        results = {(baseline, *key): future.result() for key, future in base.items()}
        results.update({key: future.result() for key, future in others.items()})
    for (variant, trunk, seed), result in results.items():
        reference = full.get((trunk, seed)) if full else results[(baseline, trunk, seed)].get("full_val_crf")
        if "deeplab_val_crf" in result and reference:
            result["weak_full_crf"] = result["deeplab_val_crf"] / reference
    return results


def read_full(path: Path, parser) -> dict:
    """``{(trunk, seed): ground-truth DeepLab val mIoU (scales + flip + CRF)}`` of an earlier result file."""
    _, results, _, baseline = read_results([path], parser)
    full = {(trunk, seed): row["full_val_crf"] for (variant, trunk, seed), row in results.items()
            if variant == baseline and row.get("full_val_crf")}
    if not full:
        parser.error(f"--full-from {path}: no {baseline} run with a ground-truth DeepLab in it")
    return full


def read_results(paths: list[Path], parser) -> tuple[list[int], dict, dict, str]:
    """Seeds, results, variant options and baseline of earlier runs' ``.json`` files, merged (``--from``)."""
    seeds, results, options, baseline = None, {}, {}, None
    for path in paths:
        try:  # every key read here, so that a foreign file is a one-line error, not a traceback
            saved = read_json(path)
            rows = {(r["variant"], r["trunk"], r["seed"]):
                    {k: v for k, v in r.items() if k not in ("variant", "trunk", "seed")} for r in saved["results"]}
            file_seeds = saved["seeds"]
            file_options = {name: tuple(value[:2]) + (tuple(value[2]),) for name, value in saved["variants"].items()}
            file_baseline = str(saved.get("baseline", "plain"))  # files written before --baseline: plain
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            parser.error(f"--from {path}: not a bench/ablation.py result file ({error!r})")
        if seeds is not None and file_seeds != seeds:
            parser.error(f"--from {path}: seeds {file_seeds}, the other files have {seeds}")
        if set(rows) & set(results):
            parser.error(f"--from {path}: repeats rows of the files before it")
        if baseline is not None and file_baseline != baseline:
            parser.error(f"--from {path}: baseline {file_baseline!r}, the other files have {baseline!r}")
        seeds, baseline = file_seeds, file_baseline
        results.update(rows)
        options.update(file_options)
    return seeds, results, options, baseline


def report(results: dict, seeds: list[int], options: dict, baseline: str = "plain") -> list[str]:
    """The markdown table, per-seed lines and options of the results (rows in TRUNKS x VARIANTS order)."""
    trunks = [t for t in TRUNKS if any(key[1] == t for key in results)]
    variants = {t: [v for v in options if (v, t, seeds[0]) in results] for t in trunks}
    with_deeplab = {v for (v, _, _), r in results.items() if "deeplab_val_crf" in r}
    columns = COLUMNS if with_deeplab else COLUMNS[:4]
    lines = ["# Ablation on the demo data: equivariance (ER), erasing, GMM threshold"
             + (", DeepLab" if with_deeplab else ""), "",
             f"Seeds {', '.join(map(str, seeds))}; mIoU %" + (" (weak/full as a ratio)" if with_deeplab else "")
             + ", mean ± sample std over seeds. "
             "`bench/ablation.py`, see its docstring for the protocol; – : not measured for that row.", "",
             "| trunk | variant | " + " | ".join(title for _, title in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for trunk in trunks:
        for variant in variants[trunk]:
            cells = []
            for key, _ in columns:
                values = [results[(variant, trunk, seed)].get(key) for seed in seeds]
                cells.append(fmt(values, scale=1 if key in RATIOS else 100, digits=2 if key in RATIOS else 1))
            lines.append(f"| {trunk} | {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (CAM; pseudo GMM+CRF" + ("; DeepLab val + CRF" if with_deeplab else "")
              + f"), and the change against {baseline} of the same trunk and seed:", ""]
    for trunk in trunks:
        for variant in variants[trunk]:
            row = [results[(variant, trunk, seed)] for seed in seeds]
            base = [results[(baseline, trunk, seed)] for seed in seeds]
            text = (f"- {trunk}, {variant}: CAM {per_seed([r['cam_miou'] for r in row])}; pseudo "
                    f"{per_seed([r['pseudo_gmm_crf'] for r in row])}")
            if "deeplab_val_crf" in row[0]:
                text += f"; DeepLab {per_seed([r['deeplab_val_crf'] for r in row])}"
            if variant != baseline:
                text += (f" — vs {baseline}: CAM {fmt([r['cam_miou'] - b['cam_miou'] for r, b in zip(row, base)])}"
                         f" ({per_seed([r['cam_miou'] - b['cam_miou'] for r, b in zip(row, base)])})")
                if "deeplab_val_crf" in row[0] and "deeplab_val_crf" in base[0]:
                    text += f", DeepLab {fmt([r['deeplab_val_crf'] - b['deeplab_val_crf'] for r, b in zip(row, base)])}"
            lines.append(text)
    full = {trunk: [results[(baseline, trunk, seed)] for seed in seeds] for trunk in trunks
            if "full_val_crf" in results[(baseline, trunk, seeds[0])]}
    lines += ["", "DeepLab on the ground truth, val mIoU per seed: " + "; ".join(
        f"{trunk}: 1 scale {per_seed([r['full_val_1scale'] for r in rows])}, scales + flip + CRF "
        f"{per_seed([r['full_val_crf'] for r in rows])}" for trunk, rows in full.items())] if full else []
    lines += ["", "Options per variant (train-cls | make-cam | other pipeline options):", ""]
    run = {variant for names in variants.values() for variant in names}
    lines += [f"- {v}: `{c}` | `{m}`" + (f" | `{' '.join(extra)}`" if extra and v in with_deeplab else "")
              for v, (c, m, extra) in options.items() if v in run]
    return lines


def main() -> None:
    parser = quality_arguments(__doc__.split("\n")[0], "ablation.md")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--scratch-variants", default=None, help="the variants run from scratch (default --variants)")
    parser.add_argument("--trunks", default="scratch,pretrained", help="comma-separated subset of scratch, pretrained")
    parser.add_argument("--cam-only", action="store_true",
                        help="every variant stops after refine: CAM and pseudo-label columns only, no DeepLab")
    parser.add_argument("--cam-only-variants", default="",
                        help="comma-separated variants that stop after refine as well (besides " + ", ".join(STOP) + ")")
    parser.add_argument("--from", dest="sources", type=lambda text: [Path(p) for p in text.split(",")], default=None,
                        help="run nothing: one table from these earlier runs' .json files (comma-separated), "
                             "e.g. each trunk measured on its own")
    parser.add_argument("--baseline", default="plain",
                        help="the variant the others are compared with; its runs train the ground-truth DeepLab "
                             "(default plain)")
    parser.add_argument("--full-from", type=Path, default=None,
                        help="train no ground-truth DeepLab: weak/full divides by that of the same trunk and seed "
                             "in this earlier result file (same recipe; runs are deterministic under --seed)")
    args = parser.parse_args()
    if args.sources:
        seeds, results, options, baseline = read_results(args.sources, parser)
    else:
        seeds, results, options, baseline = args.seeds, run_variants(args, parser), dict(VARIANTS), args.baseline
    lines = report(results, seeds, options, baseline)
    if os.environ.get("WSSS_NUM_TRAIN"):  # the demo's size, passed through to every run (bench/harness.py)
        count, val = int(os.environ["WSSS_NUM_TRAIN"]), int(os.environ.get("WSSS_NUM_VAL", 40))
        lines[2:2] = [f"Demo data with {count} train images (`WSSS_NUM_TRAIN`), not the pipeline's 120: the demo "
                      f"numbers its images train first, so train holds the 120-image set's train and val images "
                      f"and more, and val is {val} other images (ids {count}-{count + val - 1}).", ""]
    if not args.sources and args.full_from:
        lines += ["", "weak/full: against the ground-truth DeepLab (scales + flip + CRF) of "
                  f"`{args.full_from}`'s baseline runs of the same trunk and seed, not trained again here (the ratio "
                  "is exact only where those runs had the same classifier recipe: `--seg-init cls` starts DeepLab "
                  "from the baseline's classifier trunk)."]
    args.md.write_text("\n".join(lines) + "\n")
    args.md.with_suffix(".json").write_text(json.dumps({"seeds": seeds, "baseline": baseline, "variants": options,
                                                        "results": [
        {"variant": v, "trunk": t, "seed": s, **r} for (v, t, s), r in results.items()]}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
