"""Settings: a command's options as one frozen dataclass that owns every default, help text and check.

A stage's ``Config`` derives from :class:`Settings` and declares each option once, with
:func:`setting`::

    @dataclass(frozen=True)
    class TrainClsConfig(Settings):
        lr: float = setting(0.1, "Backbone learning rate.", above=0)
        select: str = setting("val-map", "What picks best.pth.", choices=("val-map", "last"))

The field is the one owner of the option: its default, its help text, its choices and range.
The command line (:mod:`wsss.stages.options` builds one option per field), a TOML file, a
``config.json`` written by an earlier run and a recipe all reach the same dataclass, and the
dataclass checks itself (:meth:`Settings.__post_init__`): every real number finite, every value in
its choices and range, then the class's own :meth:`Settings.check` for rules between fields.  A
failed check is a :class:`SettingError`, one line that names the option.

A field whose type is another :class:`Settings` class is a group (SGD, CRF): on the command line
its fields appear with the group's prefix (``crf`` + ``iterations`` -> ``--crf-iterations``), in a
file as a table (``[crf]`` or ``crf = {iterations = 5}``).

Values arrive in two forms and one function each turns them into the field's type:
:func:`from_text` (what a user typed: ``"0.5,1.5"``, ``"none"``, ``"0/4"``) and :func:`from_value`
(typed values of TOML, JSON or Python; a string there is read as text).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

from wsss.errors import WsssError

_MISSING = dataclasses.MISSING


class SettingError(WsssError, ValueError):
    """A setting is invalid; ``option`` is the command-line option it belongs to (``--lr``).

    Also a ValueError: library code that builds settings in Python sees the usual error for a bad value.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option} {message}")
        self.option = option
        self.reason = message


class MissingSetting(WsssError):
    """A required setting was not given; ``option`` names it (``--root``, or ``RUN_DIR`` for an argument)."""

    def __init__(self, option: str, label: str = "") -> None:
        super().__init__(f"{label}missing {option} (required)")
        self.option = option


def setting(default: Any = _MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            choices: tuple | None = None, at_least: float | None = None, above: float | None = None,
            at_most: float | None = None, below: float | None = None, option: str | None = None,
            flag: str | None = None, prefix: str | None = None, parse: Callable[[str], Any] | None = None,
            metavar: str | None = None, argument: bool = False,
            validate: Callable[[Any], str | None] | None = None, aliases: tuple[str, ...] = (),
            repeat: bool = False) -> Any:
    """Declare one option of a :class:`Settings` dataclass.

    Args:
        default: the default value (omit for a required option; ``factory`` for a group's default).
        help: the help text: what the option does, its unit; the default is appended by the command line.
        choices: the allowed values.
        at_least, above, at_most, below: the allowed range (closed or open bounds); a tuple's every element.
        option: the command-line name when it is not ``--`` + the field name with dashes (``--out``).
        flag: for a bool, the ``--on/--off`` pair (default ``--name/--no-name``).
        prefix: for a group, the prefix of its options (default the field name; ``""`` for none).
        parse: reads the text form (``"0/4"``) when a plain type conversion cannot.
        metavar: what the help shows for the value.
        argument: on the command line a positional argument instead of an option.
        validate: a check of the value however it arrived (text, file, Python): returns what is wrong, or None.
        aliases: other command-line names of the option (an older or another command's spelling).
        repeat: for a tuple, the option is given once per element (``--split-file A --split-file B``)
            instead of as one comma-separated text.
    """
    metadata = {"help": help, "choices": choices, "range": (at_least, above, at_most, below), "option": option,
                "flag": flag, "prefix": prefix, "parse": parse, "metavar": metavar,
                "argument": argument,
                "validate": validate, "aliases": tuple(aliases), "repeat": repeat}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_of(field: dataclasses.Field, prefix: str = "") -> str:
    """The command-line option of a field: ``--`` + prefix + name with dashes, unless the field names one
    (a positional argument: its name in capitals, ``RUN_DIR``)."""
    if field.metadata.get("argument"):
        return field.name.upper()
    return prefixed(field.metadata.get("option") or "--" + field.name.replace("_", "-"), prefix)


def prefixed(option: str, prefix: str) -> str:
    """``--iterations`` with prefix ``crf`` -> ``--crf-iterations`` (no prefix: unchanged)."""
    return f"--{prefix}-{option[2:]}" if prefix else option


def group_prefix(field: dataclasses.Field, prefix: str = "") -> str:
    """The option prefix of a group field's own options."""
    own = field.metadata.get("prefix")
    own = field.name.replace("_", "-") if own is None else own
    return "-".join(part for part in (prefix, own) if part)


def option_for(config: Any, name: str, group: str | None = None) -> str:
    """The command-line option of field ``name`` of a :class:`Settings` class or instance, for messages; with
    ``group``, of that group field's own setting: ``option_for(SegConfig, "reliability_dir")`` -> ``--reliability``,
    ``option_for(RefineConfig, "iterations", group="crf_params")`` -> ``--crf-iterations``."""
    fields = {field.name: field for field in dataclasses.fields(config)}
    if group is None:
        return option_of(fields[name])
    inner = optional_inner(field_types(config if isinstance(config, type) else type(config))[group])[1]
    return option_of({field.name: field for field in dataclasses.fields(inner)}[name], group_prefix(fields[group]))


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every field of a dataclass (annotations are strings under ``from __future__``)."""
    return typing.get_type_hints(cls)


def optional_inner(kind: Any) -> tuple[bool, Any]:
    """``(True, X)`` for ``X | None``, else ``(False, kind)``."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return True, args[0]
    return False, kind


def is_group(kind: Any) -> bool:
    """True for a field type that is itself a :class:`Settings` dataclass (a group of options)."""
    return isinstance(kind, type) and issubclass(kind, Settings)


def type_name(kind: Any) -> str:
    """How a message names a type: ``a number``, ``a whole number``, ``true or false``, ``a list``."""
    optional, kind = optional_inner(kind)
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", Path: "a path"}
    if typing.get_origin(kind) is tuple:
        name = "a list"
    elif is_group(kind):
        name = "a table"
    else:
        name = names.get(kind, str(kind))
    return name + (" or none" if optional else "")


def _split_tuple(kind: Any) -> tuple[Any, int | None]:
    args = typing.get_args(kind)
    if len(args) == 2 and args[1] is Ellipsis:
        return args[0], None
    if args and all(arg == args[0] for arg in args):
        return args[0], len(args)
    raise TypeError(f"unsupported settings type {kind}")


def from_text(text: str, kind: Any, parse: Callable[[str], Any] | None = None) -> Any:
    """A typed value from the text a user typed; ValueError (saying what was expected) when it is not one.

    ``X | None``: ``none`` is None; ``bool``: true/false, yes/no, 1/0; tuples: comma-separated;
    ``parse`` (a field's own parser) is used for everything but ``none``.
    """
    optional, kind = optional_inner(kind)
    stripped = str(text).strip()
    if optional and stripped.lower() == "none":
        return None
    if parse is not None:
        return parse(stripped)
    if kind is bool:
        lowered = stripped.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if typing.get_origin(kind) is tuple:
        element, length = _split_tuple(kind)
        parts = [part for part in stripped.split(",") if part.strip()]
        if length is not None and len(parts) != length:
            raise ValueError(f"expected {length} comma-separated values, got {text!r}")
        return tuple(from_text(part, element) for part in parts)
    try:
        if kind is int:
            return int(stripped)
        if kind is float:
            return float(stripped)
    except ValueError:
        raise ValueError(f"expected {type_name(kind)}, got {text!r}") from None
    if kind is Path:
        if not stripped:
            raise ValueError("expected a path, got an empty string")
        return Path(stripped)
    if kind is str:
        return stripped
    raise TypeError(f"unsupported settings type {kind}")


def from_value(value: Any, kind: Any, parse: Callable[[str], Any] | None = None, where: str = "") -> Any:
    """A typed value from a TOML/JSON/Python value; ValueError when it has the wrong type.

    A string is read as text (:func:`from_text`), so ``scale_range = "0.5,1.5"`` and ``shard = "0/4"``
    work as on the command line; a list fills a tuple; a table fills a group (:func:`build`).
    """
    optional, inner = optional_inner(kind)
    if value is None:
        if optional:
            return None
        raise ValueError(f"expected {type_name(kind)}, got none")
    if is_group(inner):
        if isinstance(value, inner):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a table of {inner.__name__} settings, got {value!r}")
        return build(inner, value, where=where)
    if isinstance(value, str) and (parse is not None or inner not in (str, Path)
                                   or (optional and value.strip().lower() == "none")):
        return from_text(value, kind, parse)  # text as on the command line: "0.5,1.5", "0/4", "none"
    if inner is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"expected a whole number, got {value!r}")
        return int(value)
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if inner in (str, Path):
        if not isinstance(value, (str, Path)):
            raise ValueError(f"expected {type_name(inner)}, got {value!r}")
        return inner(value) if inner is Path else str(value)
    if typing.get_origin(inner) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        element, length = _split_tuple(inner)
        if length is not None and len(value) != length:
            raise ValueError(f"expected a list of {length} values, got {list(value)!r}")
        return tuple(from_value(item, element) for item in value)
    raise TypeError(f"unsupported settings type {kind}")


def gather_unprefixed(cls: type, values: Mapping[str, Any]) -> dict:
    """``values`` with the top-level keys of a group without an option prefix moved into its table.

    Such a group (SGD's ``--lr``) takes its keys at the top level too: ``lr = 0.1`` in a file means
    ``sgd.lr``, as ``--lr 0.1`` does on the command line.  Two sources of values are gathered first,
    then merged, so neither form overrides the other by accident.
    """
    values = dict(values)
    for name, own in unprefixed_keys(cls).items():
        loose = {key: values.pop(key) for key in list(values) if key in own}
        if loose:
            table = values.get(name, {})
            values[name] = merge(table, loose) if isinstance(table, Mapping) else table
    return values


def unprefixed_keys(cls: type) -> dict[str, set[str]]:
    """The keys that ``cls``'s groups without an option prefix take at the top level, by group field name."""
    kinds, names = field_types(cls), {field.name for field in dataclasses.fields(cls)}
    return {field.name: {f.name for f in dataclasses.fields(kinds[field.name])} - names
            for field in dataclasses.fields(cls)
            if is_group(kinds[field.name]) and field.metadata.get("prefix") == ""}


def field_default(field: dataclasses.Field) -> Any:
    """A dataclass field's default value (made by its factory where it has one), or ``dataclasses.MISSING``."""
    if field.default is not _MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not _MISSING else _MISSING


def build(cls: type, values: Mapping[str, Any], *, where: str = "") -> Any:
    """An instance of the :class:`Settings` class ``cls`` from typed or text values keyed by field name.

    Unknown keys and values of the wrong type are :class:`WsssError`s that name ``where`` (a file,
    a recipe section) and the key; missing required fields name their option.
    """
    fields = {field.name: field for field in dataclasses.fields(cls)}
    kinds = field_types(cls)
    label = f"{where}: " if where else ""
    values = gather_unprefixed(cls, values)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise WsssError(f"{label}unknown setting {unknown[0]!r} (known: {', '.join(fields)})")
    converted = {}
    for name, value in values.items():
        grouped = is_group(optional_inner(kinds[name])[1])
        default = field_default(fields[name])
        if grouped and isinstance(value, Mapping) and isinstance(default, Settings):
            value = merge(as_values(default), value)  # keys not given keep this field's default, not the class's
        try:
            converted[name] = from_value(value, kinds[name], fields[name].metadata.get("parse"),
                                         where=f"{where}.{name}" if where and grouped else where)
        except SettingError as err:  # a group checked itself: name its option with the group's prefix
            raise SettingError(prefixed(err.option, group_prefix(fields[name])), err.reason) from None
        except ValueError as err:
            raise WsssError(f"{label}{name}: {err}") from None
    missing = [name for name, field in fields.items() if name not in converted and field_default(field) is _MISSING]
    if missing:
        raise MissingSetting(option_of(fields[missing[0]]), label)
    return cls(**converted)


def _in_range(value: float, bounds: tuple) -> str | None:
    at_least, above, at_most, below = bounds
    if at_least is not None and value < at_least:
        return f">= {at_least:g}"
    if above is not None and value <= above:
        return f"> {above:g}"
    if at_most is not None and value > at_most:
        return f"<= {at_most:g}"
    if below is not None and value >= below:
        return f"< {below:g}"
    return None


def describe_range(bounds: tuple) -> str:
    """``[0, 1)``-style text of a setting's range, or ``""`` when it has none."""
    at_least, above, at_most, below = bounds
    low = "[" + f"{at_least:g}" if at_least is not None else ("(" + f"{above:g}" if above is not None else None)
    high = f"{at_most:g}" + "]" if at_most is not None else (f"{below:g}" + ")" if below is not None else None)
    if low is None and high is None:
        return ""
    if high is None:
        return f">= {at_least:g}" if at_least is not None else f"> {above:g}"
    if low is None:
        return f"<= {at_most:g}" if at_most is not None else f"< {below:g}"
    return f"{low}, {high}"


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _numbers(value: Any) -> list:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return [value]
    if isinstance(value, tuple):
        return [item for item in value if isinstance(item, numbers.Real) and not isinstance(item, bool)]
    return []


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of every command's config: checks each field against its declaration, then :meth:`check`."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or isinstance(value, Settings):
                continue
            option = option_of(field)
            shown = ",".join(map(_shown, value)) if isinstance(value, tuple) else _shown(value)
            for number in _numbers(value):
                if not math.isfinite(number):
                    raise SettingError(option, f"{shown}: must be a finite number")
                bound = _in_range(number, field.metadata.get("range", (None,) * 4))
                if bound is not None:
                    raise SettingError(option, f"{shown}: must be {bound}")
            choices = field.metadata.get("choices")
            if choices is not None and value not in choices:
                raise SettingError(option, f"{value!r}: choose from {', '.join(map(str, choices))}")
            validate = field.metadata.get("validate")
            if validate is not None and (problem := validate(value)):
                raise SettingError(option, f"{shown}: {problem}")
        self.check()

    def check(self) -> None:
        """Rules between fields (a subclass's own); raise :class:`SettingError` naming the option."""

    def replace(self, **changes: Any):
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)


def fail(option: str, message: str) -> None:
    """Raise the :class:`SettingError` of ``option`` (for :meth:`Settings.check`)."""
    raise SettingError(option, message)


# --------------------------------------------------------------------------- files


def read_settings_file(path: str | Path) -> dict:
    """The settings in a TOML file, or in a ``config.json`` an earlier run wrote (its ``config`` object).

    Raises:
        WsssError: the file is missing, unreadable or not TOML/JSON of a table.
    """
    return _read_settings(path)[0]


def _read_settings(path: str | Path) -> tuple[dict, bool]:
    """:func:`read_settings_file`'s table, and whether the file is a run's ``config.json``."""
    path = Path(path)
    run_config = False
    if not path.is_file():
        raise WsssError(f"{path}: settings file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise WsssError(f"{path}: cannot read settings ({err})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except ValueError as err:
            raise WsssError(f"{path}: not valid JSON ({err})") from None
        run_config = isinstance(data, dict) and isinstance(data.get("config"), dict) and "versions" in data
        if run_config:
            data = data["config"]  # a stage's config.json: the resolved options, beside provenance
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise WsssError(f"{path}: not valid TOML ({err})") from None
    if not isinstance(data, dict):
        raise WsssError(f"{path}: expected a table of settings")
    _refuse_non_finite(data, path)
    return data, run_config


def read_settings_for(cls: type, path: str | Path) -> dict:
    """:func:`read_settings_file` for the settings class ``cls``.

    A ``config.json`` written by another version of wsss may hold settings this one does not have
    (renamed or retired); they are left out with a warning, so the run still replays.  In any other
    file an unknown key stays an error (:func:`build`).
    """
    data, run_config = _read_settings(path)
    if not run_config:
        return data
    known = {field.name for field in dataclasses.fields(cls)}.union(*unprefixed_keys(cls).values())
    dropped = sorted(set(data) - known)
    if dropped:
        logging.getLogger(__name__).warning("%s: settings this version does not have, left out: %s", path,
                                            ", ".join(dropped))
    return {key: value for key, value in data.items() if key not in dropped}


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def _refuse_non_finite(data: Any, path: Path, key: str = "") -> None:
    if isinstance(data, dict):
        for name, value in data.items():
            _refuse_non_finite(value, path, f"{key}.{name}" if key else name)
    elif isinstance(data, list):
        for value in data:
            _refuse_non_finite(value, path, key)
    elif isinstance(data, float) and not math.isfinite(data):
        raise WsssError(f"{path}: {key} = {data}: must be a finite number")


def as_values(settings: Any) -> dict:
    """The fields of a settings instance as plain values keyed by name (groups as nested dicts)."""
    return {field.name: (as_values(value) if isinstance(value := getattr(settings, field.name), Settings) else value)
            for field in dataclasses.fields(settings)}


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict:
    """``base`` updated by ``top``; tables (groups) are merged key by key."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
