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

Every mistake in a file is one UserError naming the file and the line (JSONL, CSV) or the
record's index (JSON, Parquet, datasets): a line that is not an object, bytes that are not
UTF-8, JSON nested too deeply to read, a message without a text "content" or whose role is
not system, user or assistant (tool calls are not supported: peftlab would drop the calls and
train on a conversation the model never saw), a prompt/completion record whose completion has
no assistant message. A text record that is empty (or only whitespace) is skipped.
"""

import csv
import io
import json
from pathlib import Path

from .errors import UserError

BUILTIN_FORMAT = 1  # bump when a built-in task's records change, so cached tokens are not reused
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
ROLES = ("system", "user", "assistant")
SHAPES = ("'messages' or 'conversations' (a chat), 'prompt'+'completion', 'instruction'+'output', or 'text'; "
          "or name the column with --text-column")


def is_dataset_folder(path: Path) -> bool:
    """A folder `datasets.save_to_disk` wrote (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def _builtin():
    from .tasks import builtin  # late: tasks read their files through this module

    return builtin


def is_record_source(source: str) -> bool:
    if _builtin().is_builtin(source):
        return True
    path = Path(source).expanduser()
    return path.suffix.lower() in SUFFIXES or is_dataset_folder(path)


def read(source: str) -> list[tuple[str, dict]]:
    """[(where, record)] from a record file, a dataset folder or a built-in task (its training
    split); where = 'file:line' for messages."""
    if _builtin().is_builtin(source):
        return _builtin().train_records(source)
    path = Path(source).expanduser()
    if is_dataset_folder(path):
        return _dataset(path)
    if not path.is_file():
        raise UserError(f"data not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(_utf8(path).splitlines(), 1):
            if line.strip():
                where = f"{path}:{n}"
                out.append((where, _record(_json(line, where), where)))
        return out
    if suffix == ".json":
        data = _json(_utf8(path), str(path))
        if isinstance(data, dict):  # {"data": [...]} or any single list of records
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of records (objects), or JSON Lines in a .jsonl file")
        return [(f"{path}[{i}]", _record(r, f"{path}[{i}]")) for i, r in enumerate(data)]
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(_utf8(path), newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        out = []
        try:
            for r in reader:
                where = f"{path}:{reader.line_num}"
                out.append((where, {k: _maybe_json(v, where) for k, v in r.items() if k is not None}))
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: not readable as {suffix[1:].upper()} ({e})") from None
        return out
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
            raise UserError(f"{where}: no column '{shown(text_column)}' (columns: {', '.join(map(shown, record))})")
        value = record[text_column]
        return ("chat", _messages(value, where)) if isinstance(value, list) else ("text", _text(value, where))
    for key in ("messages", "conversations"):
        if isinstance(record.get(key), list):
            return "chat", _messages(record[key], where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational prompt/completion
            chat = _messages(_as_list(prompt, "user") + _as_list(completion, "assistant"), where)
            answer = chat[len(_as_list(prompt, "user")):]
            if not any(m["role"] == "assistant" for m in answer):
                raise UserError(f"{where}: the completion has no assistant message (roles: "
                                f"{', '.join(m['role'] for m in answer) or 'none'}); the model learns the completion's "
                                "assistant turns, so give it role 'assistant'")
            return "chat", chat
        return "chat", [{"role": "user", "content": _text(prompt, where)},
                        {"role": "assistant", "content": _text(completion, where)}]
    if "instruction" in record and "output" in record:
        extra = record.get("input")
        user = _text(record["instruction"], where) + (f"\n\n{_text(extra, where)}" if extra not in (None, "") else "")
        return "chat", [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record["output"], where)}]
    if "text" in record:
        return "text", _text(record["text"], where)
    raise UserError(f"{where}: a record needs {SHAPES}; this one has: {', '.join(map(shown, record)) or 'nothing'}")


def _as_list(value, role):
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def shown(value, limit: int = 60) -> str:
    """`value` as text that stays on one line (a name or key from a file may hold anything)."""
    text = str(value)
    text = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _record(value, where):
    if not isinstance(value, dict):
        raise UserError(f"{where}: a record must be a JSON object ({{...}}), found {json_kind(value)}")
    return value


def json_kind(value) -> str:
    """What a JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _messages(value, where) -> list[dict]:
    """A chat checked message by message: {"role": system|user|assistant, "content": text}."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: a chat must be a list of {{\"role\": ..., \"content\": ...}} messages")
    out = []
    for i, m in enumerate(value, 1):
        shape = "a chat must be a list of {\"role\": ..., \"content\": ...} messages"
        if not isinstance(m, dict):
            raise UserError(f"{where}: {shape}; message {i} is {json_kind(m)}")
        if "from" in m and "value" in m and "role" not in m:  # ShareGPT's shape
            raise UserError(f"{where}: message {i} has 'from'/'value' (ShareGPT); {shape} with roles {', '.join(ROLES)}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise UserError(f"{where}: {shape}; message {i} has no {' and no '.join(repr(k) for k in missing)}")
        role = m["role"]
        if role not in ROLES:
            if role == "tool":
                raise UserError(f"{where}: message {i} has role 'tool'; peftlab trains on system, user and assistant "
                                "text turns, not tool calls")
            raise UserError(f"{where}: message {i} has role {repr(shown(role)) if isinstance(role, str) else json_kind(role)}; "
                            "use system, user or assistant")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: message {i} ({role}): content is {json_kind(m['content'])}, not a string")
        out.append({"role": role, "content": _valid(m["content"], where)})
    return out


def _text(value, where) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: expected text, found {json_kind(value)}")
    return _valid(value, where)


def _valid(text: str, where) -> str:
    """Text a tokenizer can take: no lone surrogates (JSON can spell them, as \\ud800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: the text holds \\u{ord(text[e.start]):04x}, half of a surrogate pair, which is not "
                        "a character; write the whole pair or the character itself") from None
    return text


def _utf8(path: Path) -> str:
    """The file as text; a file that is not UTF-8 is one line naming where it stops being so."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "save the file as UTF-8") from None


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to read; records are objects of text and lists of messages") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise UserError(f"{where}: not readable JSON ({str(e).split(';')[0][:120]})") from None


def _maybe_json(cell, where):
    """A CSV cell that holds a JSON list of objects (messages) is read as one; anything else stays text."""
    if isinstance(cell, str) and cell.lstrip().startswith("["):
        try:
            value = json.loads(cell)
        except RecursionError:
            raise UserError(f"{where}: a cell holds JSON nested too deeply to read") from None
        except ValueError:
            return cell
        return value if isinstance(value, list) and value and all(isinstance(m, dict) for m in value) else cell
    return cell


def _dataset(path: Path) -> list[tuple[str, dict]]:
    datasets = _need("datasets", "datasets folders")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:  # a damaged folder: missing or unreadable files (pyarrow's errors are ValueErrors)
        first = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable datasets folder ({first})") from None
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
