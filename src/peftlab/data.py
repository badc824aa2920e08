"""Training data: texts and chat records, tokenized once, packed into fixed-length blocks.

`D` may be an alias (`moby-dick`, `alice`), a text file, a folder of text files, or a JSONL
file of chat/instruction records. Records are rendered with the tokenizer's chat template
and only assistant tokens carry loss (labels are -100 elsewhere). The held-out split is the
tail of the token stream (a contiguous passage the model never trains on), and the batch
order is a seeded permutation, so the same seed always sees the same batches.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import assets
from .errors import UserError

TEXT_ALIASES = ("moby-dick", "alice")
TEXT_SUFFIXES = (".txt", ".md", ".text")
IGNORE = -100


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
        return [strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))]
    raise UserError(f"data not found: '{source}'; give a text file, a folder, a .jsonl file, or one of: {', '.join(TEXT_ALIASES)}")


def to_messages(record: dict, where: str) -> list[dict]:
    """Accept {messages}, {prompt, completion} or {instruction, input, output} records."""
    if isinstance(record.get("messages"), list):
        return record["messages"]
    if "prompt" in record and "completion" in record:
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    if "instruction" in record and "output" in record:
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    raise UserError(f"{where}: a record needs 'messages', 'prompt'+'completion' or 'instruction'+'output'")


def render_chat(loaded, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that keep only the assistant turns."""
    tok = loaded.tokenizer
    if not getattr(tok, "chat_template", None):
        raise UserError(f"the tokenizer of {loaded.name} has no chat template; use plain text data")
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


def tokenize(loaded, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole source as one id stream (and a label stream for chat data)."""
    if str(source).endswith(".jsonl"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"data not found: {path}")
        ids, labels = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            i, lab = render_chat(loaded, to_messages(record, f"{path}:{n}"))
            ids += i
            labels += lab
        if not ids:
            raise UserError(f"{path} holds no records")
        return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    docs = read_text(source)
    if not any(d.strip() for d in docs):
        raise UserError(f"data '{source}' is empty")
    eos = loaded.tokenizer.eos_token_id
    ids = []
    for d in docs:
        ids += loaded.encode(d) + ([eos] if eos is not None else [])
    return np.asarray(ids, dtype=np.int64), None


def cached_tokens(loaded, source: str):
    """`tokenize`, memoised on disk by (source content, tokenizer)."""
    path = Path(source).expanduser()
    if source in TEXT_ALIASES:
        path = assets.asset_path(source)
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(p.name.encode() + p.read_bytes())
    else:
        return tokenize(loaded, source)
    tok = loaded.tokenizer
    h.update(f"{type(tok).__name__}|{tok.name_or_path}|{len(tok)}|{loaded.add_bos}|{str(source).endswith('.jsonl')}".encode())
    h.update(json.dumps(tok.get_vocab(), sort_keys=True).encode()[:1_000_000])
    cache = assets.cache_dir() / "tokens" / f"{h.hexdigest()[:24]}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            return z["ids"], (z["labels"] if "labels" in z else None)
    ids, labels = tokenize(loaded, source)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, ids=ids, **({"labels": labels} if labels is not None else {}))
    tmp.replace(cache)
    return ids, labels


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


def load_blocks(loaded, source: str, seq_len: int, held_out: float = 0.05, max_held: int = 32) -> Blocks:
    """Tokenize `source`, pack it into blocks of `seq_len`, and split off a held-out tail."""
    if seq_len <= 0:
        raise UserError(f"--seq-len must be a positive number of tokens, got {seq_len}")
    ids, labels = cached_tokens(loaded, source)
    n = len(ids) // seq_len
    if n < 2:
        raise UserError(
            f"data '{source}' has {len(ids)} tokens, fewer than two blocks of --seq-len {seq_len} "
            f"(one to train, one held out); give more text or a --seq-len below {max(1, len(ids) // 2)}"
        )
    ids = torch.from_numpy(ids[: n * seq_len].copy()).view(n, seq_len)
    labels = ids.clone() if labels is None else torch.from_numpy(labels[: n * seq_len].copy()).view(n, seq_len)
    n_held = min(max(1, round(n * held_out)), max_held, n - 1)
    return Blocks(ids[:-n_held], labels[:-n_held], ids[-n_held:], labels[-n_held:], n * seq_len)
