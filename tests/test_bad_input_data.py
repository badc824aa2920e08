"""Bad data, model files and cache settings, run through the real command line (tests/bad_input.py):
each is exit code 2, one line naming the file (and line or record), no traceback, and no file
written or changed."""

import json
import shutil

import pytest

from bad_input import Case

GOOD = {"messages": [{"role": "user", "content": "Say 1."}, {"role": "assistant", "content": "1 it is."}]}
USER_ONLY = {"messages": [{"role": "user", "content": "Say something long enough to fill a block or two."}]}
TRAIN = ["train", "-m", "tiny-llama", "-o", "{tmp}/out", "--steps", "1", "--seq-len", "16", "--quiet"]


def train(data, *extra, model="tiny-llama"):
    argv = TRAIN + ["-d", data, *extra]
    argv[2] = model
    return argv


def lines(name, *rows):
    """setup: write `name` in the world, one JSON value (or raw text) per line, after 20 good records."""
    def setup(world):
        body = [json.dumps(GOOD)] * 20 + [r if isinstance(r, str) else json.dumps(r) for r in rows]
        (world / name).write_text("\n".join(body) + "\n")
    return setup


def raw(name, data: bytes):
    return lambda world: (world / name).write_bytes(data)


def model_copy(edit):
    """setup: {tmp}/m, a copy of the world's tiny-llama folder, then `edit(folder)`."""
    def setup(world):
        shutil.copytree(world / "model", world / "m")
        edit(world / "m")
    return setup


def cut_file(name, keep):
    def edit(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:keep])
    return edit


def real_gguf_head(world):
    from peftlab import assets

    real = assets.cache_dir() / "smollm2-135m" / assets.ASSETS["smollm2-135m"].filename
    if not real.is_file():
        pytest.skip("needs: peftlab fetch smollm2-135m")
    with real.open("rb") as f:
        (world / "cut.gguf").write_bytes(f.read(4096))


def chat(*messages):
    return {"messages": list(messages)}


CASES = [
    # records that are not records
    Case("jsonl-null-line", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: a record must be a JSON object \(\{\.\.\.\}\), found null$",
         setup=lines("bad.jsonl", "null")),
    Case("jsonl-list-line", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: a record must be a JSON object .*found a list$",
         setup=lines("bad.jsonl", "[1, 2, 3]")),
    Case("jsonl-number-line", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: .*found a number$", setup=lines("bad.jsonl", "42")),
    Case("jsonl-string-line", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: .*found a string$", setup=lines("bad.jsonl", '"hi"')),
    Case("json-list-with-null", train("{tmp}/bad.json"), 2, r"bad\.json\[1\]: a record must be a JSON object .*found null$",
         setup=lambda w: (w / "bad.json").write_text(json.dumps([GOOD, None, GOOD]))),
    Case("jsonl-latin1", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: not UTF-8 text \(byte 0xe9 at offset \d+\); save the file as UTF-8$",
         setup=lambda w: (w / "bad.jsonl").write_bytes((json.dumps(GOOD) + "\n").encode() * 20 + b'{"text": "caf\xe9"}\n')),
    Case("json-latin1", train("{tmp}/bad.json"), 2, r"bad\.json:1: not UTF-8 text \(byte 0xe9",
         setup=raw("bad.json", b'[{"text": "caf\xe9"}]')),
    Case("csv-latin1", train("{tmp}/bad.csv"), 2, r"bad\.csv:3: not UTF-8 text \(byte 0xe9",
         setup=raw("bad.csv", b"text\nCall me Ishmael.\ncaf\xe9\n")),
    Case("jsonl-nested-100000-deep", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: JSON nested too deeply to read",
         setup=lines("bad.jsonl", "[" * 100_000)),
    Case("json-nested-100000-deep", train("{tmp}/bad.json"), 2, r"bad\.json: JSON nested too deeply to read",
         setup=lambda w: (w / "bad.json").write_text("[" * 100_000)),
    Case("csv-cell-nested-100000-deep", train("{tmp}/bad.csv"), 2, r"bad\.csv:2: a cell holds JSON nested too deeply",
         setup=lambda w: (w / "bad.csv").write_text('text\n"' + "[" * 100_000 + '"\n')),
    Case("jsonl-lone-surrogate", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: the text holds \\ud800, half of a surrogate pair",
         setup=lines("bad.jsonl", '{"text": "a\\ud800b"}')),
    # chats that are not chats
    Case("chat-null-content", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: message 1 \(user\): content is null, not a string$",
         setup=lines("bad.jsonl", chat({"role": "user", "content": None}, {"role": "assistant", "content": "x"}))),
    Case("chat-number-content", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: message 2 \(assistant\): content is a number, not a string$",
         setup=lines("bad.jsonl", chat({"role": "user", "content": "x"}, {"role": "assistant", "content": 7}))),
    Case("chat-message-without-role", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: a chat must be a list of .*message 1 has no 'role'$",
         setup=lines("bad.jsonl", chat({"content": "x"}))),
    Case("chat-message-without-content", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: .*message 2 has no 'content'$",
         setup=lines("bad.jsonl", chat({"role": "user", "content": "x"}, {"role": "assistant"}))),
    Case("chat-unknown-role", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: message 2 has role 'bot'; use system, user or assistant$",
         setup=lines("bad.jsonl", chat({"role": "user", "content": "x"}, {"role": "bot", "content": "y"}))),
    Case("chat-tool-role", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: message 2 has role 'tool'; .*not tool calls$",
         setup=lines("bad.jsonl", chat({"role": "user", "content": "x"}, {"role": "tool", "content": "42"}))),
    Case("chat-sharegpt", train("{tmp}/bad.jsonl"), 2, r"bad\.jsonl:21: message 1 has 'from'/'value' \(ShareGPT\)",
         setup=lines("bad.jsonl", {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]})),
    # data with nothing to learn
    Case("chat-user-only", train("{tmp}/user.jsonl"), 2, r"user\.jsonl: no record has an assistant turn, so no token carries loss",
         setup=lambda w: (w / "user.jsonl").write_text((json.dumps(USER_ONLY) + "\n") * 40)),
    Case("trl-completion-by-the-user", train("{tmp}/bad.jsonl"), 2,
         r"bad\.jsonl:21: the completion has no assistant message \(roles: user\)",
         setup=lines("bad.jsonl", {"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]})),
    Case("held-out-without-assistant", train("{tmp}/head.jsonl"), 2,
         r"head\.jsonl' in blocks of --seq-len 16: the \d+ held-out blocks hold no assistant token .*no held-out loss",
         setup=lambda w: (w / "head.jsonl").write_text((json.dumps(GOOD) + "\n") * 20 + (json.dumps(USER_ONLY) + "\n") * 40)),
    Case("train-seq-len-1", train("{text}", "--seq-len", "1"), 2,
         r"--seq-len 1 leaves nothing to learn: the loss is next-token, so a block of T tokens has T-1 targets; use --seq-len 2 or more"),
    Case("compare-seq-len-1", ["compare", "-m", "tiny-llama", "-d", "{text}", "-s", "full", "-s", "lora:r=4", "-o", "{tmp}/new-cmp",
                               "--steps", "1", "--seq-len", "1", "--quiet"], 2, r"--seq-len 1 leaves nothing to learn"),
    Case("bench-seq-len-1", ["bench", "-m", "tiny-llama", "-d", "{text}", "--steps", "1", "--seq-len", "1", "--dtype", "fp32"], 2,
         r"--seq-len 1 leaves nothing to learn"),
    Case("train-seq-len-past-gpt2-positions", train("{text}", "--seq-len", "1024", model="tiny-gpt2"), 2,
         r"^peftlab: error: --seq-len 1024 is more than tiny-gpt2's 512 positions; use --seq-len 512 or less$"),
    Case("train-seq-len-past-llama-positions", train("{text}", "--seq-len", "4096"), 2,
         r"--seq-len 4096 is more than tiny-llama's 512 positions; use --seq-len 512 or less$"),
    Case("compare-seq-len-past-positions", ["compare", "-m", "tiny-gptneo", "-d", "{text}", "-s", "full", "-o", "{tmp}/new-cmp",
                                            "--steps", "1", "--seq-len", "600", "--quiet"], 2,
         r"--seq-len 600 is more than tiny-gptneo's 512 positions"),
    # model folders and files
    Case("model-config-empty", train("{text}", model="{tmp}/m"), 2,
         r"m/config\.json names no model_type \(it holds an empty object\)",
         setup=model_copy(lambda f: (f / "config.json").write_text("{}"))),
    Case("model-unknown-type", train("{text}", model="{tmp}/m"), 2, r"m/config\.json: unknown model_type 'xyzzy'",
         setup=model_copy(lambda f: (f / "config.json").write_text(
             json.dumps({**json.loads((f / "config.json").read_text()), "model_type": "xyzzy"})))),
    Case("model-no-tokenizer", train("{text}", model="{tmp}/m"), 2, r"/m has no tokenizer files",
         setup=model_copy(lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")])),
    Case("model-config-larger-than-weights", train("{text}", model="{tmp}/m"), 2,
         r"/m: the weights do not fit config\.json: .* in the weights but .* by the config",
         setup=model_copy(lambda f: (f / "config.json").write_text(
             json.dumps({**json.loads((f / "config.json").read_text()), "vocab_size": 300})))),
    Case("model-config-more-layers", train("{text}", model="{tmp}/m"), 2,
         r"/m: the weights lack 9 tensors config\.json asks for",
         setup=model_copy(lambda f: (f / "config.json").write_text(
             json.dumps({**json.loads((f / "config.json").read_text()), "num_hidden_layers": 3})))),
    Case("model-truncated-safetensors", train("{text}", model="{tmp}/m"), 2,
         r"m/model\.safetensors is truncated: its header lists [\d,]+ bytes but the file has [\d,]+",
         setup=model_copy(cut_file("model.safetensors", -4096))),
    Case("params-model-truncated-header", ["params", "-m", "{tmp}/m", "-s", "lora:r=4"], 2,
         r"m/model\.safetensors is truncated: 100 bytes, fewer than its safetensors header needs",
         setup=model_copy(cut_file("model.safetensors", 100))),
    Case("gguf-magic-and-a-few-bytes", train("{text}", model="{tmp}/bad.gguf"), 2,
         r"bad\.gguf is truncated: its GGUF header needs at least 24 bytes but the file has 9",
         setup=raw("bad.gguf", b"GGUF\x03\x00\x00\x00\x01")),
    Case("gguf-real-cut-at-4096", train("{text}", model="{tmp}/cut.gguf"), 2,
         r"cut\.gguf is truncated: its GGUF header needs at least [\d,]+ bytes but the file has 4,096", setup=real_gguf_head),
    Case("gguf-not-gguf", train("{text}", model="{tmp}/bad.gguf"), 2,
         r"bad\.gguf is not a GGUF file \(it does not start with the bytes 'GGUF'\)", setup=raw("bad.gguf", b"PK\x03\x04 a zip")),
    Case("gguf-empty", ["generate", "-m", "{tmp}/bad.gguf", "-p", "hi"], 2, r"bad\.gguf is not a GGUF file \(it is empty\)",
         setup=raw("bad.gguf", b"")),
    Case("merge-onto-truncated-gguf", ["merge", "-m", "{tmp}/bad.gguf", "-a", "{lora}", "-o", "{tmp}/merged"], 2,
         r"bad\.gguf is damaged or truncated: its GGUF header runs past the end of the file \(48 bytes\)",
         setup=raw("bad.gguf", b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)),
    # the cache
    Case("cache-is-a-file-train", train("{text}"), 2,
         r"PEFTLAB_CACHE=\S+/text\.txt is a file, not a folder; point PEFTLAB_CACHE at a folder peftlab can write to$",
         env={"PEFTLAB_CACHE": "{tmp}/text.txt"}),
    Case("cache-is-a-file-alias", train("moby-dick"), 2, r"PEFTLAB_CACHE=\S+/text\.txt is a file, not a folder",
         env={"PEFTLAB_CACHE": "{tmp}/text.txt"}),
    Case("cache-is-a-file-fetch", ["fetch", "alice"], 2, r"PEFTLAB_CACHE=\S+/text\.txt is a file, not a folder",
         env={"PEFTLAB_CACHE": "{tmp}/text.txt"}),
    Case("cache-below-a-file-fetch", ["fetch", "alice"], 2,
         r"cannot write to PEFTLAB_CACHE=\S+/text\.txt/cache \(Not a directory\); point PEFTLAB_CACHE at a folder",
         env={"PEFTLAB_CACHE": "{tmp}/text.txt/cache"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_data_and_model_input(bad_case, case):
    bad_case(case)
