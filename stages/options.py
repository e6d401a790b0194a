"""The command line of a stage, built from its :class:`~wsss.settings.Settings` config.

:func:`settings_command` makes one click option per config field (a group's fields with its
prefix), with the field's help text, choices, range and default in the help; ``--config FILE``
(TOML, or a ``config.json`` an earlier run wrote) supplies values, the command line wins over the
file, and the config checks everything itself.  A command module is then the stage's library call
minus option parsing: ``settings_command(MakeCamConfig)(report)`` where ``report(cfg)`` runs the
stage and prints its summary.  ``-v``/``-q`` are accepted after the command name too.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

import click
import math

from wsss import settings as S
from wsss.device import AMP_MODES, DEVICES  # noqa: F401  (re-exported for the commands)
from wsss.stages.cli import log_level

# Help texts of the options that many commands share (each command's config declares the field).
ROOT_HELP = "Dataset root prepared with `wsss prepare` (e.g. VOCdevkit/VOC2012)."
DATASET_HELP = "Dataset kind; must match what `wsss prepare` wrote under --root (default: what it wrote)."
CAMS_HELP = "Folder of CAM files <id>.npz from `wsss make-cam` (IRN-style <id>.npy with --allow-pickle)."
DEVICE_HELP = "auto = cuda when available, else cpu."
SEED_HELP = "Random seed (same seed, same device, same outputs)."
OVERWRITE_HELP = "Redo finished outputs instead of skipping them (--resume skips them)."
AMP_HELP = "Mixed precision: auto = bf16 on CUDA GPUs that support it, off on CPU."
COMPILE_HELP = "torch.compile the network (slow start, faster steps on GPU)."
THREADS_HELP = ("Threads for torch/OpenCV/BLAS in this process (default: the cores divided among the worker "
                "processes).")
LOADER_WORKERS_HELP = "DataLoader worker processes that decode images (default: min(cores, 4))."
POOL_WORKERS_HELP = "Worker processes for the per-image work (default: all cores)."
SHARD_HELP = ("Process only shard I of N of the split (0 <= I < N), e.g. one task of a job array; outputs merge by "
              "file name.")
ALLOW_PICKLE_HELP = "Allow IRN-style pickled .npy CAM dicts (unpickling runs code from the file)."
LIMIT_HELP = "Only the first N images (quick looks, benchmarks)."


# The settings that many commands share, declared once: ``device: str = device_setting()`` in a config.

def root_setting():
    """``--root``: the prepared dataset."""
    return S.setting(help=ROOT_HELP, validate=folder_problem)


def dataset_setting():
    """``--dataset``: the kind that ``wsss prepare`` wrote (none: whatever it wrote)."""
    from wsss.datasets.prepared import DATASET_KINDS

    return S.setting(None, DATASET_HELP, choices=DATASET_KINDS)


def cams_setting():
    """``--cams``: a folder of CAM files."""
    return S.setting(help=CAMS_HELP, option="--cams")


def device_setting(note: str = ""):
    """``--device auto|cpu|cuda``."""
    return S.setting("auto", DEVICE_HELP + note, choices=DEVICES)


def amp_setting():
    """``--amp``: mixed precision."""
    return S.setting("auto", AMP_HELP, choices=AMP_MODES)


def compile_setting():
    """``--compile``: torch.compile the network."""
    return S.setting(False, COMPILE_HELP, option="--compile")


def seed_setting():
    """``--seed``."""
    return S.setting(0, SEED_HELP)


def loader_workers_setting():
    """``--workers`` of a stage whose images are decoded by DataLoader workers."""
    return S.setting(None, LOADER_WORKERS_HELP, at_least=0)


def pool_workers_setting():
    """``--workers`` of a stage whose per-image work runs in a process pool."""
    return S.setting(None, POOL_WORKERS_HELP, at_least=0)


def threads_setting():
    """``--threads``: torch/OpenCV/BLAS threads of this process."""
    return S.setting(None, THREADS_HELP, at_least=1)


def overwrite_setting():
    """``--overwrite/--resume``."""
    return S.setting(False, OVERWRITE_HELP, flag="--overwrite/--resume")


def allow_pickle_setting():
    """``--allow-pickle``: read IRN-style pickled CAM dicts."""
    return S.setting(False, ALLOW_PICKLE_HELP)


def limit_setting():
    """``--limit N``: the first N images of the split."""
    return S.setting(None, LIMIT_HELP, at_least=1)


# Parsers of the text forms of settings (``parse=`` of :func:`wsss.settings.setting`); a ValueError says what
# was expected, and the command line or the file reader names the option or key.

def pair_problem(value: tuple[float, float]) -> str | None:
    """What is wrong with a ``MIN,MAX`` range however it arrived (a TOML list skips the text parser), or None."""
    return None if len(value) == 2 and 0 < value[0] <= value[1] else "expected MIN,MAX with 0 < MIN <= MAX"


def positive_pair(text: str) -> tuple[float, float]:
    """``MIN,MAX`` with ``0 < MIN <= MAX`` (scale ranges)."""
    values = S.from_text(text, tuple[float, ...])
    if not all(math.isfinite(v) for v in values) or pair_problem(values):
        raise ValueError(f"expected finite MIN,MAX with 0 < MIN <= MAX, got {text!r}")
    return values


def positive_scales(text: str) -> tuple[float, ...]:
    """Comma-separated positive scales (multi-scale inference)."""
    values = S.from_text(text, tuple[float, ...])
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"expected positive finite comma-separated scales, got {text!r}")
    return values


def folder_problem(path: Path) -> str | None:
    """What is wrong with a folder option (a dataset root, an output folder) before any work, or None."""
    return "is a file, expected a folder" if Path(path).is_file() else None


def file_problem(path: Path) -> str | None:
    """What is wrong with a file option (a labels list, a class list) before any work, or None."""
    return "is a folder, expected a file" if Path(path).is_dir() else None


def shard_problem(value: tuple[int, int]) -> str | None:
    """What is wrong with a shard ``(I, N)``, or None."""
    return None if len(value) == 2 and 0 <= value[0] < value[1] else "expected I/N with 0 <= I < N"


def shard_setting():
    """``--shard I/N``: one shard of the split (a job array's task); ``(0, 1)`` is the whole split."""
    return S.setting((0, 1), SHARD_HELP, parse=shard_text, metavar="I/N", validate=shard_problem)


def sweep_problem(value: tuple[float, float, float]) -> str | None:
    """What is wrong with a threshold sweep ``(start, stop, step)``, or None."""
    from wsss.evaluation import threshold_range

    try:
        threshold_range(*value)
    except (TypeError, ValueError) as err:
        return str(err)
    return None


def sweep_setting(default: tuple[float, float, float], help_text: str):
    """A ``--sweep start:stop:step`` of background thresholds (stop inclusive), checked however it arrives."""
    return S.setting(default, help_text, parse=sweep_text, metavar="START:STOP:STEP", validate=sweep_problem)


def shard_text(text: str) -> tuple[int, int]:
    """``I/N`` (``0 <= I < N``) -> ``(I, N)``."""
    from wsss.device import parse_shard

    try:
        return parse_shard(text)
    except S.WsssError as err:
        raise ValueError(str(err).split(": ", 1)[-1]) from None


def sweep_text(text: str) -> tuple[float, float, float]:
    """``start:stop:step`` (a threshold sweep, stop inclusive), checked by :func:`sweep_problem` at once."""
    try:
        values = tuple(float(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"expected start:stop:step, got {text!r}") from None
    if len(values) != 3:
        raise ValueError(f"expected start:stop:step, got {text!r}")
    if problem := sweep_problem(values):
        raise ValueError(problem)
    return values


#: What an option's callback returns for the text ``none`` (None itself means "not given").
EXPLICIT_NONE = object()

CONFIG_HELP = ("Read options from a TOML file, or replay a run from the config.json it wrote; options given "
               "on the command line win.")


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(_shown(item) for item in value) if value else "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def shown_default(field: dataclasses.Field, default: Any) -> str:
    """A field's default as ``--help`` writes it, the way a user would type it (``0.5,1.5``, ``0/1``, ``none``)."""
    written = _WRITTEN.get(field.metadata.get("parse"))
    return written(default) if written is not None and isinstance(default, tuple) else _shown(default)


def _help(field: dataclasses.Field, default: Any, key: str | None = None) -> str:
    text = field.metadata.get("help", "")
    extra = [f"key: {key}"] if key else []
    rng = S.describe_range(field.metadata.get("range", (None,) * 4))
    if rng:
        extra.append(rng)
    if default is not dataclasses.MISSING:
        if "(default:" not in text:  # a help that says what its default does (`min(cores, 4)`) is not contradicted
            extra.append(f"default: {shown_default(field, default)}")
    else:
        extra.append("required")
    return f"{text} [{'; '.join(extra)}]".strip()


CliField = tuple[tuple[str, ...], dataclasses.Field, Any, str, Any]


def cli_fields(cls: type, prefix: str = "", path: tuple[str, ...] = (),
               group_default: Any = dataclasses.MISSING) -> list[CliField]:
    """Every option of a settings class: ``(path, field, type, option, default)``, groups flattened."""
    rows = []
    kinds = S.field_types(cls)
    for field in dataclasses.fields(cls):
        kind = kinds[field.name]
        default = S.field_default(field) if group_default is dataclasses.MISSING else getattr(group_default,
                                                                                              field.name)
        if S.is_group(kind):
            rows += cli_fields(kind, S.group_prefix(field, prefix), path + (field.name,), default)
        else:
            rows.append((path + (field.name,), field, kind, S.option_of(field, prefix), default))
    return rows


def _param_name(path: tuple[str, ...]) -> str:
    return "__".join(path)


def _text_parser(field: dataclasses.Field, kind: Any, option: str) -> Callable:
    def convert(ctx, param, text):
        if text is None:
            return None
        try:
            value = S.from_text(text, kind, field.metadata.get("parse"))
            return EXPLICIT_NONE if value is None else value
        except (ValueError, S.WsssError) as err:
            message = str(err)
            if message.startswith(option + " "):  # a field's parser names the option itself
                message = message[len(option) + 1:]
            raise click.BadParameter(message) from None
    return convert


def _metavar(field: dataclasses.Field, kind: Any) -> str:
    choices = field.metadata.get("choices")
    if choices:
        return "[" + "|".join(map(str, choices)) + "]"
    inner = S.optional_inner(kind)[1]
    if S.typing.get_origin(inner) is tuple:
        element, length = S.typing.get_args(inner)[0], len(S.typing.get_args(inner))
        name = {int: "N", float: "X"}.get(element, "V")
        return f"{name},{name}" if S.typing.get_args(inner)[-1] is not Ellipsis and length == 2 else f"{name},..."
    return {int: "INTEGER", float: "NUMBER", str: "TEXT", Path: "PATH"}.get(inner, "VALUE")


def file_key(path: tuple[str, ...], option: str) -> str | None:
    """The key of an option in a settings file or recipe table when it is not the option's own name
    (``--out`` -> ``out_dir``, ``--crf-scale`` -> ``crf_params.scale``), else None."""
    if option.startswith("--") and option[2:].replace("-", "_") == path[-1]:
        return None  # the option's name, also for a group without a prefix (``--lr`` -> ``lr``)
    return ".".join(path)


def _option(path, field, kind, option, default) -> click.Parameter:
    name = _param_name(path)
    help_text = _help(field, default, file_key(path, option))
    if field.metadata.get("argument"):
        return click.Argument([name], required=False, default=None,
                              callback=_text_parser(field, kind, option), metavar=option)
    aliases = list(field.metadata.get("aliases", ()))
    if field.metadata.get("repeat"):
        element = S.typing.get_args(S.optional_inner(kind)[1])[0]
        parse = _text_parser(field, element, option)

        def repeated(ctx, param, texts):
            return tuple(parse(ctx, param, text) for text in texts) or None
        return click.Option([option, *aliases, name], multiple=True, default=None, callback=repeated,
                            metavar=field.metadata.get("metavar") or _metavar(field, element), help=help_text)
    if S.optional_inner(kind)[1] is bool and field.metadata.get("parse") is None:
        flag = field.metadata.get("flag") or option
        if "/" not in flag:  # every switch can be turned off again, e.g. over a replayed config.json
            flag = f"{flag}/--no-{flag[2:]}"
        return click.Option([flag, name], default=None, help=help_text)
    metavar = field.metadata.get("metavar") or _metavar(field, kind)
    return click.Option([option, *aliases, name], default=None, metavar=metavar, help=help_text,
                        callback=_text_parser(field, kind, option))


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
    nested: dict = {}
    for path, value in flat.items():
        level = nested
        for key in path[:-1]:
            level = level.setdefault(key, {})
        level[path[-1]] = value
    return nested


def verbosity_options() -> list[click.Option]:
    """``-v``/``-q`` for a command, so that they work after the command's name too (:func:`set_log_level`)."""
    return [click.Option(["-v", "--verbose"], count=True, help="More log output (-vv for debug)."),
            click.Option(["-q", "--quiet"], is_flag=True, default=False, help="Only warnings and errors.")]


def set_log_level(verbose: int, quiet: bool) -> None:
    """Apply a command's own ``-v``/``-q`` (the group's were applied before it ran)."""
    if verbose or quiet:
        logging.getLogger().setLevel(log_level(verbose, quiet))


def settings_from_command_line(cls: type, values: dict[str, Any], config_file: Path | None = None):
    """The config of ``cls`` from a command's parsed option values (None = not given) and an optional file."""
    rows = {_param_name(path): path for path, *_ in cli_fields(cls)}
    given = _nest({rows[name]: None if value is EXPLICIT_NONE else value
                   for name, value in values.items() if name in rows and value is not None})
    base = S.read_settings_for(cls, config_file) if config_file is not None else {}
    # each source gathered alone, so a flat ``lr`` in the file cannot win over ``--lr`` on the command line
    return S.build(cls, S.merge(S.gather_unprefixed(cls, base), given),
                   where=str(config_file) if config_file is not None else "")


def settings_command(cls: type, *, name: str | None = None, short_help: str | None = None):
    """Decorate ``report(cfg)`` into the click command of the settings class ``cls``.

    The command's help is ``report``'s docstring; its options are :func:`cli_fields` of ``cls``, plus
    ``--config FILE`` and ``-v``/``-q``.
    """
    def decorate(report: Callable[[Any], Any]) -> click.Command:
        params = [_option(*row) for row in cli_fields(cls)]
        arguments = [param for param in params if isinstance(param, click.Argument)]
        options = [param for param in params if not isinstance(param, click.Argument)]
        extra = [click.Option(["--config", "config_file"], type=click.Path(dir_okay=False, path_type=Path),
                              default=None, help=CONFIG_HELP), *verbosity_options()]

        def callback(config_file, verbose, quiet, **values):
            set_log_level(verbose, quiet)
            try:
                cfg = settings_from_command_line(cls, values, config_file)
            except S.MissingSetting as err:
                raise click.UsageError(f"Missing {'argument' if err.option.isupper() else 'option'} "
                                       f"'{err.option}'.") from None
            except S.SettingError as err:  # a value out of range or choices: a usage error, like a typo
                source = f" (in {config_file})" if config_file is not None else ""
                raise click.BadParameter(err.reason + source, param_hint=f"'{err.option}'") from None
            except S.WsssError as err:  # the settings file: unreadable, an unknown key, a wrong type
                raise click.ClickException(str(err)) from None
            return report(cfg)

        command = click.Command(name or report.__name__, callback=callback, params=arguments + options + extra,
                                help=report.__doc__, short_help=short_help,
                                context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
        command.config_class, command.run_config = cls, report  # `wsss pipeline` runs stages through these
        return command
    return decorate


# how --help writes the defaults of settings with their own text form
_WRITTEN = {shard_text: lambda value: f"{value[0]}/{value[1]}",
            sweep_text: lambda value: ":".join(f"{number:g}" for number in value)}
