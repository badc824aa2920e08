"""Data: Gutenberg stripping, packing, the held-out split, batch order, chat labels."""

import json

import pytest
import torch

from peftlab import load_model
from peftlab.data import IGNORE, cached_tokens, load_blocks, render_chat, strip_gutenberg
from peftlab.errors import UserError


def test_strip_gutenberg_drops_bom_crlf_header_footer():
    raw = "\ufeffThe Project Gutenberg eBook\r\nheader\r\n*** START OF THE BOOK ***\r\nCall me Ishmael.\r\n*** END OF THE BOOK ***\r\nlicence\r\n"
    assert strip_gutenberg(raw) == "Call me Ishmael.\n"


def test_blocks_split_and_order_are_deterministic(text_file):
    loaded = load_model("tiny-llama")
    a = load_blocks(loaded, str(text_file), 64)
    b = load_blocks(loaded, str(text_file), 64)
    n = a.n_tokens // 64
    assert len(a.train_ids) + len(a.held_ids) == n and len(a.held_ids) == round(n * 0.05)
    assert torch.equal(a.held_ids, b.held_ids)
    # the held-out blocks are the tail of the token stream, after every training block
    ids, _ = cached_tokens(loaded, str(text_file))
    assert a.held_ids.flatten().tolist() == ids[(n - len(a.held_ids)) * 64 : n * 64].tolist()
    xa = [x for x, _ in zip(a.batches(4, seed=3), range(5))]
    xb = [x for x, _ in zip(b.batches(4, seed=3), range(5))]
    xc = [x for x, _ in zip(b.batches(4, seed=4), range(5))]
    assert all(torch.equal(p[0], q[0]) for p, q in zip(xa, xb))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(xa, xc))


def test_folder_of_texts(tmp_path, text_file):
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(text_file.read_text())
    blocks = load_blocks(load_model("tiny-llama"), str(tmp_path / "docs"), 64)
    assert blocks.n_tokens >= 3 * len(text_file.read_text()) - 64 * 3


def test_chat_jsonl_trains_on_assistant_tokens_only(tmp_path):
    loaded = load_model("tiny-llama")
    msgs = [{"role": "user", "content": "Who is the captain?"}, {"role": "assistant", "content": "Ahab."}]
    ids, labels = render_chat(loaded, msgs)
    learned = loaded.tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert learned == "Ahab.<|im_end|>\n"
    assert loaded.tokenizer.decode(ids) == loaded.tokenizer.apply_chat_template(msgs, tokenize=False)
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": msgs}, {"prompt": "Name the ship.", "completion": "The Pequod."},
            {"instruction": "Say hi", "input": "", "output": "Hi."}] * 20
    path.write_text("\n".join(json.dumps(r) for r in rows))
    blocks = load_blocks(loaded, str(path), 32)
    assert (blocks.train_labels == IGNORE).any() and (blocks.train_labels != IGNORE).any()


def test_chat_errors(tmp_path):
    loaded = load_model("tiny-llama")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{oops\n')
    with pytest.raises(UserError, match="bad.jsonl:2: not valid JSON"):
        load_blocks(loaded, str(bad), 32)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "x"}\n')
    with pytest.raises(UserError, match="needs 'messages'"):
        load_blocks(loaded, str(odd), 32)
