"""Command lines generated from dataclasses: a field declared with `flag` becomes one `--kebab-case` option.

Generic: nothing here knows lenet-dist's commands (config.py declares them).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import field
from typing import Any

import lenet_dist
from lenet_dist.errors import UsageError


class _Unset:
    """The default of a flag whose value another one decides (lenet-dist's --recipe): the config's __post_init__
    replaces it, so a made config holds no UNSET and its fields keep their plain types."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def flag(
    default: Any, doc: str, *, short: str | None = None, choices: tuple[str, ...] | None = None,
    bare: Any = None, positional: bool = False, metavar: str | None = None, required: bool = False,
    trajectory: bool | None = None,
) -> Any:
    """A dataclass field that also carries what argparse needs to expose it.

    `bare` is the value the flag takes when given without an argument (`--resume` → "latest").
    A list default makes a positional argument taking one or more values. A `required` flag has no
    default on the command line (the field's default serves in-process use, where __post_init__ checks it).
    `trajectory`: whether the flag decides what a run computes (True), so that a resume must keep it, or only how
    or where (False); None leaves it unclassified, which a training flag must not be (tests/test_structure.py).
    """
    metadata = {"help": doc, "short": short, "choices": choices, "bare": bare, "positional": positional,
                "metavar": metavar, "required": required, "trajectory": trajectory}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def option(name: str) -> str:
    """The command-line spelling of a config field: `batch_size` → `--batch-size`."""
    return "--" + name.replace("_", "-")


def require_at_least(config: Any, minimums: dict[str, int]) -> None:
    """Refuse, in one line, the first flag below its minimum (None means "use the default" and passes)."""
    for name, least in minimums.items():
        value = getattr(config, name)
        if value is not None and value < least:
            raise UsageError(f"{option(name)} must be at least {least}, got {value}")


def split_list(text: str | None) -> list[str]:
    """`"a, b,c"` → ["a", "b", "c"]: how list-valued flags are spelled."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def require_choices(name: str, text: str | None, allowed: typing.Collection[str]) -> None:
    unknown = [value for value in split_list(text) if value not in allowed]
    if unknown:
        raise UsageError(f"{option(name)}: unknown {', '.join(unknown)}; choose from {', '.join(sorted(allowed))}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line, exit status 2, with the flag probably meant. No prefix
    matching (`--epoch 1` is an error), so a flag added later cannot change what an old command line means."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.given = list(sys.argv[1:] if args is None else args)  # for error(): the flags typed
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> typing.NoReturn:
        known = {name for action in self._actions for name in action.option_strings}
        typed = [word.partition("=")[0] for word in getattr(self, "given", []) if word.startswith("--")]
        if "arguments are required" in message and any(word not in known for word in typed):
            # a misspelt required flag (--modle) is missing too: name the misspelling, with the flag meant
            message = "unrecognized arguments: " + " ".join(word for word in typed if word not in known)
        self.exit(2, f"error: {message}{self.suggestion(message)} (see {self.prog} --help)\n")

    def suggestion(self, message: str) -> str:
        """`; did you mean --epochs?` for an unrecognized `--epoch`."""
        unknown = re.findall(r"(--?[\w-]+)", message.partition("unrecognized arguments:")[2])
        known = [name for action in self._actions for name in action.option_strings]
        close = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.6) if unknown else []
        return f"; did you mean {close[0]}?" if close else ""


def version_text() -> str:
    return f"lenet-dist {lenet_dist.__version__}"


def _scalar_type(annotation: Any) -> type:
    """`int | None` → int; argparse needs the concrete converter."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (inner,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return inner
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One `--kebab-case` option per dataclass field, with its default shown in --help."""
    hints = typing.get_type_hints(config_class)
    for config_field in dataclasses.fields(config_class):
        meta = config_field.metadata
        names = ([meta["short"]] if meta["short"] else []) + [option(config_field.name)]
        metavar = meta["metavar"] or config_field.name.upper()
        if typing.get_origin(hints[config_field.name]) is list:
            parser.add_argument(config_field.name, nargs="*", metavar=metavar, help=meta["help"].replace("%", "%%"))
            continue
        kind = _scalar_type(hints[config_field.name])
        # the default in the help, unless the help text already states it
        shown = "" if "(default" in meta["help"] or meta["required"] or config_field.default == "" else \
            f" (default: {_shown_default(config_field.default, kind)})"
        text = (meta["help"] + shown).replace("%", "%%")  # argparse's %
        if meta["positional"]:
            parser.add_argument(config_field.name, type=kind, metavar=metavar, help=text)
        elif kind is bool:
            parser.add_argument(
                *names, action=argparse.BooleanOptionalAction, default=config_field.default, help=text
            )
        else:
            optional_value = {"nargs": "?", "const": meta["bare"]} if meta["bare"] is not None else {}
            parser.add_argument(
                *names,
                type=kind,
                default=config_field.default,
                choices=meta["choices"],
                help=text,
                required=meta["required"],
                metavar=meta["metavar"],
                **optional_value,
            )


def _shown_default(default: Any, kind: type) -> str:
    if kind is bool:
        return "on" if default else "off"
    return "none" if default is None else str(default)


def config_from_args(config_class: type, args: argparse.Namespace) -> Any:
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def parse_config(config_class: type, argv: list[str] | None, prog: str | None, description: str) -> Any:
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=version_text())
    add_config_arguments(parser, config_class)
    return config_from_args(config_class, parser.parse_args(argv))


