"""Built-in tasks that need nothing downloaded, each both training data and a task.

    arith[:digits=2,op=add|sub|mul,reverse=false,n=N,seed=0]
        "What is 47 + 385?" -> "432" (reverse=true: "234", least significant digit first,
        which is how a left-to-right model can carry). Operands have up to `digits` digits.
    which-book[:n=N,chars=240,seed=0]
        a passage of Moby-Dick or Alice; multiple choice between the two titles.

Training and test items never overlap: an arithmetic problem is a test item when a fixed hash
of its operands says so (one in eight), whatever the seed; a passage is a test item when it
comes from the last tenth of its book. As `--data`, a built-in task yields its training
records (prompt/completion); as `--task`, its test items.
"""

import hashlib
import random

from ..errors import UserError, close_matches
from .items import Choice, Generation

OPS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("×", lambda a, b: a * b)}
BOOKS = {"moby-dick": "Moby-Dick", "alice": "Alice's Adventures in Wonderland"}
QUESTION = "Which book is this passage from?"
DEFAULTS = {
    "arith": {"digits": 2, "op": "add", "reverse": False, "n": None, "seed": 0},
    "which-book": {"n": None, "chars": 240, "seed": 0},
}
SIZES = {"train": 5000, "test": 500}  # n's default per split


def is_builtin(source: str) -> bool:
    return str(source).split(":", 1)[0] in DEFAULTS


def options(spec: str) -> tuple[str, dict]:
    """'arith:digits=3,op=mul' -> ('arith', {...all options...}); a one-line error for bad ones."""
    name, _, rest = str(spec).partition(":")
    known = DEFAULTS[name]
    out = dict(known)
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in known:
            raise UserError(f"{name}: unknown option '{key}'{close_matches(key, known)}; valid: {', '.join(known)}")
        if key == "op":
            if value not in OPS:
                raise UserError(f"{name}: op={value} is not one of {', '.join(OPS)}")
            out[key] = value
        elif key == "reverse":
            if value.lower() not in ("true", "false"):
                raise UserError(f"{name}: reverse={value}; write true or false")
            out[key] = value.lower() == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                raise UserError(f"{name}: {key}={value} is not a whole number") from None
            low = {"digits": 1, "n": 1, "chars": 40, "seed": 0}[key]
            high = {"digits": 9, "n": 1_000_000, "chars": 4000, "seed": 2**32 - 1}[key]
            if not low <= out[key] <= high:
                raise UserError(f"{name}: {key}={value} must be between {low} and {high}")
    return name, out


def _is_test(*key) -> bool:
    return hashlib.sha256(repr(key).encode()).digest()[0] % 8 == 0


def arith(split: str, digits: int = 2, op: str = "add", reverse: bool = False, n: int | None = None, seed: int = 0):
    """[(prompt, answer)] of one split, deterministic for the options."""
    n = n or SIZES[split]
    symbol, f = OPS[op]
    top = 10**digits
    rng = random.Random(f"arith|{split}|{digits}|{op}|{seed}")
    if top * top <= 4 * n / (1 / 8 if split == "test" else 7 / 8):  # a small space: take all of it, shuffled
        pairs = [(a, b) for a in range(top) for b in range(top)]
        rng.shuffle(pairs)
    else:
        pairs = ((rng.randrange(top), rng.randrange(top)) for _ in range(50 * n))
    seen, out = set(), []
    for a, b in pairs:
        if op == "sub" and a < b:
            a, b = b, a  # answers stay non-negative
        if (a, b) in seen or _is_test(op, a, b) != (split == "test"):
            continue
        seen.add((a, b))
        answer = str(f(a, b))
        out.append((f"What is {a} {symbol} {b}?" + (" Write the digits of the answer in reverse order." if reverse else ""),
                    answer[::-1] if reverse else answer))
        if len(out) == n:
            break
    return out


def passages(split: str, chars: int = 240, n: int | None = None, seed: int = 0) -> list[tuple[str, int]]:
    """[(passage, index of its book in BOOKS)]: whole words, from the first nine tenths of each
    book (train) or the last tenth (test), alternating books."""
    from ..data import read_text

    per_book = []
    for b, name in enumerate(BOOKS):
        text = " ".join(read_text(name)[0].split())
        cut = int(len(text) * 0.9)
        part = text[:cut] if split == "train" else text[cut:]
        pieces, i = [], 0
        while i + chars <= len(part):
            start = part.find(" ", i) + 1 if i else 0  # begin and end at a word boundary
            end = part.rfind(" ", start, start + chars)
            if end <= start:
                break
            pieces.append((part[start:end], b))
            i = start + chars
        random.Random(f"which-book|{split}|{seed}|{b}").shuffle(pieces)
        per_book.append(pieces)
    mixed = [p for pair in zip(*per_book) for p in pair]
    return mixed[: n or SIZES[split]]


def train_records(spec: str) -> list[tuple[str, dict]]:
    """The training split as (where, prompt/completion record) pairs, for `--data`."""
    name, opts = options(spec)
    if name == "arith":
        rows = arith("train", **opts)
        return [(f"{spec}[{i}]", {"prompt": p, "completion": a}) for i, (p, a) in enumerate(rows)]
    titles = list(BOOKS.values())
    return [(f"{spec}[{i}]", {"prompt": f"{text}\n\n{QUESTION}", "completion": titles[b]})
            for i, (text, b) in enumerate(passages("train", opts["chars"], opts["n"], opts["seed"]))]


def test_items(spec: str) -> list:
    """The test split as task items."""
    name, opts = options(spec)
    if name == "arith":
        return [Generation(({"role": "user", "content": p},), a, f"{spec}[{i}]")
                for i, (p, a) in enumerate(arith("test", **opts))]
    titles = tuple(BOOKS.values())
    return [Choice(f"{text}\n\n{QUESTION}", titles, b, f"{spec}[{i}]")
            for i, (text, b) in enumerate(passages("test", opts["chars"], opts["n"], opts["seed"]))]
