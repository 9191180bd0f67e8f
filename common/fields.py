"""Settings declared once. A config dataclass's field carries its default, its description and its
bounds; every face of the setting is derived from that one declaration:

- the command line: `add_arguments(parser, Config)` makes `--field-name` with the type, bounds,
  choices (from a `Literal`), help text and default, and `from_args(Config, namespace)` builds the
  config back from the parsed options;
- the environment: each option is also `MNISTOPS_FIELD_NAME` (`env_name`; a config may put a section
  in between, the batch job's are `MNISTOPS_INFER_...`), read through common.settings.env when the
  parser is built and parsed by the option's own parser, so a bad value is the same one-line usage
  error (exit 2), naming the variable. Precedence: command line > environment > default;
- Prefect's parameter form and its validation: pydantic reads `description`, `ge`, `gt`, `le` from a
  dataclass field's metadata, so a flow parameter typed `Config` is shown with descriptions and
  checked (a `Literal` as a choice) before the flow runs; `FORM` (the config's `__pydantic_config__`)
  leaves internal fields out of the form and shows `X | None` as an X input;
- the check at construction: `check(self)` in `__post_init__` refuses a value out of range or not
  among a `Literal`'s choices, whoever builds the config (a test, a worker, a deployment).

Why our own layer and not a library (pydantic-settings 2.16 and tyro, tried 2026-12-03): the
command line is flat (`mnistops run --lr 1e-3 --hidden 128,64 --nproc 2`) over several configs, one
per concern, that the flows take as separate typed parameters. pydantic-settings' CliSettingsSource
renders a nested model as `--train.lr` (no option flattens it; flat options would mean one settings
class per command that merges every config's fields, losing the per-concern types the flows, the
checkpoints and the workers use); a bad value is a pydantic ValidationError of four lines raised after
parsing, exit 1, not argparse's one-line usage error with exit 2; `--help` shows metavars such as
`tuple[int,...]`; and importing it costs ~0.24 s (pydantic) on every `--help` and typo, before
anything is checked. Its configs must also be pydantic models, where ours are dataclasses that the
workers pickle and checkpoints store with `asdict`. tyro flattens dataclasses well but is not
installed here and brings its own help renderer. What a library would replace is this ~250-line module;
the environment, the forms and the checks come from the same declarations at no extra cost.

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

from common import settings

META = "mnistops"  # our key in a field's metadata; pydantic reads only its own keys (description, ge, ...)


@dataclass(frozen=True)
class Cli:
    """How a setting appears on the command line."""

    flag: str | None = None  # default: --field-name; a bool that defaults to True: --no-field-name
    parse: Callable[[str], Any] | None = None  # argparse type, for values that are not a plain type
    text: Callable[[Any], str] | None = None  # how the default is written in --help (parse reads it back)
    metavar: str | None = None
    option: bool = True  # False: set by the program, never a command-line option
    internal: bool = False  # derived by the program: neither an option nor a field of Prefect's form


def setting(default: Any = MISSING, description: str = "", *, default_factory: Any = MISSING,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            flag: str | None = None, parse: Callable[[str], Any] | None = None,
            text: Callable[[Any], str] | None = None, metavar: str | None = None,
            option: bool = True, internal: bool = False) -> Any:
    """A dataclass field that knows its faces. `option=False`: not on the command line (nor in the
    environment), still in Prefect's form. `internal=True`: set by the program (derived from the data,
    or by the pipeline): in neither."""
    metadata: dict[str, Any] = {"description": description}
    metadata.update({k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None})
    metadata[META] = Cli(flag, parse, text, metavar, option and not internal, internal)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Prefect's form


def in_form(f: dataclasses.Field) -> bool:
    """Whether a field is a field of Prefect's form (every one but the internal ones)."""
    return not _cli(f).internal


def _form_schema(schema: dict[str, Any], cls: type) -> None:
    """A config's JSON schema as Prefect's form shows it: internal fields left out (a user must not
    set a derived value such as the model's pixel mean), and `X | None` shown as an X input (the
    form renders `anyOf [X, null]` as a fixed "Property is type None"); left empty, the field keeps
    its default None, which the Python signature still accepts."""
    props = schema.get("properties", {})
    for f in dataclasses.fields(cls):
        if not in_form(f):
            props.pop(f.name, None)
            if f.name in schema.get("required", ()):
                schema["required"].remove(f.name)
    for prop in props.values():
        branches = [b for b in prop.get("anyOf", ()) if b != {"type": "null"}]
        if len(branches) == 1 and len(prop["anyOf"]) == 2:
            del prop["anyOf"]
            prop.update(branches[0])


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def form_values(cfg: Any) -> dict[str, Any]:
    """A config as a deployment's parameters hold it (JSON): the form's fields only (no internal
    ones), None left out (it is the default, and the form's X input would refuse an explicit null)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if in_form(f) and getattr(cfg, f.name) is not None}


# A config's `__pydantic_config__` (what pydantic.with_config sets; a plain dict so that the command
# line need not import pydantic): Prefect builds the flow's parameter schema through pydantic.
FORM: dict[str, Any] = {"json_schema_extra": _form_schema}


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
    of None (the help says what happens then), or a help that already names its default; and the
    environment variable that sets it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.nargs == 0 or action.default is None or "default:" in text or "%(default)" in text
        if not quiet:
            text += " (default: %(default)s)"
        if (var := getattr(action, "env", None)) and var not in text:
            text += f" [env {var}]"
        return text


# ---------------------------------------------------------------------------------------------
# The environment face: MNISTOPS_<SECTION><FIELD_NAME>, parsed like the option


PREFIX = "MNISTOPS_"


def env_name(cls: type, name: str) -> str:
    """The environment variable of a config's option: `lr` of TrainConfig -> MNISTOPS_LR; a config
    whose options would clash with another's names a section (`ENV_SECTION = "INFER_"`)."""
    return PREFIX + getattr(cls, "ENV_SECTION", "") + name.upper()


class FromEnv(str):
    """An option's default taken from the environment: argparse parses a string default with the
    option's type after the command line, only when the option was not given (so the command line
    wins), and a bad value becomes a usage error; `var` lets that error name the variable."""

    var: str

    def __new__(cls, text: str, var: str):
        obj = super().__new__(cls, text)
        obj.var = var
        return obj


def _naming_env(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, whose error names the environment variable when the text came from there."""

    def typed(text: str):
        try:
            return parse(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            if isinstance(text, FromEnv):
                raise argparse.ArgumentTypeError(f"{text.var}: {e}") from None
            raise

    typed.__name__ = getattr(parse, "__name__", "value")
    return typed


def _choice(allowed: tuple) -> Callable[[str], Any]:
    def choice(text: str):
        # argparse checks `choices` for command-line values (its "invalid choice"), never a default
        if isinstance(text, FromEnv) and text not in allowed:
            raise argparse.ArgumentTypeError(f"{str(text)!r}: expected one of {', '.join(map(str, allowed))}")
        return str(text)

    return choice


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"{str(text)!r}: expected 1/true/yes/on or 0/false/no/off")
    return value in ("1", "true", "yes", "on")


class Switch(argparse.Action):
    """A flag without a value (like store_true/store_false) that also takes a typed default, so
    that a boolean from the environment is parsed and checked like every other option."""

    def __init__(self, option_strings, dest, const: bool, default=None, type=None, help=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, const=const, default=default, type=type, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const)


# ---------------------------------------------------------------------------------------------
# Options


def _cli(f: dataclasses.Field) -> Cli:
    return f.metadata.get(META, Cli(option=False))


def options(cls: type, only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line options, in declaration order."""
    only, exclude = (set(only) if only is not None else None), set(exclude)
    return [f for f in dataclasses.fields(cls) if _cli(f).option and f.name not in exclude
            and (only is None or f.name in only)]


def _parser(cls: type, f: dataclasses.Field) -> dict[str, Any]:
    """argparse's type= (and choices=) for a field's values."""
    cli, hint = _cli(f), _hints(cls)[f.name]
    inner, _ = _unwrap(hint)
    if inner is bool:
        return {"type": boolean}
    if (allowed := choices(hint)) is not None:
        return {"choices": list(allowed), "type": _choice(allowed)}
    if cli.parse is not None:
        return {"type": cli.parse}
    if inner in (int, float):
        return {"type": number(inner, f.metadata)}
    if inner in (str, Path):
        return {"type": inner}
    raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {hint} (give it parse=)")


def _argument(cls: type, f: dataclasses.Field, default: Any) -> tuple[str, dict[str, Any]]:
    cli = _cli(f)
    flag = cli.flag or "--" + f.name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": f.metadata.get("description", ""), "default": default, **_parser(cls, f)}
    kwargs["type"] = _naming_env(kwargs["type"])
    if _unwrap(_hints(cls)[f.name])[0] is bool:
        kwargs.update(action=Switch, const=default is not True)
        if default is True and cli.flag is None:
            flag, kwargs["help"] = "--no-" + f.name.replace("_", "-"), "do not " + kwargs["help"]
        return flag, kwargs
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
    """One option per command-line field of `cls` (see `options`), its default taken from its
    environment variable when that is set. `defaults` and `helps` replace a field's default or help
    for this command; `nargs="+"` takes several values (a sweep's axes, not read from the
    environment), stored under `dest_prefix + name`."""
    defaults, helps = defaults or {}, helps or {}
    for f in options(cls, only, exclude):
        flag, kwargs = _argument(cls, f, defaults.get(f.name, field_default(f)))
        kwargs["dest"] = dest_prefix + f.name
        var = None if nargs is not None or dest_prefix else env_name(cls, f.name)
        if var is not None and (raw := settings.env(var)):  # set and not empty (`export X=` unsets)
            kwargs["default"] = FromEnv(raw, var)
        if dest_prefix and kwargs.get("action") is not Switch:
            kwargs.setdefault("metavar", f.name.upper())
        if f.name in helps:
            kwargs["help"] = helps[f.name]
        if nargs is not None and kwargs.get("action") is not Switch:
            kwargs["nargs"] = nargs
        parser.add_argument(flag, **kwargs).env = var


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """`cls` from the parsed options (those the command has), `overrides` on top."""
    values = {f.name: getattr(args, f.name) for f in options(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})
