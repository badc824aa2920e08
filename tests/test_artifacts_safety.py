"""Adapter files under stress: bad names, corrupt files, missing keys, another base, crashes."""

import json

import pytest

from conftest import perturb
from peftlab import load_model, prepare
from peftlab.artifacts import load, save
from peftlab.errors import UserError


@pytest.fixture
def lora_dir(tmp_path):
    m = load_model("tiny-llama")
    prepared = prepare(m.model, "lora:r=4")
    perturb(m.model)
    return save(m.model, prepared, tmp_path / "lora")


@pytest.fixture
def native_dir(tmp_path):
    m = load_model("tiny-llama")
    prepared = prepare(m.model, "freeze:train=mlp")
    perturb(m.model)
    return save(m.model, prepared, tmp_path / "native")


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "..", "", "x" * 80])
def test_names_cannot_escape(lora_dir, name):
    with pytest.raises(UserError, match="not allowed"):
        load(load_model("tiny-llama").model, lora_dir, name=name)
    with pytest.raises(UserError):  # '/' already splits a spec into methods
        prepare(load_model("tiny-llama").model, f"lora:name={name}")


@pytest.mark.parametrize("which", ["lora_dir", "native_dir"])
def test_truncated_tensors_are_one_clear_error(which, request):
    folder = request.getfixturevalue(which)
    f = next(folder.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load(load_model("tiny-llama").model, folder)


def test_garbage_config(lora_dir):
    (lora_dir / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load(load_model("tiny-llama").model, lora_dir)


def test_missing_required_keys_and_tensors(lora_dir, native_dir):
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    del cfg["r"]
    (lora_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="lacks the required key 'r'"):
        load(load_model("tiny-llama").model, lora_dir)
    cfg = json.loads((native_dir / "peftlab_config.json").read_text())
    del cfg["strategy"]
    (native_dir / "peftlab_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="lacks the required key 'strategy'"):
        load(load_model("tiny-llama").model, native_dir)


def test_missing_tensor_is_named(lora_dir):
    from safetensors.torch import load_file, save_file

    f = lora_dir / "adapter_model.safetensors"
    tensors = load_file(str(f))
    gone = sorted(tensors)[0]
    del tensors[gone]
    save_file(tensors, str(f))
    with pytest.raises(UserError, match=f"lacks tensor {gone}"):
        load(load_model("tiny-llama").model, lora_dir)


def test_unknown_keys_warn_and_load(lora_dir, native_dir):
    for folder, name in ((lora_dir, "adapter_config.json"), (native_dir, "peftlab_config.json")):
        cfg = json.loads((folder / name).read_text())
        cfg["added_in_2030"] = 1
        (folder / name).write_text(json.dumps(cfg))
        with pytest.warns(UserWarning, match="ignoring unknown key"):
            load(load_model("tiny-llama").model, folder)


def test_another_base_is_refused_with_the_first_offending_tensor(native_dir):
    with pytest.raises(UserError, match="base tensor model.embed_tokens.weight differs"):
        load(load_model("tiny-llama", seed=1).model, native_dir)
    with pytest.raises(UserError, match="made for a llama model, this base is gemma3_text"):
        load(load_model("tiny-gemma3").model, native_dir)


def test_lora_on_another_architecture_names_the_tensor(lora_dir):
    with pytest.raises(UserError, match="lacks tensor base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"):
        load(load_model("tiny-gpt2").model, lora_dir)


def test_a_crash_while_saving_leaves_the_old_adapter(lora_dir, monkeypatch):
    import peftlab.artifacts.hf as hf

    before = {p.name: p.read_bytes() for p in lora_dir.iterdir()}
    m = load_model("tiny-llama")
    prepared = prepare(m.model, "lora:r=4")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf, "write_json", boom, raising=False)
    monkeypatch.setattr("peftlab.files.write_json", boom)
    with pytest.raises(RuntimeError):
        save(m.model, prepared, lora_dir)
    assert {p.name: p.read_bytes() for p in lora_dir.iterdir()} == before
    assert [p.name for p in lora_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_cli_generate_side_by_side_and_corrupt_adapter(cli, lora_dir, native_dir, tmp_path):
    code, out, err = cli("generate", "-m", "tiny-llama", "-p", "Call me", "--max-new-tokens", 5,
                         "--adapter", lora_dir, "--adapter", native_dir)
    assert code == 0, err
    assert "lora" in out and "native" in out and "(base)" in out
    (lora_dir / "adapter_model.safetensors").write_bytes(b"\x00\x01")
    code, out, err = cli("generate", "-m", "tiny-llama", "-p", "Call me", "--adapter", lora_dir)
    assert code == 2 and "not a readable safetensors file" in err and len(err.strip().splitlines()) == 1


def test_train_reports_artifact_size_next_to_the_model(cli, text_file, tmp_path):
    code, out, err = cli("train", "-m", "tiny-llama", "-d", text_file, "-s", "lora:r=4", "--steps", 3, "--seq-len", 32,
                         "-o", tmp_path / "run", "--quiet")
    assert code == 0, err
    assert "adapter:" in out and "the full model is" in out
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
