import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from helpers import assert_one_line_error
from wsss.stages.cli import COMMANDS, cli, one_line
from wsss import __version__
from wsss.errors import WsssError


def test_help_lists_every_command_in_pipeline_order():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines()
              if line.strip() and not line.startswith("    ")]
    assert listed == list(COMMANDS)
    for name in COMMANDS:  # every registered module really provides its command
        assert cli.get_command(None, name) is not None


def test_help_lists_the_commands_without_importing_torch():
    # a fresh process: `wsss --help` reads the list from COMMANDS and imports no command, so no torch (seconds)
    code = ("import sys; from click.testing import CliRunner; from wsss.stages.cli import cli; "
            "result = CliRunner().invoke(cli, ['--help']); "
            "assert result.exit_code == 0 and 'train-cls' in result.output, result.output; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help_imports_no_torch_torchvision_or_sklearn(name):
    # a fresh process: a command's options come from its config, which must not need the heavy libraries (seconds)
    code = ("import sys; from wsss.stages.cli import cli; "
            f"assert cli([{name!r}, '--help'], prog_name='wsss', standalone_mode=False) == 0; "
            "print('imported:', *(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"Usage: wsss {name} " in done.stdout
    assert done.stdout.splitlines()[-1] == "imported:"


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_wsss_error_becomes_one_line_without_traceback(tmp_path):
    # a real process, so that the console-script path (not only CliRunner) is checked
    result = subprocess.run([sys.executable, "-m", "wsss.stages.cli", "eval", "--pred", str(tmp_path), "--root",
                             str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"Error: {tmp_path / 'nowhere'}: dataset root not found"]


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["train-everything"])
    assert result.exit_code == 2 and "No such command" in result.output


class _BadItems(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise WsssError(f"images/{index}.jpg: not a readable image")


def test_an_error_in_a_dataloader_worker_becomes_its_own_one_line_message():
    loader = torch.utils.data.DataLoader(_BadItems(), num_workers=1)
    with pytest.raises(WsssError) as info:
        next(iter(loader))
    # torch re-raises it as "Caught WsssError in DataLoader worker process 0.\nOriginal Traceback ..."
    assert "Original Traceback" in str(info.value)
    assert one_line(info.value) == "images/0.jpg: not a readable image"
    assert one_line(WsssError("plain message")) == "plain message"
    assert one_line(ValueError("first line\nsecond line")) == "first line"


def test_os_errors_about_files_become_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(cli, ["demo-data", str(blocker / "sub"), "--num-train", "1", "--num-val", "1"])
    assert result.exit_code == 1
    assert_one_line_error(result, str(blocker), "a file stands where a folder is needed")
