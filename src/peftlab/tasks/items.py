"""Task items from a user's file: what a task asks, and what counts as the right answer.

    generation        {"prompt": "...", "answer": "..."}, or {"messages": [...]} whose last
                      assistant turn is the answer (the turns before it are the prompt)
    multiple choice   {"prompt": "...", "choices": ["...", ...], "label": i}

Files are any record format `--data` reads (.jsonl .json .csv .tsv, ...; records.py). Every
record is checked here, before a model loads: a missing field, empty choices, a label out of
range or an empty answer is one line naming the record and the field.
"""

from dataclasses import dataclass

from .. import records
from ..errors import UserError


@dataclass(frozen=True)
class Generation:
    """Greedy decoding must reproduce `answer` (then stop) after the `prompt` turns."""

    prompt: tuple  # chat messages ({"role", "content"}) leading to the answer
    answer: str
    where: str


@dataclass(frozen=True)
class Choice:
    """The choice with the highest log-likelihood after `prompt` must be `label`."""

    prompt: str
    choices: tuple
    label: int
    where: str


def normalise(text: str) -> str:
    """Whitespace folded: the answer a user writes and the text a model produces compare equal
    when they differ only in spaces and line breaks."""
    return " ".join(text.split())


def item(record: dict, where: str):
    """One record as a Generation or a Choice item."""
    if "choices" in record:
        return _choice(record, where)
    if "answer" in record:
        prompt = _text(record, "prompt", where)
        return Generation(({"role": "user", "content": prompt},), _answer(record["answer"], where), where)
    if isinstance(record.get("messages"), list):
        msgs = record["messages"]
        last = max((i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"), default=None)
        if last is None or last == 0:
            raise UserError(f"{where}: messages: a task chat needs turns before an assistant turn, whose content is the answer")
        kind, chat = records.example({"messages": msgs[:last] + [msgs[last]]}, where)
        return Generation(tuple(chat[:-1]), _answer(chat[-1]["content"], where), where)
    raise UserError(f"{where}: a task record needs 'prompt' and 'answer' (generation), 'messages' ending in an assistant "
                    f"turn, or 'prompt', 'choices' and 'label' (multiple choice); this one has: {', '.join(map(str, record))}")


def _text(record, key, where) -> str:
    if key not in record:
        raise UserError(f"{where}: missing field '{key}'")
    if not isinstance(record[key], str):
        raise UserError(f"{where}: field '{key}' must be text, found {type(record[key]).__name__}")
    return record[key]


def _answer(value, where) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not normalise(value):
        raise UserError(f"{where}: field 'answer' is empty; a generation item needs the answer to reproduce")
    return normalise(value)


def _choice(record, where) -> Choice:
    prompt = _text(record, "prompt", where)
    choices = record["choices"]
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where}: field 'choices' must be a non-empty list of texts")
    if len(choices) < 2:
        raise UserError(f"{where}: field 'choices' has one entry; multiple choice needs two or more")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise UserError(f"{where}: field 'choices' must hold non-empty texts")
    label = record.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # CSV cells are text
    if not isinstance(label, int) or isinstance(label, bool):
        raise UserError(f"{where}: field 'label' must be the index of the right choice (0 to {len(choices) - 1})")
    if not 0 <= label < len(choices):
        raise UserError(f"{where}: field 'label' is {label}, out of range for {len(choices)} choices (0 to {len(choices) - 1})")
    return Choice(prompt, tuple(choices), label, where)


def read(source: str) -> list:
    """Every item of a task file, each checked."""
    rows = records.read(source)
    if not rows:
        raise UserError(f"task {source} holds no records")
    items = [item(r, where) for where, r in rows]
    if len({type(i) for i in items}) > 1:
        raise UserError(f"task {source} mixes generation and multiple-choice records; give each kind its own task file")
    return items
