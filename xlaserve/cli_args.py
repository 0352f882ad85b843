"""Command-line flags generated from `EngineArgs`: one source of truth for names, types, defaults
and help text. Every field is a flag (`max_num_seqs` -> `--max-num-seqs`); a flag not given keeps
the field's default (or the subcommand's own default), so the CLI never restates a default."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from xlaserve.config import EngineArgs

NONE_WORDS = ("none", "None", "null")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _kv_memory(value: str) -> int | float | None:
    """Bytes (an int: 1073741824 or 1e9) or a fraction of free memory (a float in (0, 1])."""
    if value in NONE_WORDS:
        return None
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected bytes or a fraction in (0, 1], got {value!r}"
        ) from None
    if number > 1 and number.is_integer():
        return int(number)
    return number if any(c in value for c in ".eE") else int(number)


def _int_tuple(value: str) -> tuple[int, ...] | None:
    if value in NONE_WORDS:
        return None
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {value!r}") from None


def _optional(convert):
    def parse(value: str):
        return None if value in NONE_WORDS else convert(value)

    parse.__name__ = convert.__name__
    return parse


def _parser_for(field: dataclasses.Field):
    """(argparse type, extra add_argument kwargs) for a field's annotation."""
    hints = typing.get_type_hints(EngineArgs)
    hint = hints[field.name]
    if field.name == "kv_cache_memory":
        return _kv_memory, {"metavar": "BYTES|FRACTION"}
    if field.name == "speculative_config":  # JSON, parsed and checked by EngineArgs
        return _optional(str), {"metavar": "JSON"}
    if hint is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if typing.get_origin(base) is tuple:
        return _int_tuple, {"metavar": "N,N,..."}
    convert = {int: int, float: float, str: str}[base]
    return (_optional(convert) if optional else convert), {}


def add_engine_args(
    parser: argparse.ArgumentParser, *, defaults: dict | None = None, skip: tuple[str, ...] = ()
) -> None:
    """Adds one flag per `EngineArgs` field. `defaults` overrides a field's default for this
    subcommand (shown in the help); `skip` leaves fields out (flags the subcommand owns)."""
    defaults = defaults or {}
    group = parser.add_argument_group("engine options (EngineArgs)")
    for field in dataclasses.fields(EngineArgs):
        if field.name in skip:
            continue
        convert, extra = _parser_for(field)
        default = defaults.get(field.name, field.default)
        kwargs = dict(extra, dest=field.name, default=argparse.SUPPRESS)
        if convert is not None:
            kwargs["type"] = convert
        help_text = field.metadata.get("help", "")
        if "default" not in help_text or field.name in defaults:
            help_text = f"{help_text} (default: {default})"
        group.add_argument(flag_name(field.name), help=help_text, **kwargs)
    parser.set_defaults(_engine_defaults=defaults)


def engine_args_from(namespace: argparse.Namespace, **overrides) -> EngineArgs:
    """The `EngineArgs` of parsed flags: given flags, else subcommand defaults, else the
    field's own default."""
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    values = dict(getattr(namespace, "_engine_defaults", {}))
    values.update({k: v for k, v in vars(namespace).items() if k in names})
    values.update(overrides)
    return EngineArgs(**values)
