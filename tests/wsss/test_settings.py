"""Tests of wsss/settings.py: declarations, text and file values, checks, groups, settings files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from wsss import settings as S
from wsss.errors import WsssError
from wsss.settings import SettingError, Settings, setting


@dataclass(frozen=True)
class Kernel(Settings):
    width: float = setting(3.0, "Width.", above=0)
    steps: int = setting(10, "Steps.", at_least=1)


@dataclass(frozen=True)
class Optim(Settings):
    lr: float = setting(0.1, "Rate.", above=0)
    momentum: float = setting(0.9, "Momentum.", at_least=0, below=1)


@dataclass(frozen=True)
class Toy(Settings):
    out_dir: Path = setting(help="Output.", option="--out")
    mode: str = setting("a", "Mode.", choices=("a", "b"))
    scale_range: tuple[float, float] = setting((0.5, 1.5), "Scales.", above=0)
    scales: tuple[float, ...] = setting((1.0,), "Scales.", above=0)
    limit: int | None = setting(None, "Limit.", at_least=1)
    flip: bool = setting(True, "Flip.")
    kernel: Kernel = setting(factory=Kernel, prefix="crf")
    optim: Optim = setting(factory=lambda: Optim(lr=0.5), prefix="")

    def check(self) -> None:
        if self.mode == "b" and self.limit is None:
            S.fail("--limit", "none: mode b needs a limit")


def test_defaults_and_groups():
    toy = Toy(out_dir=Path("o"))
    assert toy.kernel == Kernel(3.0, 10) and toy.optim.lr == 0.5 and toy.optim.momentum == 0.9
    assert S.as_values(toy)["kernel"] == {"width": 3.0, "steps": 10}


@pytest.mark.parametrize("changes, message", [
    ({"mode": "c"}, "--mode 'c': choose from a, b"),
    ({"scale_range": (0.0, 1.0)}, "--scale-range 0,1: must be > 0"),
    ({"scales": (1.0, float("nan"))}, "--scales 1,nan: must be a finite number"),
    ({"limit": 0}, "--limit 0: must be >= 1"),
    ({"mode": "b"}, "--limit none: mode b needs a limit"),
])
def test_checks_name_the_option(changes, message):
    with pytest.raises(SettingError) as caught:
        Toy(out_dir=Path("o"), **changes)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, WsssError)


def test_numpy_scalars_are_checked_too():
    import numpy as np

    with pytest.raises(SettingError, match="--width -inf: must be a finite number"):
        Kernel(width=np.float32("-inf"))


def test_open_and_closed_bounds():
    assert Optim(momentum=0.0).momentum == 0.0
    with pytest.raises(SettingError, match=r"--momentum 1: must be < 1"):
        Optim(momentum=1.0)
    with pytest.raises(SettingError, match=r"--lr 0: must be > 0"):
        Optim(lr=0.0)
    assert S.describe_range((0, None, None, 1)) == "[0, 1)" and S.describe_range((None, 0, None, None)) == "> 0"


@pytest.mark.parametrize("text, kind, expected", [
    ("0.5,1.5", tuple[float, float], (0.5, 1.5)),
    ("1, 2 ,3", tuple[float, ...], (1.0, 2.0, 3.0)),
    ("none", int | None, None),
    ("7", int | None, 7),
    ("off", bool, False),
    ("x/y", Path, Path("x/y")),
])
def test_from_text(text, kind, expected):
    assert S.from_text(text, kind) == expected


@pytest.mark.parametrize("text, kind, needle", [
    ("abc", float, "expected a number, got 'abc'"),
    ("1.5", int, "expected a whole number"),
    ("1,2,3", tuple[float, float], "expected 2 comma-separated values"),
    ("maybe", bool, "expected true or false"),
    ("none", int, "expected a whole number"),
])
def test_from_text_refuses(text, kind, needle):
    with pytest.raises(ValueError, match=needle):
        S.from_text(text, kind)


@pytest.mark.parametrize("value, kind, expected", [
    (3, float, 3.0),
    (2.0, int, 2),
    ([0.5, 1.5], tuple[float, float], (0.5, 1.5)),
    ("0.5,1.5", tuple[float, float], (0.5, 1.5)),  # text in a file reads like the command line
    ("out", Path, Path("out")),
    (None, int | None, None),
])
def test_from_value(value, kind, expected):
    assert S.from_value(value, kind) == expected


@pytest.mark.parametrize("value, kind", [(True, int), (True, float), ("x", int), (2.5, int), (1, bool),
                                         ([1, 2, 3], tuple[float, float]), (None, int), (3, str)])
def test_from_value_refuses_wrong_types(value, kind):
    with pytest.raises(ValueError):
        S.from_value(value, kind)


def test_build_from_a_file_table_with_a_group_and_loose_keys_of_the_unprefixed_group():
    toy = S.build(Toy, {"out_dir": "o", "kernel": {"steps": 5}, "lr": 0.25, "scale_range": [1, 2]})
    assert toy.kernel == Kernel(3.0, 5) and toy.optim == Optim(lr=0.25) and toy.scale_range == (1.0, 2.0)
    assert toy.out_dir == Path("o")


@pytest.mark.parametrize("values, message", [
    ({"out_dir": "o", "colour": 1}, "f.toml: unknown setting 'colour'"),
    ({"out_dir": "o", "limit": "many"}, "f.toml: limit: expected a whole number"),
    ({"out_dir": "o", "flip": 1}, "f.toml: flip: expected true or false, got 1"),
    ({}, "f.toml: missing --out (required)"),
    ({"out_dir": "o", "kernel": 3}, "f.toml: kernel: expected a table"),
])
def test_build_errors_name_the_source_and_key(values, message):
    with pytest.raises(WsssError) as caught:
        S.build(Toy, values, where="f.toml")
    assert str(caught.value).startswith(message)


def test_a_group_error_names_the_prefixed_option():
    with pytest.raises(SettingError) as caught:
        S.build(Toy, {"out_dir": "o", "kernel": {"steps": 0}})
    assert str(caught.value) == "--crf-steps 0: must be >= 1"
    with pytest.raises(SettingError) as caught:
        S.build(Toy, {"out_dir": "o", "momentum": 2})
    assert str(caught.value) == "--momentum 2: must be < 1"


def test_option_for_names_a_fields_option_for_messages():
    toy = Toy(out_dir=Path("o"))
    assert S.option_for(Toy, "scale_range") == "--scale-range" and S.option_for(toy, "out_dir") == "--out"
    assert S.option_for(toy, "steps", group="kernel") == "--crf-steps"
    assert S.option_for(Toy, "momentum", group="optim") == "--momentum"


def test_read_settings_file_toml_json_and_config_json(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_text('mode = "b"\n[kernel]\nsteps = 4\n')
    assert S.read_settings_file(toml) == {"mode": "b", "kernel": {"steps": 4}}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"config": {"mode": "a"}, "versions": {"wsss": "0"}, "command": []}))
    assert S.read_settings_file(config) == {"mode": "a"}


@pytest.mark.parametrize("name, text, needle", [
    ("bad.toml", "mode = \n", "not valid TOML"),
    ("nan.toml", "[kernel]\nwidth = nan\n", "kernel.width = nan: must be a finite number"),
    ("nan.json", '{"lr": NaN}', "not valid JSON"),
    ("list.json", "[1, 2]", "expected a table of settings"),
])
def test_read_settings_file_refuses_bad_files(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(WsssError, match=needle) as caught:
        S.read_settings_file(path)
    assert str(caught.value).startswith(str(path))
    with pytest.raises(WsssError, match="settings file not found"):
        S.read_settings_file(tmp_path / "missing.toml")


def test_merge_keeps_tables_key_by_key():
    assert S.merge({"a": 1, "k": {"x": 1, "y": 2}}, {"k": {"y": 3}, "b": 2}) == {"a": 1, "k": {"x": 1, "y": 3}, "b": 2}


def test_a_partly_given_group_keeps_the_fields_own_defaults():
    # Toy's optim group defaults to lr 0.5 (the class's own default is 0.1): giving only the momentum keeps 0.5
    assert S.build(Toy, {"out_dir": "o", "momentum": 0.5}).optim == Optim(lr=0.5, momentum=0.5)
    assert S.build(Toy, {"out_dir": "o", "optim": {"momentum": 0.5}}).optim == Optim(lr=0.5, momentum=0.5)
