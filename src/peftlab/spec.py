"""Strategy specs: `NAME[:key=value,...]`, list values joined with `+`, methods stacked with `/`.

    lora:r=8,alpha=16,targets=q_proj+v_proj
    targeted-qkv/lora:r=4

A spec may also be a TOML file holding `strategy = "..."`. Each method appears once. Every
mistake is one UserError line, raised while parsing where the text alone shows it (unknown
names and keys, numbers out of range or not finite, unsafe regexes: `user_regex`).
"""

import math
import re
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
    kind: str = "str"  # int | float | bool | str | list | choice | regex | patterns (PATTERN=VALUE joined with +)
    choices: tuple = ()
    help: str = ""
    low: float | None = None  # numbers (and pattern values): the smallest value allowed (inclusive)
    high: float | None = None  # numbers (and pattern values): the largest value allowed (inclusive)
    of: str = "float"  # patterns: the kind of each PATTERN=VALUE's value, int or float

    def parse(self, key: str, text: str, method: str):
        text = text.strip()
        if self.kind in ("int", "float"):
            try:
                value = int(text) if self.kind == "int" else float(text)
            except ValueError:
                kind = "an integer" if self.kind == "int" else "a number"
                raise UserError(f"{method}: {key}={clip(text)} is not {kind}") from None
            return self.check(key, value, method)
        if self.kind == "bool":
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise UserError(f"{method}: {key}={text} is not a boolean; write true or false")
        if self.kind == "list":
            return tuple(x for x in text.split("+") if x)
        if self.kind == "regex":
            user_regex(text, f"{method}: {key}")
            return text
        if self.kind == "patterns":
            items = tuple(x for x in text.split("+") if x)
            for item in items:
                pattern_item(item, f"{method}: {key}", self.of, self.low, self.high)
            return items
        if self.kind == "choice" and text not in self.choices:
            raise UserError(f"{method}: {key}={text} is not valid; choose one of: {', '.join(self.choices)}")
        return text

    def check(self, key: str, value, method: str):
        """A number must be finite and inside [low, high] (an integer also fits in 64 bits:
        seeds and sizes beyond that are mistakes, and torch's generators refuse them)."""
        return check_number(f"{method}: {key}={clip(value)}", value, self.low,
                            INT_MAX if self.kind == "int" and self.high is None else self.high)


INT_MAX = 2**63 - 1


def clip(value, n: int = 40) -> str:
    """`value` as text, shortened for a one-line message."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"<a {int(value.bit_length() * 0.30103) + 1}-digit number>"
    text = str(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def check_number(label: str, value, low=None, high=None):
    """`value` if it is finite and inside [low, high]; else one UserError starting with `label`."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{label} must be a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "" if low is None else f"≥ {low:g}"
        hi = "" if high is None else f"≤ {high}" if high == INT_MAX else f"≤ {high:g}"
        raise UserError(f"{label} is out of range; it must be {' and '.join(x for x in (lo, hi) if x)}")
    return value


def pattern_item(item: str, what: str, of: str = "float", low=None, high=None) -> tuple:
    """'PATTERN=VALUE' (rank_pattern, alpha_pattern) -> (compiled pattern, value), checked: the
    pattern is a safe regex (see `user_regex`), the value a finite number of kind `of` (int or
    float) inside [low, high]."""
    key, _, value = item.rpartition("=")
    if not key:
        raise UserError(f"{what}: pattern '{item}' is not PATTERN=VALUE, e.g. q_proj=16")
    try:
        number = int(value) if of == "int" else float(value)
    except ValueError:
        kind = "a rank is a whole number" if of == "int" else "write a number"
        raise UserError(f"{what}: in '{item}', {value} is not a number; {kind}, e.g. {key}=16") from None
    if of == "int" and low is not None and number < low:
        raise UserError(f"{what}: '{item}' gives rank {number}; ranks must be positive, e.g. {key}=16")
    check_number(f"{what}: {item}", number, low, INT_MAX if of == "int" and high is None else high)
    return user_regex(key, what), number


# ---- regular expressions from users -------------------------------------------------------
#
# Python's `re` backtracks: a pattern that can match the same text in many ways takes time
# exponential in the text's length to fail, e.g. `(.|.)*zzz` or `(a+)+b` on a 30-character
# module path. `user_regex` compiles a user's pattern only after a static check of its parse
# tree (re's own parser) bounds the number of ways it can match one text:
#
#   refused as nested: a repeat that can run more than once (`*`, `+`, `{2,}`, `{3}`) around
#     something that can itself match in more than one way: another repeat (`(a+)+`,
#     `(.*a){3}`, `(\.\d+)*`) or an alternation whose branches can begin with the same
#     character (`(a|ab)*`, `(.|.)*`); such a repeat multiplies the ways per iteration, so
#     they grow exponentially with the text. Alternations whose branches start with distinct
#     literal characters (`(q_proj|v_proj)+`) and fixed repeats (`\d{2}`) are deterministic
#     and allowed.
#   refused as too costly: everything else multiplies out (each open-ended repeat in a
#     sequence can stop at any of ~200 places of a module path, an optional part doubles,
#     an alternation adds its branches); more than REGEX_WAYS ways in total (four `.*` in a
#     row, or 24 `x?`) is refused. Three `.*` pass: < 0.2 s on a 200-character path, well
#     under a millisecond on a real one (~40 characters).
#   refused as too long: more than REGEX_CHARS characters (peftlab writes a peft config's
#     target_modules as an exact-path regex for an irregular choice of layers, ~40 characters a
#     layer: 32k characters cover 800 layers; `max_chars` changes the bound).
# The check is conservative (it may refuse a harmless pattern such as `(\w+\.)*`, never the
# other way round) and assumes the texts matched are module or parameter paths, < 200 chars.

REGEX_CHARS = 32_768
REGEX_WAYS = 10_000_000
_PATH_CHARS = 200

try:  # Python ≥ 3.11
    from re import _constants as _sre_c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover
    import sre_constants as _sre_c
    import sre_parse as _sre_parse


class _Nested(Exception):
    pass


def user_regex(pattern: str, what: str, max_chars: int = REGEX_CHARS) -> "re.Pattern":
    """Compile a regular expression a user gave (a strategy option, a peft config's
    target_modules) after checking it cannot backtrack catastrophically (see above).

    `what` names where it came from, 'METHOD: KEY' or 'FILE: KEY'; every refusal is one
    UserError: 'METHOD: bad KEY 'PATTERN': reason; what would be right'."""
    head, _, key = str(what).rpartition(": ")
    bad = f"{head + ': ' if head else ''}bad {key} {_shown(pattern)}"
    if not isinstance(pattern, str):
        raise UserError(f"{bad}: a regular expression must be text")
    if len(pattern) > max_chars:
        raise UserError(f"{head + ': ' if head else ''}bad {key}: the regular expression is {len(pattern):,} characters "
                        f"long; at most {max_chars:,} are accepted")
    try:
        tree = _sre_parse.parse(pattern)
        ignore_case = bool(tree.state.flags & _sre_c.SRE_FLAG_IGNORECASE)
        ways = _ways(tree, ignore_case)
        compiled = re.compile(pattern)
    except (re.error, OverflowError) as e:
        raise UserError(f"{bad}: bad regular expression ({e})") from None
    except RecursionError:
        raise UserError(f"{bad}: the regular expression is nested too deeply") from None
    except _Nested:
        raise UserError(f"{bad}: it repeats a group that can itself match in several ways (a repeat inside a repeat, "
                        "or alternatives starting alike), which can take exponential time to match; write it without "
                        r"one, e.g. .*\.(q|v)_proj or model\.layers\.[0-9]+\.mlp\..*") from None
    if ways > REGEX_WAYS:
        raise UserError(f"{bad}: it can match one module path in too many ways (more than {REGEX_WAYS:.0e}: too many "
                        "open-ended repeats such as .* or optional parts in a row); use at most three, e.g. "
                        r".*layers\.1\..*_proj")
    return compiled


def _shown(pattern) -> str:
    text = str(pattern)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _ways(items, icase: bool) -> float:
    """Upper bound on the ways a parsed sequence can match one text (module paths < 200 chars)."""
    total = 1.0
    for op, av in items:
        total *= _node_ways(op, av, icase)
        if total > REGEX_WAYS:
            return math.inf
    return total


_REPEATS = {_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, getattr(_sre_c, "POSSESSIVE_REPEAT", _sre_c.MAX_REPEAT)}


def _node_ways(op, av, icase: bool) -> float:
    c = _sre_c
    if op is c.SUBPATTERN:  # (group, add_flags, del_flags, items)
        local = (icase or bool(av[1] & c.SRE_FLAG_IGNORECASE)) and not (av[2] & c.SRE_FLAG_IGNORECASE)
        return _ways(av[3], local)
    if op in (c.ASSERT, c.ASSERT_NOT):  # (direction, items)
        return _ways(av[1], icase)
    if getattr(c, "ATOMIC_GROUP", None) is op:
        return _ways(av, icase)
    if op is c.BRANCH:  # (None, [items, ...])
        ways = [_ways(b, icase) for b in av[1]]
        return max(ways) if _disjoint(av[1], icase) else sum(ways)
    if op is c.GROUPREF_EXISTS:  # (group, yes, no)
        return _ways(av[1], icase) + (_ways(av[2], icase) if av[2] is not None else 1.0)
    if op in _REPEATS:  # (min, max, items)
        low, high, body = av
        inner = _ways(body, icase)
        if high <= 1:  # x? tries x, then nothing
            return inner + (1.0 if low == 0 else 0.0)
        if inner > 1:
            raise _Nested
        if low == high:
            return 1.0
        return float(min(high, _PATH_CHARS) - min(low, _PATH_CHARS) + 1)
    return 1.0  # one character, a class, an anchor, a back-reference


def _disjoint(branches, icase: bool) -> bool:
    """True when no two branches can start with the same character (then at most one goes on)."""
    if icase:
        return False
    seen = set()
    for b in branches:
        first = _first(b)
        if first is None or first & seen:
            return False
        seen |= first
    return True


def _first(items):
    """The characters a parsed sequence can start with, or None when unknown (or it can be empty)."""
    c = _sre_c
    for op, av in items:
        if op is c.LITERAL:
            return {av}
        if op is c.IN:
            chars = set()
            for o, a in av:
                if o is c.LITERAL:
                    chars.add(a)
                elif o is c.RANGE and a[1] - a[0] < 256:
                    chars.update(range(a[0], a[1] + 1))
                else:
                    return None
            return chars
        if op is c.SUBPATTERN and not (av[1] & c.SRE_FLAG_IGNORECASE):
            return _first(av[3])
        if op in _REPEATS and av[0] >= 1:
            return _first(av[2])
        return None
    return None


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
        shown = spec if spec.isprintable() and len(spec) <= 200 else repr(clip(spec, 200))
        try:
            if not path.is_file():
                raise UserError(f"strategy file not found: {shown}")
            spec = str(tomllib.loads(path.read_text())["strategy"]).strip()
        except (tomllib.TOMLDecodeError, KeyError, UnicodeDecodeError) as e:
            raise UserError(f"{shown}: expected a TOML file with strategy = \"...\" ({e})") from None
        except OSError as e:
            raise UserError(f"cannot read strategy file {shown}: {e.strerror or e}") from None
    if not spec:
        raise UserError("empty strategy; e.g. full, freeze:train=mlp+norm, lora:r=8")
    odd = next((i for i, ch in enumerate(spec) if not ch.isprintable()), None)
    if odd is not None:  # a line break or control character would also break the one-line error messages
        raise UserError(f"strategy holds the control character {spec[odd]!r} at position {odd}; "
                        "a strategy is one line of printable text, e.g. lora:r=8")
    steps = []
    seen = {}
    for part in spec.split("/"):
        name, _, rest = part.strip().partition(":")
        if name not in registry:
            raise UserError(f"unknown strategy '{clip(name, 60)}'{close_matches(name, registry)}; known: {', '.join(registry)}")
        if name in seen:
            # Each method once: a second step of one method replaced the first (the same adapter
            # name on the same layers) or, named apart, could not be saved and loaded back (a
            # saved strategy holds one adapter name). One step holds all of a method's options.
            apart = f"; for two {name} adapters, train two runs" if "name" in registry[name].options else ""
            raise UserError(f"strategy names {name} twice ({clip(seen[name], 60)} and {clip(part.strip(), 60)}); give each "
                            f"method once, with all its options in one step{apart}")
        seen[name] = part.strip()
        method = registry[name]
        options = {}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq:
                raise UserError(f"{name}: '{clip(item, 60)}' is not key=value")
            if key not in method.options:
                valid = ", ".join(method.options) or "none"
                raise UserError(f"{name}: unknown key '{clip(key, 60)}'{close_matches(key, method.options)}; valid keys: {valid}")
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
        raise UserError(f"{_shown(entry)}: the learning rate after @ must be a number, e.g. lora:r=8@1e-3") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{_shown(entry)}: the learning rate after @ must be a positive number, got {clip(lr)}")
    return spec, value
