import subprocess
import sys

from click.testing import CliRunner

from stages.cli import COMMANDS, cli
from wsss import __version__


def test_help_lists_every_command_in_pipeline_order():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == list(COMMANDS)
    for name in COMMANDS:  # every registered module really provides its command
        assert cli.get_command(None, name) is not None


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_wsss_error_becomes_one_line_without_traceback(tmp_path):
    # a real process, so that the console-script path (not only CliRunner) is checked
    result = subprocess.run([sys.executable, "-m", "stages.cli", "eval", "--pred", str(tmp_path), "--root",
                             str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"Error: {tmp_path / 'nowhere'}: dataset root not found"]


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["train-everything"])
    assert result.exit_code == 2 and "No such command" in result.output
