"""The bad-input harness: a table of user mistakes, each run through the real command line.

A case is the command (with `{name}` placeholders for the files of a prepared world), the exit
code it must end with, and a pattern the one line on stderr must match. Every case runs in a
fresh copy of the world, and afterwards every file that was there is byte-identical (sha256)
and nothing new was written — unless the case names what it may write.

    Case("merge-onto-adapter", ["merge", "-m", "tiny-llama", "-a", "{lora}", "-o", "{lora}"], 2, "input")

The world (built once per session, copied per case):
    {text}   text.txt          about 12 kB of prose
    {chat}   chat.jsonl        chat records with assistant turns
    {lora}   lora/             a LoRA adapter (peft format) trained on tiny-llama
    {native} native/           a freeze:train=mlp adapter (peftlab format) on tiny-llama
    {run}    run/              a finished `train` run folder (run.json, metrics.jsonl, adapter/)
    {model}  model/            tiny-llama saved as a plain HF folder
    {cmp}    cmp/              a finished comparison (strategy `full`, 2 steps)
    {tmp}    the world's root
"""

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PARAGRAPH = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery "
    "part of the world. It is a way I have of driving off the spleen and regulating the circulation.\n"
)


@dataclass
class Case:
    id: str
    argv: list
    code: int
    line: str | None  # regex searched in the one `peftlab:` line on stderr (None: a success, no error line)
    setup: Callable | None = None  # setup(world: Path) makes extra input files before the run
    writes: tuple = ()  # paths (relative to the world) the case may create or change
    env: dict = field(default_factory=dict)


def build_world(root: Path) -> Path:
    """Make the files every case starts from (a few seconds on the tiny models)."""
    import json

    from peftlab import load_model, prepare
    from peftlab.artifacts import save
    from peftlab.cli import main

    root.mkdir(parents=True, exist_ok=True)
    (root / "text.txt").write_text(PARAGRAPH * 40)
    chat = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i} it is."}]}
            for i in range(60)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    for folder, strategy in (("lora", "lora:r=4"), ("native", "freeze:train=mlp")):
        m = load_model("tiny-llama")
        prepared = prepare(m.model, strategy)
        save(m.model, prepared, root / folder, base_model="tiny-llama")
    code = main(["train", "-m", "tiny-llama", "-d", str(root / "text.txt"), "-s", "lora:r=4", "--steps", "2",
                 "--seq-len", "32", "-o", str(root / "run"), "--quiet"])
    assert code == 0, "the world's train run failed"
    here = os.getcwd()
    os.chdir(root)  # relative paths in its job, so a copy of the world is the same comparison
    try:
        code = main(["compare", "-m", "tiny-llama", "-d", "text.txt", "-s", "full", "--steps", "2", "--seq-len", "32",
                     "-o", "cmp", "--quiet", "--forget", "none", "--samples", "1", "--gen-tokens", "4"])
    finally:
        os.chdir(here)
    assert code == 0, "the world's comparison failed"
    m = load_model("tiny-llama")
    m.model.save_pretrained(root / "model")
    m.tokenizer.save_pretrained(root / "model")
    return root


def snapshot(root: Path) -> dict:
    """{relative path: sha256} of every file below `root` (folders as None)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
    return out


def fill(argv: list, world: Path) -> list[str]:
    names = {"tmp": world, "text": world / "text.txt", "chat": world / "chat.jsonl", "lora": world / "lora",
             "native": world / "native", "run": world / "run", "model": world / "model", "cmp": world / "cmp"}
    return [str(a).format(**{k: str(v) for k, v in names.items()}) for a in argv]


def run_case(case: Case, template: Path, work: Path, capsys, monkeypatch) -> None:
    """Copy the world, run the case in-process, check code, the one line and every hash."""
    from peftlab.cli import main

    world = work / "world"
    shutil.copytree(template, world, symlinks=True)
    if case.setup:
        case.setup(world)
    before = snapshot(world)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v.format(tmp=world))
    monkeypatch.chdir(world)
    capsys.readouterr()
    code = main(fill(case.argv, world))
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert "Traceback" not in captured.err + captured.out, captured.err
    assert code == case.code, f"exit {code}, expected {case.code}; stderr: {captured.err}"
    mine = [ln for ln in err if ln.startswith("peftlab:")]
    if case.line is None:
        assert not [ln for ln in mine if ln.startswith("peftlab: error")], err
    else:
        assert len(mine) == 1, f"expected one 'peftlab:' line, got: {err}"
        assert re.search(case.line, mine[0]), f"{mine[0]!r} does not match {case.line!r}"
    after = snapshot(world)
    allowed = [str(Path(fill([w], world)[0]).relative_to(world)) if os.path.isabs(fill([w], world)[0]) else w
               for w in case.writes]

    def free(rel):
        return any(rel == a or rel.startswith(a.rstrip("/") + "/") for a in allowed)

    changed = [p for p, h in before.items() if after.get(p, "gone") != h and not free(p)]
    added = [p for p in after if p not in before and not free(p)]
    assert not changed, f"inputs changed or removed: {changed}"
    assert not added, f"files written: {added}"
