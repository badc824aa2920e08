"""Models: aliases, classification by structure, the asset cache."""

import pytest
import torch

from peftlab import assets, load_model
from peftlab.components import where
from peftlab.errors import UserError
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
