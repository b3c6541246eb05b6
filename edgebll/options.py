"""One source for every training option: a config dataclass's fields make the CLI options, read them back,
and write them out again for the MPI ranks.

A field declared with :func:`option` carries its help (and choices, metavar, parser) as metadata;
:func:`add_options` turns each into ``--field-name``, :func:`from_args` builds the dataclass from
the parsed namespace, and :func:`to_argv` writes a config back as those options, which is how
``edgebll train --transport mpi`` tells every rank what to do. Adding a field adds all three.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import Field, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, *, metavar: str | None = None, choices: Sequence[str] | None = None,
           parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field that is also a command-line option (``help`` says what it does; the default is added).

    ``parse`` turns the option's text into the value (default: the type of ``default``; give it when the
    default is None or a tuple); a ``bool`` field is a flag that turns it on.
    """
    return field(default=default, metadata={"help": help, "metavar": metavar, "choices": choices, "parse": parse})


def flag_of(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def _options(cls: type) -> list[Field]:
    return [f for f in fields(cls) if "help" in f.metadata]


def add_options(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = ()) -> None:
    """``--field-name`` for every :func:`option` field of ``cls`` but ``skip``, with its help and default."""
    for f in _options(cls):
        if f.name in skip:
            continue
        meta, default = f.metadata, f.default
        if isinstance(default, bool):
            parser.add_argument(flag_of(f), action="store_true", help=meta["help"])
            continue
        shown = "none" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else default
        told = "none:" in meta["help"] or "0:" in meta["help"]  # the help says what the default does
        parser.add_argument(flag_of(f), type=meta["parse"] or type(default), default=default, choices=meta["choices"],
                            metavar=meta["metavar"], help=meta["help"] if told else f"{meta['help']} (default: {shown})")


def from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """``cls`` from a namespace that :func:`add_options` filled (fields it lacks keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in _options(cls) if hasattr(args, f.name)}
    return cls(**(values | extra))


def to_argv(config: Any) -> list[str]:
    """``config`` as the options that :func:`from_args` reads back into an equal config."""
    argv: list[str] = []
    for f in _options(type(config)):
        value = getattr(config, f.name)
        if value == f.default:
            continue  # the reader's default
        if isinstance(f.default, bool):
            argv += [flag_of(f)] if value else []
        elif isinstance(value, tuple):
            argv += [flag_of(f), ",".join(map(str, value))] if value else []
        elif value is not None:
            argv += [flag_of(f), repr(value) if isinstance(value, float) else str(value)]
    return argv
