"""Adapters as files: round trips for every method, interop with HF peft both ways."""

import json

import pytest
import torch

from conftest import ARCHS, sample_ids
from method_checks import saves_and_loads
from peftlab import load_model, prepare
from peftlab.artifacts import kind, load, save, size_on_disk

PEFT_FORMAT = ["lora:r=4", "dora:r=4", "lora:r=4,rslora=true,targets=all-linear", "prompt:tokens=4", "prefix:tokens=4",
               "prefix:tokens=4,projection=16"]
NATIVE = ["lora:r=4,init=pissa", "adapter:r=8", "adapter:r=4,placement=pfeiffer", "bitfit:norms=true",
          "freeze:train=mlp", "targeted-qkv:from_layer=1", "schedule:mlp=0,attention=5", "targeted-qkv:from_layer=1/lora:r=4",
          "full"]


def roundtrip(arch, spec, tmp_path):
    return saves_and_loads(arch, spec, tmp_path / "adapter")[0]


@pytest.mark.parametrize("spec", PEFT_FORMAT + NATIVE)
def test_peft_format_wherever_peft_holds_the_strategy(spec, tmp_path):
    """(Every method's round trip on every architecture, and peft loading its folders, are the
    shared checks in test_methods_common.py.)"""
    folder = roundtrip("tiny-llama", spec, tmp_path)
    assert kind(folder) == ("peft" if spec in PEFT_FORMAT else "peftlab")


def test_artifact_is_small(tmp_path):
    folder = roundtrip("tiny-llama", "lora:r=4", tmp_path)
    assert size_on_disk(folder) < 0.1 * sum(p.numel() * 4 for p in load_model("tiny-llama").model.parameters())


def test_qlora_round_trip(tmp_path):
    roundtrip("tiny-llama", "qlora:bits=4,r=4,targets=all-linear", tmp_path)


def peft_trained(arch, kind_, folder):
    """A peft model with non-trivial weights, saved by peft itself."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    base = load_model(arch).model
    config = {
        "lora": LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", task_type=TaskType.CAUSAL_LM),
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, task_type=TaskType.CAUSAL_LM),
        "rslora": LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear", task_type=TaskType.CAUSAL_LM),
        "prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
        "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
    }[kind_]
    pm = get_peft_model(base, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(folder))
    return pm


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind_", ["lora", "dora", "rslora", "prompt", "prefix"])
def test_peftlab_loads_what_peft_saved(arch, kind_, tmp_path):
    pm = peft_trained(arch, kind_, tmp_path / "p")
    ours = load_model(arch)
    load(ours.model, tmp_path / "p")
    ids = sample_ids(ours)
    torch.testing.assert_close(ours.model(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_peft_config_keys(tmp_path):
    loaded = load_model("tiny-gpt2")
    save(loaded.model, prepare(loaded.model, "lora:r=4,alpha=8,rslora=true"), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["use_rslora"] and config["fan_in_fan_out"]
    assert config["target_modules"] == ["c_attn"]


def test_second_adapter_gets_its_own_name(tmp_path):
    a = load_model("tiny-llama")
    save(a.model, prepare(a.model, "adapter:r=4"), tmp_path / "a")
    base = load_model("tiny-llama")
    load(base.model, tmp_path / "a", name="first")
    load(base.model, tmp_path / "a", name="second")
    names = [n for n, _ in base.model.named_parameters() if ".adapter." in n]
    assert any(".adapter.first." in n for n in names) and any(".adapter.second." in n for n in names)
