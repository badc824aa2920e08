"""Tasks: does the fine-tuned model now do what the user needs?

    --task FILE | --task NAME=FILE | --task arith:digits=3 | --task sums=arith:op=mul

A task is generation (scored by exact match of the greedy answer, computed teacher-forced) or
multiple choice (log-likelihood `acc` and `acc_norm`, as lm-evaluation-harness defines them).
items.py reads a user's file, builtin.py makes `arith` and `which-book`, score.py scores a
model, stats.py gives Wilson intervals and McNemar's paired test.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import builtin, items as items_mod

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


MATCHES = ("exact", "last-number")


@dataclass
class Task:
    name: str
    source: str
    items: list
    match: str = "exact"  # generation: the whole answer, or only the last number in it (as GSM8K scorers do)

    @property
    def kind(self) -> str:
        return "choice" if isinstance(self.items[0], items_mod.Choice) else "generation"


def split_name(entry: str) -> tuple[str, str]:
    """'sums=arith:op=mul' -> ('sums', 'arith:op=mul'); 'qa.jsonl' -> ('qa', 'qa.jsonl')."""
    entry = str(entry).strip()
    head, eq, rest = entry.partition("=")
    if eq and re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", head) and not builtin.is_builtin(entry.split(",")[0]) \
            and ":" not in head:
        name, source = head, rest
    else:
        source = entry
        name = source.split(":", 1)[0] if builtin.is_builtin(source) else Path(source).stem
    if not source:
        raise UserError(f"--task {entry}: name a task file or a built-in task (arith, which-book)")
    return name, source


def split_match(source: str) -> tuple[str, str]:
    """'qa.jsonl:match=last-number' -> ('qa.jsonl', 'last-number'); built-ins take it as an
    option among theirs (arith:digits=3,match=last-number)."""
    m = re.search(r"[:,]match=([^,:]*)$", source)
    if not m:
        return source, "exact"
    if m.group(1) not in MATCHES:
        raise UserError(f"--task {source}: match={m.group(1)} is not one of {', '.join(MATCHES)}")
    rest = source[: m.start()]
    return rest, m.group(1)


def load(entry: str) -> Task:
    """One `--task` entry: its name, where its items come from, and the checked items."""
    name, source = split_name(entry)
    source, match = split_match(source)
    if builtin.is_builtin(source):
        found = builtin.test_items(source)
    else:
        if not Path(source).expanduser().exists():
            raise UserError(f"--task {entry}: no such file; give a task file (.jsonl .json .csv) or a built-in task "
                            f"({', '.join(builtin.DEFAULTS)})")
        found = items_mod.read(source)
    if not found:
        raise UserError(f"--task {entry} holds no items")
    task = Task(name, source, found, match)
    if match == "last-number" and task.kind != "generation":
        raise UserError(f"--task {entry}: match=last-number applies to generation tasks, not multiple choice")
    if match == "last-number" and not any(NUMBER.search(it.answer) for it in found):
        raise UserError(f"--task {entry}: match=last-number, but no answer holds a number")
    return task


def load_all(entries) -> list[Task]:
    tasks = [load(e) for e in entries or ()]
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two tasks are named '{twice[0]}'; name them apart: --task a={tasks[0].source}")
    return tasks
