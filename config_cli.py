"""Command-line options generated from config dataclasses, so each default and its help live once.

A config's field is on the command line when its ``metadata`` (or the ``flags`` given here for
it) has a ``help``; every other field keeps its default. The field gives the rest:

- the flag: ``--field-name``, or ``metadata["flag"]``;
- the default: the field's own (``default`` or ``default_factory``); a field without one is a
  required option, unless ``metadata["required"]`` is False (then it defaults to None);
  ``metadata["required"]`` True makes a field that has a default required all the same;
- the type: int, float or str from the annotation (the first of a union that is not None;
  ``metadata["type"]`` overrides it); a bool is a ``--x``/``--no-x`` pair; a list is repeatable
  (``action="append"``), takes ``metadata["nargs"]`` values, or, with ``metadata["sep"]``, one
  value split at that separator;
- ``choices`` and ``metavar`` from the metadata.

Help texts name no default: "(default: %(default)s)" is appended (a list's items, "on" for True)
unless the default is empty (None, False, "" or []) or the text already says what it means (it
mentions "default"), so the value printed is the field's.

``add_config_arguments(..., override=True)`` is for settings that override a config file: every
option then defaults to None (not given), and ``config_overrides`` collects the given ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class _Switch(argparse.Action):
    """A bool field: ``--x`` sets it, ``--no-x`` clears it."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _split(sep: str, kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(v.strip()) for v in text.split(sep) if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"takes {kind.__name__} values separated by {sep!r}, got {text!r}"
            ) from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _types(annotation: Any) -> tuple[Any, ...]:
    """The types a field's annotation allows, None excluded: ``int | None`` -> (int,)."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return tuple(t for t in options if t is not type(None))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _help(text: str, default: Any, override: bool) -> str:
    if override:
        shown = str(default).replace("%", "%%")
        return f"{text} (default: the config file's, else {shown})"
    empty = default is None or default is False or (isinstance(default, (str, list)) and not default)
    if empty or "%(default)" in text or "default" in text.lower():
        return text
    if default is True:
        return f"{text} (default: on)"
    if isinstance(default, list):
        return f"{text} (default: {' '.join(map(str, default))})".replace("%", "%%")
    return f"{text} (default: %(default)s)"


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_cls: type,
    *,
    skip: Iterable[str] = (),
    flags: Mapping[str, Mapping[str, Any]] | None = None,
    override: bool = False,
) -> list[str]:
    """Adds an option for every field of ``config_cls`` that has a help (see the module's
    docstring), except those in ``skip``; ``flags`` adds to or replaces a field's metadata.
    Returns the names of the fields added (each option's ``dest`` is its field's name)."""
    hints = typing.get_type_hints(config_cls)
    added = []
    for f in dataclasses.fields(config_cls):
        meta = {**f.metadata, **(flags or {}).get(f.name, {})}
        if f.name in skip or "help" not in meta:
            continue
        default = _default(f)
        kinds = _types(hints[f.name])
        listed = next((t for t in kinds if typing.get_origin(t) is list or t is list), None)
        kwargs: dict[str, Any] = {"dest": f.name}
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if "flag" in meta:  # the placeholder is named after the flag, as for a hand-written option
            kwargs["metavar"] = flag[2:].upper().replace("-", "_")
        for key in ("choices", "metavar"):
            if key in meta:
                kwargs[key] = meta[key]
        names = [flag]
        if listed is not None:
            item = meta.get("type") or next(iter(typing.get_args(listed)), str)
            if "sep" in meta:
                kwargs["type"] = _split(meta["sep"], item)
            else:
                kwargs["type"] = item
                if "nargs" in meta:
                    kwargs["nargs"] = meta["nargs"]
                else:
                    kwargs["action"] = "append"
        elif kinds and kinds[0] is bool and "type" not in meta:
            kwargs["action"] = _Switch
            names.append("--no-" + flag[2:])
        else:
            kwargs["type"] = meta.get("type") or (kinds[0] if kinds and kinds[0] in (int, float, str) else str)
        if default is dataclasses.MISSING:
            kwargs["required"] = meta.get("required", True)
            default = None
        elif meta.get("required"):
            kwargs["required"] = True
        kwargs["default"] = None if override else default
        kwargs["help"] = meta["help"] if kwargs.get("required") else _help(meta["help"], default, override)
        parser.add_argument(*names, **kwargs)
        added.append(f.name)
    return added


def config_from_args(config_cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """``config_cls`` built from the options of ``args`` named like its fields; ``given`` wins."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if f.init and hasattr(args, f.name)}
    return config_cls(**{**values, **given})


def config_overrides(config_cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``config_cls`` with a help that were given on the command line (added with
    ``override=True``, an option not given is None)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(config_cls)
        if "help" in f.metadata and getattr(args, f.name, None) is not None
    }


class LazyParser(argparse.ArgumentParser):
    """A subcommand's parser whose options are added (by ``populate``) the first time it parses or prints
    help: a command line of many subcommands then imports only the configs of the one it runs."""

    def __init__(self, *args, populate: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._populate = populate

    def populated(self) -> LazyParser:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        return super(LazyParser, self.populated()).parse_known_args(args, namespace)

    def format_help(self) -> str:
        return super(LazyParser, self.populated()).format_help()

    def format_usage(self) -> str:
        return super(LazyParser, self.populated()).format_usage()


def command_description(populate: Callable) -> str:
    """A subcommand's description: its populate function's docstring, one line per paragraph."""
    return "\n".join(" ".join(para.split()) for para in (populate.__doc__ or "").split("\n\n"))
