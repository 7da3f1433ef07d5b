"""Command lines from typed dataclasses, through jsonargparse (the parser Lightning's own CLI uses).

A dataclass field made with `arg(default, help)` is one flag: its annotation is the type (`Literal[...]` for choices,
jsonargparse's bounded numbers such as `PositiveInt` for bounds), booleans work bare (`--compile`) and with a value
(`--compile false`), and `--config FILE.yaml` reads the same names (the command line wins). Every bad value is one
`InputError` naming the flag, and the YAML file where the value came from one. Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import Field, field, fields
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from lit_gpt.errors import InputError

# A settings file is a few dozen flags: anything far larger (a YAML alias "bomb" expands 1 KB into millions of values)
# is refused before it is expanded.
CONFIG_MAX_BYTES = 1 << 20
CONFIG_MAX_VALUES = 10_000
MESSAGE_VALUE_CHARS = 200  # a value quoted in an error is cut to this


def arg(default: Any, help: str) -> Any:
    """A flag's field: its default and its --help text (type, choices and bounds are the field's annotation)."""
    return field(default=default, metadata={"help": help})


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """For the plain argparse scripts: the description as written, and each flag's default after its help (where it
    has one worth saying: not None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def make_parser(settings: type, description: str, extra_fields: dict[str, tuple[Any, Field]] | None = None,
                extra_title: str = ""):
    """A jsonargparse parser: `--config`, `--print_config` and a flag per field of the dataclass `settings`;
    `extra_fields` (name: (type, field)) are optional flags of their own group whose default is None (e.g. model config
    overrides)."""
    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """The description as written; jsonargparse's type and default after each flag's help."""

    parser = ArgumentParser(description=description, formatter_class=HelpFormatter, exit_on_error=False,
                            print_config=None, usage="%(prog)s [--config YAML] [--print_config] [--NAME VALUE ...]")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of settings; the command line wins")
    parser.add_argument("--print_config", action="store_true", help="print the settings that differ from the "
                        "defaults as YAML for --config, and exit")
    types = get_type_hints(settings)
    for f in fields(settings):
        kind = types[f.name]
        options = dict(nargs="?", const=True) if kind is bool else {}
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"],
                            metavar=_metavar(kind), **options)
    if extra_fields:
        group = parser.add_argument_group(extra_title)
        for name, (kind, f) in extra_fields.items():
            group.add_argument(f"--{name}", type=kind, default=None, help=f.metadata["help"], metavar=_metavar(kind))
    return parser


def parse(parser, settings: type, argv: list[str] | None,
          extra_names: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any], bool]:
    """(settings, the extra flags that were given, --print_config): defaults < YAML file(s) < command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    for config in _config_args(argv):
        check_config_size(config)
    try:
        namespace = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise InputError(_one_line(e, argv)) from None
    # jsonargparse's bounded types are int/float subclasses: plain values pickle into checkpoints and dump as YAML.
    values = {key: _plain(value) for key, value in namespace.as_dict().items()}
    for f in fields(settings):  # a YAML null passes jsonargparse's check of a plain str (or number) field
        if values[f.name] is None and f.default is not None:
            raise InputError(f"--{f.name} must be a {type(f.default).__name__}, got null")
    chosen = settings(**{f.name: values[f.name] for f in fields(settings)})
    extras = {name: values[name] for name in extra_names if values[name] is not None}
    return chosen, extras, values["print_config"]


def changed_settings_yaml(chosen: Any, extras: dict[str, Any]) -> str:
    """YAML for --config of the settings that differ from their defaults, and the extras given."""
    defaults = type(chosen)()
    values = {f.name: getattr(chosen, f.name) for f in fields(chosen)
              if getattr(chosen, f.name) != getattr(defaults, f.name)}
    values.update(extras)
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True) if values else ""


@contextmanager
def naming_flag(flag: str) -> Iterator[None]:
    """An InputError raised inside (it names the file) also names the flag that pointed there; any other error is a
    bug and propagates as it is."""
    try:
        yield
    except InputError as e:
        raise InputError(f"--{flag}: {e}") from None


def check_config_size(config: str) -> None:
    """Refuse a --config file (or inline YAML) too large to be settings before anything expands it: its bytes, and its
    values counted with every alias expanded (counted on the composed graph, where an alias is one shared node)."""
    path = Path(config)
    try:
        is_file = path.is_file()
    except OSError:  # e.g. inline YAML longer than a file name may be
        is_file = False
    try:
        if is_file and path.stat().st_size > CONFIG_MAX_BYTES:
            raise InputError(f"--config {config}: {path.stat().st_size:,} bytes; a settings file is at most "
                             f"{CONFIG_MAX_BYTES:,}")
        text = path.read_bytes()[:CONFIG_MAX_BYTES + 1] if is_file else config.encode()
    except OSError as e:  # jsonargparse reports an unreadable file in its own words
        if e.errno is None:
            raise
        return
    if len(text) > CONFIG_MAX_BYTES:
        raise InputError(f"--config: more than {CONFIG_MAX_BYTES:,} bytes of settings")
    name = config if is_file else "(inline YAML)"
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # not YAML: jsonargparse's error names the line
    except RecursionError:
        raise InputError(f"--config {name}: nested too deeply for settings") from None
    expanded: dict[int, int] = {}

    def count(node) -> int:  # values below `node` with aliases expanded; each shared node is counted once
        if id(node) not in expanded:
            expanded[id(node)] = 0  # a recursive alias counts as one value
            children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
                node.value if isinstance(node, yaml.SequenceNode) else []
            expanded[id(node)] = 1 + sum(count(child) for child in children)
        return expanded[id(node)]

    if root is not None and count(root) > CONFIG_MAX_VALUES:
        raise InputError(f"--config {name}: expands to more than "
                         f"{CONFIG_MAX_VALUES:,} values (YAML aliases?); settings are a few flags")


def _config_args(argv: list[str]) -> list[str]:
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    return configs + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def _metavar(kind: Any) -> str | None:
    if getattr(kind, "__origin__", None) is Literal:
        return None  # argparse shows the choices
    base = next((t for t in (bool, int, float, str) if isinstance(kind, type) and issubclass(kind, t)), None)
    return {bool: "[BOOL]", None: None}.get(base, base.__name__.upper() if base else None)


def _one_line(error: argparse.ArgumentError, argv: list[str]) -> str:
    """jsonargparse's message as one line naming the flag (and the YAML file when the value came from one), its type
    and bound failures said as what the value must be."""
    text = " ".join(str(error).split())
    text = re.sub(rf"((?:Given|Got) value: )(.{{{MESSAGE_VALUE_CHARS}}}).+?((?: Given value type.*)?)$",
                  r"\1\2...\3", text)  # a long value is quoted by its start
    message = text
    if match := re.match(r'Parser key "(\w+)": (.*)', text):
        key, detail = match.groups()
        bounds = [" and ".join(f"{op} {bound}" for op, bound in re.findall(r"v([<>]=?)([-+\w.]+)", restriction))
                  for restriction in re.findall(r"restriction (v[<>]=?[-+\w.]+(?: and v[<>]=?[-+\w.]+)*)", detail)]
        words = dict.fromkeys(word for choices in re.findall(r"Literal\[([^\]]*)\]", detail)
                              for word in choices.split(", "))
        value = re.search(r"(?:Given value|Got value): (.*?)(?: Given value type.*)?$", detail) or \
            re.search(r": (\S+) does not conform", detail)
        allowed = ([f"one of {', '.join(words)}"] if words else []) + bounds
        if allowed and value:
            message = f"--{key} must be {' or '.join(allowed)}, got {value.group(1)}"
        else:
            message = f"--{key}: {detail}"
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    configs = _config_args(argv)
    key = match.group(1) if match else None
    if configs and (key is None or f"--{key}" not in given) and not text.startswith("unrecognized arguments"):
        message = f"--config {', '.join(configs)}: {message.removeprefix('--')}"  # the file's key, not the flag
    return message


def _plain(value: Any) -> Any:
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value
