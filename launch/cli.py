"""What every role's command line shares: help that shows defaults, `--config FILE.toml`, and one
clear line (not a traceback) when a port is taken.

A config file holds a role's flags as TOML keys (`heartbeat-interval = 0.5` or
`heartbeat_interval = 0.5`; lists for repeatable flags such as `model`), at the top level or
under a table named after the role (`[master]`, `[worker]`, `[ps]`, `[publish]`, `[admin]`,
`[local]`, `[keys]`), so one file can serve several roles. Flags given on the command line win
over the file. The file is turned into flags and parsed by the same parser,
so every check a flag has applies to the file too; an unknown key is an error that names the
keys the role takes.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ringserve.protocol.sockets import BindError


ROLES = ("master", "worker", "ps", "publish", "admin", "local", "keys", "gateway")  # tables a config file may hold


def number(kind, lo: float, lo_open: bool = False):
    """An argparse type: a finite `kind` >= lo (> lo when lo_open); a clear error at parse time."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not math.isfinite(value) or value < lo or (lo_open and value == lo):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number {'>' if lo_open else '>='} {lo:g}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_float = number(float, 0, lo_open=True)
positive_int = number(int, 1)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (when it has one worth saying), once."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = "" if action.help == _NO_HELP else action.help or ""
        if "%(default)" in text or "(default" in text or not _default_worth_showing(action):
            return text
        return f"{text} (default: %(default)s)".strip()


_NO_HELP = "\x00"  # stands for an option without help text, so that argparse still prints its default


def _default_worth_showing(action: argparse.Action) -> bool:
    return bool(action.option_strings) and not (action.default is None or action.default is False
                                                or action.default in ([], argparse.SUPPRESS))


def all_actions(parser: argparse.ArgumentParser) -> list[tuple[argparse.ArgumentParser, argparse.Action]]:
    """(parser, action) for every argument of the parser and of each of its subcommands."""
    out = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share one parser
                out += all_actions(sub)
        else:
            out.append((parser, action))
    return out


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """An option without help text still shows its default (argparse prints nothing for help=None)."""
    for _, action in all_actions(parser):
        if action.help is None and _default_worth_showing(action):
            action.help = _NO_HELP


def make_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--config", metavar="FILE.toml",
                   help="read this role's flags from a TOML file (keys are flag names); flags given here win")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` after the flags of `--config FILE` (if given); command-line flags win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _show_defaults(parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        flags = config_flags(parser, load_config(parser, known.config), argv)
        top = {o for a in parser._actions for o in a.option_strings}
        first = [f for f in flags if f.split("=", 1)[0] in top]  # must come before a subcommand
        argv = first + argv + [f for f in flags if f not in first]
    return parser.parse_args(argv)


def load_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        parser.error(f"--config {path}: {exc.strerror or exc}")
    except tomllib.TOMLDecodeError as exc:
        parser.error(f"--config {path}: not valid TOML: {exc}")
    raise AssertionError("unreachable")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name without dashes -> action, over the parser and its subcommands."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse keeps no public list of its actions
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out.update({k: v for k, v in _options(sub).items() if k not in out})
        for opt in action.option_strings:
            if opt.startswith("--") and opt not in ("--help", "--config"):
                out[opt[2:]] = action
    return out


def _chosen_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, argparse.Action] | None:
    """For a parser with subcommands: the options of the top level and of the subcommand in `argv`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = next((a for a in argv if a in action.choices), None)
            top = {o[2:]: a for a in parser._actions for o in a.option_strings
                   if o.startswith("--") and o not in ("--help", "--config")}
            return {**top, **(_options(action.choices[chosen]) if chosen else {})}
    return None


def config_flags(parser: argparse.ArgumentParser, config: dict[str, Any], argv: Sequence[str]) -> list[str]:
    """TOML keys -> flags, leaving out those the command line gives itself (it wins)."""
    known = _options(parser)  # over every subcommand: a shared file may hold another's keys
    options = _chosen_options(parser, argv) or known
    given = {a.split("=", 1)[0][2:] for a in argv if a.startswith("--")}
    role = parser.prog.removeprefix("ringserve-")
    settings = {k: v for k, v in config.items() if not (isinstance(v, dict) and k in ROLES)}
    table = config.get(role)  # (`keys = "DIR"` is a setting, not ringserve-keys's table)
    settings.update(table if isinstance(table, dict) else {})  # the role's own table wins over the top level
    flags: list[str] = []
    for key, value in settings.items():
        name = key.replace("_", "-")
        action = options.get(name)
        if action is None and name in known:
            continue  # a setting of another subcommand (ringserve-admin status vs rollback)
        if action is None:
            parser.error(f"--config: unknown key {key!r}; {parser.prog} takes: {', '.join(sorted(known))}")
        if name in given or any(opt[2:] in given for opt in action.option_strings):
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                parser.error(f"--config: {key!r} must be true or false")
            if value == isinstance(action, argparse._StoreTrueAction):
                flags.append(f"--{name}")
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not isinstance(action, argparse._AppendAction):
            parser.error(f"--config: {key!r} takes one value, not a list")
        for v in values:
            if isinstance(v, (dict, list)):
                parser.error(f"--config: {key!r} must be a string or a number")
            flags.append(f"--{name}={str(v).lower() if isinstance(v, bool) else v}")
    return flags


def bind_error_exit(exc: BindError, flags: dict[str, str]) -> None:
    """One clear line for a port that cannot be bound: which endpoint, why, which flag changes it."""
    flag = next((f for f, ep in flags.items() if ep == exc.endpoint), None)
    hint = f"; choose another with {flag}" if flag else ""
    print(f"error: cannot bind {exc.endpoint}: {exc.reason}{hint}", file=sys.stderr)
    sys.exit(2)
