"""Command-line flags and config files generated from frozen dataclasses: help in one place.

A config dataclass declares each field with ``option(default, help, ...)``; ``add_flags`` turns
every field into a flag (``--field-name``) whose type, choices and default come from the field's
annotation and default, and whose help comes from the field's metadata. ``parse_config`` adds
``--config FILE`` (TOML, or JSON by its ``.json`` ending): the file's values replace the defaults
and explicit flags replace the file's. ``convert`` turns one text into a value of an annotation
(``int``, ``float``, ``bool``, an ``Enum`` by its value, ``tuple[X, ...]`` comma-separated, ``X |
None``); the scripts' ``--engine-option KEY=VALUE`` uses it too, so a text means the same value
wherever it is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def option(
  default,
  help: str,
  *,
  group: str = "options",
  metavar: str | None = None,
  choices: Sequence[str] | None = None,
  env: str | None = None,
  off_flag: tuple[str, str] | None = None,
):
  """A dataclass field that is also a flag.

  Args:
    default: the field's default (and the flag's).
    help: the flag's help, the one place it is written.
    group: the help section and the config file's table the field belongs to.
    metavar: the value's name in the help.
    choices: allowed texts of a ``str`` field (an ``Enum`` field's come from the enum).
    env: an environment variable whose value, when set, replaces ``default`` at parse time.
    off_flag: ``(flag, help)`` of a second flag that sets the field to None (``--no-X``).
  """
  meta = {"help": help, "group": group, "metavar": metavar, "choices": choices, "env": env, "off_flag": off_flag}
  if isinstance(default, (list, dict, set)):
    raise TypeError("a mutable default: use a tuple")
  return dataclasses.field(default=default, metadata=meta)


def field_types(cls) -> dict[str, object]:
  """Each field's resolved annotation (the modules use ``from __future__ import annotations``)."""
  return typing.get_type_hints(cls)


def _strip_optional(annotation) -> tuple[object, bool]:
  """``X | None`` -> ``(X, True)``; ``X`` -> ``(X, False)``."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1:
      return args[0], True
  return annotation, False


def _is_tuple(annotation) -> bool:
  return typing.get_origin(annotation) is tuple


def convert(text: str, annotation):
  """``text`` as a value of ``annotation``.

  Raises:
    ValueError: the text is no value of that type (the message names the allowed values).
  """
  base, optional = _strip_optional(annotation)
  if optional and base is not str and text.strip().lower() in ("none", "null", ""):
    return None
  if _is_tuple(base):
    element = typing.get_args(base)[0]
    return tuple(convert(part.strip(), element) for part in text.split(",") if part.strip())
  if isinstance(base, type) and issubclass(base, enum.Enum):
    try:
      return base(text)
    except ValueError:
      raise ValueError(f"unknown value {text!r}; choose one of {', '.join(m.value for m in base)}") from None
  if base is bool:
    lowered = text.strip().lower()
    if lowered not in _TRUE + _FALSE:
      raise ValueError(f"{text!r} is not a boolean (true or false)")
    return lowered in _TRUE
  if base in (int, float, str):
    try:
      return base(text)
    except ValueError:
      raise ValueError(f"{text!r} is not {'an integer' if base is int else 'a number'}") from None
  raise TypeError(f"no text conversion to {annotation!r}")


def _from_file(value, annotation, name: str):
  """A config file's value (TOML or JSON types) as a value of ``annotation``."""
  if isinstance(value, str):
    return convert(value, annotation)
  base, optional = _strip_optional(annotation)
  if _is_tuple(base) and isinstance(value, list):
    element = typing.get_args(base)[0]
    return tuple(_from_file(v, element, name) for v in value)
  if base is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(base, type) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
    return value
  raise ValueError(f"{name}: {value!r} is not a {getattr(base, '__name__', base)}")


def _display(value) -> str:
  if isinstance(value, enum.Enum):
    return value.value
  if isinstance(value, tuple):
    return ",".join(map(_display, value))
  return str(value)


def _converter(annotation, name: str):
  def parse(text: str):
    try:
      return convert(text, annotation)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None

  parse.__name__ = name  # argparse names it in "invalid <name> value"
  return parse


def flag_name(field_name: str) -> str:
  return "--" + field_name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
  """One flag per field of ``cls``, in argument groups named by each field's ``group``.

  A ``bool`` field is a switch: ``--name`` when its default is False, ``--no-name`` when True.
  """
  hints = field_types(cls)
  groups: dict[str, argparse._ArgumentGroup] = {}
  for f in dataclasses.fields(cls):
    meta = f.metadata
    if "help" not in meta:
      continue
    group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
    annotation = hints[f.name]
    base, _ = _strip_optional(annotation)
    default = os.environ.get(meta["env"]) if meta["env"] and os.environ.get(meta["env"]) else f.default
    if base is bool:
      name = flag_name(f.name) if not f.default else "--no-" + f.name.replace("_", "-")
      group.add_argument(
        name, dest=f.name, action="store_false" if f.default else "store_true", default=default, help=meta["help"]
      )
      continue
    kwargs = {"dest": f.name, "default": default, "help": meta["help"], "type": _converter(annotation, f.name)}
    if isinstance(base, type) and issubclass(base, enum.Enum):
      kwargs["metavar"] = meta["metavar"] or "{" + ",".join(m.value for m in base) + "}"
    else:
      kwargs["metavar"] = meta["metavar"]
      if meta["choices"]:
        kwargs["choices"] = meta["choices"]
    group.add_argument(flag_name(f.name), **kwargs)
    if meta["off_flag"]:
      off, off_help = meta["off_flag"]
      group.add_argument(off, dest=f.name, action="store_const", const=None, help=off_help)


def load_config_file(path: str | Path, cls) -> dict:
  """The values of a config file for ``cls``: top-level keys, or keys in the table of each field's
  group (``[scheduler] policy = "s3"``); names with ``-`` or ``_``.

  Raises:
    ValueError: an unknown name, a name in another group's table, or a value of the wrong type.
  """
  path = Path(path)
  text = path.read_text()
  raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
  fields = {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}
  hints = field_types(cls)
  groups = {f.metadata["group"] for f in fields.values()}
  values = {}

  def take(key: str, value, table: str | None):
    name = key.replace("-", "_")
    if name not in fields:
      raise ValueError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(fields))}")
    group = fields[name].metadata["group"]
    if table is not None and table != group:
      raise ValueError(f"{path}: {key!r} belongs in [{group}], not [{table}]")
    values[name] = _from_file(value, hints[name], f"{path}: {key}")

  for key, value in raw.items():
    if isinstance(value, Mapping) and key in groups:
      for inner, inner_value in value.items():
        take(inner, inner_value, key)
    else:
      take(key, value, None)
  return values


def parse_config(parser: argparse.ArgumentParser, cls, argv: Sequence[str] | None) -> argparse.Namespace:
  """``parser``'s namespace with ``cls``'s flags and ``--config FILE``: explicit flags override the
  file's values, which override the defaults."""
  parser.add_argument(
    "--config",
    metavar="FILE",
    type=Path,
    help="a TOML (or .json) file of these settings, by field name, top level or in [group] tables "
    "(e.g. configs/server/example.toml); flags given as well override it",
  )
  early = argparse.ArgumentParser(add_help=False)
  early.add_argument("--config", type=Path)
  known, _ = early.parse_known_args(argv)
  if known.config is not None:
    try:
      parser.set_defaults(**load_config_file(known.config, cls))
    except (OSError, ValueError, tomllib.TOMLDecodeError) as e:
      parser.error(f"--config: {e}")
  return parser.parse_args(argv)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Adds "(default: X)" to a flag's help when it has a value worth showing and the help does not
  already say it (a switch's default is its absence; a None default means "not set")."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    shown = action.default not in (None, False, True, (), argparse.SUPPRESS) and action.nargs != 0
    if shown and "default" not in text and action.option_strings:
      text += f" (default: {_display(action.default).replace('%', '%%')})"
    return text
