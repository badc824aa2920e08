"""freeze, full and the two presets: exact counts, selections and errors."""

import pytest

from conftest import ARCHS, n_trainable
from peftlab import load_model, prepare
from peftlab.errors import UserError


def test_gptneo_125m_presets_match_the_studies():
    for spec, want in [("freeze-attention", 56_707_584), ("freeze:train=mlp+norm", 56_707_584),
                       ("targeted-qkv", 10_616_832), ("full", 125_198_592)]:
        model = load_model("gptneo-125m-shape").model
        prepare(model, spec)
        assert n_trainable(model) == want, spec
    assert sum(p.numel() for p in model.parameters()) == 125_198_592


@pytest.mark.parametrize("arch", ARCHS)
def test_targeted_qkv_counts_q_k_v_of_late_blocks(arch):
    model = load_model(arch).model
    prepare(model, "targeted-qkv:from_layer=1")
    c = model.config
    d, heads = c.hidden_size, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head = getattr(c, "head_dim", None) or d // heads
    want = {  # one block (index 1) of W_Q, W_K, W_V
        "tiny-llama": d * heads * head + 2 * d * kv * head,
        "tiny-gemma3": d * heads * head + 2 * d * kv * head,
        "tiny-gptneo": 3 * d * d,
        "tiny-gpt2": 3 * d * d + 3 * d,  # fused c_attn weight and bias
    }[arch]
    assert n_trainable(model) == want


def test_layers_include_exclude():
    model = load_model("tiny-llama").model
    prepare(model, "freeze:train=mlp,layers=1")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("model.layers.1.mlp.") for n in names)
    prepare(model, "freeze:include=up_proj,exclude=layers\\.0\\.")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.layers.1.mlp.up_proj.weight"]


@pytest.mark.parametrize("spec, says", [
    ("freeze", "say what trains"),
    ("freeze:train=mlp,layers=3-5", "outside the model"),
    ("freeze:train=mlp,layers=x", "bad layer range"),
    ("freeze:include=(", "bad regular expression"),
    ("targeted-qkv:from_layer=9", "outside the model"),
    ("freeze:train=atention", "did you mean: attention"),
])
def test_errors(spec, says):
    with pytest.raises(UserError, match=says.replace("(", r"\(")):
        prepare(load_model("tiny-llama").model, spec)


def test_gpt2_cannot_split_its_fused_qkv():
    with pytest.raises(UserError, match="fuses q, k and v"):
        prepare(load_model("tiny-gpt2").model, "freeze:train=q")
