"""OFT: closed-form counts, identity at init, equality with HF peft (every variant), the
multiplicative merge, stacked adapters, errors. GPT-2's Conv1D is refused (peft has no form)."""


import pytest
import torch

from conftest import ARCHS, linear_dims, n_trainable, perturb, sample_ids
from method_checks import (checkpointing_keeps_gradients, compiles_like_eager, merges_exactly, named_and_routed,
                           peft_agrees, starts_at_the_base)
from peftlab import adapters, load_model, prepare
from peftlab.artifacts import load, save
from peftlab.errors import UserError
from peftlab.merge import merge, unmerge
from peftlab.methods.attach import attached

LINEAR = [a for a in ARCHS if a != "tiny-gpt2"]  # GPT-2 is all Conv1D (refused below)
# tiny dims: hidden 64, kv 32, mlp 128; every block size below divides 64 and 128


def pairs(b):
    return b * (b - 1) // 2


@pytest.mark.parametrize("arch", LINEAR)
@pytest.mark.parametrize("spec, leaves, count", [
    ("oft:block_size=8", ("q_proj", "v_proj"), lambda n: n // 8 * pairs(8)),
    ("oft:r=4,targets=all-linear", None, lambda n: 4 * pairs(n // 4)),
    ("oft:block_size=16,block_share=true,targets=all-linear", None, lambda n: pairs(16)),
])
def test_counts_are_blocks_times_b_choose_2(arch, spec, leaves, count):
    model = load_model(arch).model
    prepare(model, spec)
    assert n_trainable(model) == sum(count(i) for i, _ in linear_dims(model, leaves))


def test_default_block_size_is_peft_s_32():
    model = load_model("tiny-llama").model
    prepare(model, "oft")
    assert n_trainable(model) == 2 * 2 * (64 // 32) * pairs(32)  # q, v in 2 layers


def peft_config(**kw):
    from peft import OFTConfig

    return OFTConfig(**({"target_modules": ["q_proj", "v_proj"]} | kw))


VARIANTS = [
    ("oft:block_size=8", dict(oft_block_size=8)),
    ("oft:r=4,use_cayley_neumann=false,targets=all-linear", dict(r=4, oft_block_size=0, use_cayley_neumann=False,
                                                                 target_modules="all-linear")),
    ("oft:block_size=16,block_share=true,num_cayley_neumann_terms=3,layers=1",
     dict(oft_block_size=16, block_share=True, num_cayley_neumann_terms=3, layers_to_transform=[1])),
    ("oft:block_size=8,coft=true,eps=0.01,targets=q_proj+down_proj", dict(oft_block_size=8, coft=True, eps=0.01,
                                                                          target_modules=["q_proj", "down_proj"])),
]


@pytest.mark.parametrize("arch", LINEAR)
def test_starts_at_the_base(arch):
    starts_at_the_base(arch, "oft:block_size=8,targets=all-linear", atol=0)


@pytest.mark.parametrize("arch", LINEAR)
@pytest.mark.parametrize("spec, kw", VARIANTS[:2])
def test_peft_agrees(arch, spec, kw, tmp_path):
    peft_agrees(arch, spec, peft_config(**kw), tmp_path)


@pytest.mark.parametrize("spec, kw", VARIANTS[2:])
def test_peft_agrees_block_share_and_coft(spec, kw, tmp_path):
    peft_agrees("tiny-llama", spec, peft_config(**kw), tmp_path)


def test_coft_training_keeps_rotations_small_like_peft():
    """COFT projects θ in place each forward; after a step both sides hold the same tensors."""
    from peft import get_peft_model

    ours = load_model("tiny-llama")
    theirs = get_peft_model(load_model("tiny-llama").model, peft_config(oft_block_size=8, coft=True, eps=0.05))
    prepare(ours.model, "oft:block_size=8,coft=true,eps=0.05")
    perturb(ours.model, 0.3)
    pairs_ = [(slot["default"].weight, theirs.get_submodule("base_model.model." + h).oft_R["default"].weight)
              for h, _, slot in attached(ours.model, "oft")]
    with torch.no_grad():
        for a, b in pairs_:
            b.copy_(a)
    ids = sample_ids(ours)
    for model in (ours.model, theirs):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model(input_ids=ids)  # projects again
    for a, b in pairs_:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        q_norm = (2 * a.pow(2).sum(1)).sqrt()  # ‖Q_i‖_F of each block
        assert (q_norm <= 0.05 / a.shape[0] ** 0.5 * (1 + 1e-5)).all()


@pytest.mark.parametrize("arch", LINEAR)
def test_merges_exactly(arch):
    merges_exactly(arch, "oft:block_size=8,targets=all-linear")


@pytest.mark.parametrize("spec", ["oft:r=4,use_cayley_neumann=false", "oft:block_size=16,block_share=true"])
def test_merges_exactly_variants(spec):
    merges_exactly("tiny-llama", spec)


def test_delta_weight_is_w_m_minus_w_and_cayley_is_orthogonal():
    loaded = load_model("tiny-llama")
    prepare(loaded.model, "oft:block_size=8,use_cayley_neumann=false")
    perturb(loaded.model, 0.3)
    host_name, layer, slot = next(attached(loaded.model, "oft"))
    rot = slot["default"]
    r = rot.rotation()
    eye = torch.eye(8).expand_as(r)
    torch.testing.assert_close(r @ r.transpose(-2, -1), eye, atol=1e-5, rtol=0)
    w = layer.weight.detach().clone()
    dw = rot.delta_weight(layer)
    merge(loaded.model)
    torch.testing.assert_close(layer.weight, w + dw, atol=1e-6, rtol=0)
    unmerge(loaded.model)
    torch.testing.assert_close(layer.weight, w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", LINEAR)
def test_named_and_routed(arch):
    named_and_routed(arch, "oft:block_size=8")


@pytest.mark.parametrize("arch", LINEAR)
def test_checkpointing_keeps_gradients(arch):
    checkpointing_keeps_gradients(arch, "oft:block_size=8,targets=all-linear")


def test_compiles_like_eager(text_file):
    compiles_like_eager("oft:block_size=8", text_file)


def test_two_active_adapters_compose_like_peft(tmp_path):
    """peft rotates the input by each active adapter in turn; so does the pre hook."""
    from peft import PeftModel

    ours = load_model("tiny-llama")
    prepared = prepare(ours.model, "oft:block_size=8,name=a")
    perturb(ours.model, 0.2, seed=1)
    save(ours.model, prepared, tmp_path / "a")
    other = load_model("tiny-llama")
    prepared_b = prepare(other.model, "oft:r=4,use_cayley_neumann=false,name=b")
    perturb(other.model, 0.2, seed=2)
    save(other.model, prepared_b, tmp_path / "b")
    load(ours.model, tmp_path / "b", name="b")
    adapters.set_active(ours.model, "a", "b")
    pm = PeftModel.from_pretrained(load_model("tiny-llama").model, str(tmp_path / "a"), adapter_name="a")
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    ids = sample_ids(ours)
    torch.testing.assert_close(ours.model(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_reads_peft_configs_and_refuses_what_it_cannot_honour(tmp_path):
    from peft import get_peft_model

    pm = get_peft_model(load_model("tiny-llama").model, peft_config(oft_block_size=8, module_dropout=0.1))
    pm.save_pretrained(str(tmp_path / "drop"))  # peft 0.21 never applies module_dropout: read as is
    load(load_model("tiny-llama").model, tmp_path / "drop")
    import json

    cfg_path = tmp_path / "drop" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for change, says in [({"bias": "all"}, "bias='all' is not supported"),
                         ({"peft_version": "0.17.1"}, "Cayley–Neumann form changed in 0.18.0"),
                         ({"r": 4}, "exactly one of r"),
                         ({"oft_block_size": None}, "peft < 0.14")]:
        bad = {k: v for k, v in (cfg | change).items() if v is not None or k != "oft_block_size"}
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=says):
            load(load_model("tiny-llama").model, tmp_path / "drop")


@pytest.mark.parametrize("arch, spec, says", [
    ("tiny-llama", "oft:r=4,block_size=8", "give r .blocks per layer. or block_size, not both"),
    ("tiny-llama", "oft:block_size=24", "block_size=24 does not divide .*q_proj's 64 input features"),
    ("tiny-llama", "oft:r=3", "r=3 blocks do not divide .*q_proj's 64 input features"),
    ("tiny-llama", "oft:block_size=1", "block_size=1 is out of range"),
    ("tiny-llama", "oft:num_cayley_neumann_terms=0", "num_cayley_neumann_terms=0 is out of range"),
    ("tiny-llama", "oft:targets=q_prj", "target module 'q_prj' is not in this model"),
    ("tiny-llama", "oft:module_dropout=0.1", "unknown key 'module_dropout'"),
    ("tiny-gpt2", "oft:block_size=8", "c_attn is a GPT-2 Conv1D layer, which peft's OFT does not support"),
])
def test_errors(arch, spec, says):
    with pytest.raises(UserError, match=says):
        prepare(load_model(arch).model, spec)


def test_peft_refuses_conv1d_too():
    """The reason for the GPT-2 refusal: peft's OFT has no Conv1D layer."""
    from peft import get_peft_model

    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(load_model("tiny-gpt2").model, peft_config(oft_block_size=8, target_modules=["c_attn"]))
