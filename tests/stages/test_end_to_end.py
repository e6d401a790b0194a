"""run_pipeline.sh (the demo recipe of `wsss pipeline`) end to end on a tiny demo dataset: every stage runs, the
report is written, a rerun resumes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wsss import artifacts

REPO = Path(__file__).resolve().parents[2]


def run_pipeline(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    sizes = {"demo-data.num_train": 8, "demo-data.num_val": 4, "demo-data.size": 48, "pretrain.epochs": 1,
             "train-cls.epochs": 1, "train-seg.iterations": 4, "pipeline.upper_bound": "true", "pipeline.device": "cpu"}
    command = ["bash", str(REPO / "run_pipeline.sh"), "--out", str(out)]
    for key, value in sizes.items():
        command += ["--set", f"{key}={value}"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_pipeline_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    first = run_pipeline(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = out / "run"
    # every stage left its artifacts, provenance and metrics
    train_ids = (out / "data" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val_ids = (out / "data" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(train_ids) == 8 and len(val_ids) == 4
    for stage in ("pretrain", "cls", "cams", "pseudo", "seg_gt", "seg", "pred", "pred_train"):
        assert artifacts.config_path(run / stage).is_file(), stage
        assert artifacts.metrics_path(run / stage).is_file(), stage
    for image_id in train_ids:
        keys, cams = artifacts.read_cam(artifacts.cam_path(run / "cams", image_id))
        label = artifacts.read_label_png(artifacts.label_path(run / "pseudo", image_id))
        assert cams.shape[1:] == label.shape and len(keys) >= 1
        assert artifacts.read_reliability(artifacts.reliability_path(run / "pseudo", image_id)).shape == label.shape
    for image_id in val_ids:
        assert artifacts.label_path(run / "pred", image_id).is_file()
    # the report prints one mIoU per stage, and they match the evaluation files
    printed = dict(re.findall(r"^(CAM|pseudo-labels|DeepLab)\s+\S+\s+([0-9.]+)$", first.stdout, re.MULTILINE))
    assert set(printed) == {"CAM", "pseudo-labels", "DeepLab"}, first.stdout[-2000:]
    evaluation = artifacts.read_json(artifacts.eval_metrics_path(run / "pred", "val"))
    assert float(printed["DeepLab"]) == pytest.approx(evaluation["miou"], abs=1e-4)
    assert all(0.0 <= float(value) <= 1.0 for value in printed.values())
    report = (run / "report.md").read_text()
    for figure in ("stage_miou", "per_class_iou", "curves", "gallery"):
        assert (run / "report" / f"{figure}.png").is_file() and f"report/{figure}.png" in report

    # a second run resumes: nothing is trained again
    # the classifier started from the pretrained trunk; DeepLab has its weak/full ratio
    assert json.loads(artifacts.config_path(run / "cls").read_text())["config"]["weights"].endswith("backbone.pth")
    seg_metrics = json.loads(artifacts.metrics_path(run / "seg").read_text())
    assert seg_metrics["weak_full_ratio"] is not None
    # DeepLab trains on plain cross-entropy by default: weighting it with refine's reliability maps (RAW)
    # showed no gain on the demo (bench/ablation_earlier_step.md); --raw turns it on
    assert seg_metrics["raw"] is False
    # the demo's recipe: the plain CAM network at output stride 8, without equivariance or make-cam's erasing
    # (at the classifier's new step they raise the CAMs but not the pseudo-labels or DeepLab:
    # bench/ablation_step_full.md), DeepLab at output stride 8
    cls_config = json.loads(artifacts.config_path(run / "cls").read_text())
    assert cls_config["arch"]["output_stride"] == 8 and cls_config["config"]["er_weight"] == 0
    assert cls_config["config"]["er_scale_range"] == [0.5, 0.75] and cls_config["config"]["erase_weight"] == 0
    # the classifier's step (bench/ablation_step.md): lr 0.1, the CAM head at the trunk's rate, no colour jitter
    assert (cls_config["config"]["sgd"]["lr"], cls_config["config"]["sgd"]["head_lr_mult"]) == (0.1, 1.0)
    assert cls_config["config"]["epochs"] == 1  # --set reached the stage
    assert cls_config["config"]["jitter"] is False
    assert json.loads(artifacts.config_path(run / "cams").read_text())["config"]["erase_steps"] == 0
    assert artifacts.load_checkpoint(artifacts.checkpoint_path(run / "seg", "last"))["arch"]["output_stride"] == 8
    # DeepLab's predictions are CRF post-processed by default (bench/ablation_stride16.md)
    pred_config = json.loads(artifacts.config_path(run / "pred").read_text())["config"]
    assert pred_config["crf"] is True and pred_config["crf_params"]["iterations"] == 10
    assert json.loads(artifacts.config_path(run / "seg").read_text())["config"]["upper_bound"].endswith("seg_gt")
    checkpoints = {stage: artifacts.checkpoint_path(run / stage, "last").stat().st_mtime_ns
                   for stage in ("pretrain", "cls", "seg_gt", "seg")}
    cam_time = artifacts.cam_path(run / "cams", train_ids[0]).stat().st_mtime_ns
    second = run_pipeline(out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage, mtime in checkpoints.items():
        assert artifacts.checkpoint_path(run / stage, "last").stat().st_mtime_ns == mtime, stage
    assert artifacts.cam_path(run / "cams", train_ids[0]).stat().st_mtime_ns == cam_time
