"""Record files, in the formats people have, turned into examples: plain text or a chat.

    .jsonl / .json     one JSON object per line, or a JSON list of objects
    .csv / .tsv        a header row; a messages cell may hold a JSON list
    .parquet           (pyarrow, from the `data` extra)
    a folder written by `datasets.Dataset.save_to_disk` (its "train" split for a DatasetDict)

A record is read, in this order of preference, as:
    the `text_column` the user named (text, or a list of {role, content} messages)
    {"messages": [...]} or {"conversations": [...]}          a chat (TRL's conversational format)
    {"prompt": ..., "completion": ...}                        strings, or lists of messages (TRL)
    {"instruction": ..., "input": ..., "output": ...}         Alpaca style
    {"text": "..."}                                           plain text, loss on every token
"""

import csv
import json
from pathlib import Path

from .errors import UserError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SHAPES = ("'messages' or 'conversations' (a chat), 'prompt'+'completion', 'instruction'+'output', or 'text'; "
          "or name the column with --text-column")


def is_dataset_folder(path: Path) -> bool:
    """A folder `datasets.save_to_disk` wrote (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def is_record_source(source: str) -> bool:
    path = Path(source).expanduser()
    return path.suffix.lower() in SUFFIXES or is_dataset_folder(path)


def read(source: str) -> list[tuple[str, dict]]:
    """[(where, record)] from a record file or dataset folder; where = 'file:line' for messages."""
    path = Path(source).expanduser()
    if is_dataset_folder(path):
        return _dataset(path)
    if not path.is_file():
        raise UserError(f"data not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                out.append((f"{path}:{n}", _json(line, f"{path}:{n}")))
        return out
    if suffix == ".json":
        data = _json(path.read_text(encoding="utf-8"), str(path))
        if isinstance(data, dict):  # {"data": [...]} or any single list of records
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path}: expected a JSON list of records (objects), or JSON Lines in a .jsonl file")
        return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        return [(f"{path}:{i + 2}", {k: _maybe_json(v) for k, v in r.items() if k is not None}) for i, r in enumerate(rows)]
    if suffix == ".parquet":
        pq = _need("pyarrow.parquet", "Parquet files")
        try:
            rows = pq.read_table(str(path)).to_pylist()
        except Exception as e:  # pyarrow raises its own error types for damaged files
            raise UserError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:100]})") from None
        return [(f"{path}[{i}]", r) for i, r in enumerate(rows)]
    raise UserError(f"{path}: unknown record format; give one of {', '.join(SUFFIXES)} or a datasets folder")


def example(record: dict, where: str, text_column: str | None = None) -> tuple[str, object]:
    """('text', str) or ('chat', [messages]) for one record."""
    if text_column:
        if text_column not in record:
            raise UserError(f"{where}: no column '{text_column}' (columns: {', '.join(map(str, record))})")
        value = record[text_column]
        return ("chat", _messages(value, where)) if isinstance(value, list) else ("text", _text(value, where))
    for key in ("messages", "conversations"):
        if isinstance(record.get(key), list):
            return "chat", _messages(record[key], where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational prompt/completion
            return "chat", _messages(_as_list(prompt, "user") + _as_list(completion, "assistant"), where)
        return "chat", [{"role": "user", "content": _text(prompt, where)},
                        {"role": "assistant", "content": _text(completion, where)}]
    if "instruction" in record and "output" in record:
        user = _text(record["instruction"], where) + (f"\n\n{record['input']}" if record.get("input") else "")
        return "chat", [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record["output"], where)}]
    if "text" in record:
        return "text", _text(record["text"], where)
    raise UserError(f"{where}: a record needs {SHAPES}; this one has: {', '.join(map(str, record)) or 'nothing'}")


def _as_list(value, role):
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _messages(value, where) -> list[dict]:
    ok = isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    if not ok:
        raise UserError(f"{where}: a chat must be a list of {{\"role\": ..., \"content\": ...}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(value, where) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: expected text, found {type(value).__name__}")
    return value


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None


def _maybe_json(cell):
    """A CSV cell that holds a JSON list (messages) is read as one; anything else stays text."""
    if isinstance(cell, str) and cell.lstrip().startswith("["):
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell
    return cell


def _dataset(path: Path) -> list[tuple[str, dict]]:
    datasets = _need("datasets", "datasets folders")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    return [(f"{path}[{i}]", r) for i, r in enumerate(loaded)]


def _need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"reading {what} needs the data extra: pip install 'peftlab[data]'") from None
