"""Prompt and prefix tuning: counts, equality with HF peft, the reparametrisation fold."""

import copy

import pytest
import torch

from conftest import ARCHS, n_trainable, perturb, sample_ids
from peftlab import load_model, prepare
from peftlab.errors import UserError
from peftlab.methods.prefix import kv_shape


@pytest.mark.parametrize("arch", ARCHS)
def test_counts(arch):
    model = load_model(arch).model
    prepare(model, "prompt:tokens=7")
    assert n_trainable(model) == 7 * model.config.hidden_size
    model = load_model(arch).model
    prepare(model, "prefix:tokens=5")
    kv_heads, head_dim = kv_shape(model.config)
    assert n_trainable(model) == 2 * 5 * kv_heads * head_dim * model.config.num_hidden_layers


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_same_weights_same_logits_and_loss_as_hf_peft(arch, kind):
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    loaded = load_model(arch)
    base = copy.deepcopy(loaded.model)
    prepare(loaded.model, f"{kind}:tokens=5")
    perturb(loaded.model, 0.05)
    config = (PromptTuningConfig if kind == "prompt" else PrefixTuningConfig)(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5)
    pm = get_peft_model(base, config)
    mine = loaded.model._modules[kind]["default"]
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(mine.weight if kind == "prompt" else mine.prefix)
    ids = sample_ids(loaded)
    ours, theirs = loaded.model(input_ids=ids, labels=ids), pm(input_ids=ids, labels=ids)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)


def test_prefix_projection_folds_to_the_same_prefixes():
    loaded = load_model("tiny-llama")
    prepare(loaded.model, "prefix:tokens=4,projection=32")
    perturb(loaded.model, 0.1)
    p = loaded.model._modules["prefix"]["default"]
    assert n_trainable(loaded.model) == 4 * 32 + (32 * 32 + 32) + (32 * 2 * 2 * 32 + 2 * 2 * 32)
    ids = sample_ids(loaded)
    before = loaded.model(input_ids=ids).logits
    p.fold()
    assert p.transform is None and p.prefix.shape == (4, 2 * 2 * 32)
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, before, atol=1e-6, rtol=0)


def test_prompt_text_init_uses_the_text_embeddings():
    loaded = load_model("tiny-llama")
    prepare(loaded.model, "prompt:tokens=6,init=text,text=whale", loaded.tokenizer)
    w = loaded.model._modules["prompt"]["default"].weight
    table = loaded.model.get_input_embeddings().weight
    ids = loaded.tokenizer("whale", add_special_tokens=False)["input_ids"]
    assert torch.equal(w[:5], table[ids]) and torch.equal(w[5], table[ids[0]])


@pytest.mark.parametrize("spec, says", [("prompt:tokens=0", "tokens=0 is out of range"),
                                        ("prefix:tokens=-1", "tokens=-1 is out of range"),
                                        ("prompt:init=zeros", "choose one of")])
def test_errors(spec, says):
    with pytest.raises(UserError, match=says):
        prepare(load_model("tiny-llama").model, spec)
