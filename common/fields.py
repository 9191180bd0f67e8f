"""Settings declared once. A config dataclass's field carries its default, its description and its
bounds; every face of the setting is derived from that one declaration:

- the command line: `add_arguments(parser, Config)` makes `--field-name` with the type, bounds,
  choices (from a `Literal`), help text and default, and `from_args(Config, namespace)` builds the
  config back from the parsed options;
- Prefect's parameter form and its validation: pydantic reads `description`, `ge`, `gt`, `le` from a
  dataclass field's metadata, so a flow parameter typed `Config` is shown with descriptions and
  checked (a `Literal` as a choice) before the flow runs;
- the check at construction: `check(self)` in `__post_init__` refuses a value out of range or not
  among a `Literal`'s choices, whoever builds the config (a test, a worker, a deployment).

Torch- and Prefect-free (the command line parses and checks before anything heavy is imported), so it
lives in the bottom layer, beside the batch job's own config that uses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal

META = "mnistops"  # our key in a field's metadata; pydantic reads only its own keys (description, ge, ...)


@dataclass(frozen=True)
class Cli:
    """How a setting appears on the command line."""

    flag: str | None = None  # default: --field-name; a bool that defaults to True: --no-field-name
    parse: Callable[[str], Any] | None = None  # argparse type, for values that are not a plain type
    text: Callable[[Any], str] | None = None  # how the default is written in --help (parse reads it back)
    metavar: str | None = None
    option: bool = True  # False: set by the program, never a command-line option


def setting(default: Any = MISSING, description: str = "", *, default_factory: Any = MISSING,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            flag: str | None = None, parse: Callable[[str], Any] | None = None,
            text: Callable[[Any], str] | None = None, metavar: str | None = None,
            option: bool = True, internal: bool = False) -> Any:
    """A dataclass field that knows its faces. `internal=True`: set by the program (derived from the
    data, or by the pipeline): no command-line option, shown read-only in Prefect's form."""
    metadata: dict[str, Any] = {"description": description}
    metadata.update({k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None})
    if internal:
        metadata["json_schema_extra"] = {"readOnly": True}
    metadata[META] = Cli(flag, parse, text, metavar, option and not internal)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Types


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed): `int | None` -> (int, True)."""
    args = typing.get_args(hint)
    if type(None) in args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else typing.Union[rest]), True
    return hint, False


def choices(hint: Any) -> tuple | None:
    """The values a `Literal` allows (None for any other type)."""
    inner, _ = _unwrap(hint)
    return typing.get_args(inner) if typing.get_origin(inner) is Literal else None


def _bounds_text(meta: Mapping[str, Any]) -> str:
    parts = [f">= {meta['ge']:g}" if "ge" in meta else "", f"> {meta['gt']:g}" if "gt" in meta else "",
             f"<= {meta['le']:g}" if "le" in meta else ""]
    return " and ".join(p for p in parts if p)


def _in_bounds(value: float, meta: Mapping[str, Any]) -> bool:
    return (math.isfinite(value) and ("ge" not in meta or value >= meta["ge"])
            and ("gt" not in meta or value > meta["gt"]) and ("le" not in meta or value <= meta["le"]))


def check(obj: Any) -> None:
    """Refuse a config whose values are outside their declared choices or bounds (ValueError naming
    the class, the field and what was expected). Call it from `__post_init__`."""
    cls = type(obj)
    for f in dataclasses.fields(cls):
        value, hint = getattr(obj, f.name), _hints(cls)[f.name]
        _, optional = _unwrap(hint)
        if value is None and optional:
            continue
        where = f"{cls.__name__}.{f.name}"
        allowed = choices(hint)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{where}: {value!r}: expected one of {', '.join(map(str, allowed))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not _in_bounds(value, f.metadata):
            raise ValueError(f"{where}: {value!r}: expected a number {_bounds_text(f.metadata)}")


# ---------------------------------------------------------------------------------------------
# Command-line values: a bad one is a usage error (argparse's own, exit 2) naming the option


def number(kind: type, meta: Mapping[str, Any]) -> Callable[[str], Any]:
    """An argparse type: `kind` (int or float) within the bounds of `meta` (ge, gt, le)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {noun}") from None
        if not _in_bounds(value, meta):
            raise argparse.ArgumentTypeError(f"{text}: expected {noun} {_bounds_text(meta)}".rstrip())
        return value

    parse.__name__ = "integer" if kind is int else "number"
    return parse


def sizes(text: str) -> tuple[int, ...]:
    """Layer sizes: `50`, `128,64` or `128x64`."""
    try:
        values = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"hidden sizes {text!r}: expected integers like 50 or 128,64") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"hidden sizes {text!r}: expected positive integers like 50 or 128,64")
    return values


def sizes_text(values: Iterable[int]) -> str:
    return ",".join(map(str, values))


def host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where it says nothing: a flag without a value, a default
    of None (the help says what happens then), or a help that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.default is None or "default:" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


def _cli(f: dataclasses.Field) -> Cli:
    return f.metadata.get(META, Cli(option=False))


def options(cls: type, only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line options, in declaration order."""
    only, exclude = (set(only) if only is not None else None), set(exclude)
    return [f for f in dataclasses.fields(cls) if _cli(f).option and f.name not in exclude
            and (only is None or f.name in only)]


def _argument(cls: type, f: dataclasses.Field, default: Any) -> tuple[str, dict[str, Any]]:
    cli, hint = _cli(f), _hints(cls)[f.name]
    inner, _ = _unwrap(hint)
    flag = cli.flag or "--" + f.name.replace("_", "-")
    kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("description", ""), "default": default}
    if inner is bool:
        kwargs["action"] = "store_false" if default is True else "store_true"
        if default is True and cli.flag is None:
            flag, kwargs["help"] = "--no-" + f.name.replace("_", "-"), "do not " + kwargs["help"]
        return flag, kwargs
    if (allowed := choices(hint)) is not None:
        kwargs["choices"] = list(allowed)
    elif cli.parse is not None:
        kwargs["type"] = cli.parse
    elif inner in (int, float):
        kwargs["type"] = number(inner, f.metadata)
    elif inner in (str, Path):
        kwargs["type"] = inner
    else:
        raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {hint} (give it parse=)")
    if cli.text is not None and default is not None:
        kwargs["default"] = cli.text(default)  # argparse parses a string default with `type`
    if cli.metavar:
        kwargs["metavar"] = cli.metavar
    return flag, kwargs


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                  only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                  defaults: Mapping[str, Any] | None = None, helps: Mapping[str, str] | None = None,
                  nargs: str | None = None, dest_prefix: str = "") -> None:
    """One option per command-line field of `cls` (see `options`). `defaults` and `helps` replace a
    field's default or help for this command; `nargs="+"` takes several values (a sweep's axes), stored
    under `dest_prefix + name`."""
    defaults, helps = defaults or {}, helps or {}
    for f in options(cls, only, exclude):
        flag, kwargs = _argument(cls, f, defaults.get(f.name, field_default(f)))
        kwargs["dest"] = dest_prefix + f.name
        if dest_prefix and "action" not in kwargs:
            kwargs.setdefault("metavar", f.name.upper())
        if f.name in helps:
            kwargs["help"] = helps[f.name]
        if nargs is not None and "action" not in kwargs:
            kwargs["nargs"] = nargs
        parser.add_argument(flag, **kwargs)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """`cls` from the parsed options (those the command has), `overrides` on top."""
    values = {f.name: getattr(args, f.name) for f in options(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})
