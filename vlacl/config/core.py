"""Frozen-dataclass configs with YAML files, ``--set a.b=value`` overrides and named flags.

Every setting of a command is a field of a frozen dataclass; the field's default is the only
default there is, and its ``help`` metadata is the text ``--help`` shows. A command resolves its
config from three layers, each overriding the one before:

1. ``--config file.yaml`` (a mapping, nested like the dataclasses),
2. ``--set a.b=value`` overrides, in the order given (values are parsed as YAML scalars),
3. the command's named flags (only those the user passed).

Unknown keys are errors with a did-you-mean hint; values are converted to the field's type and a
wrong value names the key, where it came from and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vlacl.errors import ConfigError

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"null", "none", "~", ""}


def setting(default: Any, help: str, *, flag: str | None = None) -> Any:
    """Declare a config field: its one default, its help text and the CLI flag that sets it.

    Args:
        default: The default value. Must be immutable (the config is frozen); use tuples, not lists.
        help: One sentence for ``--help``; say what the setting does and, where it matters, why the
            default is what it is.
        flag: The named CLI flag that sets this field, used in error messages.
    """
    metadata = {"help": help, "flag": flag}
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def help_for(cls: type, key: str) -> str:
    """Return the ``--help`` text of the field ``key`` (dotted) of config class ``cls``, with its default."""
    fld, _ = _field_at(cls, key)
    default = fld.default if fld.default_factory is dataclasses.MISSING else fld.default_factory()
    shown = "none" if default is None else default
    return f"{fld.metadata.get('help', '')} (default: {shown})"


def invalid(key: str, message: str, cls: type | None = None) -> ConfigError:
    """Build the error for a config value that has the right type but a wrong value.

    Config classes call this from ``__post_init__`` so that the message names the key and the flag.
    """
    flag = None
    if cls is not None:
        try:
            flag = _field_at(cls, key)[0].metadata.get("flag")
        except KeyError:
            flag = None
    where = f"`{key}`" + (f" ({flag})" if flag else "")
    return ConfigError(f"invalid config value {where}: {message}")


def resolve_config(
    cls: type[T],
    *,
    config_file: Path | None = None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> T:
    """Build a config of class ``cls`` from its defaults, a YAML file, ``--set`` overrides and flags.

    Args:
        cls: A (frozen) dataclass whose fields may themselves be dataclasses.
        config_file: Optional YAML file with a mapping nested like ``cls``.
        overrides: ``key=value`` strings with dotted keys; the value is parsed as a YAML scalar.
        flags: Dotted key -> value for the named flags the user passed. ``None`` values are ignored,
            so a CLI can pass every flag and let the unpassed ones (``None``) fall through.

    Raises:
        ConfigError: An unknown key (with a did-you-mean hint), a value of the wrong type, an
            unreadable file or a value that the config class rejects.
    """
    values: dict[str, tuple[Any, str]] = {}
    if config_file is not None:
        for key, value in _flatten(cls, _read_yaml(config_file), "", str(config_file)):
            values[key] = (value, f"config file {config_file}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"invalid --set {item!r}: expected KEY=VALUE, e.g. --set seed=3")
        _check_key(cls, key, source="--set")
        values[key] = (_RawText(raw), f"--set {item}")
    for key, value in (flags or {}).items():
        if value is None:
            continue
        fld, _ = _field_at(cls, key)
        flag = fld.metadata.get("flag") or key
        values[key] = (value, str(flag))
    return _build(cls, values, prefix="")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Return a config as plain YAML/JSON types, in field order (paths and enums become strings)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def dump_config(cfg: Any) -> str:
    """Serialize a config to YAML text; the same config always gives the same bytes."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def config_keys(cls: type) -> list[str]:
    """Every dotted key a config class accepts (nested dataclass fields are expanded)."""
    return [key for key, (_, tp) in _schema(cls).items() if not _is_section(tp)]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: check the path given to --config") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text: --config takes a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got a {type(data).__name__}")
    return data


@dataclass(frozen=True)
class _RawText:
    """A ``--set`` value as typed; it is read as YAML unless the field wants text (str, Path)."""

    text: str


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def _schema(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Every dotted key of ``cls``, sections included, mapped to its field and resolved type."""
    schema: dict[str, tuple[dataclasses.Field[Any], Any]] = {}
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        schema[fld.name] = (fld, hints[fld.name])
        if _is_section(hints[fld.name]):
            schema.update({f"{fld.name}.{key}": entry for key, entry in _schema(hints[fld.name]).items()})
    return schema


def _field_at(cls: type, key: str) -> tuple[dataclasses.Field[Any], Any]:
    """Return the field at dotted ``key`` and its resolved type; ``KeyError`` if there is none."""
    return _schema(cls)[key]


def _unknown_key(root: type, key: str, source: str) -> ConfigError:
    known = config_keys(root)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`?" if close else "known keys: " + ", ".join(known)
    return ConfigError(f"unknown config key `{key}` in {source}: {hint}")


def _check_key(cls: type, key: str, source: str) -> None:
    if key not in _schema(cls):
        raise _unknown_key(cls, key, source)
    tp = _schema(cls)[key][1]
    if _is_section(tp):
        raise ConfigError(
            f"config key `{key}` in {source} is a section, not a setting: set one of its keys, "
            f"e.g. `{key}.{dataclasses.fields(tp)[0].name}`"
        )


def _flatten(cls: type, data: Mapping[str, Any], prefix: str, source: str) -> Iterator[tuple[str, Any]]:
    """Yield the dotted key and value of every setting in a (nested) mapping read from a file."""
    for raw_key, value in data.items():
        key = prefix + str(raw_key)
        if key not in _schema(cls):
            raise _unknown_key(cls, key, source)
        if not _is_section(_schema(cls)[key][1]):
            yield key, value
        elif isinstance(value, Mapping):
            yield from _flatten(cls, value, key + ".", source)
        else:
            raise ConfigError(f"config key `{key}` in {source} must be a mapping of settings, got {value!r}")


def _build(cls: type[T], values: Mapping[str, tuple[Any, str]], prefix: str) -> T:
    kwargs: dict[str, Any] = {}
    for key, (fld, tp) in _schema(typing.cast(type, cls)).items():
        if "." in key:
            continue  # built by the section's own _build
        if _is_section(tp):
            kwargs[fld.name] = _build(tp, values, prefix + key + ".")
        elif prefix + key in values:
            value, source = values[prefix + key]
            kwargs[fld.name] = _coerce(value, tp, prefix + key, source)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise a ConfigError naming ``key`` and ``source``."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"invalid value {value!r} for `{key}` (from {source}): expected {expected}")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _RawText):
        text = value.text.strip()
        if tp in (str, Path):
            return tp(value.text)
        if origin in (tuple, list, Sequence) and not text.startswith("["):
            items = [item.strip() for item in text.split(",")] if text else []
            return _coerce(items, tp, key, source)
        if origin in (typing.Union, types.UnionType) and str in args and text.lower() not in _NONE:
            return value.text
        return _coerce(_parse_scalar(value.text), tp, key, source)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        is_none = value is None or (isinstance(value, str) and value.strip().lower() in _NONE)
        if is_none and len(non_none) < len(args):
            return None
        for arg in non_none:
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is typing.Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise fail("one of " + ", ".join(repr(c) for c in args))
    if origin in (tuple, list, Sequence):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise fail(f"a list ({_type_name(tp)})")
        item_tp = args[0] if args else Any
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item_tp = args[0]
        elif origin is tuple and args:
            if len(args) != len(items):
                raise fail(f"{len(args)} items")
            return tuple(_coerce(v, a, key, source) for v, a in zip(items, args, strict=True))
        return tuple(_coerce(v, item_tp, key, source) for v in items)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, key, source): _coerce(v, val_tp, key, source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise fail("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise fail("an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, int | float):
            return float(value)
        try:
            return float(str(value).strip())
        except ValueError:
            raise fail("a number") from None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise fail("a path")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        raise fail("one of " + ", ".join(repr(m.value) for m in tp))
    raise TypeError(f"config field `{key}` has an unsupported type {tp!r}")
