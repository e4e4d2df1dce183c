"""The command line, generated from the stages' config dataclasses.

Every stage is a function of one config dataclass; its command is generated from that dataclass,
so the library and the CLI cannot drift apart:

- a field `batch_size` is the option `--batch-size` (one spelling rule for every command);
- the field's docstring (a string literal right under it, PEP 257 attribute docstrings) is the
  help text, and the default is appended once, by the generator ("(default: 4096)"); help texts
  never state their defaults themselves;
- `bool` fields are flags: `--name` for a default of False, `--no-name` for a default of True;
- `X | None` takes an X; `tuple[T, ...]` and `list[T]` take comma-separated values;
- `Literal[...]` or `field(metadata=choices(...))` give the valid choices; a callable there is
  asked when the parser is built (the SAE architecture registry);
- `field(metadata=positional())` makes the field a positional argument (the run directory);
- a field whose type is a dataclass is flattened: its fields become options of the same command;
- `field(metadata=hidden())` keeps a field out of the command line (library-only settings);
- `field(metadata=at_least(1))` bounds a number: the parser refuses a smaller value, naming the option,
  and `check_bounds(cfg)` (called by the config's __post_init__) refuses it for library callers too;
- a comma-separated option given an empty value (`--features ''`) is refused: leaving it out is how
  to ask for its default.

Considered: simple_parsing (sparsify's dataclass-as-CLI) does the same from docstrings. This
generator is ~200 lines we control: registry-driven choices, `--no-` flags, the positional run
directory and one naming rule, with no dependency; see docs/formats.md "Command line".
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- field metadata helpers


def positional(required: bool = True, metavar: str | None = None) -> dict:
    """A positional argument; `required` even when the field has a default (None for the library)."""
    return {"cli_positional": True, "cli_required": required, **({"metavar": metavar} if metavar else {})}


def hidden() -> dict:
    return {"cli_hidden": True}


def choices(values: list | tuple | Callable[[], list]) -> dict:
    return {"cli_choices": values}


def short(flag: str) -> dict:
    return {"cli_short": flag}


def at_least(minimum: int | float) -> dict:
    """A lower bound on a number (None, where the field allows it, stays allowed)."""
    return {"cli_min": minimum}


def option_name(name: str) -> str:
    """The option a field is given by on the command line: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def below_minimum(value: Any, minimum: int | float) -> bool:
    return value is not None and not isinstance(value, bool) and isinstance(value, (int, float)) and value < minimum


def check_bounds(cfg: Any) -> None:
    """Raise ValueError naming the option of the first field of `cfg` below its `at_least` bound."""
    for f in dataclasses.fields(cfg):
        bound = f.metadata.get("cli_min")
        value = getattr(cfg, f.name, None)
        if bound is not None and below_minimum(value, bound):
            raise ValueError(f"{option_name(f.name)} must be at least {bound}, got {value}")


# ---------------------------------------------------------------- field docstrings


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} for a dataclass and its bases (the string right under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# ---------------------------------------------------------------- types


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def _scalar(tp: Any) -> Callable[[str], Any]:
    if tp in (int, float, str):
        return tp
    if tp is Path:
        return Path
    if tp is Any:
        return str
    raise TypeError(f"no command-line type for {tp!r}")


def _sequence(tp: Any) -> tuple[type, Callable[[str], Any]] | None:
    """(container, item parser) for tuple[T, ...] / list[T], else None."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is tuple and (len(args) == 2 and args[1] is Ellipsis or len(set(args)) == 1):
        return tuple, _scalar(args[0])
    if origin is list and args:
        return list, _scalar(args[0])
    return None


def comma_list(container: type, item: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def parse(text: str):
        if not text.strip(" ,"):
            raise argparse.ArgumentTypeError(f"{what} was given no values ({text!r}): give at least one, or leave "
                                             f"{what} out for its default")
        out = []
        for part in text.split(","):
            if not part.strip():
                continue
            try:
                out.append(item(part.strip()))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{what}: {part.strip()!r} is not a valid "
                                                 f"{getattr(item, '__name__', 'value')}") from None
        return container(out)

    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')}s"
    return parse


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------- building a parser


@dataclass
class _Leaf:
    path: tuple[str, ...]  # field names from the top config down to this field
    field: dataclasses.Field
    owner: type


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[_Leaf]:
    """The command-line fields of a config dataclass, nested dataclass fields flattened in place."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaves(tp, prefix + (f.name,))
        elif not f.metadata.get("cli_hidden") and f.init:
            out.append(_Leaf(prefix + (f.name,), f, cls))
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per (flattened) field of `cls`; dest is the dotted path of the field."""
    seen: dict[str, tuple[str, ...]] = {}
    for leaf in leaves(cls):
        f, name = leaf.field, leaf.path[-1]
        if name in seen:
            raise TypeError(f"{cls.__name__}: option --{name.replace('_', '-')} comes from two fields "
                            f"({'.'.join(seen[name])} and {'.'.join(leaf.path)})")
        seen[name] = leaf.path
        tp, optional = _unwrap_optional(typing.get_type_hints(leaf.owner)[f.name])
        doc = f.metadata.get("cli_help") or field_docs(leaf.owner).get(f.name)
        if not doc:
            raise TypeError(f"{leaf.owner.__name__}.{f.name} has no docstring: it is the option's help text")
        default = _default(f)
        dest = ".".join(leaf.path)
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"dest": dest}
        picks = f.metadata.get("cli_choices")
        if picks is None and typing.get_origin(tp) is typing.Literal:
            picks = list(typing.get_args(tp))
        if callable(picks):
            picks = list(picks())
        if tp is bool:
            if default is True:
                kw.update(action="store_false", help=f"{doc} (default: on; this flag turns it off)")
                flags = ["--no-" + name.replace("_", "-")]
            else:
                flags = [flag]
                kw.update(action="store_true", help=doc)
            parser.add_argument(*flags, **kw)
            continue
        seq = _sequence(tp)
        if seq is not None:
            kw["type"] = comma_list(seq[0], seq[1], flag)
            kw["metavar"] = name.upper().rstrip("S") + ",..."
        elif picks is None or typing.get_origin(tp) is not typing.Literal:
            kw["type"] = _scalar(tp) if typing.get_origin(tp) is not typing.Literal else str
            if picks is None:
                kw["metavar"] = name.upper()
        if picks is not None:
            kw["choices"] = picks
            if seq is not None:  # choices of a list apply to its items
                inner = kw.pop("choices")
                kw["type"] = _checked_list(kw["type"], inner, flag)
                kw["metavar"] = "{" + ",".join(map(str, inner)) + "},..."
        empty = default in (dataclasses.MISSING, None) or (isinstance(default, (tuple, list)) and not default)
        shown = "" if empty else f" (default: {_shown(default)})"
        kw["help"] = doc + shown
        if "cli_min" in f.metadata and "type" in kw:
            kw["type"] = _bounded(kw["type"], f.metadata["cli_min"])
        if f.metadata.get("cli_positional"):
            kw.pop("dest")
            kw["metavar"] = f.metadata.get("metavar", name.upper())
            if default is not dataclasses.MISSING and not f.metadata.get("cli_required"):
                kw.update(nargs="?", default=default)
            parser.add_argument(dest, **kw)
            continue
        if default is dataclasses.MISSING or (default is None and f.metadata.get("cli_required")):
            kw["required"] = True
        else:
            kw["default"] = default
        flags = [flag] + ([f.metadata["cli_short"]] if "cli_short" in f.metadata else [])
        parser.add_argument(*flags, **kw)


def _bounded(parse: Callable[[str], Any], minimum: int | float) -> Callable[[str], Any]:
    def check(text: str):
        value = parse(text)
        if below_minimum(value, minimum):
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    check.__name__ = getattr(parse, "__name__", "value")
    return check


def _checked_list(parse: Callable[[str], Any], allowed: list, flag: str) -> Callable[[str], Any]:
    def check(text: str):
        values = parse(text)
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{flag}: unknown {', '.join(map(repr, bad))}; "
                                             f"choose from {', '.join(map(str, allowed))}")
        return values

    check.__name__ = parse.__name__
    return check


def config_from_args(cls: type, ns: argparse.Namespace) -> Any:
    """The config instance the parsed arguments describe (nested dataclasses rebuilt)."""
    values = vars(ns)

    def build(klass: type, prefix: tuple[str, ...]):
        hints = typing.get_type_hints(klass)
        kwargs = {}
        for f in dataclasses.fields(klass):
            if not f.init:
                continue
            path = prefix + (f.name,)
            if dataclasses.is_dataclass(hints[f.name]):
                kwargs[f.name] = build(hints[f.name], path)
            elif ".".join(path) in values:
                kwargs[f.name] = values[".".join(path)]
        return klass(**kwargs)

    return build(cls, ())


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """One `interp` command: a stage function of one config dataclass.

    `name` may be "GROUP NAME" (e.g. "organism train"). `report(result, cfg)` prints the result
    for a person and returns the exit code (None: 0)."""

    name: str
    config: type
    run: Callable[[Any], Any]
    help: str
    description: str | None = None
    report: Callable[[Any, Any], int | None] | None = None


def add_commands(sub: argparse._SubParsersAction, commands: list[Command], groups: dict[str, str]) -> None:
    """Add every command to the top-level subparsers; grouped commands under their group's parser."""
    group_subs: dict[str, argparse._SubParsersAction] = {}
    for cmd in commands:
        *group, name = cmd.name.split(" ")
        target = sub
        if group:
            g = group[0]
            if g not in group_subs:
                gp = sub.add_parser(g, help=groups.get(g, g))
                group_subs[g] = gp.add_subparsers(dest=f"{g}_command", metavar="ACTION", required=True)
            target = group_subs[g]
        p = target.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
        add_config_arguments(p, cmd.config)
        p.set_defaults(_command=cmd)


def run_command(cmd: Command, ns: argparse.Namespace) -> int:
    cfg = config_from_args(cmd.config, ns)
    result = cmd.run(cfg)
    code = cmd.report(result, cfg) if cmd.report else None
    return int(code or 0)
