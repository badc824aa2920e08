"""Strategy specs: `NAME[:key=value,...]`, list values joined with `+`, methods stacked with `/`.

    lora:r=8,alpha=16,targets=q_proj+v_proj
    targeted-qkv/lora:r=4

A spec may also be a TOML file holding `strategy = "..."`.
"""

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError, close_matches

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Option:
    """One key a method accepts: its default and how to read it from text."""

    default: object
    kind: str = "str"  # int | float | bool | str | list | choice
    choices: tuple = ()
    help: str = ""
    low: float | None = None  # numbers: the smallest value allowed (inclusive)
    high: float | None = None  # numbers: the largest value allowed (inclusive)

    def parse(self, key: str, text: str, method: str):
        text = text.strip()
        if self.kind in ("int", "float"):
            try:
                value = int(text) if self.kind == "int" else float(text)
            except ValueError:
                raise UserError(f"{method}: {key}={text} is not a{'n integer' if self.kind == 'int' else ' number'}") from None
            return self.check(key, value, method)
        if self.kind == "bool":
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise UserError(f"{method}: {key}={text} is not a boolean; write true or false")
        if self.kind == "list":
            return tuple(x for x in text.split("+") if x)
        if self.kind == "choice" and text not in self.choices:
            raise UserError(f"{method}: {key}={text} is not valid; choose one of: {', '.join(self.choices)}")
        return text


    def check(self, key: str, value, method: str):
        """A number must be finite and inside [low, high]."""
        if not math.isfinite(value):
            raise UserError(f"{method}: {key}={value} must be a finite number")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            lo = "" if self.low is None else f"≥ {self.low:g}"
            hi = "" if self.high is None else f"≤ {self.high:g}"
            raise UserError(f"{method}: {key}={value} is out of range; it must be {' and '.join(x for x in (lo, hi) if x)}")
        return value


@dataclass(frozen=True)
class Step:
    """One method of a strategy with its fully resolved options."""

    method: str
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        def fmt(v):
            if isinstance(v, tuple):
                return "+".join(map(str, v))
            return str(v).lower() if isinstance(v, bool) else str(v)

        given = ",".join(f"{k}={fmt(v)}" for k, v in self.options.items())
        return f"{self.method}:{given}" if given else self.method


def parse(spec: str, registry: dict) -> list[Step]:
    """Parse a strategy string (or a TOML file path) against `registry` (name -> method)."""
    spec = str(spec).strip()
    if spec.endswith(".toml"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"strategy file not found: {path}")
        try:
            spec = str(tomllib.loads(path.read_text())["strategy"])
        except (tomllib.TOMLDecodeError, KeyError) as e:
            raise UserError(f"{path}: expected a TOML file with strategy = \"...\" ({e})") from None
    if not spec:
        raise UserError("empty strategy; e.g. full, freeze:train=mlp+norm, lora:r=8")
    steps = []
    for part in spec.split("/"):
        name, _, rest = part.strip().partition(":")
        if name not in registry:
            raise UserError(f"unknown strategy '{name}'{close_matches(name, registry)}; known: {', '.join(registry)}")
        method = registry[name]
        options = {}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq:
                raise UserError(f"{name}: '{item}' is not key=value")
            if key not in method.options:
                valid = ", ".join(method.options) or "none"
                raise UserError(f"{name}: unknown key '{key}'{close_matches(key, method.options)}; valid keys: {valid}")
            options[key] = method.options[key].parse(key, value, name)
        steps.append(Step(name, options))
    return steps


def split_lr(entry: str, default_lr: float) -> tuple[str, float]:
    """'lora:r=8@1e-3' -> ('lora:r=8', 0.001): a strategy may carry its own learning rate."""
    spec, at, lr = str(entry).partition("@")
    if not at:
        return spec, default_lr
    try:
        value = float(lr)
    except ValueError:
        raise UserError(f"'{entry}': the learning rate after @ must be a number, e.g. lora:r=8@1e-3") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"'{entry}': the learning rate after @ must be a positive number, got {lr}")
    return spec, value
