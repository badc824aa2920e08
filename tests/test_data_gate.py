"""The input gate for data and models: every mistake in a record file, a model file or the
cache is one UserError naming the file (and the line or record), never a traceback; data that
gives a run nothing to learn is refused before training; a cache that cannot be written only
costs the caching."""

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from peftlab import assets, load_model
from peftlab.data import IGNORE, cached_tokens, load_blocks, tokenize
from peftlab.errors import UserError
from peftlab.models import check_gguf, check_positions, max_positions

GOOD = {"messages": [{"role": "user", "content": "Who is the captain?"}, {"role": "assistant", "content": "Ahab."}]}
USER_ONLY = {"messages": [{"role": "user", "content": "Who is the captain of the Pequod, and why?"}]}


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-llama")


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def chat(*messages):
    return {"messages": list(messages)}


@pytest.mark.parametrize("name, content, words", [
    ("bad.jsonl", jsonl(GOOD, "null"), "bad.jsonl:2: a record must be a JSON object ({...}), found null"),
    ("bad.jsonl", jsonl(GOOD, GOOD, "[1, 2]"), "bad.jsonl:3: a record must be a JSON object ({...}), found a list"),
    ("bad.jsonl", jsonl("42"), "bad.jsonl:1: a record must be a JSON object ({...}), found a number"),
    ("bad.jsonl", jsonl(GOOD, '"hello"'), "bad.jsonl:2: a record must be a JSON object ({...}), found a string"),
    ("bad.json", json.dumps([GOOD, None]), "bad.json[1]: a record must be a JSON object ({...}), found null"),
    ("bad.jsonl", "[" * 100_000 + "\n", "bad.jsonl:1: JSON nested too deeply to read"),
    ("bad.jsonl", jsonl(GOOD) + '{"a": ' * 100_000 + "\n", "bad.jsonl:2: JSON nested too deeply to read"),
    ("bad.json", "[" * 100_000, "bad.json: JSON nested too deeply to read"),
    ("bad.csv", 'text\n"' + "[" * 100_000 + '"\n', "bad.csv:2: a cell holds JSON nested too deeply to read"),
    ("bad.jsonl", jsonl('{"text": ' + "1" * 5000 + "}"), "bad.jsonl:1: not readable JSON (Exceeds the limit"),
    ("bad.jsonl", jsonl({"text": "a\ud800b"}), "bad.jsonl:1: the text holds \\ud800, half of a surrogate pair"),
    ("bad.jsonl", jsonl(chat({"role": "user", "content": None}, {"role": "assistant", "content": "x"})),
     "bad.jsonl:1: message 1 (user): content is null, not a string"),
    ("bad.jsonl", jsonl(chat({"role": "user", "content": "x"}, {"role": "assistant", "content": ["x"]})),
     "bad.jsonl:1: message 2 (assistant): content is a list, not a string"),
    ("bad.jsonl", jsonl(chat({"content": "x"})), "bad.jsonl:1: a chat must be a list of {\"role\": ..., \"content\": ...} "
     "messages; message 1 has no 'role'"),
    ("bad.jsonl", jsonl(chat({"role": "user"})), "message 1 has no 'content'"),
    ("bad.jsonl", jsonl(chat("hi")), "message 1 is a string"),
    ("bad.jsonl", jsonl(chat({"role": "bot", "content": "x"})), "bad.jsonl:1: message 1 has role 'bot'; use system, user or assistant"),
    ("bad.jsonl", jsonl(chat({"role": ["user"], "content": "x"})), "message 1 has role a list; use system, user or assistant"),
    ("bad.jsonl", jsonl(chat({"role": "user", "content": "x"}, {"role": "tool", "content": "42"})),
     "bad.jsonl:1: message 2 has role 'tool'; peftlab trains on system, user and assistant text turns, not tool calls"),
    ("bad.jsonl", jsonl({"conversations": [{"from": "human", "value": "x"}]}), "message 1 has 'from'/'value' (ShareGPT)"),
    ("bad.jsonl", jsonl({"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]}),
     "bad.jsonl:1: the completion has no assistant message (roles: user)"),
    ("bad.jsonl", jsonl({"instruction": "x", "input": 3, "output": "y"}), "bad.jsonl:1: expected text, found a number"),
    ("bad.jsonl", jsonl({"text": None}), "bad.jsonl:1: expected text, found null"),
    ("bad.jsonl", jsonl({"text": ""}, {"text": "  \n"}), "bad.jsonl: every record's text is empty"),
    ("bad.csv", "id,text\n", "bad.csv holds no records"),
])
def test_bad_records_are_one_line_naming_file_and_line(loaded, tmp_path, name, content, words):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as e:
        load_blocks(loaded, str(path), 16)
    assert words in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name, raw, where", [
    ("bad.jsonl", jsonl(GOOD).encode() + b'{"text": "caf\xe9"}\n', "bad.jsonl:2"),
    ("bad.json", b'[{"text": "ok"},\n {"text": "caf\xe9"}]', "bad.json:2"),
    ("bad.csv", b"text\nhello\ncaf\xe9\n", "bad.csv:3"),
    ("bad.tsv", b"\xff\xfet\x00e\x00x\x00t\x00", "bad.tsv:1"),  # UTF-16
])
def test_bytes_that_are_not_utf8(loaded, tmp_path, name, raw, where):
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(UserError, match=rf"{where}: not UTF-8 text \(byte 0x[0-9a-f]{{2}} at offset \d+\); save the file as UTF-8"):
        load_blocks(loaded, str(path), 16)


def test_a_bom_is_read_and_csv_cells_stay_text_unless_they_hold_messages(loaded, tmp_path):
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufefftext\n[citation needed] Call me Ishmael.\n\"[1, 2]\"\n".encode())
    ids, labels = tokenize(loaded, str(bom))
    assert loaded.tokenizer.decode(ids) == "[citation needed] Call me Ishmael.<|eos|>[1, 2]<|eos|>"


def test_empty_text_records_are_skipped(loaded, tmp_path):
    with_empty = tmp_path / "a.jsonl"
    with_empty.write_text(jsonl({"text": "Call me Ishmael."}, {"text": ""}, {"text": " \n"}, {"text": "Some years ago."}))
    without = tmp_path / "b.jsonl"
    without.write_text(jsonl({"text": "Call me Ishmael."}, {"text": "Some years ago."}))
    assert tokenize(loaded, str(with_empty))[0].tolist() == tokenize(loaded, str(without))[0].tolist()


def test_tool_calls_and_other_roles_are_refused_but_system_is_fine(loaded, tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(jsonl(chat({"role": "system", "content": "Be brief."}, *GOOD["messages"])) * 40)
    assert (load_blocks(loaded, str(path), 16).train_labels != IGNORE).any()


# ----- data a run cannot learn from -------------------------------------------------------------

def test_chats_without_an_assistant_turn_are_refused(loaded, tmp_path):
    path = tmp_path / "user.jsonl"
    path.write_text(jsonl(USER_ONLY) * 50)
    with pytest.raises(UserError, match="user.jsonl: no record has an assistant turn, so no token carries loss"):
        load_blocks(loaded, str(path), 16)
    ids, labels = cached_tokens(loaded, str(path))  # the tokens are fine; there is simply no target
    assert len(ids) > 100 and (labels == IGNORE).all()


def test_assistant_tokens_only_in_the_held_out_tail_leave_training_nothing(loaded, tmp_path):
    path = tmp_path / "tail.jsonl"
    path.write_text(jsonl(*[USER_ONLY] * 60, GOOD))
    with pytest.raises(UserError, match=r"the \d+ training blocks hold no assistant token .* so there is nothing to learn"):
        load_blocks(loaded, str(path), 16)


def test_no_assistant_token_in_the_held_out_blocks_is_refused(loaded, tmp_path):
    path = tmp_path / "head.jsonl"
    path.write_text(jsonl(*[GOOD] * 20, *[USER_ONLY] * 40))
    with pytest.raises(UserError, match=r"the \d+ held-out blocks hold no assistant token .* no held-out loss to measure"):
        load_blocks(loaded, str(path), 16)


def test_every_block_has_a_next_token_target(loaded, tmp_path, text_file):
    with pytest.raises(UserError, match="--seq-len 1 leaves nothing to learn: the loss is next-token, so a block of T "
                                        "tokens has T-1 targets; use --seq-len 2 or more"):
        load_blocks(loaded, str(text_file), 1)
    with pytest.raises(UserError, match="positive"):
        load_blocks(loaded, str(text_file), 0)
    blocks = load_blocks(loaded, str(text_file), 2)  # the shortest blocks that learn: one target each
    assert ((blocks.train_labels[:, 1:] != IGNORE).sum(1) == 1).all()
    # a chat whose only assistant token sits at each block's first position teaches nothing
    path = tmp_path / "c.jsonl"
    path.write_text(jsonl(GOOD) * 40)
    ids, labels = cached_tokens(loaded, str(path))
    assert (labels != IGNORE).any()
    for seq_len in (2, 3, 16, 64):
        blocks = load_blocks(loaded, str(path), seq_len)
        assert (blocks.train_labels[:, 1:] != IGNORE).any() and (blocks.held_labels[:, 1:] != IGNORE).any()


# ----- positions --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gptneo", "tiny-gemma3"])
def test_max_positions_from_the_config(name):
    m = load_model(name)
    assert max_positions(m) == max_positions(m.model) == max_positions(m.model.config) == 512
    check_positions(m, 512, "--seq-len")
    with pytest.raises(UserError) as e:
        check_positions(m, 1024, "--seq-len")
    assert str(e.value) == f"--seq-len 1024 is more than {name}'s 512 positions; use --seq-len 512 or less"
    with pytest.raises(UserError, match="; shorten the prompt$"):
        check_positions(m, 600, "the prompt and --max-new-tokens", fix="shorten the prompt")


def test_max_positions_rope_scaling_and_unbounded_models():
    from transformers import GPT2Config, LlamaConfig, MambaConfig

    assert max_positions(GPT2Config(n_positions=128)) == 128
    yarn = LlamaConfig(max_position_embeddings=4096, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                   "original_max_position_embeddings": 4096})
    assert max_positions(yarn) == 16384
    llama3 = LlamaConfig(max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0})
    assert max_positions(llama3) == 131072
    assert max_positions(MambaConfig()) is None
    check_positions(MambaConfig(), 10**6, "--seq-len")


def test_load_blocks_refuses_a_seq_len_past_the_models_positions(text_file):
    gpt2 = load_model("tiny-gpt2")
    with pytest.raises(UserError, match="^--seq-len 513 is more than tiny-gpt2's 512 positions; use --seq-len 512 or less$"):
        load_blocks(gpt2, str(text_file), 513)
    assert load_blocks(gpt2, str(text_file), 512).train_ids.shape[1] == 512


# ----- model files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    m = load_model("tiny-llama")
    folder = tmp_path_factory.mktemp("model") / "tiny"
    m.model.save_pretrained(folder)
    m.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from peftlab.export import export_model

    m = load_model("tiny-llama")
    return export_model(m.model, m.tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf", dtype="q8_0")


def config_with(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def cut(name, keep):
    def edit(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:keep])
    return edit


@pytest.mark.parametrize("edit, words", [
    (lambda f: (f / "config.json").write_text("{}"), "config.json names no model_type (it holds an empty object)"),
    (lambda f: (f / "config.json").write_text("[]"), "config.json names no model_type (it holds a list, not an object)"),
    (lambda f: (f / "config.json").write_text("{oops"), "config.json is not valid JSON (Expecting property name"),
    (lambda f: (f / "config.json").write_bytes(b'{"model_type": "caf\xe9"}'), "config.json is not UTF-8 text"),
    (config_with(model_type="xyzzy"), "config.json: unknown model_type 'xyzzy'; transformers"),
    (config_with(model_type="lama"), "unknown model_type 'lama' (did you mean: llama"),
    (config_with(model_type="t5"), "config.json: model_type 't5' is not a causal language model"),
    (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "has no tokenizer files"),
    (config_with(hidden_size=128), "the weights do not fit config.json: lm_head.weight is (264, 64) in the weights but "
     "(264, 128) by the config (21 tensors differ)"),
    (config_with(num_hidden_layers=3), "the weights lack 9 tensors config.json asks for (e.g. model.layers.2."),
    (cut("model.safetensors", 1000), "model.safetensors is truncated: 1,000 bytes, fewer than its safetensors header needs"),
    (cut("model.safetensors", 4), "model.safetensors is truncated"),
    (cut("model.safetensors", -1000), "model.safetensors is truncated: its header lists"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"),
     "model.safetensors is not a readable safetensors file (its header is damaged)"),
    (lambda f: (f / "model.safetensors").unlink(), "no file named model.safetensors"),
])
def test_damaged_model_folders_are_one_line(model_folder, tmp_path, edit, words):
    folder = tmp_path / "m"
    shutil.copytree(model_folder, folder)
    edit(folder)
    with pytest.raises(UserError) as e:
        load_model(str(folder))
    assert words in str(e.value) and str(folder) in str(e.value) and "\n" not in str(e.value)


def test_a_whole_model_folder_and_gguf_still_load(model_folder, gguf_file):
    ids = torch.tensor([[1, 2, 3]])
    assert load_model(str(model_folder)).model(input_ids=ids).logits.shape == (1, 3, 264)
    check_gguf(gguf_file)
    assert load_model(str(gguf_file)).model(input_ids=ids).logits.shape[:2] == (1, 3)


@pytest.mark.parametrize("make, words", [
    (lambda g: g[:100], "is truncated: its GGUF header needs at least"),
    (lambda g: g[:4096], "is truncated: its GGUF header needs at least"),
    (lambda g: b"GGUF\x03\x00\x00\x00\x01", "is truncated: its GGUF header needs at least 24 bytes but the file has 9"),
    (lambda g: b"GGUF", "is truncated"),
    (lambda g: g[: len(g) - 5000], "is truncated: tensor '"),
    (lambda g: b"GGUF" + b"\x07\x00\x00\x00" + g[8:], "GGUF version 7; peftlab reads versions 2 and 3"),
    (lambda g: b"", "is not a GGUF file (it is empty)"),
    (lambda g: b"PK\x03\x04 this is a zip", "is not a GGUF file (it does not start with the bytes 'GGUF')"),
    (lambda g: b"GGUF\x03\x00\x00\x00" + b"\xff" * 40, "is damaged or truncated: its GGUF header runs past the end"),
])
def test_damaged_gguf_files_are_one_line(gguf_file, tmp_path, make, words):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(make(gguf_file.read_bytes()))
    with pytest.raises(UserError) as e:
        load_model(str(bad))
    assert words in str(e.value) and str(bad) in str(e.value)


def test_a_real_gguf_cut_inside_its_header(tmp_path):
    real = assets.cache_dir() / "smollm2-135m" / assets.ASSETS["smollm2-135m"].filename
    if not real.is_file():
        pytest.skip("needs: peftlab fetch smollm2-135m")
    with real.open("rb") as f:
        head = f.read(4096)
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(UserError, match="cut.gguf is truncated: its GGUF header needs at least 4,09"):
        load_model(str(tmp_path / "cut.gguf"))
    check_gguf(real)  # the whole file passes


# ----- the cache --------------------------------------------------------------------------------

def test_a_cache_that_is_a_file(loaded, tmp_path, monkeypatch, text_file):
    monkeypatch.setenv("PEFTLAB_CACHE", str(text_file))
    want = f"PEFTLAB_CACHE={text_file} is a file, not a folder; point PEFTLAB_CACHE at a folder peftlab can write to"
    for call in (assets.cache_dir, lambda: load_blocks(loaded, str(text_file), 16), lambda: assets.asset_path("alice")):
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value) == want
    monkeypatch.setattr(assets, "_download", lambda *a: pytest.fail("downloaded into a broken cache"))
    with pytest.raises(UserError, match="is a file, not a folder"):
        assets.fetch("alice")


def test_a_cache_that_cannot_be_written_costs_only_the_caching(loaded, tmp_path, monkeypatch, capsys, text_file):
    blocked = text_file / "cache"  # below a file: no one can make it, not even root
    monkeypatch.setenv("PEFTLAB_CACHE", str(blocked))
    want = load_blocks(loaded, str(text_file), 16)
    for _ in range(2):
        capsys.readouterr()
        got = load_blocks(loaded, str(text_file), 16)
        assert torch.equal(got.train_ids, want.train_ids) and torch.equal(got.held_labels, want.held_labels)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"peftlab: warning: could not write the token cache in {blocked}")
    monkeypatch.setattr(assets, "_download", lambda *a: pytest.fail("downloaded into a broken cache"))
    with pytest.raises(UserError, match=f"cannot write to PEFTLAB_CACHE={blocked} .*; point PEFTLAB_CACHE at a folder"):
        assets.fetch("alice")
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder(loaded, tmp_path, monkeypatch, capsys, text_file):
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        monkeypatch.setenv("PEFTLAB_CACHE", str(cache))
        load_blocks(loaded, str(text_file), 16)
        assert "could not write the token cache" in capsys.readouterr().err
        with pytest.raises(UserError, match=f"cannot write to PEFTLAB_CACHE={cache}"):
            assets.fetch("alice")
        assert not any(cache.iterdir())
    finally:
        cache.chmod(0o755)


def test_a_damaged_token_cache_file_is_tokenized_again(loaded, tmp_path, monkeypatch, text_file):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    want = cached_tokens(loaded, str(text_file))[0]
    (cached,) = (tmp_path / "cache" / "tokens").iterdir()
    cached.write_bytes(cached.read_bytes()[:50])
    assert cached_tokens(loaded, str(text_file))[0].tolist() == want.tolist()
    assert cached_tokens(loaded, str(text_file))[0].tolist() == want.tolist()  # and the file was replaced
    assert [p.name for p in (tmp_path / "cache" / "tokens").iterdir()] == [cached.name]


# ----- any file at all ------------------------------------------------------------------------

KEYS = st.sampled_from(["text", "messages", "conversations", "prompt", "completion", "instruction", "input", "output",
                        "role", "content"]) | st.text(max_size=4)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "bot"]) | SCALARS,
                                 "content": SCALARS})
VALUES = st.recursive(SCALARS | MESSAGE, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS, kids, max_size=4),
                      max_leaves=12)


def as_file(rows, suffix) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8", "surrogatepass")
    if suffix == ".json":
        return json.dumps(rows).encode()
    keys = sorted({str(k) for r in rows if isinstance(r, dict) for k in r}) or ["text"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(keys)
    for r in rows:
        r = r if isinstance(r, dict) else {"text": r}
        w.writerow([v if isinstance(v, str) else json.dumps(v) for v in (r.get(k, "") for k in keys)])
    return buf.getvalue().encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rows=st.lists(VALUES, max_size=8), good=st.integers(0, 12), suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
       raw=st.none() | st.binary(max_size=64))
def test_any_record_file_is_read_or_refused_in_one_line(loaded, own_cache, rows, good, suffix, raw):
    """Random JSON values (some of them records, some broken, some good chats) and random bytes,
    as .jsonl, .json and .csv: load_blocks either packs them or raises one line of UserError."""
    rows = rows + [GOOD] * good
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(raw if raw is not None else as_file(rows, suffix))
        try:
            blocks = load_blocks(loaded, str(path), 16)
        except UserError as e:
            assert len(str(e).splitlines()) == 1, str(e)
        else:
            assert (blocks.train_labels[:, 1:] != IGNORE).any() and (blocks.held_labels[:, 1:] != IGNORE).any()
