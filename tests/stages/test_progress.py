"""The progress-bar policy: -q hides bars, log files get none unless WSSS_PROGRESS=1."""

import io
import logging

import pytest
from click.testing import CliRunner

from wsss.stages.cli import cli
from wsss import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def info_logging():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    yield root
    root.setLevel(level)


@pytest.mark.parametrize("tty, level, forced, show, expected", [
    (True, logging.INFO, "", True, True),          # a terminal, default verbosity
    (True, logging.INFO, "", False, False),        # the caller asked for none (e.g. a non-zero rank)
    (True, logging.WARNING, "", True, False),      # wsss -q
    (False, logging.INFO, "", True, False),        # stderr redirected to a file
    (False, logging.INFO, "1", True, True),        # ... unless forced on
    (True, logging.INFO, "0", True, False),        # forced off on a terminal
    (False, logging.WARNING, "1", True, False),    # -q wins over WSSS_PROGRESS=1
])
def test_enabled(monkeypatch, info_logging, tty, level, forced, show, expected):
    monkeypatch.setattr("sys.stderr", _Terminal() if tty else io.StringIO())
    monkeypatch.setenv("WSSS_PROGRESS", forced)
    info_logging.setLevel(level)
    assert progress.enabled(show) is expected


def test_bar_draws_only_when_enabled(monkeypatch, info_logging):
    monkeypatch.setenv("WSSS_PROGRESS", "1")
    stream = io.StringIO()
    assert list(progress.bar(range(3), desc="probe", file=stream)) == [0, 1, 2]
    assert "probe" in stream.getvalue() and "3/3" in stream.getvalue()
    monkeypatch.setenv("WSSS_PROGRESS", "0")
    silent = io.StringIO()
    assert list(progress.bar(range(3), desc="probe", file=silent)) == [0, 1, 2]
    assert silent.getvalue() == ""


def test_quiet_demo_data_prints_no_bar(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_PROGRESS", "1")  # would draw into the captured output, but -q wins
    runner = CliRunner()
    loud = runner.invoke(cli, ["demo-data", str(tmp_path / "a"), "--num-train", "2", "--num-val", "1", "--size", "32"])
    quiet = runner.invoke(cli, ["-q", "demo-data", str(tmp_path / "b"), "--num-train", "2", "--num-val", "1",
                                "--size", "32"])
    assert loud.exit_code == 0 and quiet.exit_code == 0
    assert "demo-data" in loud.output and "3/3" in loud.output
    assert "3/3" not in quiet.output
