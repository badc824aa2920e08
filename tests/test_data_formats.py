"""The data people have: JSON, JSONL of text, CSV/TSV, Parquet, datasets folders, TRL's chat
formats, a system prompt; packed chat blocks keep every record's loss mask exactly."""

import csv
import json

import pytest
import torch

from peftlab import load_model
from peftlab.data import IGNORE, load_blocks, render_chat, tokenize
from peftlab.errors import UserError

CHAT = [{"role": "user", "content": "Who is the captain?"}, {"role": "assistant", "content": "Ahab."}]
RECORDS = [{"messages": CHAT}, {"prompt": "Name the ship.", "completion": "The Pequod."}] * 3


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-llama")


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_chat_packing_keeps_each_records_mask_exact(loaded, tmp_path):
    """Hand-built: each record's ids, then labels that are -100 up to and including the
    assistant header, the assistant text and its end token learned; blocks are cut from that."""
    tok = loaded.tokenizer
    want_ids, want_labels = [], []
    for r in RECORDS:
        msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        whole = tok.apply_chat_template(msgs, tokenize=False)
        head, answer = loaded.encode(prompt), tok(whole[len(prompt):], add_special_tokens=False)["input_ids"]
        want_ids += head + answer
        want_labels += [IGNORE] * len(head) + answer
    path = write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    ids, labels = tokenize(loaded, path)
    assert ids.tolist() == want_ids and labels.tolist() == want_labels
    blocks = load_blocks(loaded, path, 16)
    n = len(want_ids) // 16
    flat_labels = torch.cat([blocks.train_labels, blocks.held_labels]).reshape(-1).tolist()
    assert flat_labels == want_labels[: n * 16]
    learned = tok.decode([i for i, lab in zip(want_ids, want_labels) if lab != IGNORE])
    assert learned == "Ahab.<|im_end|>\nThe Pequod.<|im_end|>\n" * 3


def test_every_format_gives_the_same_tokens(loaded, tmp_path):
    reference = tokenize(loaded, write_jsonl(tmp_path / "a.jsonl", RECORDS))
    json_list = tmp_path / "a.json"
    json_list.write_text(json.dumps(RECORDS))
    wrapped = tmp_path / "b.json"
    wrapped.write_text(json.dumps({"data": RECORDS}))
    trl = write_jsonl(tmp_path / "trl.jsonl", [{"messages": CHAT}, {"prompt": [{"role": "user", "content": "Name the ship."}],
                                                                     "completion": [{"role": "assistant", "content": "The Pequod."}]}] * 3)
    table = tmp_path / "a.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "chat"])
        for i, r in enumerate(RECORDS):
            msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
            w.writerow([i, json.dumps(msgs)])
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"conversations": r.get("messages") or [
        {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]} for r in RECORDS]), parquet)
    import datasets

    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": r.get("messages") or [
        {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]} for r in RECORDS])}
    ).save_to_disk(str(folder))
    for source, column in ((json_list, None), (wrapped, None), (trl, None), (table, "chat"), (parquet, None), (folder, None)):
        ids, labels = tokenize(loaded, str(source), text_column=column)
        assert ids.tolist() == reference[0].tolist() and labels.tolist() == reference[1].tolist(), source


def test_text_records_learn_every_token(loaded, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Call me Ishmael."}, {"text": "Some years ago."}])
    ids, labels = tokenize(loaded, path)
    assert labels.tolist() == ids.tolist()
    assert loaded.tokenizer.decode(ids) == "Call me Ishmael.<|eos|>Some years ago.<|eos|>"
    table = tmp_path / "t.tsv"
    table.write_text("title\tbody\nA\tCall me Ishmael.\nB\tSome years ago.\n")
    assert tokenize(loaded, str(table), text_column="body")[0].tolist() == ids.tolist()


def test_system_prompt_for_chats_without_one(loaded, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    ids, labels = tokenize(loaded, path, system="Answer like a sailor.")
    text = loaded.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nAnswer like a sailor.<|im_end|>")
    assert loaded.tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == "Ahab.<|im_end|>\n"
    own = write_jsonl(tmp_path / "own.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}] + CHAT}])
    assert "Be brief." in loaded.tokenizer.decode(tokenize(loaded, own, system="Answer like a sailor.")[0])
    assert render_chat(loaded, CHAT)[0] != render_chat(loaded, CHAT, "x")[0]


@pytest.mark.parametrize("name, content, words", [
    ("x.pdf", "%PDF-1.4", "unrecognised data format: x.pdf; peftlab reads text"),
    ("x.json", '{"a": 1, "b": 2}', "expected a JSON list of records"),
    ("x.jsonl", '{"question": "x"}\n', "a record needs 'messages' or 'conversations'"),
    ("x.csv", "a,b\n1,2\n", "a record needs"),
    ("x.jsonl", '{"messages": "hi"}\n', "a record needs"),
    ("x.jsonl", '{"messages": [{"role": "user"}]}\n', "a chat must be a list of"),
])
def test_unrecognised_data_is_one_line(loaded, tmp_path, name, content, words):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        tokenize(loaded, str(path))


def test_text_column_must_exist_and_options_need_records(cli, loaded, tmp_path, text_file):
    path = write_jsonl(tmp_path / "c.jsonl", RECORDS)
    with pytest.raises(UserError, match="no column 'body'"):
        tokenize(loaded, path, text_column="body")
    code, _, err = cli("train", "-m", "tiny-llama", "-d", text_file, "--system", "x", "-o", tmp_path / "r")
    assert code == 2 and "--system apply to record files" in err


def test_train_from_a_csv_with_a_text_column(cli, tmp_path):
    table = tmp_path / "notes.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        for i in range(60):
            w.writerow([i, f"Call me Ishmael. Some years ago, never mind how long precisely ({i})."])
    code, _, err = cli("train", "-m", "tiny-llama", "-d", table, "--text-column", "body", "--steps", 2, "--seq-len", 32,
                       "--quiet", "-o", tmp_path / "run")
    assert code == 0, err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data_options"] == {"text_column": "body", "system": None}
