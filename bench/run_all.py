"""Per-stage quality and throughput of the whole pipeline on the demo data, in one table.

Runs ``run_pipeline.sh`` (``wsss pipeline demo``, which resumes, so a finished run is only read) and prints, for every
stage, the mIoU its output reaches and how fast it ran, from the stages' own ``metrics.json`` and
``metrics_eval_<split>.json`` files.

    python bench/run_all.py                       # ./work/demo, the README's default run
    python bench/run_all.py --out work/bench --fresh
    python bench/run_all.py --no-run --out work/demo   # only read an existing run

Extra arguments after ``--`` go to run_pipeline.sh (e.g. ``-- --set demo-data.num_train=40 --set demo-data.size=64``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsss import artifacts  # noqa: E402


def _read(path: Path) -> dict:
    return artifacts.read_json(path) if path.is_file() else {}


def _miou(folder: Path, split: str) -> str:
    value = _read(artifacts.eval_metrics_path(folder, split)).get("miou")
    return "–" if value is None else f"{100 * value:.1f}"


def _rate(count: float | None, seconds: float | None, unit: str) -> str:
    if not count or not seconds:
        return "–"
    return f"{count / seconds:.2f} {unit}/s"


def table(out: Path) -> str:
    """Return the Markdown table of a finished run under ``out`` (``out/run/<stage>``, see ``RUN_LAYOUT``)."""
    run = out / "run"
    folder = {stage: artifacts.RUN_LAYOUT.folder(run, stage) for stage in ("cls", "cams", "pseudo", "seg", "pred")}
    cams_config = _read(artifacts.config_path(folder["cams"])).get("config", {})
    pred_config = _read(artifacts.config_path(folder["pred"])).get("config", {})
    train_split, val_split = cams_config.get("split", "train"), pred_config.get("split", "val")
    cls, cams, pseudo, seg, pred = (_read(artifacts.metrics_path(folder[stage]))
                                    for stage in ("cls", "cams", "pseudo", "seg", "pred"))
    cls_config = _read(artifacts.config_path(folder["cls"])).get("config", {})
    seg_config = _read(artifacts.config_path(folder["seg"])).get("config", {})
    train_images = len(_read(artifacts.config_path(folder["cams"])).get("ids", [])) or cams.get("num_images")
    cls_images = (train_images or 0) * cls.get("epochs", 0)
    seg_images = seg.get("iteration", 0) * seg_config.get("batch_size", 0)
    rows = [
        ("train-cls", f"val mAP {cls.get('history', [{}])[-1].get('val_map', float('nan')):.3f}" if cls.get("history") else "–",
         _rate(cls_images, cls.get("seconds"), "img"), f"{cls.get('seconds', 0):.0f} s"),
        (f"make-cam (CAM mIoU, {train_split})", _miou(folder["cams"], train_split),
         _rate(cams.get("processed"), cams.get("seconds"), "img"), f"{cams.get('seconds', 0):.0f} s"),
        (f"refine --crf (pseudo-label mIoU, {train_split})", _miou(folder["pseudo"], train_split),
         _rate(pseudo.get("refined"), pseudo.get("seconds"), "img"), f"{pseudo.get('seconds', 0):.0f} s"),
        (f"train-seg (val mIoU, 1 scale, {val_split})",
         "–" if seg.get("val_miou") is None else f"{100 * seg['val_miou']:.1f}",
         _rate(seg_images, seg.get("seconds"), "img"), f"{seg.get('seconds', 0):.0f} s"),
        (f"predict (DeepLab mIoU, {val_split})", _miou(folder["pred"], val_split),
         _rate(pred.get("predicted"), pred.get("seconds"), "img"), f"{pred.get('seconds', 0):.0f} s"),
    ]
    lines = ["| stage | quality (mIoU %) | throughput | time |", "|---|---|---|---|"]
    lines += [f"| {name} | {quality} | {rate} | {time} |" for name, quality, rate, time in rows]
    if cls_config:
        lines.append(f"\nclassifier: {cls_config.get('backbone')}, weights {cls_config.get('weights')}; "
                     f"DeepLab: {seg_config.get('model')}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "work" / "demo")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument("--no-run", action="store_true", help="only read an existing run")
    parser.add_argument("pipeline_args", nargs="*", help="passed to run_pipeline.sh (after --)")
    args = parser.parse_args()
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    if not args.no_run:
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        subprocess.run(["bash", str(REPO / "run_pipeline.sh"), "--out", str(args.out), *args.pipeline_args],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
