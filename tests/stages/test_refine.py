"""Tests of stages/refine.py (``wsss refine``) on a tiny synthetic dataset (wsss/refine.py: tests/wsss/test_refine.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsss.stages.cli import cli
from wsss.stages.refine import RefineConfig, run
from wsss import artifacts
from wsss.crf import PSEUDO_LABEL_CRF, CrfParams
from wsss.datasets.prepared import SplitSpec, write_prepared
from wsss.gmm import GmmParams
from wsss.refine import RefineParams
from wsss.settings import SettingError

CLASSES = ["background", "cat", "dog"]
HEIGHT, WIDTH = 40, 56


# --------------------------------------------------------------------------- the stage

IDS = ["a1", "b2", "c3", "d4", "e5"]


@pytest.fixture
def tiny(tmp_path):
    """A prepared 'folder' dataset of 5 images with masks, and a folder of CAMs made from the masks."""
    root, cam_dir = tmp_path / "data", tmp_path / "cams"
    rng = np.random.default_rng(0)
    labels = {}
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    for index, image_id in enumerate(IDS):
        cls = 1 + index % 2
        cy, cx, radius = 12 + 3 * index, 15 + 5 * index, 9 + index
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        image = np.full((HEIGHT, WIDTH, 3), (200, 190, 170), dtype=np.uint8)
        image[disc] = (40, 80, 150) if cls == 1 else (160, 40, 40)
        image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
        artifacts.write_image(root / "images" / f"{image_id}.png", image)
        artifacts.write_label_png(root / "masks" / f"{image_id}.png", np.where(disc, cls, 0).astype(np.uint8))
        # a blurry CAM: smooth bump that spills past the object
        bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (radius * 0.9) ** 2))
        cam = np.clip(bump + rng.normal(0, 0.02, bump.shape), 0, 1)
        artifacts.write_cam(artifacts.cam_path(cam_dir, image_id), np.array([cls]), cam[None] / cam.max())
        labels[image_id] = [cls]
    spec = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks")
    write_prepared(root, "folder", CLASSES, {"train": (spec, IDS)}, labels)
    return root, cam_dir, tmp_path


def _outputs(folder):
    return {image_id: (artifacts.label_path(folder, image_id).read_bytes(),
                       artifacts.reliability_path(folder, image_id).read_bytes()) for image_id in IDS}


def test_one_and_two_workers_give_identical_outputs(tiny):
    root, cam_dir, tmp = tiny
    crf = {"crf": True, "crf_params": CrfParams(iterations=3)}
    one = run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=tmp / "w1", **crf, workers=1, progress=False))
    two = run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=tmp / "w2", **crf, workers=2, progress=False))
    assert _outputs(tmp / "w1") == _outputs(tmp / "w2")
    assert one["threshold"] == two["threshold"] and one["refined"] == two["refined"] == len(IDS)
    assert one["workers"] == 1 and two["workers"] == 2


def test_two_shards_write_the_files_of_one_unsharded_run(tiny):
    root, cam_dir, tmp = tiny
    crf = {"crf": True, "crf_params": CrfParams(iterations=3)}
    run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=tmp / "whole", **crf, workers=1, progress=False))
    done = [run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=tmp / "sharded", **crf, workers=1,
                             shard=(index, 2), progress=False))["refined"] for index in (0, 1)]
    assert done == [3, 2]
    assert _outputs(tmp / "sharded") == _outputs(tmp / "whole")
    assert artifacts.metrics_path(tmp / "sharded", (1, 2)).is_file()


def test_stage_outputs_metrics_resume_and_eval(tiny):
    root, cam_dir, tmp = tiny
    out = tmp / "pseudo"
    cfg = RefineConfig(cam_dir=cam_dir, root=root, out_dir=out, confidence=0.0, evaluate=True, workers=1, seed=4,
                       progress=False)
    metrics = run(cfg)
    # the files re-opened from disk
    for image_id in IDS:
        label = artifacts.read_label_png(artifacts.label_path(out, image_id))
        weights = artifacts.read_reliability(artifacts.reliability_path(out, image_id))
        assert label.shape == weights.shape == (HEIGHT, WIDTH)
        assert np.load(artifacts.reliability_path(out, image_id)).dtype == np.float16
        assert set(np.unique(label)) <= {0, 1, 2, 255}
        assert weights[label != 255].mean() == pytest.approx(1.0, abs=1e-2)
    written = json.loads(artifacts.metrics_path(out).read_text())
    assert written["threshold"]["count"] == len(IDS)
    assert written["threshold"]["min"] <= written["threshold"]["median"] <= written["threshold"]["max"]
    assert set(written["fallbacks"]["by_reason"]) >= {"empty", "flat", "one_mode", "full_frame", "no_crossing"}
    assert written["eval"]["miou"] > 0.5 and written["eval"]["ignore_share"] == 0.0
    config = json.loads(artifacts.config_path(out).read_text())
    assert config["config"]["threshold"] == "gmm" and config["config"]["seed"] == 4
    assert config["params"] == json.loads(json.dumps(dataclasses.asdict(cfg.params)))

    # resume: nothing is redone, the statistics are the same, files untouched
    before = {image_id: artifacts.label_path(out, image_id).stat().st_mtime_ns for image_id in IDS}
    again = run(cfg)
    assert again["refined"] == 0 and again["skipped"] == len(IDS)
    assert again["threshold"] == metrics["threshold"] and again["ignore_ratio"] == metrics["ignore_ratio"]
    assert before == {image_id: artifacts.label_path(out, image_id).stat().st_mtime_ns for image_id in IDS}

    # a half-written image (reliability missing) is redone
    artifacts.reliability_path(out, "c3").unlink()
    assert run(cfg)["refined"] == 1

    # resuming with other settings is refused
    from wsss.errors import WsssError
    with pytest.raises(WsssError, match="other settings"):
        run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=out, threshold="fixed", workers=1, progress=False))


def test_crf_and_raw_options_reach_every_image(tiny):
    """--crf-gaussian-sxy, --crf-gaussian-compat, --crf-temperature and --raw-alpha: the files written are
    refine_image's with those settings, and each setting alone changes them (the labels, or for --raw-alpha
    the weights), so none of them can be dropped on the way."""
    from wsss.datasets.prepared import PreparedDataset
    from wsss.refine import refine_image

    root, cam_dir, tmp = tiny
    out = tmp / "pseudo"
    result = CliRunner().invoke(cli, [
        "-q", "refine", "--cams", str(cam_dir), "--root", str(root), "--out", str(out), "--threshold", "fixed",
        "--bg-thresh", "0.3", "--crf", "--crf-iterations", "3", "--crf-gaussian-sxy", "20", "--crf-gaussian-compat",
        "30", "--crf-temperature", "3", "--raw-alpha", "0.8", "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    crf = CrfParams(iterations=3, gaussian_sxy=20.0, gaussian_compat=30.0)
    params = RefineParams(threshold="fixed", bg_thresh=0.3, crf=crf, unary_temperature=3.0, lambda_alpha=0.8)
    without = {"--crf-gaussian-sxy": params.replace(crf=crf.replace(gaussian_sxy=PSEUDO_LABEL_CRF.gaussian_sxy)),
               "--crf-gaussian-compat": params.replace(crf=crf.replace(gaussian_compat=PSEUDO_LABEL_CRF.gaussian_compat)),
               "--crf-temperature": params.replace(unary_temperature=RefineParams.unary_temperature),
               "--raw-alpha": params.replace(lambda_alpha=RefineParams.lambda_alpha)}
    changed = set()
    dataset = PreparedDataset.load(root)
    for image_id in IDS:
        image = dataset.read_image("train", image_id)
        keys, cams = artifacts.read_cam(artifacts.cam_path(cam_dir, image_id))
        label, weights, _ = refine_image(image, keys, cams, params)
        np.testing.assert_array_equal(artifacts.read_label_png(artifacts.label_path(out, image_id)), label)
        written = artifacts.read_reliability(artifacts.reliability_path(out, image_id))
        np.testing.assert_allclose(written, weights, rtol=2e-3, atol=1e-3)  # float16 on disk
        for option, other in without.items():
            other_label, other_weights, _ = refine_image(image, keys, cams, other)
            if option == "--raw-alpha":
                assert np.array_equal(other_label, label)  # RAW weighs the labels, it does not change them
                if np.abs(other_weights - weights).max() > 0.1:
                    changed.add(option)
            elif not np.array_equal(other_label, label):
                changed.add(option)
    assert changed == set(without)


def test_rw_beta_and_steps_reach_the_walk(tiny):
    """--random-walk with --rw-beta and --rw-steps: the walked CAMs are walk_cams' with that beta and step count
    (what beta does there: tests/wsss/test_affinity.py), not those of the default beta."""
    import torch

    from wsss.affinity import pair_offsets, walk_cams
    from wsss.datasets.prepared import PreparedDataset
    from wsss.models.affinity import AffinityNet
    from wsss.transforms import normalize_image

    root, cam_dir, tmp = tiny
    torch.manual_seed(0)
    network = AffinityNet("resnet18", embed_dim=8).eval()
    checkpoint = tmp / "aff" / "last.pth"
    artifacts.save_checkpoint(checkpoint, {"model": network.state_dict(), "step": 1, "config": {}, "classes": CLASSES,
                                           "arch": {"kind": "affinity", "backbone": "resnet18", "embed_dim": 8,
                                                    "radius": 3, "stride": 8}})
    out = tmp / "pseudo"
    result = CliRunner().invoke(cli, ["-q", "refine", "--cams", str(cam_dir), "--root", str(root), "--out", str(out),
                                      "--threshold", "fixed", "--random-walk", str(checkpoint), "--rw-beta", "2",
                                      "--rw-steps", "4", "--device", "cpu", "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    dataset = PreparedDataset.load(root)
    largest_change = 0.0
    for image_id in IDS:
        image = normalize_image(dataset.read_image("train", image_id))
        _, cams = artifacts.read_cam(artifacts.cam_path(cam_dir, image_id))
        _, walked = artifacts.read_cam(artifacts.cam_path(out / "walked", image_id))

        def walk(beta):
            with torch.no_grad():
                return walk_cams(network, image, torch.from_numpy(cams), pair_offsets(3), beta=beta, steps=4).numpy()

        np.testing.assert_allclose(walked, walk(2.0), atol=2e-3)  # float16 on disk
        largest_change = max(largest_change, float(np.abs(walk(8.0) - walked).max()))
    assert largest_change > 0.05


def test_pseudo_labels_beat_the_cam_at_the_fixed_threshold(tiny):
    from wsss.datasets.prepared import PreparedDataset
    from wsss.evaluation import evaluate_cams

    root, cam_dir, tmp = tiny
    metrics = run(RefineConfig(cam_dir=cam_dir, root=root, out_dir=tmp / "crf", evaluate=True, workers=1,
                               crf=True, confidence=0.0, progress=False))
    _, matrices = evaluate_cams(PreparedDataset.load(root), "train", cam_dir, [0.2], progress=False)
    assert metrics["eval"]["miou"] > matrices[0].miou()


# --------------------------------------------------------------------------- command line

def test_cli_refine_with_crf_and_eval(tiny):
    root, cam_dir, tmp = tiny
    out = tmp / "cli"
    result = CliRunner().invoke(cli, ["-q", "refine", "--cams", str(cam_dir), "--root", str(root), "--out", str(out),
                                      "--crf", "--crf-iterations", "3", "--crf-scale", "0.5", "--workers", "1",
                                      "--eval"])
    assert result.exit_code == 0, result.output
    assert "pseudo-label mIoU" in result.output
    metrics = json.loads(artifacts.metrics_path(out).read_text())
    assert metrics["crf"] is True and metrics["refined"] == len(IDS)
    config = json.loads(artifacts.config_path(out).read_text())
    assert config["config"]["crf_params"]["scale"] == 0.5 and config["params"]["crf"]["scale"] == 0.5
    assert all(artifacts.label_path(out, image_id).is_file() for image_id in IDS)
    # the defaults: one mixture over classes and no band of unsure pixels (bench/threshold_choice.md); the band
    # of --confidence 0.9 marks the blurry CAMs' rims 255
    assert metrics["threshold"]["per_class"] is False and metrics["ignore_ratio"]["pixels"] == 0.0
    assert not any((artifacts.read_label_png(artifacts.label_path(out, i)) == 255).any() for i in IDS)
    banded = tmp / "banded"
    result = CliRunner().invoke(cli, ["-q", "refine", "--cams", str(cam_dir), "--root", str(root), "--out", str(banded),
                                      "--confidence", "0.9", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert all((artifacts.read_label_png(artifacts.label_path(banded, i)) == 255).any() for i in IDS)


def test_cli_errors_name_the_problem(tiny):
    root, cam_dir, tmp = tiny
    runner = CliRunner()
    base = ["refine", "--cams", str(cam_dir), "--root", str(root), "--workers", "1"]

    artifacts.cam_path(cam_dir, "d4").unlink()
    result = runner.invoke(cli, base + ["--out", str(tmp / "x")])
    assert result.exit_code == 1 and "Error:" in result.output and "d4.npz" in result.output
    assert "Traceback" not in result.output
    assert not (tmp / "x").exists()

    # an IRN-style pickled CAM needs --allow-pickle
    np.save(artifacts.irn_cam_path(cam_dir, "d4"),
            {"keys": np.array([0]), "high_res": np.zeros((1, HEIGHT, WIDTH), np.float32)}, allow_pickle=True)
    result = runner.invoke(cli, base + ["--out", str(tmp / "y")])
    assert result.exit_code == 1 and "--allow-pickle" in result.output and "d4.npy" in result.output
    result = runner.invoke(cli, base + ["--out", str(tmp / "y"), "--allow-pickle"])
    assert result.exit_code == 0, result.output

    result = runner.invoke(cli, base + ["--out", str(tmp / "z"), "--fg-thresh", "0.3"])
    assert result.exit_code == 2 and "Invalid value for '--fg-thresh': 0.3: needs --threshold fixed" in result.output
    result = runner.invoke(cli, base + ["--out", str(tmp / "z"), "--threshold", "fixed", "--bg-thresh", "0.4",
                                        "--fg-thresh", "0.3"])
    assert result.exit_code == 2 and "'--fg-thresh': 0.3: must not be below --bg-thresh 0.4" in result.output
    result = runner.invoke(cli, base + ["--out", str(tmp / "z"), "--crf-bilateral-sxy", "0"])
    assert result.exit_code == 2 and "Invalid value for '--crf-bilateral-sxy': 0: must be > 0" in result.output
    result = runner.invoke(cli, base + ["--out", str(tmp / "z"), "--crf-gaussian-compat", "nan"])
    assert result.exit_code == 2 and "'--crf-gaussian-compat': nan: must be a finite number" in result.output
    result = runner.invoke(cli, base + ["--out", str(tmp / "z"), "--gmm-components", "9"])
    assert result.exit_code == 2 and "'--gmm-components': 9: must be <= 8" in result.output
    assert not (tmp / "z").exists()
    result = runner.invoke(cli, base + ["--out", str(cam_dir)])
    assert result.exit_code == 1 and "--out must differ" in result.output


def test_pool_workers_stop_when_the_refine_process_is_killed(tmp_path):
    # 16 images of 320x320 with the CRF: each takes a worker a good fraction of a second
    root, cam_dir, out = tmp_path / "data", tmp_path / "cams", tmp_path / "out"
    rng = np.random.default_rng(1)
    ids = [f"k{index:02d}" for index in range(16)]
    yy, xx = np.mgrid[:320, :320]
    for image_id in ids:
        artifacts.write_image(root / "images" / f"{image_id}.png", rng.integers(0, 255, (320, 320, 3), np.uint8))
        cy, cx = rng.integers(80, 240, 2)
        cam = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 3000.0)
        artifacts.write_cam(artifacts.cam_path(cam_dir, image_id), np.array([1]), cam[None])
    write_prepared(root, "folder", CLASSES, {"train": (SplitSpec(image_dir="images", image_ext=".png"), ids)},
                   {image_id: [1] for image_id in ids})
    parent = subprocess.Popen([sys.executable, "-m", "wsss.stages.cli", "-q", "refine", "--cams", str(cam_dir), "--root",
                               str(root), "--out", str(out), "--crf", "--workers", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.png"))) < 1 and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    children = [int(pid) for pid in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()]
    assert parent.poll() is None and len(children) == 2, "refine finished before it could be killed"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    written = sorted(os.listdir(out))

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 3
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(alive(pid) for pid in children)
    time.sleep(0.3)
    # a worker without PR_SET_PDEATHSIG finished its image (and the rest of its chunk) and wrote it
    assert sorted(os.listdir(out)) == written
    assert len(list(out.glob("*.png"))) < len(ids)


def test_a_resume_with_other_settings_names_the_options():
    from wsss.stages.refine import _changed_options, _params_json

    fixed = _params_json(RefineParams(threshold="fixed"))
    gmm = _params_json(RefineParams(bg_thresh=0.3, gmm=GmmParams(fallback_threshold=0.3)))
    # before: the dataclass fields ("bg_thresh, gmm, threshold")
    assert _changed_options(fixed, gmm) == ["--bg-thresh", "--threshold"]
    assert _changed_options(fixed, _params_json(RefineParams(threshold="fixed", crf=CrfParams()))) == ["--crf"]
    assert _changed_options(_params_json(RefineParams(crf=CrfParams(iterations=3, bilateral_srgb=3.0))),
                            _params_json(RefineParams(crf=CrfParams(), lambda_beta=2.0))) == \
        ["--crf-bilateral-srgb", "--crf-iterations", "--raw-beta"]
    assert _changed_options(_params_json(RefineParams()), _params_json(RefineParams(gmm=GmmParams(components=2)))) \
        == ["--gmm-components"]
    # settings without an option keep their names rather than naming an option that does not exist
    assert _changed_options(_params_json(RefineParams()), _params_json(RefineParams(gmm_min_images=3))) == \
        ["gmm_min_images"]
    assert _changed_options(_params_json(RefineParams()), _params_json(RefineParams(gmm=GmmParams(min_weight=0.2)))) \
        == ["gmm.min_weight"]


# --------------------------------------------------------------------------- the config

def test_config_defaults_are_the_librarys_and_build_the_params(tmp_path):
    cfg = RefineConfig(cam_dir=tmp_path / "cams", root=tmp_path, out_dir=tmp_path / "out")
    assert cfg.params == RefineParams()  # the options' defaults are the library's
    assert cfg.crf_params == PSEUDO_LABEL_CRF
    cfg = cfg.replace(threshold="fixed", bg_thresh=0.05, fg_thresh=0.3, gmm_components=2, gmm_samples=500, crf=True,
                      crf_params=CrfParams(scale=0.5), crf_temperature=0.5, raw_alpha=0.3, raw_beta=2.0)
    assert cfg.params == RefineParams(threshold="fixed", bg_thresh=0.05, fg_thresh=0.3,
                                      gmm=GmmParams(components=2, fallback_threshold=0.05, max_samples=500),
                                      crf=CrfParams(scale=0.5), unary_temperature=0.5, lambda_alpha=0.3,
                                      lambda_beta=2.0)
    assert cfg.replace(crf=False).params.crf is None  # the CRF's settings count only with --crf
    with pytest.raises(SettingError, match="--fg-thresh 0.3: needs --threshold fixed"):
        cfg.replace(threshold="gmm")


def test_config_json_replays_the_run(tiny):
    root, cam_dir, tmp = tiny
    out = tmp / "replayed"
    first = CliRunner().invoke(cli, ["-q", "refine", "--cams", str(cam_dir), "--root", str(root), "--out", str(out),
                                     "--threshold", "fixed", "--bg-thresh", "0.3", "--crf", "--crf-iterations", "2",
                                     "--crf-bilateral-srgb", "7", "--workers", "1", "--no-progress"])
    assert first.exit_code == 0, first.output
    # the same options from the config.json it wrote: a resume of the same settings (nothing redone)
    again = CliRunner().invoke(cli, ["refine", "--config", str(artifacts.config_path(out))])
    assert again.exit_code == 0, again.output
    assert "0 refined, 5 skipped" in again.output
    # an option on the command line wins over the file, and the resume check names it
    other = CliRunner().invoke(cli, ["refine", "--config", str(artifacts.config_path(out)), "--crf-scale", "0.5"])
    assert other.exit_code == 1 and "other settings (--crf-scale)" in other.output
