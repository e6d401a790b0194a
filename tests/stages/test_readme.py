"""README's commands name only options that exist: every `wsss COMMAND ... --option` in a shell block or an
inline code span is checked against that command's own options (a renamed option fails here, not for a user)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import click
import pytest

from wsss.stages.cli import COMMANDS, cli

README = Path(__file__).resolve().parents[2] / "README.md"
GLOBAL = {"-v", "--verbose", "-q", "--quiet", "--help", "-h", "--version"}


def commands_in_readme() -> list[tuple[str, str]]:
    """``(command line, where)`` for every `wsss ...` command in README's shell blocks and inline code."""
    text = README.read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in joined.splitlines():
            line = line.split("#")[0].strip()
            found += [(match, "shell block") for match in re.findall(r"(?:^|&& |; )(wsss [^&;|]*)", line)]
    found += [(span, "inline code") for span in re.findall(r"`(wsss [^`]*)`", text)]
    return found


def _options_of(words: list[str]) -> tuple[click.Command, list[str]]:
    """The command a README line runs and the options it gives."""
    name = next((word for word in words[1:] if not word.startswith("-")), None)
    command = importlib.import_module(COMMANDS[name][0]).command
    rest = words[words.index(name) + 1:]
    sub = rest[0].replace("\\|", "|").split("|")[0] if rest else None  # `prepare voc|coco|folder`: voc
    if isinstance(command, click.Group) and sub in command.commands:
        command, rest = command.commands[sub], rest[1:]
    return command, [word.split("=")[0] for word in rest if word.startswith("--")]


def test_readme_names_commands_that_exist():
    names = {line.split()[1] if not line.split()[1].startswith("-") else line.split()[2]
             for line, _ in commands_in_readme() if len(line.split()) > 1}
    unknown = sorted(name for name in names - set(COMMANDS) if name not in ("…", "...", "COMMAND", "<stage>"))
    assert not unknown, unknown


@pytest.mark.parametrize("line, where", commands_in_readme())
def test_every_option_in_readme_exists(line, where):
    words = [word for word in line.replace("[", " ").replace("]", " ").split() if word]
    if len(words) < 2 or all(word.startswith("-") for word in words[1:]):
        return
    name = next(word for word in words[1:] if not word.startswith("-"))
    if name not in COMMANDS:
        return  # placeholders (`wsss <stage> --help`): the test above names real commands
    command, given = _options_of(words)
    known = {opt for param in command.params for opt in (*param.opts, *getattr(param, "secondary_opts", ()))}
    missing = sorted(set(given) - known - GLOBAL)
    assert not missing, f"README ({where}): `{line}` uses {missing}, not options of `wsss {name}`"


# --------------------------------------------------------------------------- README's Python examples run


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The files README's Python examples open, where the demo pipeline puts them (small and untrained)."""
    import numpy as np
    import torch
    from click.testing import CliRunner

    from wsss import artifacts
    from wsss.datasets.prepared import PreparedDataset
    from wsss.models.deeplab import build_seg_model

    base = tmp_path_factory.mktemp("readme")
    work = base / "work" / "demo"
    runner = CliRunner()
    for args in (["demo-data", str(work / "data"), "--num-train", "120", "--num-val", "1", "--size", "40"],
                 ["prepare", "voc", "--root", str(work / "data" / "VOC2012"), "--workers", "1"]):
        result = runner.invoke(cli, ["-q", *args])
        assert result.exit_code == 0, result.output
    dataset = PreparedDataset.load(work / "data" / "VOC2012")
    torch.manual_seed(0)
    model = build_seg_model("deeplabv3_resnet18", dataset.num_classes)
    artifacts.save_checkpoint(work / "run" / "seg" / "last.pth", {
        "model": model.state_dict(), "config": {}, "classes": list(dataset.classes),
        "arch": {"model": "deeplabv3_resnet18", "num_classes": dataset.num_classes}})
    keys = np.array(dataset.labels["demo_000000"])
    artifacts.write_cam(artifacts.cam_path(work / "run" / "cams", "demo_000000"), keys,
                        np.full((len(keys), 40, 40), 0.5, np.float32))
    for image_id in dataset.ids("val"):
        mask = dataset.read_mask("val", image_id)
        artifacts.write_label_png(artifacts.label_path(work / "run" / "pred", image_id), mask)
    result = runner.invoke(cli, ["export", "--checkpoint", str(work / "run" / "seg"), "--out", str(work / "export")])
    assert result.exit_code == 0, result.output
    return base


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_examples_run(demo_run, index, monkeypatch):
    monkeypatch.chdir(demo_run)
    namespace = {}
    exec(compile(python_blocks()[index], f"README.md python block {index + 1}", "exec"), namespace)
    if "scores" in namespace:  # the API example: predictions equal to the masks score 1
        assert namespace["scores"]["miou"] == 1.0
        assert namespace["label"].shape == namespace["image"].shape[:2]
        assert namespace["probs"].shape[0] == len(namespace["model"].classes)
    if "batch" in namespace:  # the export example
        assert tuple(namespace["label"].shape) == namespace["image"].shape[:2]


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 2


def test_readme_fits_under_300_lines():
    assert len(README.read_text().splitlines()) < 300  # the rest belongs in bench/README.md
