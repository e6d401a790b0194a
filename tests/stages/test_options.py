"""Tests of stages/options.py: every command's options come from its config, --config files, one owner per default."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from helpers import assert_one_line_error
from wsss import settings as S
from wsss.settings import Settings, setting
from wsss.stages import options
from wsss.stages.cli import COMMANDS, cli


def stage_commands() -> dict[str, click.Command]:
    """Every command built from a config: the stages, and the subcommands of ``prepare``."""
    commands = {}
    for name, (module, _) in COMMANDS.items():
        command = importlib.import_module(module).command
        if isinstance(command, click.Group):
            commands.update({f"{name} {sub}": cmd for sub, cmd in command.commands.items()})
        elif name != "pipeline":
            commands[name] = command
    return commands


@pytest.mark.parametrize("name", sorted(stage_commands()))
def test_every_option_is_a_config_field_with_its_default_and_every_field_an_option(name):
    command = stage_commands()[name]
    cls = command.config_class
    rows = options.cli_fields(cls)
    params = {param.name: param for param in command.params}
    assert set(params) == {options._param_name(path) for path, *_ in rows} | {"config_file", "verbose", "quiet"}
    for path, field, kind, option, default in rows:
        param = params[options._param_name(path)]
        if isinstance(param, click.Option):
            assert option in param.opts, (name, option, param.opts)
            assert param.default is None  # "not given": the config's default applies
            shown = "required" if default is dataclasses.MISSING else f"default: {options.shown_default(field, default)}"
            own = "(default:" in field.metadata["help"]  # `(default: min(cores, 4))` says what None does
            bracket = param.help.rsplit(" [", 1)[-1]  # [range; default: ...] after the help text
            assert (own and "default:" not in bracket) or (not own and shown in bracket), (name, option, param.help)
    # the defaults the command applies are the config's: run the conversion with nothing given
    required = {options._param_name(path): "x" for path, field, *_ in rows
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}
    if not required:
        return
    values = {param: None for param in params if param not in ("config_file", "verbose", "quiet")}
    given = {key: S.from_text(text, kind) for key, text in required.items()
             for path, field, kind, *_ in rows if options._param_name(path) == key}
    try:
        cfg = options.settings_from_command_line(cls, {**values, **given})
    except S.SettingError:  # a rule between options (eval: --pred or --cams) needs more than the required ones
        return
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            assert getattr(cfg, field.name) == field.default, (name, field.name)


@dataclass(frozen=True)
class Kernel(Settings):
    width: float = setting(3.0, "Width.", above=0)


@dataclass(frozen=True)
class Toy(Settings):
    out_dir: Path = setting(help="Output.", option="--out")
    scale_range: tuple[float, float] = setting((0.5, 1.5), "Scales.", parse=options.positive_pair)
    limit: int | None = setting(None, "Limit.", at_least=1)
    mode: str = setting("a", "Mode.", choices=("a", "b"))
    flip: bool = setting(True, "Flip.")
    kernel: Kernel = setting(factory=Kernel, prefix="crf")


@options.settings_command(Toy, name="toy")
def toy(cfg: Toy) -> None:
    """A toy command."""
    click.echo(repr(cfg))


def test_command_line_values_file_values_and_defaults(tmp_path):
    runner = CliRunner()
    result = runner.invoke(toy, ["--out", "o", "--scale-range", "0.7,1.3", "--limit", "none", "--no-flip",
                                 "--crf-width", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == repr(Toy(Path("o"), (0.7, 1.3), None, "a", False, Kernel(2.0)))
    file = tmp_path / "toy.toml"
    file.write_text('out_dir = "from-file"\nmode = "b"\nlimit = 3\n[kernel]\nwidth = 5.0\n')
    result = runner.invoke(toy, ["--config", str(file), "--mode", "a"])  # the command line wins
    assert result.exit_code == 0, result.output
    assert result.output.strip() == repr(Toy(Path("from-file"), (0.5, 1.5), 3, "a", True, Kernel(5.0)))


@pytest.mark.parametrize("args, code, needle", [
    (["--out", "o", "--limit", "0"], 2, "Invalid value for '--limit': 0: must be >= 1"),
    (["--out", "o", "--limit", "x"], 2, "Invalid value for '--limit': expected a whole number"),
    (["--out", "o", "--mode", "c"], 2, "Invalid value for '--mode': 'c': choose from a, b"),
    (["--out", "o", "--scale-range", "2,1"], 2, "expected finite MIN,MAX with 0 < MIN <= MAX"),
    (["--out", "o", "--crf-width", "nan"], 2, "Invalid value for '--crf-width': nan: must be a finite number"),
    ([], 2, "Missing option '--out'."),
])
def test_bad_command_line_values_are_one_line_errors_naming_the_option(args, code, needle):
    result = CliRunner().invoke(toy, args)
    assert result.exit_code == code
    assert needle in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("text, needle", [
    ("colour = 1\n", "toy.toml: unknown setting 'colour'"),
    ("limit = \"many\"\n", "toy.toml: limit: expected a whole number"),
    ("[kernel]\nwidth = nan\n", "toy.toml: kernel.width = nan: must be a finite number"),
    ("limit = 0\n", "Invalid value for '--limit': 0: must be >= 1 (in "),
])
def test_bad_config_files_are_one_line_errors_naming_file_and_key(tmp_path, text, needle):
    file = tmp_path / "toy.toml"
    file.write_text('out_dir = "o"\n' + text)
    result = CliRunner().invoke(toy, ["--config", str(file)])
    assert result.exit_code != 0 and needle in result.output, result.output
    assert "Traceback" not in result.output


def test_quiet_and_verbose_after_the_command(tmp_path):
    result = CliRunner().invoke(cli, ["demo-data", str(tmp_path / "d"), "--num-train", "2", "--num-val", "1",
                                      "--size", "32", "-q"])
    assert result.exit_code == 0, result.output
    assert "INFO" not in result.output


def test_a_stage_error_from_a_config_file_is_one_line(tmp_path):
    file = tmp_path / "cls.toml"
    file.write_text('root = "nowhere"\nout_dir = "o"\nepochs = 0\n')
    result = CliRunner().invoke(cli, ["train-cls", "--config", str(file)])
    assert_one_line_error(result, "--epochs", "must be >= 1", str(file))


@pytest.mark.parametrize("text", ["0.5,1.5", " 0.5 , 1.5 "])
def test_positive_pair(text):
    assert options.positive_pair(text) == (0.5, 1.5)


@pytest.mark.parametrize("text", ["1", "0,1", "2,1", "1,nan", "a,b"])
def test_positive_pair_refuses(text):
    with pytest.raises(ValueError):
        options.positive_pair(text)


@pytest.mark.parametrize("text", ["", "0", "1,-1", "1,inf"])
def test_positive_scales_refuses(text):
    with pytest.raises(ValueError):
        options.positive_scales(text)


def test_shard_and_sweep_parsers():
    assert options.shard_text("1/4") == (1, 4)
    assert options.sweep_text("0.1:0.5:0.1") == (0.1, 0.5, 0.1)
    for bad in ("4/4", "x"):
        with pytest.raises(ValueError):
            options.shard_text(bad)
    for bad in ("0.1:0.5", "0.5:0.1:0.1", "0:1:0"):
        with pytest.raises(ValueError):
            options.sweep_text(bad)


def test_help_writes_defaults_as_a_user_types_them_and_file_values_meet_the_same_checks(tmp_path):
    text = " ".join(CliRunner().invoke(cli, ["make-cam", "--help"]).output.split())  # unwrapped
    assert "default: 0/1]" in text and "default: 0.05:0.6:0.01]" in text
    settings = tmp_path / "cams.toml"
    settings.write_text('root = "r"\ncheckpoint = "c.pth"\nout_dir = "o"\nshard = [2, 2]\n')
    result = CliRunner().invoke(cli, ["make-cam", "--config", str(settings)])
    assert result.exit_code == 2 and "'--shard': 2,2: expected I/N with 0 <= I < N" in result.output
    settings.write_text('root = "r"\ncheckpoint = "c.pth"\nout_dir = "o"\nsweep = [0.5, 0.1, 0.1]\n')
    result = CliRunner().invoke(cli, ["make-cam", "--config", str(settings)])
    assert result.exit_code == 2 and "'--sweep'" in result.output and "start <= stop" in result.output


def test_help_names_the_file_key_where_it_is_not_the_option_name():
    text = " ".join(CliRunner().invoke(cli, ["refine", "--help"]).output.split())
    assert "[key: out_dir; required]" in text and "[key: crf_params.scale; (0, 1]; default: 1]" in text
    assert "[key: bg_thresh" not in text  # --bg-thresh is bg_thresh: nothing to say
    assert options.file_key(("sgd", "lr"), "--lr") is None
    assert options.file_key(("crf_params", "iterations"), "--crf-iterations") == "crf_params.iterations"


def test_the_command_line_wins_over_a_flat_group_key_in_a_file(tmp_path):
    settings = tmp_path / "cls.toml"
    settings.write_text('root = "r"\nout_dir = "o"\nlr = 0.5\nmomentum = 0.5\n')
    cls = stage_commands()["train-cls"].config_class
    values = {name: None for name in (options._param_name(path) for path, *_ in options.cli_fields(cls))}
    cfg = options.settings_from_command_line(cls, {**values, "sgd__lr": 0.2}, settings)
    assert (cfg.sgd.lr, cfg.sgd.momentum) == (0.2, 0.5)


def test_a_range_from_a_file_meets_the_command_lines_rule(tmp_path):
    settings = tmp_path / "cls.toml"
    settings.write_text('root = "r"\nout_dir = "o"\nscale_range = [1.5, 0.5]\n')
    result = CliRunner().invoke(cli, ["train-cls", "--config", str(settings)])
    assert result.exit_code == 2 and "'--scale-range': 1.5,0.5: expected MIN,MAX with 0 < MIN <= MAX" in result.output


def test_an_older_config_json_replays_without_the_settings_this_version_lacks(tmp_path, caplog):
    import json

    old = tmp_path / "config.json"
    old.write_text(json.dumps({"config": {"root": "r", "out_dir": "o", "labels": "gt", "stop_at": 40, "lr": 0.01},
                               "versions": {"wsss": "0.0"}, "command": []}))
    cls = stage_commands()["train-seg"].config_class
    values = {name: None for name in (options._param_name(path) for path, *_ in options.cli_fields(cls))}
    cfg = options.settings_from_command_line(cls, values, old)
    assert cfg.sgd.lr == 0.01 and "left out: stop_at" in caplog.text
    toml = tmp_path / "mine.toml"
    toml.write_text('root = "r"\nout_dir = "o"\nlabels = "gt"\nstop_at = 40\n')  # a file a user wrote: an error
    with pytest.raises(S.WsssError, match="unknown setting 'stop_at'"):
        options.settings_from_command_line(cls, values, toml)


def test_every_switch_can_be_turned_off():
    for name, command in stage_commands().items():
        for param in command.params:
            if isinstance(param, click.Option) and param.is_bool_flag and param.name not in ("quiet",):
                assert param.secondary_opts, (name, param.opts)


@pytest.mark.parametrize("name", sorted(stage_commands()))
def test_every_option_says_what_it_does(name):
    for path, field, _kind, option, _default in options.cli_fields(stage_commands()[name].config_class):
        assert len(field.metadata.get("help", "").strip()) >= 10, (name, option)
