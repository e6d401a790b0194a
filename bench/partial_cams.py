"""The mission's CAM methods where CAMs are partial: equivariance and erasing on the ``parts`` style (issue 37).

``bench/styles.py`` made the ``parts`` style, whose CAMs peak on one small part of each object (best
threshold 0.15, the regime of VOC).  Here each method is switched on over that run's plain classifier
(the demo recipe's ``[train-cls]``: ResNet-18 from scratch, output stride 8, 12 epochs) on the same
images (seed 0 unless ``--seed``; a style's own settings kept, e.g. voc-size's crop and stride), and its CAMs
are compared with the plain ones, per class:

* IoU, precision and recall at the run's best background threshold (``wsss eval --cams --sweep``);
* *where* the maps go, the question of issue 37: of each present class's object, the share of its
  **part** pixels and of its **body** pixels (the object without the part) above the threshold, and
  the **spill**: pixels outside every labelled object above the threshold, as a share of the object.
  A part is told from its body by colour: the generator paints every part at HSV saturation 0.95 and
  every body at most 0.45 (``wsss/datasets/demo.py``, ``_parts_colours``), so an object pixel of
  saturation > 0.7 is a part pixel.

A run reuses the styles run's data and, where its ``train-cls`` is unchanged, its classifier.  Every
run lives in ``<work>/<label>`` and resumes.  Over the seeds, a table sets each run's CAMs and pseudo-labels
beside plain's of the same style and seed.  Pictures: ``--gallery`` writes, for a few images, the image
and each run's map of the first class side by side.

Usage::

    .venv/bin/python bench/partial_cams.py --run ER --run "erasing (inference)" --jobs 2 --md bench/partial_cams.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from harness import REPO, finished, fmt, in_parallel, run, write_tables, wsss_command
from styles import RUNS as STYLE_RUNS
from styles import eval_cams_command, make_cam_command, pct, recipe_table, seed_label, train_cls_command

# rows of bench/styles.py whose data and plain classifier a run shares
STYLES = ("parts", "shapes", "context", "voc-size")
PART_SATURATION = 0.7  # between the bodies' 0.45 and the parts' 0.95

# label -> train-cls overrides (None: the styles run's plain classifier) and make-cam overrides
RUNS: dict[str, dict] = {
    "plain": {"train-cls": None, "make-cam": {}, "refine": True},
    "ER, no stop": {"train-cls": {"er_weight": 0.3, "er_view_stop": 0.0}, "make-cam": {}},
    "ER, view not classified": {"train-cls": {"er_weight": 0.3, "er_view_cls": False}, "make-cam": {}},
    "ER": {"train-cls": {"er_weight": 0.3}, "make-cam": {}},  # the view classified where it shows the class
    "erasing (training)": {"train-cls": {"erase_weight": 1.0, "erase_stop": 0.0}, "make-cam": {}},
    "erasing (training, stop 0.5)": {"train-cls": {"erase_weight": 1.0, "erase_stop": 0.5}, "make-cam": {}},
    "erasing (inference)": {"train-cls": None, "make-cam": {"erase_steps": 1, "erase_stop": 0.0}},
    "erasing (inference, stop 0.5)": {"train-cls": None, "make-cam": {"erase_steps": 1, "erase_stop": 0.5}},
}


def run_dir(work: Path, label: str) -> Path:
    return work / re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def one_run(style: str, label: str, work: Path, styles_work: Path, refines: list[str], seed: int = 0) -> dict:
    """Train (unless shared), make CAMs and score them for one row of the styles run of ``seed``; return its
    figures.  ``refines``: the refinements to make of plain's CAMs (every one of :data:`REFINES` when empty); the
    other rows' CAMs get the default refinement and these."""
    from wsss import artifacts

    spec = RUNS[label]
    shared = styles_work / seed_label(style, seed)
    root = shared / "data" / "VOC2012"
    if not (shared / "cls" / "last.pth").is_file():
        raise SystemExit(f"{shared}: run `bench/styles.py --run {style} --seed {seed}` first (its data and plain "
                         "classifier)")
    folder = run_dir(work / seed_label(style, seed), label)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = shared / "cls" / "last.pth"
    # the row's changes over the style's own (voc-size's crop, stride and scales), as its plain run has them
    style_row = STYLE_RUNS[style]
    if spec["train-cls"] is not None:
        config = folder / "train-cls.json"
        artifacts.write_json(config, recipe_table("train-cls", {**style_row.get("train-cls", {}),
                                                               **spec["train-cls"]}))
        cls = folder / "cls"
        if not finished(cls / "metrics.json"):
            run(train_cls_command(config, root, cls, seed), folder / "logs" / "train-cls.log")
        checkpoint = cls / "last.pth"
    cams = shared / "cams" if spec["train-cls"] is None and not spec["make-cam"] else folder / "cams"
    if not finished(cams / "metrics.json"):
        config = folder / "make-cam.json"
        artifacts.write_json(config, recipe_table("make-cam", {**style_row.get("make-cam", {}), **spec["make-cam"]}))
        run(make_cam_command(config, root, checkpoint, cams), folder / "logs" / "make-cam.log")
    report_file = folder / "eval_train.json"
    if not report_file.is_file():
        run(eval_cams_command(cams, root, report_file), folder / "logs" / "eval.log")
    report = json.loads(report_file.read_text())
    result = {"label": label, "style": style, "seed": seed, "train_cls": spec["train-cls"],
              "make_cam": spec["make-cam"],
              "best_threshold": report["best_threshold"], "miou": report["miou"],
              "per_class": {name: values for name, values in report["summary"]["per_class"].items()
                            if name != "background"},
              "where": where_maps_go(root, cams, report["best_threshold"]) if style == "parts" else {},
              "cams": str(cams.relative_to(REPO))}
    wanted = (refines or list(REFINES)) if spec.get("refine") else [DEFAULT_REFINE, *refines]
    result["refine"] = refine(folder, root, cams, wanted, seed)
    erasing = json.loads((cams / "metrics.json").read_text()).get("erasing")
    if erasing:
        result["recognised"] = erasing[0]["recognised"]
    cls_metrics = checkpoint.parent / "metrics.json"
    if cls_metrics.is_file():
        history = json.loads(cls_metrics.read_text())["history"]
        result["val_map"] = history[-1]["val_map"]
        result["val_ap"] = history[-1]["val_ap"]
    return result


# Refinements of a run's CAMs (with "refine": True), each the demo recipe's [refine] table (pooled GMM + CRF,
# the walk's 16 steps at beta 32) with these options.  AFFINITY stands for the `wsss train-aff` folder of the
# recipe's [train-aff] table (confident regions from the pooled GMM; the walk rows were measured when its default
# was 3 components), AFFINITY_IRN for the same trained on IRN's confident regions (foreground above 0.30,
# background below 0.05, the scores between ignored).  "(3)": CoSA's 3 components, the default before the table
# over the styles chose 4
AFFINITY, AFFINITY_IRN = "{affinity}", "{affinity-irn}"
AFFINITIES = {AFFINITY: ("aff", {}), AFFINITY_IRN: ("aff_irn", {"confident": "fixed", "fg_thresh": 0.30,
                                                                "bg_thresh": 0.05})}
REFINES: dict[str, list[str]] = {
    "GMM of 3 components + CRF": ["--gmm-components", "3"],  # CoSA's mixture, the default before this table
    "per-class GMM (3) + CRF": ["--gmm-per-class", "--gmm-components", "3"],
    "fixed 0.15 + CRF": ["--threshold", "fixed", "--bg-thresh", "0.15"],  # IRN's CAM threshold on VOC
    "walk + GMM (3) + CRF": ["--random-walk", AFFINITY, "--gmm-components", "3"],
    "walk + per-class GMM (3) + CRF": ["--random-walk", AFFINITY, "--gmm-per-class", "--gmm-components", "3"],
    "IRN's walk (256 steps, beta 10) + GMM (3) + CRF": ["--random-walk", AFFINITY, "--rw-steps", "256", "--rw-beta",
                                                        "10", "--gmm-components", "3"],
    "IRN's walk + per-class GMM (3) + CRF": ["--random-walk", AFFINITY, "--rw-steps", "256", "--rw-beta", "10",
                                            "--gmm-per-class", "--gmm-components", "3"],
    "GMM of 2 components + CRF": ["--gmm-components", "2"],
    "per-image GMM (3) + CRF": ["--threshold", "gmm-image", "--gmm-components", "3"],
    "fixed 0.15, no CRF": ["--threshold", "fixed", "--bg-thresh", "0.15", "--no-crf"],
    "walk (IRN's regions) + GMM (3) + CRF": ["--random-walk", AFFINITY_IRN, "--gmm-components", "3"],
    "walk (IRN's regions) + fixed 0.15 + CRF": ["--random-walk", AFFINITY_IRN, "--threshold", "fixed",
                                                "--bg-thresh", "0.15"],
    "IRN's walk on IRN's regions + fixed 0.25 + CRF": ["--random-walk", AFFINITY_IRN, "--rw-steps", "256",
                                                       "--rw-beta", "10", "--threshold", "fixed", "--bg-thresh",
                                                       "0.25"],  # IRN's setting after its walk
    "GMM of 4 components + CRF (the default)": ["--gmm-components", "4"],
    "GMM (3), no CRF": ["--no-crf", "--gmm-components", "3"],
    "GMM of 5 components + CRF": ["--gmm-components", "5"],
}
DEFAULT_REFINE = "GMM of 4 components + CRF (the default)"


def refine(folder: Path, root: Path, cams: Path, names: list[str], seed: int = 0) -> dict[str, dict]:
    """Pseudo-labels on train of the run's CAMs, per :data:`REFINES`: those of ``names`` are made if missing, and
    every finished one is read: mIoU and the share of pixels called foreground (a label-free figure).  The walk
    spreads the maps over the affinities that ``wsss train-aff`` (the recipe's ``[train-aff]`` table) learns from
    these CAMs: it grows a map by appearance, where the classifier has no evidence left."""
    from wsss import artifacts

    wsss = wsss_command()
    common = ["--root", str(root), "--split", "train", "--seed", str(seed)]
    config = folder / "refine.json"
    artifacts.write_json(config, recipe_table("refine", {}))
    figures = {}
    for number, (name, extra) in enumerate(REFINES.items()):
        out = folder / "refine" / str(number)
        if name not in names and not finished(out / "metrics.json"):
            continue
        for key, (affinity, overrides) in AFFINITIES.items():
            if key in extra and not finished(folder / affinity / "metrics.json"):
                aff_config = folder / f"train-{affinity}.json"
                artifacts.write_json(aff_config, recipe_table("train-aff", overrides))
                run([wsss, "-q", "train-aff", "--config", str(aff_config), "--cams", str(cams), "--out",
                     str(folder / affinity), "--weights", "none", "--threads", "1", *common],
                    folder / "logs" / f"train-{affinity}.log")
        if not finished(out / "metrics.json"):
            options = [str(folder / AFFINITIES[option][0]) if option in AFFINITIES else option for option in extra]
            run([wsss, "-q", "refine", "--config", str(config), "--cams", str(cams), "--out", str(out), "--eval",
                 "--workers", "1", *options, *common], folder / "logs" / f"refine_{number}.log")
        metrics = json.loads((out / "metrics.json").read_text())
        figures[name] = {"miou": metrics["eval"]["miou"], "foreground": metrics["foreground_ratio"],
                         "per_class_iou": {key: value["iou"] for key, value in
                                           metrics["eval"]["summary"]["per_class"].items()}}
    return figures


def part_pixels(image: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels painted at a part's saturation (see the module's docstring)."""
    import cv2

    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    return hsv[..., 1] > PART_SATURATION * 255


def where_maps_go(root: Path, cams: Path, threshold: float) -> dict[str, dict]:
    """Per class: part recall, body recall and spill (outside every object, per object pixel) at ``threshold``."""
    from wsss import artifacts
    from wsss.datasets.prepared import PreparedDataset

    dataset = PreparedDataset.load(root, "voc")
    sums: dict[str, np.ndarray] = {}  # class -> [part hit, part, body hit, body, spill]
    for image_id in dataset.ids("train"):
        image = dataset.read_image("train", image_id)
        label = dataset.read_mask("train", image_id)
        keys, maps = artifacts.read_cam(cams / f"{image_id}.npz")
        part = part_pixels(image)
        outside = label == 0
        for key, cam in zip(keys, maps):
            name = dataset.classes[int(key)]
            hot = cam >= threshold
            obj = label == key
            counts = sums.setdefault(name, np.zeros(5))
            counts += [(hot & obj & part).sum(), (obj & part).sum(), (hot & obj & ~part).sum(),
                       (obj & ~part).sum(), (hot & outside).sum()]
    return {name: {"part_recall": round(float(c[0] / max(c[1], 1)), 4),
                   "body_recall": round(float(c[2] / max(c[3], 1)), 4),
                   "spill": round(float(c[4] / max(c[1] + c[3], 1)), 4),
                   "part_share": round(float(c[1] / max(c[1] + c[3], 1)), 4)} for name, c in sorted(sums.items())}


def gallery(rows: dict[str, dict], root: Path, path: Path, count: int = 4, height: int = 112) -> None:
    """A picture (PNG, or JPEG by the suffix): per image (the first ``count`` train images, one row per present
    class), the image with its object and the part pixels outlined, then each run's map of that class, captioned
    with the run."""
    import cv2

    from wsss import artifacts
    from wsss.datasets.prepared import PreparedDataset
    from wsss.visualize import cam_heatmap, grid, labelled_tile

    dataset = PreparedDataset.load(root, "voc")
    labels = [label for label in RUNS if label in rows]
    lines = []
    for image_id in dataset.ids("train")[:count]:
        image = dataset.read_image("train", image_id)
        mask = dataset.read_mask("train", image_id)
        for key in sorted(set(np.unique(mask).tolist()) - {0, artifacts.IGNORE_INDEX}):
            outlined = image.copy()
            for region, colour in ((mask == key, (255, 255, 255)), ((mask == key) & part_pixels(image), (0, 0, 0))):
                contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(outlined, contours, -1, colour, 1)
            tiles = [labelled_tile(outlined, f"{image_id} {dataset.classes[key]}", height)]
            for label in labels:
                keys, cams = artifacts.read_cam(REPO / rows[label]["cams"] / f"{image_id}.npz")
                cam = cams[list(keys).index(key)][None] if key in keys else np.zeros((1, *mask.shape), np.float32)
                tiles.append(labelled_tile(cam_heatmap(image, cam), label, height))
            lines.append(tiles)
    picture = grid(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])


def markdown(rows: dict[str, dict]) -> str:
    labels = [label for label in RUNS if label in rows]
    lines = ["| run | val mAP | best threshold | CAM mIoU | mean precision | mean recall | part recall | body recall | "
             "spill | recognised after erasing |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        result = rows[label]
        classes = result["per_class"]
        mean = {key: sum(v[key] for v in classes.values()) / len(classes) for key in ("precision", "recall")}
        where = result["where"]
        place = {key: sum(v[key] for v in where.values()) / len(where) if where else None
                 for key in ("part_recall", "body_recall", "spill")}
        lines.append(f"| {label} | {result.get('val_map') or float('nan'):.2f} | {result['best_threshold']:.2f} | "
                     f"{pct(result['miou'])} | {pct(mean['precision'])} | {pct(mean['recall'])} | "
                     f"{pct(place['part_recall'])} | {pct(place['body_recall'])} | {pct(place['spill'])} | "
                     f"{pct(result.get('recognised'))} |")
    lines += ["", "Per class (IoU; part recall / body recall / spill, %):", "",
              "| class | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name in rows[labels[0]]["per_class"]:
        cells = []
        for label in labels:
            where = rows[label]["where"].get(name, {})
            cells.append(f"{pct(rows[label]['per_class'][name]['iou'])}; {pct(where.get('part_recall'))} / "
                         f"{pct(where.get('body_recall'))} / {pct(where.get('spill'))}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for label in labels:
        refined = rows[label].get("refine")
        if not refined or not RUNS[label].get("refine"):  # the other runs' default refinement: method_summary
            continue
        names = [name for name in rows[label]["per_class"]]
        lines += ["", f"Pseudo-labels of {label}'s CAMs on train (mIoU; share of pixels called foreground; per class "
                      "IoU, %):", "", "| refinement | mIoU | foreground | " + " | ".join(names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for name, figures in refined.items():
            lines.append(f"| {name} | {pct(figures['miou'])} | {pct(figures['foreground'])} | " + " | ".join(
                pct(figures["per_class_iou"].get(cls)) for cls in names) + " |")
    return "\n".join(lines)


def spread(values: list[float], seeds: list[int]) -> str:
    """``"52.5 ± 1.2 (0, 1, 2)"``, one seed's value alone, or "–"."""
    if not values:
        return "–"
    return (pct(values[0]) if len(values) == 1 else fmt(values)) + f" ({', '.join(map(str, seeds))})"


def over_styles(values: dict[str, dict[int, float]], styles: list[str]) -> list[str]:
    """Cells of one row over ``styles`` from ``values`` (style -> seed -> figure): mean ± std over each style's
    seeds, then the mean over the styles: each seed's mean over every style (where that seed has them all), then
    mean ± std over those seeds."""
    cells = [spread(list(values.get(style, {}).values()), list(values.get(style, {}))) for style in styles]
    seeds = sorted({seed for by_seed in values.values() for seed in by_seed})
    means, counted = [], []
    for seed in seeds:
        figures = [values.get(style, {}).get(seed) for style in styles]
        if figures and None not in figures:
            means.append(sum(figures) / len(figures))
            counted.append(seed)
    return cells + [spread(means, counted)]


def by_label(every: dict[str, dict]) -> dict[str, dict[str, dict[int, dict]]]:
    """The rows of every styles run, as label -> style -> seed -> result."""
    found: dict[str, dict[str, dict[int, dict]]] = {}
    for rows in every.values():
        for label, result in rows.items():
            found.setdefault(label, {}).setdefault(result["style"], {})[result["seed"]] = result
    return found


def refine_summary(every: dict[str, dict]) -> str:
    """Each refinement of the plain CAMs per style and over the styles (:func:`over_styles`)."""
    found = {style: {seed: result["refine"] for seed, result in by_seed.items() if result.get("refine")}
             for style, by_seed in by_label(every).get("plain", {}).items()}  # style -> seed -> refinement -> figures
    found = {style: by_seed for style, by_seed in found.items() if by_seed}
    styles = list(found)
    lines = ["### Refinements of the plain CAMs over the styles", "",
             "Pseudo-label mIoU on train, %, mean ± sample std over seeds (seeds in brackets); the mean over the "
             "styles is each seed's mean over every style, then mean ± std over those seeds.", "",
             "| refinement | " + " | ".join(styles) + " | mean over the styles |", "|---|" + "---|" * (len(styles) + 1)]
    for name in REFINES:
        values = {style: {seed: refined[name]["miou"] for seed, refined in by_seed.items() if name in refined}
                  for style, by_seed in found.items()}
        cells = over_styles(values, styles)
        if any(cell != "–" for cell in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_summary(every: dict[str, dict]) -> str:
    """Each run of :data:`RUNS` per style and over the styles (:func:`over_styles`): its CAMs' mIoU at their best
    threshold, its pseudo-labels' with the default refinement, and both against plain's of the same style and
    seed (the difference per seed, then its mean ± std), for the runs measured on more than one seed."""
    found = by_label(every)
    plain = found.get("plain", {})
    styles = [style for style in STYLES if style in plain]
    # the default refinement, then any other that a run besides plain has
    others = {name for label, by_style in found.items() if label != "plain" for by_seed in by_style.values()
              for result in by_seed.values() for name in result.get("refine", {})}
    names = [DEFAULT_REFINE] + [name for name in REFINES if name in others and name != DEFAULT_REFINE]
    figures = {"CAM": lambda result: result["miou"]}
    for name in names:
        figures[f"pseudo-labels, {name}"] = lambda result, name=name: result.get("refine", {}).get(name, {}).get(
            "miou")
    lines = ["### The methods over the styles", "",
             "mIoU on train, %: the CAMs at their best threshold (picked with masks: a measurement of the maps) and "
             "the pseudo-labels of a refinement; \"gain\" is the run's figure minus plain's on the same style and "
             "seed. Mean ± sample std over seeds (seeds in brackets); the mean over the styles is each seed's mean "
             "over every style, then mean ± std over those seeds.", "",
             "| run | figure | " + " | ".join(styles) + " | mean over the styles |",
             "|---|---|" + "---|" * (len(styles) + 1)]
    for label in RUNS:
        by_style = found.get(label, {})
        if len({seed for by_seed in by_style.values() for seed in by_seed}) < 2:
            continue  # seed 0's runs: the per-style tables
        for name, figure in figures.items():
            values = {style: {seed: figure(result) for seed, result in by_seed.items() if figure(result) is not None}
                      for style, by_seed in by_style.items()}
            lines.append(f"| {label} | {name} | " + " | ".join(over_styles(values, styles)) + " |")
            if label == "plain":
                continue
            gains = {style: {seed: value - figure(plain[style][seed]) for seed, value in by_seed.items()
                             if seed in plain.get(style, {}) and figure(plain[style][seed]) is not None}
                     for style, by_seed in values.items()}
            lines.append(f"| {label} | {name}: gain | " + " | ".join(over_styles(gains, styles)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "work" / "bench" / "partial_cams")
    parser.add_argument("--styles-work", type=Path, default=REPO / "work" / "bench" / "styles")
    parser.add_argument("--style", choices=STYLES, default="parts")
    parser.add_argument("--seed", type=int, default=0, help="the styles run's seed (`bench/styles.py --seed`)")
    parser.add_argument("--run", action="append", choices=sorted(RUNS), default=[])
    parser.add_argument("--refine", action="append", choices=sorted(REFINES), default=[],
                        help="plain: only these refinements (default: every one of REFINES); the other runs: "
                             "these besides the default refinement")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "partial_cams.json")
    parser.add_argument("--md", type=Path, help="write the tables here (between the markers of an existing file)")
    parser.add_argument("--gallery", type=Path, help="write the pictures of the runs' maps here (.png or .jpg)")
    args = parser.parse_args()
    every = json.loads(args.json.read_text()) if args.json.is_file() else {}
    rows = every.setdefault(seed_label(args.style, args.seed), {})
    labels = args.run
    results = in_parallel([lambda label=label: one_run(args.style, label, args.work.resolve(),
                                                       args.styles_work.resolve(), args.refine, args.seed)
                           for label in labels],
                          args.jobs)
    for label, result in zip(labels, results):
        rows[label] = result
    args.json.write_text(json.dumps(every, indent=1) + "\n")
    # the method tables of seed 0 (whose keys are the styles' names), then the refinements over every seed
    tables = "\n\n".join([f"### {key}\n\n{markdown(key_rows)}" for key, key_rows in every.items() if key in STYLES] +
                         [method_summary(every), refine_summary(every)])
    print(tables)
    if args.md:
        write_tables(args.md, tables)
    if args.gallery:
        gallery(rows, args.styles_work.resolve() / seed_label(args.style, args.seed) / "data" / "VOC2012", args.gallery)


if __name__ == "__main__":
    main()
