"""wsss/inference.py's BackgroundWriter: writes run beside the caller, every one is done when the block ends, and a
failed write is raised at the next submit or at the end, never lost."""

import os
import threading
import time

import pytest

from wsss.inference import BackgroundWriter


def _slow_write(path, text: str) -> None:
    time.sleep(0.02)  # still writing when the block ends
    path.write_text(text)


def test_every_write_is_done_when_the_block_ends(tmp_path):
    with BackgroundWriter(pending_limit=2) as writer:
        for index in range(5):  # more than the limit: submit waits for the oldest
            writer.submit(_slow_write, tmp_path / f"{index}.txt", str(index))
    assert sorted(path.read_text() for path in tmp_path.iterdir()) == ["0", "1", "2", "3", "4"]


def _failing_write(release: threading.Event):
    """A write that fails once ``release`` is set (so that it is still running when it is submitted)."""
    def write():
        release.wait()
        raise OSError("disk full")
    return write


def test_a_failed_write_is_raised_at_the_next_submit_that_waits_for_it():
    release = threading.Event()
    writer = BackgroundWriter(pending_limit=1)
    writer.submit(_failing_write(release))  # still running: the submit returns
    release.set()
    with pytest.raises(OSError, match="disk full"):
        writer.submit(int)  # two pending, over the limit of 1: waits for the failed one
    writer.__exit__(None, None, None)


def test_a_failed_write_that_finished_is_raised_at_the_next_submit():
    release, ran = threading.Event(), threading.Event()
    writer = BackgroundWriter(pending_limit=16)
    writer.submit(_failing_write(release))
    release.set()
    with pytest.raises(OSError, match="disk full"):
        writer.submit(ran.set)  # raises here if the failed write has finished by now,
        ran.wait()              # which it has once the next one ran (the writes run in order)
        writer.submit(int)      # else here
    writer.__exit__(None, None, None)


def test_a_failed_write_is_raised_at_the_end(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        with BackgroundWriter() as writer:
            writer.submit(os.remove, tmp_path / "missing.png")


def test_an_error_in_the_block_is_the_one_raised(tmp_path):
    release = threading.Event()
    with pytest.raises(KeyError, match="from the block"):
        with BackgroundWriter() as writer:
            writer.submit(release.wait)                    # running: finishes before the block is left
            writer.submit(os.remove, tmp_path / "missing")  # cancelled if still waiting; its error is not raised
            release.set()
            raise KeyError("from the block")


def test_worker_processes_write_and_their_errors_reach_the_parent(tmp_path):
    source = tmp_path / "source.txt"
    source.write_text("label")
    import shutil

    with BackgroundWriter(processes=1) as writer:
        writer.submit(shutil.copyfile, source, tmp_path / "copy.txt")
    assert (tmp_path / "copy.txt").read_text() == "label"
    with pytest.raises(FileNotFoundError):
        with BackgroundWriter(processes=1) as writer:
            writer.submit(shutil.copyfile, tmp_path / "missing.txt", tmp_path / "copy2.txt")
