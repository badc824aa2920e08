"""Training data: texts and records, tokenized once, packed into fixed-length blocks.

`D` may be an alias (`moby-dick`, `alice`), a text file (.txt .md .text, or no suffix), a
folder of text files, a record file (.jsonl .json .csv .tsv .parquet) or a folder written by
`datasets.save_to_disk` (records.py reads them). Chat records are rendered with the
tokenizer's chat template and only assistant tokens carry loss (labels are -100 elsewhere);
text records and text files carry loss on every token. The held-out split is the tail of the
token stream (a contiguous passage the model never trains on), and the batch order is a
seeded permutation, so the same seed always sees the same batches.

`load_blocks` refuses data a run cannot learn from: a --seq-len past the model's positions,
blocks too short to hold a next-token target (T tokens predict T-1), chats with no assistant
turn (every label -100), training or held-out blocks without a single target.
"""

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import assets, models, records
from .errors import UserError, warn

TEXT_ALIASES = ("moby-dick", "alice")
TEXT_SUFFIXES = (".txt", ".md", ".text")
ACCEPTED = (f"peftlab reads text ({' '.join(TEXT_SUFFIXES)}), records ({' '.join(records.SUFFIXES)}), "
            f"a folder of text files, a datasets save_to_disk folder, or one of: {', '.join(TEXT_ALIASES)}")
IGNORE = -100
FORMAT = 3  # bump when tokenization changes, so cached token files are not reused


def strip_gutenberg(text: str) -> str:
    """Drop a BOM, normalise CRLF, and keep only the book between the Gutenberg markers."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    lines = text.split("\n")
    start = next((i for i, ln in enumerate(lines) if ln.startswith("*** START OF")), None)
    end = next((i for i, ln in enumerate(lines) if ln.startswith("*** END OF")), None)
    if start is not None and end is not None and start < end:
        lines = lines[start + 1 : end]
    return "\n".join(lines).strip() + "\n"


def read_text(source: str) -> list[str]:
    """The documents of a text source (alias, file or folder), as strings."""
    if source in TEXT_ALIASES:
        return [strip_gutenberg(assets.asset_path(source).read_text(encoding="utf-8"))]
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return [strip_gutenberg(p.read_text(encoding="utf-8", errors="replace")) for p in files]
    if path.is_file():
        if (path.suffix and path.suffix.lower() not in TEXT_SUFFIXES) or b"\0" in path.read_bytes()[:8192]:
            raise UserError(f"unrecognised data format: {path.name}; {ACCEPTED}")
        return [strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))]
    raise UserError(f"data not found: '{source}'; {ACCEPTED}")


def render_chat(loaded, messages: list[dict], system: str | None = None,
                where: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that keep only the assistant turns.

    `system`: the system prompt for a conversation that has none (otherwise the chat
    template's own default, if it has one, is what the model sees). `where` names the record
    in the error raised when the chat template refuses the conversation."""
    from jinja2 import TemplateError

    try:
        return _render_chat(loaded, messages, system)
    except TemplateError as e:  # a template may refuse, e.g. roles that do not alternate
        raise UserError(f"{where or 'a chat'}: the chat template of {loaded.name} refuses this conversation "
                        f"({str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__})") from None


def _render_chat(loaded, messages: list[dict], system: str | None = None) -> tuple[list[int], list[int]]:
    tok = loaded.tokenizer
    if not getattr(tok, "chat_template", None):
        raise UserError(f"the tokenizer of {loaded.name} has no chat template; use plain text data")
    if system is not None and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system}] + list(messages)
    ids, labels, done = [], [], ""

    def add(text: str, learn: bool) -> str:
        # Only the first piece may get a BOS; later pieces continue the same sequence.
        new = text[len(done):]
        piece = loaded.encode(new) if not done else tok(new, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE] * len(piece))
        return text

    for i, msg in enumerate(messages):
        if msg.get("role") == "assistant":  # the prompt that leads into this turn carries no loss
            done = add(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True), False)
        done = add(tok.apply_chat_template(messages[: i + 1], tokenize=False), msg.get("role") == "assistant")
    return ids, labels


def tokenize(loaded, source: str, text_column: str | None = None, system: str | None = None):
    """The whole source as one id stream, and a label stream (None when every token is learned)."""
    if records.is_record_source(source):
        eos = loaded.tokenizer.eos_token_id
        ids, labels = [], []
        rows = records.read(source)
        for where, record in rows:
            kind, value = records.example(record, where, text_column)
            if kind == "chat":
                i, lab = render_chat(loaded, value, system, where)
            elif not value.strip():  # an empty text record teaches nothing: skipped
                continue
            else:  # a text record: every token learned, closed by EOS like a document
                i = loaded.encode(value) + ([eos] if eos is not None else [])
                lab = list(i)
            ids += i
            labels += lab
        if not rows:
            raise UserError(f"{source} holds no records")
        if not ids:
            raise UserError(f"{source}: every record's text is empty; there is nothing to train on")
        return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if text_column or system is not None:
        raise UserError(f"--text-column and --system apply to record files ({', '.join(records.SUFFIXES)}), not to '{source}'")
    docs = read_text(source)
    if not any(d.strip() for d in docs):
        raise UserError(f"data '{source}' is empty")
    eos = loaded.tokenizer.eos_token_id
    ids = []
    for d in docs:
        ids += loaded.encode(d) + ([eos] if eos is not None else [])
    return np.asarray(ids, dtype=np.int64), None


def cached_tokens(loaded, source: str, text_column: str | None = None, system: str | None = None):
    """`tokenize`, memoised on disk by (source content, tokenizer, reading options)."""
    path = Path(source).expanduser()
    if source in TEXT_ALIASES:
        path = assets.asset_path(source)
    h = hashlib.sha256()
    if records.is_record_source(source) and not path.exists():  # a built-in task: its options fix its records
        h.update(f"built-in task|{source}|{records.BUILTIN_FORMAT}".encode())
    elif path.is_file():
        h.update(path.read_bytes())
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(p.name.encode() + p.read_bytes())
    else:
        return tokenize(loaded, source, text_column, system)
    tok = loaded.tokenizer
    h.update(f"{type(tok).__name__}|{tok.name_or_path}|{len(tok)}|{loaded.add_bos}|{Path(source).suffix}".encode())
    h.update(json.dumps([FORMAT, text_column, system]).encode())
    h.update(json.dumps(tok.get_vocab(), sort_keys=True).encode()[:1_000_000])
    cache = assets.cache_dir() / "tokens" / f"{h.hexdigest()[:24]}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return z["ids"], (z["labels"] if "labels" in z.files else None)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache file: tokenize again and replace it
    ids, labels = tokenize(loaded, source, text_column, system)
    _store(cache, ids, labels)
    return ids, labels


def _store(cache: Path, ids, labels) -> None:
    """Keep the tokens for next time, through a temporary name; where the cache cannot be
    written (a read-only folder, a full disk) the run goes on without it, after one warning."""
    from .files import write_bytes

    buf = io.BytesIO()
    np.savez(buf, ids=ids, **({"labels": labels} if labels is not None else {}))
    try:
        write_bytes(cache, buf.getvalue())
    except OSError as e:
        warn(f"could not write the token cache in {cache.parent} ({e.strerror or e}); going on without it")


@dataclass
class Blocks:
    """Packed data: (N, T) input ids and labels for training and for held-out evaluation."""

    train_ids: torch.Tensor
    train_labels: torch.Tensor
    held_ids: torch.Tensor
    held_labels: torch.Tensor
    n_tokens: int

    def batches(self, batch_size: int, seed: int, start: int = 0):
        """Endless (ids, labels) batches in an order fixed by `seed` (a fresh permutation per
        epoch), beginning after the first `start` batches (where a resumed run left off)."""
        g = torch.Generator().manual_seed(seed)
        n = len(self.train_ids)
        offsets = range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size)
        for _ in range(start // len(offsets)):  # whole epochs already seen: only advance the generator
            torch.randperm(n, generator=g)
        skip = start % len(offsets)
        while True:
            order = torch.randperm(n, generator=g)
            for i in offsets[skip:]:
                idx = order[i : i + batch_size]
                yield self.train_ids[idx], self.train_labels[idx]
            skip = 0


def load_blocks(loaded, source: str, seq_len: int, held_out: float = 0.05, max_held: int = 32,
                text_column: str | None = None, system: str | None = None) -> Blocks:
    """Tokenize `source`, pack it into blocks of `seq_len`, and split off a held-out tail.

    Records are packed back to back: a block may end inside one record and the next block
    go on with it; the labels travel with the ids, so every token keeps its own loss mask."""
    if seq_len <= 0:
        raise UserError(f"--seq-len must be a positive number of tokens, got {seq_len}")
    if seq_len < 2:
        raise UserError(f"--seq-len {seq_len} leaves nothing to learn: the loss is next-token, so a block of T tokens "
                        "has T-1 targets; use --seq-len 2 or more (e.g. 128)")
    models.check_positions(loaded, seq_len, "--seq-len")
    ids, labels = cached_tokens(loaded, source, text_column, system)
    if labels is not None and not (labels != IGNORE).any():
        raise UserError(f"{source}: no record has an assistant turn, so no token carries loss (a chat learns only "
                        "the assistant's replies); add {\"role\": \"assistant\", ...} messages, or give "
                        "{\"text\": ...} records to learn every token")
    n = len(ids) // seq_len
    if n < 2:
        fits = len(ids) // 2
        raise UserError(
            f"data '{source}' has {len(ids)} tokens, fewer than two blocks of --seq-len {seq_len} "
            f"(one to train, one held out); give more text" + (f" or a --seq-len of at most {fits}" if fits >= 2 else "")
        )
    ids = torch.from_numpy(ids[: n * seq_len].copy()).view(n, seq_len)
    labels = ids.clone() if labels is None else torch.from_numpy(labels[: n * seq_len].copy()).view(n, seq_len)
    n_held = min(max(1, round(n * held_out)), max_held, n - 1)
    blocks = Blocks(ids[:-n_held], labels[:-n_held], ids[-n_held:], labels[-n_held:], n * seq_len)
    for part, rows, what in (("training", blocks.train_labels, "nothing to learn"),
                             ("held-out", blocks.held_labels, "no held-out loss to measure")):
        if not (rows[:, 1:] != IGNORE).any():  # position t is predicted from t-1: a block's first label is no target
            raise UserError(
                f"data '{source}' in blocks of --seq-len {seq_len}: the {len(rows)} {part} blocks hold no assistant "
                f"token after a block's first position, so there is {what}; give more records with assistant turns "
                "(the held-out blocks are the end of the data) or another --seq-len")
    return blocks
