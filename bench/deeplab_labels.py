"""Does DeepLab hold its pseudo-labels, and which labels let it (issue 37: "DeepLab that holds its labels").

On ``parts`` the suite's DeepLab scores 24.1 on val against pseudo-labels of 36.5, and 24.3 on the train
images it was trained on: it does not even keep what its labels hold.  Its precision stays high and its
recall falls (it paints less of each object than the labels, which already paint only the part).  The
question is what the labels teach it: a partial object whose body is labelled background teaches it that
such bodies are background, in every class that shares them.

Per style and seed, this bench takes ``bench/styles.py``'s run (the style's data, the plain classifier from
scratch and its train CAMs) and for each variant of ``VARIANTS``:

* ``wsss refine`` of the train CAMs (the demo recipe's ``[refine]`` table with the variant's changes);
* ``wsss train-seg`` on those labels with the demo recipe's ``[train-seg]`` table (and the variant's
  changes), the trunk from the classifier (the pipeline's ``seg_init = "cls"``), one thread;
* ``wsss predict`` of val and of train with the recipe's ``[predict]`` table (scales, flip, CRF), scored
  against the masks: DeepLab val, and DeepLab train (how much of its training labels' quality it keeps).

Pseudo-label mIoU counts 255 as background (``wsss eval``'s default), so a variant with 255 scores its labels
below what they teach; the last column compares every DeepLab with the *default* labels of the same style and
seed (the issue's goal: DeepLab val >= pseudo-labels - 3).  Two shares, measured with the masks, say what
the labels teach: of the pixels labelled background, the share that belongs to an object; of the objects'
pixels, the share labelled 255.  Each step's output is kept in ``<work>/<style seed>/<variant>`` and a
finished step is read, not redone; the ``GMM band`` variant reads the default variant's pooled fit.

Usage::

    .venv/bin/python bench/deeplab_labels.py --styles parts,shapes,context --variants "default,unsure 0.9,GMM band" \
        --seeds 0 --jobs 2 --json bench/deeplab_labels.json --md bench/deeplab_labels.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import REPO, finished, fmt, in_parallel, per_seed, run, score_folder, write_tables, wsss_command
from styles import recipe_table, seed_label

# variant -> overrides of the recipe's [refine] and [train-seg] tables
VARIANTS: dict[str, dict] = {
    "default": {},
    "unsure 0.9": {"refine": {"confidence": 0.9}},  # 255 where the pooled GMM's posterior is below 0.9
    "RAW": {"train-seg": {"raw": True}},  # the pixels' loss weighted by refine's reliability maps
    "2000 iterations": {"train-seg": {"iterations": 2000}},  # twice the recipe's schedule (val still rose at 1000)
    # IRN's confident regions with the pooled GMM's two boundaries (CoSA's pair, what `wsss train-aff` learns from):
    # foreground above the default's threshold, background below the crossing of its two lowest components, 255
    # between (refine's fixed mode at the values the default run's fit gave: label-free)
    "GMM band": {"refine": "gmm band"},
}
COLUMNS = (("pseudo", "pseudo-labels (train)"), ("unsure", "255 share"),
           ("object_as_background", "background that is object"), ("object_ignored", "object in 255"),
           ("deeplab_train", "DeepLab train"), ("deeplab", "DeepLab val"),
           ("held", "DeepLab val − default's pseudo-labels"))


def config_file(path: Path, stage: str, overrides: dict) -> Path:
    from wsss import artifacts

    artifacts.write_json(path, recipe_table(stage, overrides))
    return path


def gmm_band(default_pseudo: Path) -> dict:
    """Refine overrides for the confident regions of the default labels' pooled fit (``metrics.json``): the
    rule of ``wsss.refine.confident_thresholds`` for one overall fit of more than two components."""
    from wsss.gmm import GmmFit

    if not (default_pseudo / "metrics.json").is_file():
        raise SystemExit(f"GMM band: run the default variant first ({default_pseudo} has no metrics.json)")
    overall = json.loads((default_pseudo / "metrics.json").read_text())["split_fit"]["overall"]
    low = GmmFit(**{key: tuple(values) for key, values in overall["fit"].items()}).lower_crossing()
    return {"threshold": "fixed", "bg_thresh": round(min(low, overall["threshold"]), 6),
            "fg_thresh": overall["threshold"]}


def label_errors(root: Path, pseudo: Path) -> dict:
    """Measured with the masks: the share of the pixels labelled background that belong to an object (what a
    partial label teaches DeepLab to call background), and the share of the objects' pixels labelled 255."""
    import numpy as np

    from wsss import artifacts
    from wsss.datasets.prepared import PreparedDataset

    dataset = PreparedDataset.load(root, "voc")
    counts = np.zeros(4)  # object labelled background, labelled background, object labelled 255, object
    for image_id in dataset.ids("train"):
        mask = dataset.read_mask("train", image_id)
        label = artifacts.read_label_png(pseudo / f"{image_id}.png")
        obj = (mask > 0) & (mask != artifacts.IGNORE_INDEX)
        counts += [(obj & (label == 0)).sum(), (label == 0).sum(), (obj & (label == artifacts.IGNORE_INDEX)).sum(),
                   obj.sum()]
    return {"object_as_background": float(counts[0] / max(counts[1], 1)),
            "object_ignored": float(counts[2] / max(counts[3], 1))}


def paths(style: str, variant: str, seed: int, work: Path, styles_work: Path) -> tuple[Path, Path, Path, Path]:
    """The styles run's dataset root and classifier folder, the variant's folder and the default variant's."""
    shared = styles_work / seed_label(style, seed)
    runs = work / seed_label(style, seed)
    return shared / "data" / "VOC2012", shared, runs / variant.replace(" ", "_"), runs / "default"


def make_labels(style: str, variant: str, seed: int, work: Path, styles_work: Path) -> None:
    """``wsss refine`` of the variant (seconds; the default variant's first, whose fit ``GMM band`` reads)."""
    root, shared, folder, default = paths(style, variant, seed, work, styles_work)
    if (folder / "pseudo" / "metrics.json").is_file():
        return
    overrides = VARIANTS[variant].get("refine", {})
    if overrides == "gmm band":
        overrides = gmm_band(default / "pseudo")
    config = config_file(folder / "refine.json", "refine", overrides)
    run([wsss_command(), "-q", "refine", "--config", str(config), "--root", str(root), "--split", "train", "--cams",
         str(shared / "cams"), "--out", str(folder / "pseudo"), "--workers", "1", "--seed", str(seed), "--no-eval"],
        folder / "logs" / "refine.log")


def one_run(style: str, variant: str, seed: int, work: Path, styles_work: Path) -> dict:
    """DeepLab on the variant's labels (made by :func:`make_labels`), its predictions and the row's figures."""
    root, shared, folder, _ = paths(style, variant, seed, work, styles_work)
    checkpoint, wsss = shared / "cls" / "last.pth", wsss_command()
    pseudo, seg = folder / "pseudo", folder / "seg"
    if not finished(seg / "metrics.json"):
        config = config_file(folder / "train-seg.json", "train-seg", VARIANTS[variant].get("train-seg", {}))
        run([wsss, "-q", "train-seg", "--config", str(config), "--root", str(root), "--split", "train",
             "--val-split", "val", "--labels", str(pseudo), "--weights-backbone", str(checkpoint), "--out", str(seg),
             "--threads", "1", "--seed", str(seed)], folder / "logs" / "train-seg.log")
    result = {"style": style, "variant": variant, "seed": seed, "pseudo": score_folder(pseudo, root, "train"),
              "unsure": json.loads((pseudo / "metrics.json").read_text())["ignore_ratio"]["pixels"],
              **label_errors(root, pseudo)}
    config = config_file(folder / "predict.json", "predict", {})
    for split, key in (("val", "deeplab"), ("train", "deeplab_train")):
        out = folder / f"pred_{split}"
        if not (out / "metrics.json").is_file():
            run([wsss, "-q", "predict", "--config", str(config), "--root", str(root), "--split", split,
                 "--checkpoint", str(seg / "last.pth"), "--out", str(out), "--threads", "1", "--no-eval"],
                folder / "logs" / f"predict_{split}.log")
        result[key] = score_folder(out, root, split)
    return result


def markdown(rows: list[dict], seeds: list[int]) -> str:
    styles = list(dict.fromkeys(row["style"] for row in rows))
    variants = [variant for variant in VARIANTS if any(row["variant"] == variant for row in rows)]
    lines = [f"Seeds {', '.join(map(str, seeds))}; mIoU and shares in %; with several seeds, mean ± sample std over "
             "them (per seed in brackets for the last column).", ""]
    for style in styles:
        lines += [f"### {style}", "", "| labels | " + " | ".join(name for _, name in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        # against the default labels of the same style and seed: a variant's own labels count its 255 as background
        reference = {row["seed"]: row["pseudo"] for row in rows
                     if row["style"] == style and row["variant"] == "default"}
        for variant in variants:
            chosen = [{**row, "held": row["deeplab"] - reference[row["seed"]] if row["seed"] in reference else None}
                      for row in rows if row["style"] == style and row["variant"] == variant]
            if not chosen:
                continue
            cells = [fmt([row[key] for row in chosen]) if len(chosen) > 1 else per_seed([chosen[0][key]])
                     for key, _ in COLUMNS]
            cells[-1] += f" ({per_seed([row['held'] for row in chosen])})" if len(chosen) > 1 else ""
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--styles", default="parts,shapes,context")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / "work" / "bench" / "deeplab_labels")
    parser.add_argument("--styles-work", type=Path, default=REPO / "work" / "bench" / "styles")
    parser.add_argument("--json", type=Path, default=None, help="rows: read, updated and written back")
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    keys = [(style, variant, seed) for seed in args.seeds for style in args.styles.split(",")
            for variant in args.variants.split(",")]
    unknown = [key[1] for key in keys if key[1] not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    for key in sorted(keys, key=lambda key: key[1] != "default"):
        make_labels(*key, args.work.resolve(), args.styles_work.resolve())
    results = in_parallel([lambda key=key: one_run(*key, args.work.resolve(), args.styles_work.resolve())
                           for key in keys], args.jobs)
    rows = json.loads(args.json.read_text()) if args.json and args.json.is_file() else []
    done = {(row["style"], row["variant"], row["seed"]) for row in results}
    rows = [row for row in rows if (row["style"], row["variant"], row["seed"]) not in done] + results
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    text = markdown(rows, sorted({row["seed"] for row in rows}))
    print(text)
    if args.md:
        write_tables(args.md, text)


if __name__ == "__main__":
    main()
