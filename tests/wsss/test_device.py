"""Collectives of wsss.device on a real two-process Gloo group (CPU)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wsss.device import DistInfo, mean_over_ranks, sum_over_ranks


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        info = DistInfo(rank=rank, local_rank=rank, world_size=world_size)
        # rank 0 saw losses 1 and 10, rank 1 saw 3 and 30: the means are 2 and 20 on every rank
        values = [1.0 + 2 * rank, 10.0 + 20 * rank]
        results[rank] = (mean_over_ranks(values, info, torch.device("cpu")),
                         sum_over_ranks(values, info, torch.device("cpu")))
    finally:
        dist.destroy_process_group()


def test_reductions_in_a_single_process_are_identities():
    assert mean_over_ranks([0.25, 3.0], DistInfo(), torch.device("cpu")) == [0.25, 3.0]
    assert sum_over_ranks([2, 5], DistInfo(), torch.device("cpu")) == [2.0, 5.0]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_mean_and_sum_over_two_gloo_processes():
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_rank_main, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        means, sums = results[rank]
        assert means == pytest.approx([2.0, 20.0]) and sums == pytest.approx([4.0, 40.0])


# --------------------------------------------------------------------------- sharded evaluation


def _evaluation_dataset(root):
    """4 images of two sizes with a red square (class 1) or a blue disc (class 2)."""
    import numpy as np

    from wsss import artifacts
    from wsss.datasets.prepared import SplitSpec, write_prepared

    rng = np.random.default_rng(0)
    labels = {}
    for index, (height, width) in enumerate([(40, 36), (40, 36), (33, 45), (40, 36)]):
        image = rng.integers(90, 140, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), np.uint8)
        cls = 1 + index % 2
        mask[5:20, 5 + index:22 + index] = cls
        image[mask == cls] = (220, 40, 40) if cls == 1 else (40, 40, 220)
        artifacts.write_image(root / "images" / f"i{index}.png", image)
        artifacts.write_label_png(root / "masks" / f"i{index}.png", mask)
        labels[f"i{index}"] = [cls]
    spec = SplitSpec(image_dir="images", image_ext=".png", mask_dir="masks")
    write_prepared(root, "folder", ["background", "square", "disc"], {"val": (spec, sorted(labels))}, labels)


def _evaluate_both(root, info):
    """train-cls validation and train-seg evaluation of fixed random networks on ``root``'s val split."""
    from wsss.inference import validate_classifier as validate
    from wsss.segmentation import evaluate_model
    from wsss.datasets.prepared import PreparedDataset
    from wsss.models.classifier import CamNet
    from wsss.models.deeplab import build_seg_model

    torch.manual_seed(0)
    cam_net = CamNet("resnet18", num_classes=3).eval()
    seg_net = build_seg_model("deeplabv3_resnet18", 3).eval()
    dataset = PreparedDataset.load(root)
    cpu = torch.device("cpu")
    record = validate(cam_net, dataset, "val", cpu, info, cam_images=3, cam_threshold=0.3)
    matrix = evaluate_model(seg_net, dataset, "val", cpu, info)
    return record, matrix.matrix.tolist()


def _evaluation_rank(rank: int, world_size: int, port: int, root, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = _evaluate_both(root, DistInfo(rank=rank, local_rank=rank, world_size=world_size))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_process_evaluation_equals_one_process(tmp_path):
    _evaluation_dataset(tmp_path / "data")
    single_record, single_matrix = _evaluate_both(tmp_path / "data", DistInfo())
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_evaluation_rank, args=(2, _free_port(), tmp_path / "data", results), nprocs=2, join=True)
    for rank in (0, 1):
        record, matrix = results[rank]
        assert matrix == single_matrix  # integer counts: exactly equal
        assert record["val_map"] == pytest.approx(single_record["val_map"], abs=1e-6)
        assert record["val_cam_miou"] == pytest.approx(single_record["val_cam_miou"], abs=1e-9)
        assert record["val_ap"] == pytest.approx(single_record["val_ap"], abs=1e-6)
    assert sum(map(sum, single_matrix)) > 0


# a parent that has used OpenCV's thread pool forks a worker that sets its thread count, as every
# DataLoader worker does (wsss.device.loader_worker_init); without wsss's fork hook the child waits
# forever for pool threads it does not have (opencv-python-headless 5.0)
FORK_AFTER_OPENCV = """
import os, sys, time
import cv2, numpy as np
from wsss.device import loader_worker_init
cv2.setNumThreads(2)
image = np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
for _ in range(3):
    cv2.resize(image, (1000, 1000))
for attempt in range(2):
    pid = os.fork()
    if pid == 0:
        loader_worker_init(0)
        os._exit(0 if cv2.resize(image, (500, 500)).shape == (500, 500, 3) else 3)
    for _ in range(200):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        sys.exit("child hung")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("child failed")
    cv2.resize(image, (1000, 1000))
print("threads", cv2.getNumThreads())
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_workers_forked_after_opencv_used_its_threads_do_not_hang():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FORK_AFTER_OPENCV], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.split() == ["threads", "2"]  # the parent keeps its own thread count


def test_inference_loader_workers_leave_the_cpu_cores_to_the_network(monkeypatch):
    import wsss.device
    from wsss.device import inference_loader_workers

    monkeypatch.setattr(wsss.device, "default_workers", lambda: 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert inference_loader_workers(4, torch.device("cpu")) == 0  # every core runs a torch thread
        torch.set_num_threads(1)
        assert inference_loader_workers(2, torch.device("cpu")) == 2  # three cores free, two asked
        assert inference_loader_workers(8, torch.device("cpu")) == 3  # never more than the free cores
        assert inference_loader_workers(8, torch.device("cuda")) == 8  # a GPU gets what was asked
    finally:
        torch.set_num_threads(threads)


def test_split_batches_on_a_busy_cpu_decodes_in_the_main_process(tmp_path, monkeypatch):
    import wsss.device
    import wsss.inference
    from wsss.datasets.prepared import PreparedDataset

    _evaluation_dataset(tmp_path / "data")
    asked = []
    real_loader = wsss.inference.DataLoader

    def recording_loader(*args, **kwargs):
        asked.append(kwargs["num_workers"])
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(wsss.inference, "DataLoader", recording_loader)
    monkeypatch.setattr(wsss.device, "default_workers", lambda: torch.get_num_threads())
    dataset = PreparedDataset.load(tmp_path / "data")
    ids = dataset.ids("val")
    batches = list(wsss.inference.split_batches(dataset, "val", ids, batch_size=2, workers=2,
                                                device=torch.device("cpu")))
    assert asked == [0]
    assert sorted(image_id for batch_ids, _, _ in batches for image_id in batch_ids) == sorted(ids)
    assert sorted(tuple(images.shape[1:3]) for _, images, _ in batches) == [(33, 45), (40, 36), (40, 36)]


def test_threads_sets_the_threads_of_torch_opencv_and_blas(monkeypatch):
    """--threads N: torch, OpenCV and the BLAS pools all run N threads; without it, one process keeps torch's count
    and P worker processes share the cores."""
    import cv2
    from threadpoolctl import threadpool_info, threadpool_limits

    import wsss.device
    from wsss.device import configure_threads

    torch_before, opencv_before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        with threadpool_limits(limits=None):  # puts the BLAS pools back as they were on leaving
            assert configure_threads(3) == 3
            assert torch.get_num_threads() == 3 and cv2.getNumThreads() == 3
            assert all(pool["num_threads"] == 3 for pool in threadpool_info())
            monkeypatch.setattr(wsss.device, "default_workers", lambda: 8)
            assert configure_threads(None, processes=2) == 4 and torch.get_num_threads() == 4
            assert configure_threads(None, processes=16) == 1
            torch.set_num_threads(5)
            assert configure_threads(None) == 5 and cv2.getNumThreads() == 5
    finally:
        torch.set_num_threads(torch_before)
        cv2.setNumThreads(opencv_before)
