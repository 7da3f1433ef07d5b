"""Hyperparameters declared as plain assignments at the top of a script, each with a one-line comment.

    learning_rate = 4e-4  # peak learning rate, reached after warmup [> 0]
    lr_schedule = "cosine"  # {cosine, wsd}: cosine decay to min_lr, or warmup-stable-decay

The comment is the flag's `--help` text (one place to edit), the default's type is the flag's type, and two markers
in the comment are enforced (so braces and brackets are kept for them): `{a, b}` lists the allowed values, `[> 0]`,
`[>= 1]`, `[0, 1)` or `(0, 1]` bound a number. A string with both (`{auto} ... [>= 1]`) takes one of the words or an
integer in the bounds; one whose comment says "comma-separated" takes any number of the words. Floats must be finite.
Values come from the defaults, then a YAML file, then the command line; every one is checked in `Hyperparameter.check`,
so a bad value is one error naming its flag, before anything expensive (torch is not imported here).
"""
from __future__ import annotations

import argparse
import io
import math
import re
import tokenize
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class InputError(Exception):
    """A bad flag, file or directory, reported before any training starts."""


_CHOICES = re.compile(r"\{([^{}]+)\}")
_BOUNDS = re.compile(r"([\[(])\s*(?:(>=|>)\s*([-+\w.]+)|([-+\w.]+)\s*,\s*([-+\w.]+))\s*([\])])")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclass
class Hyperparameter:
    name: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    low_inclusive: bool = True
    high: float | None = None
    high_inclusive: bool = True
    default_text: str | None = None  # shown in --help instead of the default value
    several: bool = False  # "comma-separated" {choices}: any number of them, each checked

    @classmethod
    def from_comment(cls, name: str, default: Any, text: str, default_text: str | None = None) -> Hyperparameter:
        """Help text, {choices} and [bounds] from the comment (see the module docstring)."""
        hp = cls(name, default, text, default_text=default_text)
        if match := _CHOICES.search(text):
            hp.choices = tuple(c.strip() for c in match.group(1).split(","))
            hp.several = "comma-separated" in text
        if match := _BOUNDS.search(text):
            opening, op, bound, low, high, closing = match.groups()
            if op:
                hp.low, hp.low_inclusive = float(bound), op == ">="
            else:
                hp.low, hp.high = float(low), float(high)
                hp.low_inclusive, hp.high_inclusive = opening == "[", closing == "]"
        hp.check(default, f"the default of {name}")
        return hp

    @property
    def parse(self) -> Callable[[str], Any]:
        return parse_bool if isinstance(self.default, bool) else type(self.default)

    @property
    def type_name(self) -> str:
        return {bool: "true/false", int: "int", float: "float", str: "str"}[type(self.default)]

    def convert(self, text: str, source: str) -> Any:
        """A string from the command line or a YAML file -> the typed value (checked)."""
        try:
            value = self.parse(str(text))
        except (ValueError, argparse.ArgumentTypeError):
            raise InputError(f"{source}: expected {self.type_name}, got {text!r}") from None
        self.check(value, source)
        return value

    def check(self, value: Any, source: str | None = None) -> None:
        source = source or f"--{self.name}"
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{source} must be a finite number, got {value}")
        number = value
        if isinstance(value, str) and self.several:
            unknown = [item for item in value.split(",") if item not in self.choices]
            if unknown:
                raise InputError(f"{source}: {', '.join(map(repr, unknown))} not among {', '.join(self.choices)}")
            return
        if isinstance(value, str):
            if self.choices is None or value in self.choices:
                return
            if self.low is None:  # a pure choice
                raise InputError(f"{source} must be one of {', '.join(self.choices)}; got {value!r}")
            try:
                number = int(value)
            except ValueError:
                raise InputError(f"{source} must be {' or '.join(self.choices)} or an integer, got {value!r}") from None
        if not self._in_bounds(number):
            raise InputError(f"{source} must be {self._bounds_text()}, got {value}")

    def _in_bounds(self, x: float) -> bool:
        if self.low is not None and (x < self.low or (x == self.low and not self.low_inclusive)):
            return False
        return not (self.high is not None and (x > self.high or (x == self.high and not self.high_inclusive)))

    def _bounds_text(self) -> str:
        if self.high is None:
            return f"{'>=' if self.low_inclusive else '>'} {self.low:g}"
        return f"in {'[' if self.low_inclusive else '('}{self.low:g}, {self.high:g}{']' if self.high_inclusive else ')'}"


def declared(source_file: str, namespace: dict, begin: str, end: str) -> dict[str, Hyperparameter]:
    """The assignments `NAME = literal  # help` between the comment lines containing `begin` and `end`."""
    lines = Path(source_file).read_text(encoding="utf-8").splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("#") and begin in line)
    last = next(i for i, line in enumerate(lines) if i > first and line.startswith("#") and end in line)
    found: dict[str, Hyperparameter] = {}
    tokens = tokenize.generate_tokens(io.StringIO("\n".join(lines[first + 1:last]) + "\n").readline)
    line_name: str | None = None
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.start[1] == 0:
            line_name = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[1] > 0 and line_name is not None:
            found[line_name] = Hyperparameter.from_comment(line_name, namespace[line_name],
                                                            tok.string.lstrip("# ").strip())
        elif tok.type == tokenize.NEWLINE:
            line_name = None
    missing = [name for name, value in namespace.items() if _is_hparam(name, value) and name not in found]
    if missing:  # every hyperparameter documents itself
        raise RuntimeError(f"{source_file}: hyperparameters without a help comment: {missing}")
    return found


def _is_hparam(name: str, value: Any) -> bool:
    return not name.startswith("_") and name.islower() and isinstance(value, (bool, int, float, str))


def add_arguments(parser: argparse.ArgumentParser, hparams: dict[str, Hyperparameter], group_title: str = "") -> None:
    target = parser.add_argument_group(group_title) if group_title else parser
    for hp in hparams.values():
        kind = "true/false" if isinstance(hp.default, bool) else type(hp.default).__name__
        default = hp.default_text or f"default: {hp.default!r}"
        target.add_argument(f"--{hp.name}", default=argparse.SUPPRESS, metavar=kind.upper(),
                            help=f"{hp.help} ({default})".replace("%", "%%"))


def resolve(given: dict[str, Any], known: dict[str, Hyperparameter], config_file: str | None) -> dict[str, Any]:
    """The values set in a YAML file, then on the command line (raw strings from argparse), converted and checked;
    the caller fills in the defaults."""
    values: dict[str, Any] = {}
    if config_file:
        try:
            from_file = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise InputError(f"--config {config_file}: cannot read YAML ({e})") from None
        if not isinstance(from_file, dict):
            raise InputError(f"--config {config_file}: expected a mapping of names to values")
        unknown = sorted(set(from_file) - set(known))
        if unknown:
            raise InputError(f"--config {config_file}: unknown keys {unknown}")
        # The command line's conversions (YAML reads 1e-3 as a string, for one), with the file named in errors.
        for key, value in from_file.items():
            values[key] = known[key].convert(_yaml_scalar(value), f"--config {config_file}: {key}")
    for key, text in given.items():
        values[key] = known[key].convert(text, f"--{key}")
    return values


def _yaml_scalar(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def to_yaml(values: dict[str, Any]) -> str:
    """YAML that `resolve` reads back into the same values."""
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True)
