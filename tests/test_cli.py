"""The one entry point, generated from the stages' config dataclasses: every command is there, every
option has help text that states its default at most once, flags mean one thing across commands,
and user errors are one line."""

import argparse
import dataclasses
import re
from dataclasses import dataclass, field

import pytest

from interp.cli import build_parser
from interp.infra.cli_config import (Command, add_commands, choices, config_from_args, field_docs, hidden,
                                     positional, run_command)


def _subparsers(parser, prefix=""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _subparsers(sub, f"{prefix}{name} ")


def _options():
    """(command, option flags, action) of every option of every command: the one walk over the help."""
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                yield name, action.option_strings, action


STAGES = ("cache", "train", "eval", "recovery", "features", "explain", "score", "steer", "sweep", "steer-targets",
          "attribute", "app", "demo", "benchmark", "world", "layers", "organism train", "organism eval", "bench cache",
          "bench train")


def test_every_command_is_there_and_every_option_has_help_with_its_default_once():
    names = {name for name, _ in _subparsers(build_parser())}
    assert set(STAGES) <= names, set(STAGES) - names
    for name, flags, action in _options():
        assert action.help, f"interp {name} {flags[0]} has no help text"
        assert action.help.count("default") <= 1, f"interp {name} {flags[0]}: {action.help!r}"


ONE_MEANING = {  # flag -> what its help says in every command that has it
    "--features": r"feature indices", "--k": r"active features per row", "--steps": r"training steps",
    "--device": r"auto", "--batch-size": r"per (forward pass|training step|step)|rows per|together",
    "--samples": r"samples?\b", "--seed": r"seed",
}


def test_one_meaning_per_flag_and_device_auto_everywhere():
    seen = {}
    for name, flags, action in _options():
        for flag in flags:
            seen.setdefault(flag, []).append((name, action))
    for flag, want in ONE_MEANING.items():
        for name, action in seen.get(flag, []):
            assert re.search(want, action.help.lower()), f"interp {name} {flag}: {action.help!r}"
    for name, action in seen["--device"]:
        if name != "serve-explainer":  # registers itself until it moves onto a config dataclass
            assert action.default == "auto", f"interp {name} --device defaults to {action.default!r}"
    spellings = {f for f in seen if re.search(r"batch|warm|n-|sample", f)}
    assert not spellings & {"--batch", "--warmup", "-n", "--n", "--n-eval", "--n-select", "--vqa-n", "--n-top"}, spellings


def test_every_stage_addresses_its_run_directory_as_the_first_positional_argument():
    for name, sub in _subparsers(build_parser()):
        if name in ("cache", "train", "eval", "recovery", "features", "explain", "score", "steer", "sweep",
                    "steer-targets", "attribute", "app", "demo", "benchmark"):
            positionals = [a for a in sub._actions if not a.option_strings and a.dest != "help"]
            assert [a.metavar for a in positionals] == ["RUN"], (name, [a.metavar for a in positionals])


def test_user_errors_are_one_line(cli):
    r = cli("layers", "shapes-nonexistent")
    assert r.code == 2 and r.err.strip().count("\n") == 0 and "shapes-subject, shapes-explainer" in r.err
    r = cli("train", "/nowhere", "--arch", "magic")
    assert r.code == 2 and r.err.strip().count("\n") == 0
    assert "argument --arch: invalid choice: 'magic' (choose from 'topk', 'batchtopk', 'matryoshka', 'jumprelu', 'relu')" in r.err


# ---------------------------------------------------------------- the generator itself


@dataclass
class _Inner:
    depth: int = 3
    """how deep"""


@dataclass
class _Example:
    """An example command."""

    run: str | None = field(default=None, metadata=positional())
    """run directory"""
    batch_size: int = 16
    """samples per forward pass"""
    roles: tuple[str, ...] = ("a", "b")
    """roles to keep"""
    arch: str = field(default="x", metadata=choices(lambda: ["x", "y"]))
    """the kind"""
    limit: float | None = None
    """a cap (none: no cap)"""
    progress: bool = True
    """progress bar"""
    strict: bool = False
    """stop at the first error"""
    inner: _Inner = field(default_factory=_Inner)
    secret: dict = field(default_factory=dict, metadata=hidden())
    """library only"""


def _parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_commands(sub, [Command("example", _Example, lambda cfg: cfg, "an example")], {})
    ns = parser.parse_args(["example", *argv])
    return config_from_args(_Example, ns), ns


def test_the_generator_maps_fields_to_options():
    assert field_docs(_Example)["batch_size"] == "samples per forward pass"
    cfg, ns = _parse(["runs/x", "--batch-size", "4", "--roles", "c, d", "--arch", "y", "--limit", "2.5", "--no-progress",
                      "--strict", "--depth", "7"])
    assert cfg == _Example(run="runs/x", batch_size=4, roles=("c", "d"), arch="y", limit=2.5, progress=False,
                           strict=True, inner=_Inner(7))
    assert run_command(ns._command, ns) == 0
    default, _ = _parse(["runs/y"])
    assert dataclasses.asdict(default) == dataclasses.asdict(_Example(run="runs/y"))
    with pytest.raises(SystemExit):
        _parse([])  # the run directory is required
    with pytest.raises(SystemExit):
        _parse(["runs/x", "--arch", "z"])
    with pytest.raises(SystemExit):
        _parse(["runs/x", "--secret", "1"])


def test_a_field_without_a_docstring_is_refused():
    @dataclass
    class Bad:
        undocumented: int = 1

    parser = argparse.ArgumentParser()
    with pytest.raises(TypeError, match="Bad.undocumented has no docstring"):
        add_commands(parser.add_subparsers(), [Command("bad", Bad, lambda c: c, "bad")], {})
