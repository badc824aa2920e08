"""Adapters name a base that other tools can find: peft's AutoPeftModelForCausalLM loads one."""

import json

import torch
from safetensors import safe_open

from peftlab import artifacts, load_model, prepare
from peftlab.models import reference


def test_packaged_aliases_name_their_upstream_hub_id(tmp_path):
    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "lora:r=2")
    folder = artifacts.save(loaded.model, prepared, tmp_path / "adapter", base_model="smollm2-135m")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["peftlab_base_model"] == "smollm2-135m"  # peftlab's own name, kept
    assert reference("gemma3-270m") == "google/gemma-3-270m" and reference("tiny-llama") == "tiny-llama"
    other = load_model("tiny-llama")
    native = artifacts.save(other.model, prepare(other.model, "adapter:r=2"), tmp_path / "native", base_model=str(tmp_path))
    assert json.loads((native / "peftlab_config.json").read_text())["base_model_name_or_path"] == str(tmp_path.resolve())


def test_auto_peft_model_loads_a_peftlab_adapter_with_a_local_base(cli, text_file, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    base = load_model("tiny-llama")
    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)  # the base named as a relative path, as a user would type it
    code, _, err = cli("train", "-m", "base", "-d", text_file, "-s", "lora:r=4,targets=all-linear",
                       "--steps", 3, "--seq-len", 32, "--lr", 1e-2, "--quiet", "-o", tmp_path / "run")
    assert code == 0, err
    monkeypatch.chdir("/")  # loaded from elsewhere: the adapter must name the base absolutely
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()
    ours = load_model(str(tmp_path / "base"))
    artifacts.load(ours.model, adapter)
    ids = torch.tensor([ours.encode("Call me Ishmael. Some years ago")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours.model(input_ids=ids).logits, atol=1e-5, rtol=0)
