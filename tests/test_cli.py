"""The command line's conventions: help text on every flag, one spelling per kind of argument."""

from __future__ import annotations

import argparse

import pytest

from bd.cli import COMMANDS, build_parser


def _parsers(parser: argparse.ArgumentParser, name: str):
    """The parser of a command and those of its subcommands (bd figures NAME)."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _command_parsers():
    for command in COMMANDS:
        top = build_parser(command)
        sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        yield from _parsers(sub.choices[command], command)


PARSERS = list(_command_parsers())


@pytest.mark.parametrize("name,parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_every_argument_has_help_text(name, parser):
    bare = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not bare, f"bd {name}: arguments without help: {bare}"


def test_one_flag_per_kind_of_argument():
    """A trained run is --run, a slide --slide, stores --feature-index, an output folder --out-dir;
    never the old spellings."""
    flags = {opt for name, p in PARSERS for a in p._actions for opt in a.option_strings}
    assert not flags & {"--checkpoint", "--features-dir", "--out-folder"}
    for name, parser in PARSERS:
        positional = [a.dest for a in parser._actions if not a.option_strings
                      and not isinstance(a, (argparse._SubParsersAction, argparse._HelpAction))]
        assert positional in ([], ["table"], ["figure"]), f"bd {name}: positional {positional}"
