"""The one process-pool driver: order, weights, errors, and forking after OpenCV's thread pool ran."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wsss.parallel import imap_images


def _square(value: int) -> int:
    return value * value


def _touch(path: str) -> str:
    Path(path).write_text("ran")
    return path


def _fail(value: int) -> int:
    raise ValueError(f"bad task {value}")


def test_results_in_order_serial_and_in_a_pool():
    assert list(imap_images(_square, [3, 1, 2], workers=1, show=False)) == [9, 1, 4]
    assert list(imap_images(_square, [3, 1, 2], workers=2, show=False)) == [9, 1, 4]
    assert sorted(imap_images(_square, [3, 1, 2], workers=2, ordered=False, show=False)) == [1, 4, 9]


def test_a_worker_error_is_raised_in_the_parent():
    with pytest.raises(ValueError, match="bad task"):
        list(imap_images(_fail, [1, 2], workers=2, show=False))


def test_a_pool_started_after_opencv_used_its_threads_does_not_hang():
    # OpenCV's thread pool is not fork-safe: a forked worker that reconfigured it waited forever
    # (refine --random-walk decodes images with OpenCV in the parent before its pool starts)
    script = textwrap.dedent("""
        import cv2, numpy as np
        cv2.setNumThreads(2)
        image = np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)
        for _ in range(3):
            cv2.resize(image, (1000, 1000))
        from wsss.parallel import imap_images
        print(sum(imap_images(abs, [-1, -2, -3, -4], workers=2, show=False)), cv2.getNumThreads())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["10", "2"]  # the parent keeps its OpenCV threads


def test_a_worker_error_never_hangs_the_parent():
    # multiprocessing.Pool.terminate() after a worker's error killed workers that could hold the result
    # queue's lock; the parent then waited forever (before the fix, within 100-200 rounds here)
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from test_parallel import _fail, _square
        from wsss.parallel import imap_images
        for _ in range(300):
            try:
                list(imap_images(_fail, [1, 2], workers=2, show=False))
            except ValueError:
                pass
            assert list(imap_images(_square, [3, 1, 2], workers=2, show=False)) == [9, 1, 4]
        print("done")
    """)
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.split() == ["done"]


def test_stopping_early_drops_the_work_not_started(tmp_path):
    # a bounded window of chunks in flight (4 per worker): closing the generator after the first
    # result runs the chunks already sent, not the rest
    tasks = [str(tmp_path / f"{index}.txt") for index in range(400)]
    results = imap_images(_touch, tasks, workers=2, chunksize=1, show=False)
    assert next(results) == tasks[0]
    results.close()
    assert 1 <= len(list(tmp_path.iterdir())) <= 9
    assert sorted(imap_images(_square, list(range(40)), workers=2, ordered=False, show=False)) == \
        [value * value for value in range(40)]
