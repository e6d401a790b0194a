"""train-aff's --radius reaches the pairs it learns and the walk that uses the network (which pairs a radius
gives: tests/wsss/test_affinity.py)."""

import numpy as np
from click.testing import CliRunner

import wsss.affinity
from wsss import artifacts
from wsss.affinity import load_walk_network, pair_offsets
from wsss.datasets.prepared import SplitSpec, write_prepared
from wsss.stages.cli import cli

IDS = ["a", "b", "c", "d"]


def _dataset_with_cams(root, cam_dir):
    """4 images 40 x 48 with a coloured rectangle of class 1 or 2, and CAMs that peak on it."""
    rng = np.random.default_rng(0)
    labels = {}
    for index, image_id in enumerate(IDS):
        cls = 1 + index % 2
        image = rng.integers(90, 140, (40, 48, 3), dtype=np.uint8)
        image[8:28, 10:34] = (220, 40, 40) if cls == 1 else (40, 40, 220)
        artifacts.write_image(root / "images" / f"{image_id}.png", image)
        cam = np.zeros((1, 40, 48), np.float32)
        cam[0, 6:30, 8:36] = 0.5
        cam[0, 10:26, 12:32] = 1.0
        artifacts.write_cam(artifacts.cam_path(cam_dir, image_id), np.array([cls]), cam)
        labels[image_id] = [cls]
    write_prepared(root, "folder", ["background", "cat", "dog"], {"train": (SplitSpec("images", ".png"), IDS)},
                   labels)


def test_radius_sets_the_pairs_trained_and_walked(tmp_path, monkeypatch):
    root, cam_dir, out = tmp_path / "data", tmp_path / "cams", tmp_path / "aff"
    _dataset_with_cams(root, cam_dir)
    trained_with = []
    real_pair_affinity = wsss.affinity.pair_affinity

    def recording_pair_affinity(embedding, offsets):
        trained_with.append(np.asarray(offsets).tolist())
        return real_pair_affinity(embedding, offsets)

    monkeypatch.setattr(wsss.affinity, "pair_affinity", recording_pair_affinity)
    result = CliRunner().invoke(cli, [
        "-q", "train-aff", "--root", str(root), "--cams", str(cam_dir), "--out", str(out), "--radius", "3",
        "--backbone", "resnet18", "--weights", "none", "--embed-dim", "8", "--crop-size", "32", "--batch-size", "2",
        "--epochs", "1", "--confident", "fixed", "--no-crf", "--device", "cpu", "--workers", "0", "--threads", "1"])
    assert result.exit_code == 0, result.output
    # radius 3: the 12 offsets with 0 < dy^2 + dx^2 < 9, not the default radius 5's 34
    assert len(pair_offsets(3)) == 12
    assert trained_with and all(offsets == pair_offsets(3).tolist() for offsets in trained_with)
    assert artifacts.load_checkpoint(artifacts.checkpoint_path(out, "last"))["arch"]["radius"] == 3
    assert load_walk_network(out).radius == 3  # refine --random-walk walks the pairs the network learned
