"""The one entry point: every subcommand registers, and every option has a default and help text."""

import argparse

from interp.cli import build_parser, main


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_option_has_help():
    names = []
    for name, sub in _subparsers(build_parser()):
        names.append(name)
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"interp {name} {action.option_strings[0]} has no help text"
    for stage in ("cache", "train", "eval", "features", "recovery", "organism train", "organism eval", "bench cache",
                  "bench train", "layers", "world", "demo"):
        assert stage in names, stage


def test_user_errors_are_one_line(capsys):
    assert main(["layers", "shapes-nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "shapes-subject, shapes-explainer" in err
