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
