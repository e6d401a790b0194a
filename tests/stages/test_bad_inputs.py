"""Every command against bad inputs: exit 1 or 2, one ``Error:`` line, no traceback, no partial file.

The matrix is :data:`CASES`: one row per (command, bad input), with the expected exit code (2 for
what click refuses while parsing options, 1 for a :class:`~wsss.errors.WsssError`) and a piece of
the expected error line.  Arguments are written as a command line whose ``{placeholders}`` name
paths of the :func:`world` fixture (built once for the module: a small prepared dataset, a train-cls
and a train-seg checkpoint, CAMs, pseudo-labels, predictions, a run folder, and broken copies of
them).  ``{out}`` is a fresh output path per row; ``{file}`` is a regular file.

For every row: the exit code, exactly one line starting with ``Error``, no traceback anywhere,
no output folder (or, for rows that fail in the middle of the work, only complete and valid
artifacts in it, never a temporary file), and the world -- inputs and earlier outputs --
untouched.  Rows marked ``subprocess`` run the real ``wsss`` entry point (the crash of item 2 of
the hardening issue was a segmentation fault, which only a separate process can show).

To add a command, add its rows to :data:`CASES` (and what it needs to :func:`world`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wsss.stages.cli import cli
from wsss import artifacts
from wsss.datasets.prepared import SplitSpec, meta_dir, write_prepared

CLASSES = ["background", "cat", "dog"]
TRAIN, VAL = ["t0", "t1", "t2", "t3"], ["v0", "v1"]
HEIGHT, WIDTH = 40, 48


@dataclass(frozen=True)
class Case:
    """One row of the matrix (see the module docstring)."""

    command: str
    bad: str
    args: str
    code: int
    text: str
    creates: bool = False     # may leave complete, valid outputs in {out} (failed in the middle of the work)
    subprocess: bool = False  # run `python -m wsss.stages.cli` instead of CliRunner

    @property
    def id(self) -> str:
        return f"{self.command}: {self.bad}"


# --------------------------------------------------------------------------- the world


def _image(rng, cls: int) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(90, 140, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[8:28, 10:34] = cls
    image[mask > 0] = (220, 40, 40) if cls == 1 else (40, 40, 220)
    return image, mask


def _cams_for(ids, labels) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    cams = {}
    for image_id in ids:
        plane = np.zeros((HEIGHT, WIDTH), np.float32)
        plane[6:30, 8:36] = 0.5
        plane[10:26, 12:32] = 1.0
        cams[image_id] = (np.array(labels[image_id]), plane[None])
    return cams


def _copy_with(source: Path, target: Path, change) -> Path:
    shutil.copytree(source, target)
    change(target)
    return target


def _write_checkpoint(path: Path, model: torch.nn.Module, arch: dict, classes=CLASSES) -> Path:
    artifacts.save_checkpoint(path, {"model": model.state_dict(), "config": {}, "classes": list(classes),
                                     "arch": arch, "step": 1})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Inputs and earlier outputs shared by every row (read-only for them: checked after each row)."""
    from wsss.models.classifier import CamNet
    from wsss.models.deeplab import build_seg_model

    base = tmp_path_factory.mktemp("world")
    w: dict[str, Path] = {"base": base}
    rng = np.random.default_rng(0)

    # a prepared folder dataset: train with masks, val with masks, a split without masks, an empty split
    root = w["root"] = base / "data"
    labels = {}
    for index, image_id in enumerate(TRAIN + VAL + ["n0"]):
        cls = 1 + index % 2
        image, mask = _image(rng, cls)
        artifacts.write_image(root / "images" / f"{image_id}.png", image)
        artifacts.write_label_png(root / "masks" / f"{image_id}.png", mask)
        labels[image_id] = [cls]
    with_masks = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks")
    without_masks = SplitSpec(image_dir="images", image_ext=".png")
    write_prepared(root, "folder", CLASSES, {"train": (with_masks, TRAIN), "val": (with_masks, VAL),
                                             "nomask": (without_masks, ["n0"]), "empty": (with_masks, [])}, labels)
    # the same dataset, broken in one place each
    w["root_corrupt_image"] = _copy_with(root, base / "data_corrupt_image",
                                         lambda r: (r / "images" / "t2.png").write_bytes(b"\x89PNG garbage"))
    w["root_bad_labels"] = _copy_with(root, base / "data_bad_labels", lambda r: (meta_dir(r) / "labels.json").write_text(
        json.dumps({**labels, "t1": [99]})))
    w["root_list_manifest"] = _copy_with(root, base / "data_list_manifest",
                                         lambda r: (meta_dir(r) / "dataset.json").write_text("[1, 2]"))
    w["root_nan_manifest"] = _copy_with(root, base / "data_nan_manifest",
                                        lambda r: (meta_dir(r) / "labels.json").write_text('{"t0": [NaN]}'))

    def wsss_is_a_file(r: Path) -> None:
        shutil.rmtree(meta_dir(r))
        meta_dir(r).write_text("not a folder")
    w["root_wsss_file"] = _copy_with(root, base / "data_wsss_file", wsss_is_a_file)

    # raw datasets for `wsss prepare`
    from wsss.datasets import demo
    w["voc"] = demo.write_demo_dataset(base / "voc", num_train=2, num_val=1, size=24, seed=0)
    w["voc_wsss_file"] = _copy_with(w["voc"], base / "voc_wsss_file", lambda r: (r / "wsss").write_text("x"))

    def bad_annotation(r: Path) -> None:
        first = sorted((r / "Annotations").glob("*.xml"))[0]
        first.write_text("<annotation><object>")
    w["voc_bad_xml"] = _copy_with(w["voc"], base / "voc_bad_xml", bad_annotation)
    coco = w["coco_bad_json"] = base / "coco_bad_json"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_val2014.json").write_text('{"images": [')
    coco = w["coco_list_json"] = base / "coco_list_json"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "instances_val2014.json").write_text("[]")
    own = w["own"] = base / "own"
    for image_id in ("a", "b"):
        artifacts.write_image(own / "images" / f"{image_id}.png", _image(rng, 1)[0])
    (own / "classes.txt").write_text("cat\ndog\n")
    (own / "empty_classes.txt").write_text("")
    (own / "labels.csv").write_text("image,labels\na.png,cat\nb.png,dog\n")
    (own / "unknown_class.csv").write_text("image,labels\na.png,cat\nb.png,horse\n")
    (own / "no_header.csv").write_text("a.png,cat\n")
    (own / "missing_image.csv").write_text("image,labels\na.png,cat\nzz.png,dog\n")

    # checkpoints: train-cls (resnet18), train-seg (deeplabv3_resnet18), and foreign files
    torch.manual_seed(0)
    w["cls_ckpt"] = _write_checkpoint(base / "cls" / "last.pth", CamNet("resnet18", 3, "none"),
                                      {"backbone": "resnet18", "num_classes": 3, "output_stride": 16})
    w["cls_ckpt_other_classes"] = _write_checkpoint(base / "cls_other.pth", torch.nn.Linear(1, 1), {
        "backbone": "resnet18", "num_classes": 3}, classes=["background", "bird", "car"])
    w["seg_ckpt"] = _write_checkpoint(base / "seg" / "last.pth", build_seg_model("deeplabv3_resnet18", 3),
                                      {"model": "deeplabv3_resnet18", "num_classes": 3})
    diverged = torch.nn.Linear(1, 1)
    with torch.no_grad():
        diverged.weight.fill_(float("nan"))
    w["nan_ckpt"] = _write_checkpoint(base / "diverged.pth", diverged, {"backbone": "resnet18", "num_classes": 3})
    w["other_backbone"] = base / "resnet50_like.pth"  # the tensors of a resnet50 that a resnet18 has with other shapes
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)},
               w["other_backbone"])
    w["garbage"] = base / "garbage.pth"
    w["garbage"].write_bytes(b"this is not a checkpoint")
    w["empty_dir"] = base / "empty_dir"
    w["empty_dir"].mkdir()
    w["file"] = base / "a_file"
    w["file"].write_text("a regular file")
    # folders of images for `predict --images`: one with a file that is no image, one whose ids collide
    w["photos_broken"] = base / "photos_broken"
    artifacts.write_image(w["photos_broken"] / "good.png", _image(rng, 1)[0])
    (w["photos_broken"] / "broken.jpg").write_bytes(b"not a jpeg")
    w["photos_twins"] = base / "photos_twins"
    for name in ("cat.png", "cat.jpg"):
        artifacts.write_image(w["photos_twins"] / name, _image(rng, 1)[0])
    # recipes and settings files, each broken in one place
    for name, text in {"recipe_unknown_table": "[trian-cls]\nepochs = 1\n",
                       "recipe_unknown_key": "[train-cls]\nepoch = 1\n",
                       "recipe_wrong_type": '[train-cls]\nepochs = "many"\n',
                       "recipe_nan": "[refine]\nbg_thresh = nan\n",
                       "recipe_out_of_range": "[train-seg]\ncrop_size = 4\n",
                       "recipe_wired": '[make-cam]\ncheckpoint = "x.pth"\n',
                       "settings_unknown": 'colour = "red"\n',
                       "settings_wrong_type": "epochs = 1.5\n"}.items():
        w[name] = base / f"{name}.toml"
        w[name].write_text(text)

    # CAMs of the train split, and broken copies
    cams = w["cams"] = base / "cams"
    for image_id, (keys, planes) in _cams_for(TRAIN, labels).items():
        artifacts.write_cam(artifacts.cam_path(cams, image_id), keys, planes)

    def rewrite(name: str, **arrays):
        return lambda folder: np.savez(artifacts.cam_path(folder, "t1"), **arrays)
    keys = np.array(labels["t1"], np.int16)
    w["cams_nan"] = _copy_with(cams, base / "cams_nan", rewrite(
        "t1", keys=keys, cams=np.full((1, HEIGHT, WIDTH), np.nan, np.float16)))
    w["cams_keys"] = _copy_with(cams, base / "cams_keys", rewrite(
        "t1", keys=np.array([7], np.int16), cams=np.zeros((1, HEIGHT, WIDTH), np.float16)))
    w["cams_range"] = _copy_with(cams, base / "cams_range", rewrite(
        "t1", keys=keys, cams=np.full((1, HEIGHT, WIDTH), 40.0, np.float16)))
    w["cams_size"] = _copy_with(cams, base / "cams_size", rewrite(
        "t1", keys=keys, cams=np.zeros((1, HEIGHT // 2, WIDTH // 2), np.float16)))
    cam_bytes = artifacts.cam_path(cams, "t1").read_bytes()
    w["cams_trunc"] = _copy_with(cams, base / "cams_trunc",
                                 lambda f: artifacts.cam_path(f, "t1").write_bytes(cam_bytes[: len(cam_bytes) // 2]))
    w["cams_zero"] = _copy_with(cams, base / "cams_zero", lambda f: artifacts.cam_path(f, "t1").write_bytes(b""))
    w["cams_missing"] = _copy_with(cams, base / "cams_missing", lambda f: artifacts.cam_path(f, "t1").unlink())

    def pickled(folder: Path) -> None:
        artifacts.cam_path(folder, "t1").unlink()
        np.save(artifacts.irn_cam_path(folder, "t1"), {"keys": np.array([0]), "high_res": np.zeros((1, 4, 4))},
                allow_pickle=True)
    w["cams_pickled"] = _copy_with(cams, base / "cams_pickled", pickled)

    # pseudo-labels (+ reliability) of train: a finished refine output, and broken copies
    pseudo = w["pseudo"] = base / "pseudo"
    result = CliRunner().invoke(cli, ["refine", "--cams", str(cams), "--root", str(root), "--out", str(pseudo),
                                      "--workers", "0", "--threshold", "fixed"])
    assert result.exit_code == 0, result.output

    def label_50(folder: Path) -> None:
        label = artifacts.read_label_png(artifacts.label_path(folder, "t1")).copy()
        label[4:, :] = 50
        artifacts.write_label_png(artifacts.label_path(folder, "t1"), label)
    w["pseudo_50"] = _copy_with(pseudo, base / "pseudo_50", label_50)
    w["pseudo_nan_rel"] = _copy_with(pseudo, base / "pseudo_nan_rel", lambda f: np.save(
        artifacts.reliability_path(f, "t1"), np.full((HEIGHT, WIDTH), np.nan, np.float16)))
    w["pseudo_missing"] = _copy_with(pseudo, base / "pseudo_missing",
                                     lambda f: artifacts.label_path(f, "t2").unlink())
    # predictions of val, and broken copies
    pred = w["pred"] = base / "pred"
    for image_id in VAL:
        artifacts.write_label_png(artifacts.label_path(pred, image_id), _image(rng, 1)[1])
    w["pred_50"] = _copy_with(pred, base / "pred_50", lambda f: artifacts.write_label_png(
        artifacts.label_path(f, "v0"), np.full((HEIGHT, WIDTH), 50, np.uint8)))
    w["pred_size"] = _copy_with(pred, base / "pred_size", lambda f: artifacts.write_label_png(
        artifacts.label_path(f, "v0"), np.zeros((HEIGHT + 1, WIDTH), np.uint8)))
    # a train-seg output that did not train on ground truth (for --upper-bound), and one of the wrong type
    w["seg_not_gt"] = base / "seg_not_gt"
    artifacts.write_json(artifacts.metrics_path(w["seg_not_gt"]), {"labels": str(pseudo), "val_miou": 0.5})
    w["seg_list"] = base / "seg_list"
    artifacts.write_json(artifacts.metrics_path(w["seg_list"]), [0.5])

    # run folders for `wsss report`
    def run_with(name: str, text: str | None = None, files: dict[str, str] | None = None) -> Path:
        run = base / name
        evaluation = {"split": "train", "miou": 0.5, "summary": {"per_class": {"cat": {"iou": 0.5}}}}
        eval_file = artifacts.eval_metrics_path(run / "cams", "train")
        artifacts.write_json(eval_file, evaluation)
        if text is not None:
            eval_file.write_text(text)
        for relative, content in (files or {}).items():
            (run / relative).parent.mkdir(parents=True, exist_ok=True)
            (run / relative).write_text(content)
        return run
    w["run_list"] = run_with("run_list", "[0.5]")
    w["run_string"] = run_with("run_string", '"mIoU 0.5"')
    w["run_miou_string"] = run_with("run_miou_string", '{"split": "train", "miou": "high"}')
    w["run_nan"] = run_with("run_nan", '{"split": "train", "miou": NaN}')
    w["run_history"] = run_with("run_history", files={"seg/metrics.json": '{"history": [{"step": 1, "loss": "low"}]}'})
    w["run_truncated_cam"] = run_with("run_truncated_cam", files={"cams/config.json": json.dumps(
        {"config": {"root": str(root), "dataset": "folder", "split": "train"}})})
    for image_id in TRAIN:  # the gallery shows the CAMs; one is truncated
        shutil.copy(artifacts.cam_path(w["cams_trunc"], image_id),
                    artifacts.cam_path(w["run_truncated_cam"] / "cams", image_id))
    w["run_report_folder"] = run_with("run_report_folder")
    (w["run_report_folder"] / "report.md").mkdir()
    w["run_eval_folder"] = base / "run_eval_folder"
    artifacts.eval_metrics_path(w["run_eval_folder"] / "cams", "train").mkdir(parents=True)
    return w


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Path -> (size, mtime, inode, content hash for small files) of every file under ``folder``."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            info = path.stat()
            digest = hashlib.sha1(path.read_bytes()).hexdigest() if info.st_size < 1 << 20 else None
            state[str(path.relative_to(folder))] = (info.st_size, info.st_mtime_ns, info.st_ino, digest)
    return state


def _check_valid_artifact(path: Path) -> None:
    readers = {".npz": artifacts.read_cam, ".png": artifacts.read_label_png, ".npy": artifacts.read_reliability,
               ".json": artifacts.read_json, ".pth": artifacts.load_checkpoint, ".jpg": artifacts.read_image}
    assert not path.name.startswith("."), f"temporary file left behind: {path}"
    readers[path.suffix](path)  # raises for a partial or broken file


# --------------------------------------------------------------------------- the matrix

REFINE = "refine --root {root} --cams {cams} --out {out} --workers 0"
CLS = "train-cls --root {root} --out {out} --backbone resnet18 --weights none --crop-size 32 --batch-size 2 " \
      "--epochs 1 --device cpu --workers 0 --val-split none"
CAM = "make-cam --root {root} --checkpoint {cls_ckpt} --out {out} --scales 1.0 --device cpu --workers 0"
SEG = "train-seg --root {root} --out {out} --model deeplabv3_resnet18 --weights none --crop-size 32 --batch-size 2 " \
      "--iterations 2 --device cpu --workers 0 --val-split none"
IMAGES = "predict --checkpoint {seg_ckpt} --out {out} --scales 1.0 --device cpu --workers 0 --images "
PRED = "predict --root {root} --checkpoint {seg_ckpt} --out {out} --scales 1.0 --device cpu --workers 0"
EVAL = "eval --root {root} --workers 0"
PRE = "pretrain --root {root} --out {out} --backbone resnet18 --crop-size 32 --batch-size 2 --epochs 1 --device cpu " \
      "--workers 0 --probe-split none"
AFF = "train-aff --root {root} --cams {cams} --out {out} --backbone resnet18 --weights none --embed-dim 8 " \
      "--crop-size 32 --batch-size 2 --epochs 1 --device cpu --workers 0 --confident fixed --no-crf"

CASES = [
    # ---------------------------------------------------------------- the group
    Case("wsss", "unknown command", "train-everything", 2, "No such command"),
    Case("wsss", "unknown option", "--colour", 2, "No such option"),
    # ---------------------------------------------------------------- demo-data
    Case("demo-data", "zero images", "demo-data {out} --num-train 0", 2, "--num-train"),
    Case("demo-data", "tiny size", "demo-data {out} --size 8", 2, "--size"),
    Case("demo-data", "seed not a number", "demo-data {out} --seed one", 2, "--seed"),
    Case("demo-data", "out is a file", "demo-data {file}", 2, "is a file"),
    Case("demo-data", "out under a file", "demo-data {file}/sub", 1, "a file stands where a folder is needed"),
    # ---------------------------------------------------------------- prepare
    Case("prepare", "no kind", "prepare --root {voc}", 2, "No such option"),
    Case("prepare voc", "root missing", "prepare voc --root {base}/nowhere", 1, "VOC root not found"),
    Case("prepare voc", "root is a file", "prepare voc --root {file}", 2, "is a file"),
    Case("prepare voc", "wsss/ is a file", "prepare voc --root {voc_wsss_file}", 1,
         "a file stands where a folder is needed"),
    Case("prepare voc", "broken annotation XML", "prepare voc --root {voc_bad_xml} --workers 0", 1,
         "not a readable VOC annotation"),
    Case("prepare voc", "split file missing", "prepare voc --root {voc} --split-file {base}/nowhere.txt", 1,
         "nowhere.txt"),
    Case("prepare voc", "negative workers", "prepare voc --root {voc} --workers -1", 2, "--workers"),
    Case("prepare coco", "root missing", "prepare coco --root {base}/nowhere --split val2014", 1,
         "COCO root not found"),
    Case("prepare coco", "no split", "prepare coco --root {coco_bad_json}", 2, "--split"),
    Case("prepare coco", "truncated instances JSON", "prepare coco --root {coco_bad_json} --split val2014", 1,
         "not a valid JSON file"),
    Case("prepare coco", "instances JSON is a list", "prepare coco --root {coco_list_json} --split val2014", 1,
         "instances_val2014.json"),
    Case("prepare folder", "unknown class in CSV",
         "prepare folder --images {own}/images --labels {own}/unknown_class.csv --classes {own}/classes.txt "
         "--root {out} --workers 0", 1, "horse"),
    Case("prepare folder", "CSV without header",
         "prepare folder --images {own}/images --labels {own}/no_header.csv --classes {own}/classes.txt "
         "--root {out} --workers 0", 1, "no_header.csv"),
    Case("prepare folder", "CSV names a missing image",
         "prepare folder --images {own}/images --labels {own}/missing_image.csv --classes {own}/classes.txt "
         "--root {out} --workers 0", 1, "zz.png"),
    Case("prepare folder", "empty class list",
         "prepare folder --images {own}/images --labels {own}/labels.csv --classes {own}/empty_classes.txt "
         "--root {out} --workers 0", 1, "class list is empty"),
    Case("prepare folder", "images folder missing",
         "prepare folder --images {base}/nowhere --labels {own}/labels.csv --classes {own}/classes.txt "
         "--root {out} --workers 0", 1, "nowhere"),
    Case("prepare folder", "labels is a folder",
         "prepare folder --images {own}/images --labels {own}/images --classes {own}/classes.txt --root {out}", 2,
         "is a folder, expected a file"),
    # ---------------------------------------------------------------- train-cls
    Case("train-cls", "lr nan", CLS + " --lr nan", 2, "'--lr': nan: must be a finite number"),
    Case("train-cls", "lr negative", CLS + " --lr -1", 2, "'--lr': -1: must be > 0"),
    Case("train-cls", "lr zero", CLS + " --lr 0", 2, "--lr"),
    Case("train-cls", "momentum nan", CLS + " --momentum nan", 2, "--momentum"),
    Case("train-cls", "momentum 1", CLS + " --momentum 1", 2, "--momentum"),
    Case("train-cls", "weight decay inf", CLS + " --weight-decay inf", 2, "--weight-decay"),
    Case("train-cls", "er-weight nan", CLS + " --er-weight nan", 2, "--er-weight"),
    Case("train-cls", "erase-thresh inf", CLS + " --erase-thresh inf", 2, "--erase-thresh"),
    Case("train-cls", "val-cam-threshold nan", CLS + " --val-cam-threshold nan", 2, "--val-cam-threshold"),
    Case("train-cls", "batch size 0", CLS + " --batch-size 0", 2, "--batch-size"),
    Case("train-cls", "epochs 0", CLS + " --epochs 0", 2, "--epochs"),
    Case("train-cls", "epochs not a number", CLS + " --epochs nan", 2, "--epochs"),
    Case("train-cls", "crop size 4", CLS + " --crop-size 4", 2, "--crop-size"),
    Case("train-cls", "scale range reversed", CLS + " --scale-range 1.5,0.5", 2, "--scale-range"),
    Case("train-cls", "scale range nan", CLS + " --scale-range nan,1", 2, "finite"),
    Case("train-cls", "unknown backbone", CLS + " --backbone vgg16", 2, "--backbone"),
    Case("train-cls", "unknown device", CLS + " --device tpu", 2, "--device"),
    Case("train-cls", "root missing", CLS.replace("{root}", "{base}/nowhere"), 1, "dataset root not found"),
    Case("train-cls", "dataset not prepared", CLS.replace("{root}", "{voc}"), 1, "dataset not prepared"),
    Case("train-cls", "wsss/ is a file", CLS.replace("{root}", "{root_wsss_file}"), 1, "dataset not prepared"),
    Case("train-cls", "dataset.json is a list", CLS.replace("{root}", "{root_list_manifest}"), 1,
         "dataset.json: expected an object"),
    Case("train-cls", "labels.json holds NaN", CLS.replace("{root}", "{root_nan_manifest}"), 1,
         "labels.json: not a valid JSON file"),
    Case("train-cls", "label index 99", CLS.replace("{root}", "{root_bad_labels}"), 1,
         "labels.json: labels of 't1' are [99]"),
    Case("train-cls", "unknown split", CLS + " --split nosuch", 1, "no split 'nosuch'"),
    Case("train-cls", "empty split", CLS + " --split empty", 1, "is empty"),
    Case("train-cls", "weights file missing", CLS.replace("--weights none", "--weights {base}/nowhere.pth"), 1,
         "nowhere.pth: file not found"),
    Case("train-cls", "weights of another backbone", CLS.replace("--weights none", "--weights {other_backbone}"), 1,
         "in resnet18 (weights of another backbone?)"),
    Case("train-cls", "weights file is garbage", CLS.replace("--weights none", "--weights {garbage}"), 1,
         "not a readable state_dict"),
    Case("train-cls", "out is a file", CLS.replace("{out}", "{file}"), 2, "is a file"),
    Case("train-cls", "out under a file", CLS.replace("{out}", "{file}/run"), 1,
         "a file stands where a folder is needed"),
    # ---------------------------------------------------------------- pretrain
    Case("pretrain", "lr nan", PRE + " --lr nan", 2, "'--lr': nan: must be a finite number"),
    Case("pretrain", "lr zero", PRE + " --lr 0", 2, "--lr"),
    Case("pretrain", "temperature zero", PRE + " --temperature 0", 2, "--temperature"),
    Case("pretrain", "temperature inf", PRE + " --temperature inf", 2, "--temperature"),
    Case("pretrain", "min-scale nan", PRE + " --min-scale nan", 2, "--min-scale"),
    Case("pretrain", "key momentum 1", PRE + " --queue 8 --key-momentum 1", 2, "--key-momentum"),
    Case("pretrain", "negative queue", PRE + " --queue -4", 2, "--queue"),
    Case("pretrain", "queue with rotation", PRE + " --method rotation --queue 8", 2,
         "'--queue': 8: the MoCo queue belongs to --method contrastive"),
    Case("pretrain", "unknown method", PRE + " --method jigsaw", 2, "--method"),
    Case("pretrain", "epochs 0", PRE + " --epochs 0", 2, "--epochs"),
    Case("pretrain", "batch size 1", PRE + " --batch-size 1", 2, "--batch-size"),
    Case("pretrain", "warm-up negative", PRE + " --warmup-epochs -1", 2, "--warmup-epochs"),
    Case("pretrain", "weight decay inf", PRE + " --weight-decay inf", 2, "--weight-decay"),
    Case("pretrain", "probe split missing", PRE.replace("--probe-split none", "--probe-split nosuch"), 1,
         "--probe-split nosuch"),
    Case("pretrain", "root missing", PRE.replace("{root}", "{base}/nowhere"), 1, "dataset root not found"),
    Case("pretrain", "empty split", PRE + " --split empty", 1, "is empty"),
    Case("pretrain", "unknown split", PRE + " --split nosuch", 1, "no split 'nosuch'"),
    Case("pretrain", "out is a file", PRE.replace("{out}", "{file}"), 2, "is a file"),
    Case("pretrain", "out under a file", PRE.replace("{out}", "{file}/pre"), 1,
         "a file stands where a folder is needed"),
    # ---------------------------------------------------------------- train-aff
    Case("train-aff", "CAM folder missing", AFF.replace("{cams}", "{base}/nowhere"), 1, "CAM folder not found"),
    Case("train-aff", "CAM missing", AFF.replace("{cams}", "{cams_missing}"), 1, "t1.npz: CAM file not found"),
    Case("train-aff", "NaN CAM", AFF.replace("{cams}", "{cams_nan}"), 1, "t1.npz: CAMs hold NaN", creates=True),
    Case("train-aff", "truncated CAM", AFF.replace("{cams}", "{cams_trunc}"), 1, "t1.npz: not a valid CAM file",
         creates=True),
    Case("train-aff", "CAM keys outside the classes", AFF.replace("{cams}", "{cams_keys}"), 1, "t1.npz: CAM keys [7]",
         creates=True),
    Case("train-aff", "fg-thresh nan", AFF + " --fg-thresh nan", 2, "--fg-thresh"),
    Case("train-aff", "bg above fg", AFF + " --fg-thresh 0.2 --bg-thresh 0.4", 2,
         "'--bg-thresh': 0.4: must not exceed --fg-thresh 0.2"),
    Case("train-aff", "radius 1", AFF + " --radius 1", 2, "--radius"),
    Case("train-aff", "crop size 8", AFF + " --crop-size 8", 2, "--crop-size"),
    Case("train-aff", "embed-dim 0", AFF + " --embed-dim 0", 2, "--embed-dim"),
    Case("train-aff", "unknown confident source", AFF + " --confident saliency", 2, "--confident"),
    Case("train-aff", "lr nan", AFF + " --lr nan", 2, "--lr"),
    Case("train-aff", "weights of another backbone", AFF.replace("--weights none", "--weights {other_backbone}"), 1,
         "resnet18", creates=True),
    Case("train-aff", "empty split", AFF + " --split empty", 1, "is empty"),
    Case("train-aff", "out under a file", AFF.replace("{out}", "{file}/aff"), 1,
         "a file stands where a folder is needed"),
    # ---------------------------------------------------------------- refine --random-walk
    Case("refine", "random walk folder missing", REFINE + " --random-walk {base}/nowhere", 1, "checkpoint not found"),
    Case("refine", "random walk with a train-cls checkpoint", REFINE + " --random-walk {cls_ckpt}", 1,
         "not a `wsss train-aff` checkpoint"),
    Case("refine", "rw-beta nan", REFINE + " --random-walk {base}/nowhere --rw-beta nan", 2, "--rw-beta"),
    Case("refine", "rw-steps 0", REFINE + " --random-walk {base}/nowhere --rw-steps 0", 2, "--rw-steps"),
    # ---------------------------------------------------------------- train-cls regularisers
    Case("train-cls", "reg-start nan", CLS + " --reg-start nan", 2, "--reg-start"),
    Case("train-cls", "reg-ramp 2", CLS + " --reg-ramp 2", 2, "--reg-ramp"),
    Case("train-cls", "unknown er-target", CLS + " --er-target none", 2, "--er-target"),
    Case("train-cls", "unknown erase fill", CLS + " --erase-fill noise", 2, "--erase-fill"),
    Case("train-cls", "erase-stop negative", CLS + " --erase-stop -0.1", 2, "--erase-stop"),
    # ---------------------------------------------------------------- make-cam
    Case("make-cam", "scales nan", CAM.replace("--scales 1.0", "--scales nan"), 2, "finite"),
    Case("make-cam", "scales inf", CAM.replace("--scales 1.0", "--scales 1,inf"), 2, "finite"),
    Case("make-cam", "scale 0", CAM.replace("--scales 1.0", "--scales 0"), 2, "positive"),
    Case("make-cam", "score-thresh nan", CAM + " --classes pred --score-thresh nan", 2, "--score-thresh"),
    Case("make-cam", "score-thresh 1.5", CAM + " --classes pred --score-thresh 1.5", 2, "--score-thresh"),
    Case("make-cam", "erase-thresh 0", CAM + " --erase-thresh 0", 2, "--erase-thresh"),
    Case("make-cam", "erase-stop above 1", CAM + " --erase-stop 1.5", 2, "--erase-stop"),
    Case("make-cam", "batch size 0", CAM + " --batch-size 0", 2, "--batch-size"),
    Case("make-cam", "sweep of a billion thresholds", CAM + " --eval --sweep 0:1:1e-9", 2, "at most 10000"),
    Case("make-cam", "sweep nan", CAM + " --eval --sweep nan:1:0.1", 2, "finite"),
    Case("make-cam", "shard 3/2", CAM + " --shard 3/2", 2, "0 <= I < N"),
    Case("make-cam", "shard not I/N", CAM + " --shard half", 2, "I/N"),
    Case("make-cam", "checkpoint missing", CAM.replace("{cls_ckpt}", "{base}/nowhere.pth"), 1,
         "nowhere.pth: checkpoint not found"),
    Case("make-cam", "folder without checkpoints", CAM.replace("{cls_ckpt}", "{empty_dir}"), 1, "checkpoint not found"),
    Case("make-cam", "checkpoint is garbage", CAM.replace("{cls_ckpt}", "{garbage}"), 1,
         "not a readable wsss checkpoint"),
    Case("make-cam", "a train-seg checkpoint", CAM.replace("{cls_ckpt}", "{seg_ckpt}"), 1,
         "not a classifier checkpoint"),
    Case("make-cam", "checkpoint with NaN weights", CAM.replace("{cls_ckpt}", "{nan_ckpt}"), 1,
         "diverged.pth: weight 'weight' holds NaN or infinite values"),
    Case("make-cam", "a bare state dict", CAM.replace("{cls_ckpt}", "{other_backbone}"), 1,
         "a bare state dict goes to --weights"),
    Case("make-cam", "classifier of other classes", CAM.replace("{cls_ckpt}", "{cls_ckpt_other_classes}"), 1,
         "the classifier was trained on classes ['background', 'bird', 'car']"),
    Case("make-cam", "dataset not prepared", CAM.replace("{root}", "{voc}"), 1, "dataset not prepared"),
    Case("make-cam", "empty split", CAM + " --split empty", 1, "split 'empty' has no images"),
    Case("make-cam", "eval without masks", CAM + " --split nomask --eval", 1, "has no ground-truth masks",
         creates=True),
    Case("make-cam", "corrupt image in a DataLoader worker",
         CAM.replace("{root}", "{root_corrupt_image}").replace("--workers 0", "--workers 2"), 1,
         "t2.png: not a readable image", creates=True),
    Case("make-cam", "out under a file", CAM.replace("{out}", "{file}/cams"), 1,
         "a file stands where a folder is needed"),
    # ---------------------------------------------------------------- refine
    # refine works image by image: the images before a bad CAM are finished (and kept for the resume)
    Case("refine", "NaN CAM", REFINE.replace("{cams}", "{cams_nan}"), 1, "t1.npz: CAMs hold NaN", creates=True),
    Case("refine", "CAM keys outside the classes", REFINE.replace("{cams}", "{cams_keys}"), 1,
         "t1.npz: CAM keys [7] are not the dataset's foreground class indices (1..2)", creates=True),
    Case("refine", "CAM values far above 1", REFINE.replace("{cams}", "{cams_range}"), 1, "expected max-normalised",
         creates=True),
    Case("refine", "CAM of another image size", REFINE.replace("{cams}", "{cams_size}"), 1,
         "t1.npz: CAM is 24x20 but the image", creates=True),
    Case("refine", "truncated CAM", REFINE.replace("{cams}", "{cams_trunc}"), 1, "t1.npz: not a valid CAM file",
         creates=True),
    Case("refine", "zero-byte CAM", REFINE.replace("{cams}", "{cams_zero}"), 1,
         "t1.npz: not a valid CAM file (empty file)", subprocess=True, creates=True),
    Case("refine", "CAM missing", REFINE.replace("{cams}", "{cams_missing}"), 1, "t1.npz: CAM file not found"),
    Case("refine", "pickled CAM without --allow-pickle", REFINE.replace("{cams}", "{cams_pickled}"), 1,
         "--allow-pickle"),
    Case("refine", "CAM folder missing", REFINE.replace("{cams}", "{base}/nowhere"), 1, "CAM folder not found"),
    Case("refine", "CRF bilateral nan (was a segfault)", REFINE + " --crf --crf-bilateral-srgb nan", 2,
         "'--crf-bilateral-srgb': nan: must be a finite number", subprocess=True),
    Case("refine", "CRF gaussian width 0", REFINE + " --crf --crf-gaussian-sxy 0", 2, "'--crf-gaussian-sxy': 0: must be > 0"),
    Case("refine", "CRF compat below 0", REFINE + " --crf --crf-bilateral-compat -1", 2, "must be >= 0"),
    Case("refine", "CRF scale 0", REFINE + " --crf --crf-scale 0", 2, "--crf-scale"),
    Case("refine", "CRF temperature nan", REFINE + " --crf-temperature nan", 2, "--crf-temperature"),
    Case("refine", "raw-beta nan", REFINE + " --raw-beta nan", 2, "--raw-beta"),
    Case("refine", "raw-alpha 1", REFINE + " --raw-alpha 1", 2, "--raw-alpha"),
    Case("refine", "bg-thresh 1", REFINE + " --bg-thresh 1", 2, "--bg-thresh"),
    Case("refine", "fg-thresh without fixed", REFINE + " --fg-thresh 0.3", 2, "--threshold fixed"),
    Case("refine", "gmm-samples 10", REFINE + " --gmm-samples 10", 2, "--gmm-samples"),
    Case("refine", "negative workers", REFINE.replace("--workers 0", "--workers -2"), 2, "--workers"),
    Case("refine", "shard 3/2", REFINE + " --shard 3/2", 2, "0 <= I < N"),
    Case("refine", "empty split", REFINE + " --split empty", 1, "split 'empty' has no images"),
    Case("refine", "out is the CAM folder", REFINE.replace("{out}", "{cams}"), 1, "--out must differ from --cams"),
    Case("refine", "out under a file", REFINE.replace("{out}", "{file}/pseudo"), 1,
         "a file stands where a folder is needed"),
    Case("refine", "resume with other settings", REFINE.replace("{out}", "{pseudo}") + " --bg-thresh 0.3", 1,
         "was refined with other settings (--bg-thresh, --threshold)"),
    # ---------------------------------------------------------------- train-seg
    Case("train-seg", "lr nan", SEG + " --labels gt --lr nan", 2, "'--lr': nan: must be a finite number"),
    Case("train-seg", "lr negative", SEG + " --labels gt --lr -0.1", 2, "--lr"),
    Case("train-seg", "epochs nan", SEG.replace("--iterations 2", "--epochs nan") + " --labels gt", 2, "--epochs"),
    Case("train-seg", "epochs inf", SEG.replace("--iterations 2", "--epochs inf") + " --labels gt", 2, "--epochs"),
    Case("train-seg", "epochs 0", SEG.replace("--iterations 2", "--epochs 0") + " --labels gt", 2, "--epochs"),
    Case("train-seg", "iterations 0", SEG.replace("--iterations 2", "--iterations 0") + " --labels gt", 2,
         "--iterations"),
    Case("train-seg", "batch size 1", SEG.replace("--batch-size 2", "--batch-size 1") + " --labels gt", 2,
         "--batch-size"),
    Case("train-seg", "scale range with 0", SEG + " --labels gt --scale-range 0,1", 2, "--scale-range"),
    Case("train-seg", "loss diverges to NaN", SEG.replace("--iterations 2", "--iterations 4") +
         " --labels gt --lr 1e30 --log-every 1", 1, "training stopped: the loss became NaN or infinite at step",
         creates=True),
    Case("train-seg", "pseudo-label class 50 (DataLoader worker)",
         SEG.replace("--workers 0", "--workers 2") + " --labels {pseudo_50}", 1,
         "t1.png: label map holds class index 50; the dataset's classes are 0..2", creates=True),
    Case("train-seg", "NaN reliability map", SEG + " --labels {pseudo_nan_rel} --raw", 1,
         "t1.npy: reliability map holds NaN", creates=True),
    Case("train-seg", "pseudo-label missing", SEG + " --labels {pseudo_missing}", 1, "t2.png: pseudo-label not found"),
    Case("train-seg", "label folder missing", SEG + " --labels {base}/nowhere", 1, "pseudo-label folder not found"),
    Case("train-seg", "--raw with gt", SEG + " --labels gt --raw", 2, "--raw needs --labels DIR"),
    Case("train-seg", "weights of another backbone",
         SEG.replace("--weights none", "--weights-backbone {other_backbone}") + " --labels gt", 1,
         "in resnet18 (weights of another backbone?)"),
    Case("train-seg", "upper bound not a gt run", SEG.replace("--val-split none", "") + " --labels gt "
         "--upper-bound {seg_not_gt}", 1, "must be a `train-seg --labels gt` run"),
    Case("train-seg", "upper bound metrics is a list", SEG.replace("--val-split none", "") + " --labels gt "
         "--upper-bound {seg_list}", 1, "metrics.json: expected an object"),
    Case("train-seg", "val split without masks", SEG.replace("--val-split none", "--val-split nomask") +
         " --labels gt", 1, "--val-split nomask: split has no ground-truth masks"),
    Case("train-seg", "select val-miou without val split", SEG + " --labels gt --select val-miou", 2,
         "'--select': val-miou: needs a --val-split"),
    Case("train-seg", "empty split", SEG + " --labels gt --split empty", 1, "is empty"),
    Case("train-seg", "out is a file", SEG.replace("{out}", "{file}") + " --labels gt", 2, "is a file"),
    # ---------------------------------------------------------------- predict
    Case("predict", "a train-cls checkpoint", PRED.replace("{seg_ckpt}", "{cls_ckpt}"), 1,
         "not a train-seg checkpoint"),
    Case("predict", "checkpoint missing", PRED.replace("{seg_ckpt}", "{base}/nowhere.pth"), 1, "checkpoint not found"),
    Case("predict", "empty split", PRED + " --split empty", 1, "split 'empty' has no images"),
    Case("predict", "eval without masks", PRED + " --split nomask --eval", 1, "has no ground-truth masks"),
    Case("predict", "scales inf", PRED.replace("--scales 1.0", "--scales inf"), 2, "finite"),
    Case("predict", "CRF bilateral nan (was a segfault)", PRED + " --crf --crf-bilateral-sxy nan", 2,
         "'--crf-bilateral-sxy': nan: must be a finite number", subprocess=True),
    Case("predict", "CRF scale nan", PRED + " --crf --crf-scale nan", 2, "--crf-scale"),
    Case("predict", "overlay alpha 2", PRED + " --overlay --overlay-alpha 2", 2, "--overlay-alpha"),
    Case("predict", "shard 1/1", PRED + " --shard 1/1", 2, "0 <= I < N"),
    Case("predict", "out under a file", PRED.replace("{out}", "{file}/pred"), 1,
         "a file stands where a folder is needed"),
    Case("predict", "images and root", PRED + " --images {photos_twins}", 2, "'--images'"),
    Case("predict", "neither images nor root", PRED.replace("--root {root} ", ""), 2, "'--root'"),
    Case("predict", "images path missing", IMAGES + "{base}/nowhere", 2, "nowhere"),
    Case("predict", "images folder without images", IMAGES + "{empty_dir}", 1, "empty_dir: no images"),
    Case("predict", "images not an image", IMAGES + "{file}", 1, "a_file: not a readable image", creates=True),
    Case("predict", "images unreadable in a folder", IMAGES + "{photos_broken}", 1, "broken.jpg: not a readable image",
         creates=True),
    Case("predict", "images with the same id", IMAGES + "{photos_twins}", 1, "has the id 'cat'"),
    Case("predict", "images with --eval", IMAGES + "{photos_twins} --eval", 2, "no ground truth"),
    Case("predict", "max side 0", PRED + " --max-side 0", 2, "--max-side"),
    # ---------------------------------------------------------------- export
    Case("export", "a train-cls checkpoint", "export --checkpoint {cls_ckpt} --out {out}", 1,
         "not a train-seg checkpoint"),
    Case("export", "checkpoint not a checkpoint", "export --checkpoint {garbage} --out {out}", 1, "garbage.pth"),
    Case("export", "format unknown", "export --checkpoint {seg_ckpt} --out {out} --format tflite", 2, "'--format'"),
    Case("export", "opset 17 (the exporter writes 18 and later)",
         "export --checkpoint {seg_ckpt} --out {out} --format onnx --opset 17", 2, "'--opset'"),
    Case("export", "out is a file", "export --checkpoint {seg_ckpt} --out {file}", 2, "is a file"),
    # ---------------------------------------------------------------- eval
    Case("eval", "truncated CAM", EVAL + " --split train --cams {cams_trunc}", 1, "t1.npz: not a valid CAM file",
         subprocess=True),
    Case("eval", "zero-byte CAM", EVAL + " --split train --cams {cams_zero}", 1, "(empty file)"),
    Case("eval", "NaN CAM", EVAL + " --split train --cams {cams_nan}", 1, "CAMs hold NaN"),
    Case("eval", "CAM keys outside the classes", EVAL + " --split train --cams {cams_keys}", 1, "CAM keys [7]"),
    Case("eval", "sweep of a billion thresholds", EVAL + " --split train --cams {cams} --sweep 0:1:1e-9", 2,
         "at most 10000"),
    Case("eval", "sweep inf", EVAL + " --split train --cams {cams} --sweep 0:inf:0.1", 2, "finite"),
    Case("eval", "sweep step 0", EVAL + " --split train --cams {cams} --sweep 0:1:0", 2, "step > 0"),
    Case("eval", "prediction holds class 50", EVAL + " --pred {pred_50}", 1, "v0.png: label map holds class index 50"),
    Case("eval", "prediction of another size", EVAL + " --pred {pred_size}", 1, "v0.png: prediction is 48x41"),
    Case("eval", "both --pred and --cams", EVAL + " --pred {pred} --cams {cams}", 2, "exactly one of"),
    Case("eval", "neither --pred nor --cams", EVAL, 2, "exactly one of"),
    Case("eval", "prediction folder missing", EVAL + " --pred {base}/nowhere", 1, "prediction folder not found"),
    Case("eval", "split without masks", EVAL + " --split nomask --pred {pred}", 1, "has no ground-truth masks"),
    Case("eval", "--out under a file", EVAL + " --pred {pred} --out {file}/x.json", 1,
         "a file stands where a folder is needed"),
    Case("eval", "--out is a folder", EVAL + " --pred {pred} --out {empty_dir}", 2, "is a directory"),
    # ---------------------------------------------------------------- report
    Case("report", "run folder missing", "report {base}/nowhere", 1, "run folder not found"),
    Case("report", "run folder is a file", "report {file}", 2, "is a file"),
    Case("report", "nothing evaluated", "report {empty_dir}", 1, "no stage evaluation found"),
    Case("report", "metrics_eval is a list", "report {run_list}", 1, "expected an object"),
    Case("report", "metrics_eval is a string", "report {run_string}", 1, "got str"),
    Case("report", "mIoU is a string", "report {run_miou_string}", 1, "'miou' is str 'high', not a number"),
    Case("report", "metrics_eval holds NaN", "report {run_nan}", 1, "not a valid JSON file"),
    Case("report", "loss history of strings", "report {run_history}", 1, "'history' must be a list of objects"),
    Case("report", "truncated CAM in the gallery", "report {run_truncated_cam}", 1, "t1.npz: not a valid CAM file"),
    Case("report", "report.md is a folder", "report {run_report_folder}", 1, "report.md: is a folder"),
    Case("report", "metrics_eval is a folder", "report {run_eval_folder}", 1, "is a folder, expected a JSON file"),
    Case("report", "negative gallery rows", "report {run_list} --gallery-rows -1", 2, "--gallery-rows"),
    # ---------------------------------------------------------------- settings files and recipes
    Case("train-cls", "--config with an unknown key", "train-cls --config {settings_unknown} --root {root} --out {out}",
         1, "settings_unknown.toml: unknown setting 'colour'"),
    Case("train-cls", "--config with a fraction of an epoch", "train-cls --config {settings_wrong_type} --root {root} "
         "--out {out}", 1, "epochs: expected a whole number, got 1.5"),
    Case("refine", "--config file missing", REFINE + " --config {base}/nowhere.toml", 1, "settings file not found"),
    Case("pipeline", "recipe with an unknown stage", "pipeline {recipe_unknown_table} --out {out}", 1,
         "unknown table [trian-cls]"),
    Case("pipeline", "recipe with an unknown key", "pipeline {recipe_unknown_key} --out {out}", 1,
         "[train-cls]: unknown setting 'epoch'"),
    Case("pipeline", "recipe with a wrong type", "pipeline {recipe_wrong_type} --out {out}", 1,
         "[train-cls]: epochs: expected a whole number, got 'many'"),
    Case("pipeline", "recipe with NaN", "pipeline {recipe_nan} --out {out}", 1, "bg_thresh = nan: must be a finite"),
    Case("pipeline", "recipe out of range", "pipeline {recipe_out_of_range} --out {out}", 1,
         "[train-seg] --crop-size 4: must be >= "),
    Case("pipeline", "recipe sets a wired key", "pipeline {recipe_wired} --out {out}", 1,
         "[make-cam] checkpoint is set by the pipeline"),
    Case("pipeline", "recipe file missing", "pipeline {base}/nowhere.toml --out {out}", 1, "no such recipe file"),
    Case("pipeline", "bad --set", "pipeline demo --out {out} --set train-cls.epochs", 1, "expected STAGE.KEY=VALUE"),
    Case("pipeline", "--set NaN", "pipeline demo --out {out} --set train-cls.lr=nan", 1, "--lr nan: must be a finite"),
    Case("pipeline", "dataset without --root", "pipeline voc --out {out}", 1, "root is needed for dataset voc"),
]

#: case id -> (exit code, everything it printed) of every row that ran, for the summary check
OUTPUTS: dict[str, tuple[int, str]] = {}


def _run(case: Case, args: list[str]) -> tuple[int, str]:
    if case.subprocess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                            os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-m", "wsss.stages.cli", *args], capture_output=True, text=True, env=env,
                              timeout=300)
        return done.returncode, done.stdout + done.stderr
    result = CliRunner().invoke(cli, args)
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # CliRunner keeps the exception instead of printing it: print it as Python would
        output += "".join(traceback.format_exception(*result.exc_info))
    return result.exit_code, output


def _run_row(case: Case, world, out: Path) -> tuple[int, str]:
    """Run one row with ``{out}`` = ``out``; its exit code and output are also kept in :data:`OUTPUTS`."""
    code, output = _run(case, [token.format(out=out, **world) for token in shlex.split(case.args)])
    OUTPUTS[case.id] = (code, output)
    return code, output


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, world, tmp_path):
    out = tmp_path / "out"
    before = _snapshot(world["base"])
    code, output = _run_row(case, world, out)

    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, output
    assert case.text in errors[0], errors[0]
    assert code == case.code, output
    assert _snapshot(world["base"]) == before, "an input or an earlier output changed"
    if case.creates:
        for path in out.rglob("*") if out.exists() else []:
            if path.is_file():
                _check_valid_artifact(path)
    else:
        assert not out.exists(), sorted(os.listdir(out))
    leftovers = [path for path in world["base"].rglob(".*") if path.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_the_matrix_covers_every_command():
    from wsss.stages.cli import COMMANDS

    covered = {case.command.split()[0] for case in CASES}
    assert set(COMMANDS) <= covered, sorted(set(COMMANDS) - covered)
    assert len(CASES) >= 80 and len({case.id for case in CASES}) == len(CASES)


def test_no_traceback_and_only_exit_codes_1_and_2_in_the_combined_output(world, tmp_path):
    """The `grep -c Traceback` of everything the matrix printed is 0; no other exit code occurred.

    Rows that have not run in this session (a selection of the module, or this test alone) run here first.
    """
    for index, case in enumerate(CASES):
        if case.id not in OUTPUTS:
            _run_row(case, world, tmp_path / f"row{index}" / "out")
    assert set(OUTPUTS) == {case.id for case in CASES}
    combined = "\n".join(output for _, output in OUTPUTS.values())
    assert combined.count("Traceback") == 0
    assert {code for code, _ in OUTPUTS.values()} <= {1, 2}
    assert "Aborted!" not in combined and "Segmentation fault" not in combined


# --------------------------------------------------------------------------- resume after a damaged output


def _invoke(command: str, world, out: Path):
    result = CliRunner().invoke(cli, [token.format(out=out, **world) for token in shlex.split(command)])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("broken", ["cams_trunc", "cams_zero", "cams_keys", "cams_nan"])
def test_make_cam_resume_redoes_an_unreadable_cam(world, tmp_path, broken):
    out = tmp_path / "cams"
    shutil.copytree(world[broken], out)  # t1.npz is damaged, the other CAMs are valid
    kept = {image_id: artifacts.cam_path(out, image_id).read_bytes() for image_id in ("t0", "t2", "t3")}
    _invoke(CAM, world, out)
    # before: a truncated file counted as done (and an empty one stopped the run with "Aborted!")
    assert artifacts.read_json(artifacts.metrics_path(out))["processed"] == 1
    keys, cams = artifacts.read_cam(artifacts.cam_path(out, "t1"), num_classes=len(CLASSES))
    assert keys.tolist() == [2] and cams.shape == (1, HEIGHT, WIDTH)
    assert {image_id: artifacts.cam_path(out, image_id).read_bytes() for image_id in kept} == kept


def test_refine_resume_redoes_unreadable_outputs(world, tmp_path):
    out = tmp_path / "pseudo"
    shutil.copytree(world["pseudo"], out)
    artifacts.reliability_path(out, "t1").write_bytes(b"")  # before: EOFError, "Aborted!", stuck on every resume
    png = artifacts.label_path(out, "t2").read_bytes()
    artifacts.label_path(out, "t2").write_bytes(png[: len(png) // 2])
    artifacts.write_label_png(artifacts.label_path(out, "t3"), np.full((HEIGHT, WIDTH), 50, np.uint8))
    untouched = artifacts.label_path(out, "t0").read_bytes()
    _invoke(REFINE.replace("{out}", str(out)) + " --threshold fixed", world, out)
    assert artifacts.read_json(artifacts.metrics_path(out))["refined"] == 3
    for image_id in TRAIN:
        assert artifacts.label_path(out, image_id).read_bytes() == artifacts.label_path(world["pseudo"],
                                                                                        image_id).read_bytes()
        artifacts.read_reliability(artifacts.reliability_path(out, image_id))
    assert artifacts.label_path(out, "t0").read_bytes() == untouched


def test_predict_resume_redoes_an_unreadable_prediction(world, tmp_path):
    out = tmp_path / "pred"
    _invoke(PRED, world, out)
    first = artifacts.label_path(out, "v0").read_bytes()
    artifacts.label_path(out, "v0").write_bytes(b"")
    _invoke(PRED, world, out)
    assert artifacts.read_json(artifacts.metrics_path(out))["predicted"] == 1
    assert artifacts.label_path(out, "v0").read_bytes() == first
