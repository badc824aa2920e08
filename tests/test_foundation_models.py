"""Models: aliases, classification by structure, the asset cache."""

import gc
import os

import pytest
import torch

from peftlab import assets, load_model
from peftlab.components import where
from peftlab.errors import UserError
from peftlab.runtime import store_frozen
from peftlab.tiny import TINY


@pytest.mark.parametrize("name", [n for n in TINY if n.startswith("tiny-")])
def test_tiny_models_are_small_seeded_and_run(name):
    a, b = load_model(name), load_model(name)
    n = sum(p.numel() for p in a.model.parameters())
    assert 10_000 < n < 1_000_000
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    ids = torch.tensor([a.encode("Call me Ishmael.")])
    assert a.model(input_ids=ids).logits.shape == (1, ids.shape[1], a.model.config.vocab_size)
    assert a.tokenizer.decode(a.encode("naïve café")) == "naïve café"


def test_components_come_from_structure_not_names():
    gptneo = where(load_model("tiny-gptneo").model)
    assert gptneo["transformer.wte.weight"].component == "embed"
    assert gptneo["transformer.wpe.weight"].component == "embed"
    assert gptneo["transformer.h.1.attn.attention.out_proj.bias"] == type(gptneo["transformer.wte.weight"])("attn.o", 1, True)
    gpt2 = where(load_model("tiny-gpt2").model)
    assert gpt2["transformer.h.0.attn.c_attn.weight"].component == "attn.qkv"
    assert gpt2["transformer.h.0.attn.c_proj.weight"].component == "attn.o"
    assert gpt2["transformer.h.0.mlp.c_proj.weight"].component == "mlp"
    gemma = where(load_model("tiny-gemma3").model)
    assert gemma["model.layers.0.self_attn.q_norm.weight"].component == "norm"
    assert where(load_model("tiny-llama").model)["lm_head.weight"].component == "lm_head"


def test_missing_asset_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="peftlab fetch smollm2-135m"):
        load_model("smollm2-135m")
    with pytest.raises(UserError, match="unknown asset"):
        assets.fetch("nope")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))


def _mapped(path) -> bool:
    """Is `path` memory-mapped into this process? (Linux: /proc/self/maps)"""
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(str(path)) for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_trained_weights_leave_a_loaded_file_only_where_that_frees_it(tmp_path, dtype):
    # safetensors are memory-mapped: a trained fp32 weight left in the file would keep every
    # page read from it (the frozen fp32 weights too, now stored in bf16) for the whole run
    tiny = load_model("tiny-llama")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    model = load_model(str(tmp_path)).model
    weights = tmp_path / "model.safetensors"
    assert _mapped(weights)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(".mlp." in n)
    mlp = next(p for n, p in model.named_parameters() if ".mlp." in n)
    at = mlp.data_ptr()
    store_frozen(model, dtype)
    gc.collect()
    if dtype == torch.bfloat16:  # every frozen weight left the file: the trained ones follow, and the mapping goes
        assert not _mapped(weights)
    else:  # frozen fp32 weights stay in the file: a copy of the trained ones would only hold both
        assert mlp.data_ptr() == at
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if ".mlp." in n else dtype)
        assert torch.equal(p.detach(), before[n].to(p.dtype)), n
    # nothing frozen: no page is left behind (trained ones are copied on their first update), so no copy
    whole = load_model(str(tmp_path)).model
    at = {n: p.data_ptr() for n, p in whole.named_parameters()}
    store_frozen(whole, dtype)
    assert {n: p.data_ptr() for n, p in whole.named_parameters()} == at
