"""LoHa: closed-form counts 2r(m+n), identity at init, equality with HF peft's LOHA, merging,
names and routing, checkpointing, compile, errors."""

import json

import pytest
import torch

from conftest import ARCHS, linear_dims, n_trainable, perturb, sample_ids
from method_checks import (checkpointing_keeps_gradients, compiles_like_eager, merges_exactly, named_and_routed,
                           native_where_peft_refuses, peft_agrees, starts_at_the_base)
from peftlab import load_model, prepare
from peftlab.artifacts import load, save
from peftlab.errors import UserError
from peftlab.methods.attach import attached

QV = {"tiny-gpt2": ("c_attn",)}  # GPT-2 keeps q, k, v in one matrix
PEFT_ARCHS = [a for a in ARCHS if a != "tiny-gpt2"]  # peft's LoHa refuses GPT-2's Conv1D (see below)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", ["loha:r=4", "loha:r=3,targets=all-linear"])
def test_counts_are_2r_times_m_plus_n(arch, spec):
    model = load_model(arch).model
    prepare(model, spec)
    r = int(spec.split("r=")[1].split(",")[0])
    leaves = None if "all-linear" in spec else QV.get(arch, ("q_proj", "v_proj"))
    assert n_trainable(model) == sum(2 * r * (i + o) for i, o in linear_dims(model, leaves))


def test_rank_pattern_counts_and_scales():
    model = load_model("tiny-llama").model
    prepare(model, "loha:r=4,alpha=8,rank_pattern=v_proj=2,alpha_pattern=layers.1.self_attn.q_proj=2")
    # q: 64 -> 64 at r=4, v: 64 -> 32 at r=2, in 2 blocks
    assert n_trainable(model) == 2 * (2 * 4 * (64 + 64) + 2 * 2 * (64 + 32))
    scales = {h: s["default"].scaling for h, _, s in attached(model, "loha")}
    assert scales["model.layers.0.self_attn.q_proj"] == 2.0 and scales["model.layers.1.self_attn.q_proj"] == 0.5
    assert scales["model.layers.0.self_attn.v_proj"] == 4.0


def test_delta_is_the_hadamard_product():
    model = load_model("tiny-llama").model
    prepare(model, "loha:r=2,alpha=6")
    perturb(model, 0.3)
    d = next(attached(model, "loha"))[2]["default"]
    want = 3.0 * (d.w1_a @ d.w1_b) * (d.w2_a @ d.w2_b)
    torch.testing.assert_close(d.delta_weight(), want)
    assert torch.linalg.matrix_rank(d.delta_weight()) <= 4  # rank ≤ r²


@pytest.mark.parametrize("arch", ARCHS)
def test_starts_at_the_base(arch):
    starts_at_the_base(arch, "loha:r=4,targets=all-linear")


@pytest.mark.parametrize("arch", PEFT_ARCHS)
def test_peft_agrees(arch, tmp_path):
    from peft import LoHaConfig

    peft_agrees(arch, "loha:r=4,alpha=6", LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "v_proj"]), tmp_path)


def test_peft_agrees_on_patterns_and_layers(tmp_path):
    from peft import LoHaConfig

    config = LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0})
    peft_agrees("tiny-llama", "loha:r=4,alpha=8,targets=q_proj+v_proj+down_proj,layers=1,rank_pattern=v_proj=2,"
                "alpha_pattern=down_proj=3", config, tmp_path)


def test_peft_refuses_gpt2_conv1d_which_peftlab_trains(tmp_path):
    """peft 0.21's LoHa takes nn.Linear (and convolutions) only; peftlab trains GPT-2's Conv1D
    through its (out, in) layout and saves it in its own format."""
    from peft import LoHaConfig

    native_where_peft_refuses("tiny-gpt2", "loha:r=4", LoHaConfig(r=4, target_modules=["c_attn"]), tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_merges_exactly(arch):
    merges_exactly(arch, "loha:r=4,targets=all-linear")


@pytest.mark.parametrize("arch", ARCHS)
def test_named_and_routed(arch):
    named_and_routed(arch, "loha:r=4")


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointing_keeps_gradients(arch):
    checkpointing_keeps_gradients(arch, "loha:r=4")


def test_compiles_like_eager(text_file):
    compiles_like_eager("loha:r=4", text_file)


def test_bf16_forward_builds_delta_in_the_activation_dtype():
    loaded = load_model("tiny-llama")
    prepare(loaded.model, "loha:r=4")
    perturb(loaded.model, 0.1)
    ids = sample_ids(loaded)
    want = loaded.model(input_ids=ids).logits
    loaded.model.to(torch.bfloat16)
    got = loaded.model(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("spec, says", [
    ("loha:targets=q_prj", "target module 'q_prj' is not in this model \\(did you mean: q_proj"),
    ("loha:r=0", "r=0 is out of range"),
    ("loha:alpha=-1", "alpha=-1.0 is out of range"),
    ("loha:layers=0-7", "outside the model"),
    ("loha:rank_pattern=q_proj=0", "rank_pattern gives model.layers.0.self_attn.q_proj rank 0"),
    ("loha:rank=4", "unknown key 'rank'"),
])
def test_errors(spec, says):
    with pytest.raises(UserError, match=says):
        prepare(load_model("tiny-llama").model, spec)


@pytest.mark.parametrize("key, value, says", [
    ("rank_dropout", 0.1, "rank_dropout=0.1 is not supported by peftlab \\(only 0\\)"),
    ("module_dropout", 0.2, "module_dropout=0.2 is not supported"),
])
def test_peft_options_we_cannot_honour_are_refused(tmp_path, key, value, says):
    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "loha:r=4")
    folder = save(loaded.model, prepared, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {key: value}))
    with pytest.raises(UserError, match=says):
        load(load_model("tiny-llama").model, folder)
