"""LoKr: peft's factorization, closed-form counts for each shape branch, identity at init,
equality with HF peft's LOKR, merging, names and routing, checkpointing, compile, errors; and
the count and logits on the real SmolLM2-135M (slow)."""

import copy
import json

import pytest
import torch

from conftest import ARCHS, linear_dims, n_trainable, need_assets, perturb, sample_ids
from method_checks import (checkpointing_keeps_gradients, compiles_like_eager, merges_exactly, named_and_routed,
                           native_where_peft_refuses, peft_agrees, starts_at_the_base)
from peftlab import load_model, prepare
from peftlab.artifacts import load, save
from peftlab.errors import UserError
from peftlab.methods.attach import attached
from peftlab.methods.lokr import factorization

QV = {"tiny-gpt2": ("c_attn",)}  # GPT-2 keeps q, k, v in one matrix
PEFT_ARCHS = [a for a in ARCHS if a != "tiny-gpt2"]  # peft's LoKr refuses GPT-2's Conv1D (see below)


def lokr_count(d_in, d_out, r, decompose_both=False, factor=-1):
    """Closed form: (a, b) = f(out), (c, d) = f(in); W1 (a, c) and W2 (b, d), each whole or r(rows + cols)."""
    a, b = factorization(d_out, factor)
    c, d = factorization(d_in, factor)
    w1 = r * (a + c) if decompose_both and r < max(a, c) / 2 else a * c
    w2 = r * (b + d) if r < max(b, d) / 2 else b * d
    return w1 + w2


def test_factorization_is_pefts():
    from peft.tuners.lokr.layer import factorization as theirs

    for dim in [*range(1, 300), 576, 1536, 2048, 4096, 11008]:
        for f in (-1, 0, 1, 2, 3, 4, 7, 8, 16):
            assert factorization(dim, f) == theirs(dim, f), (dim, f)
    assert [factorization(d) for d in (64, 32, 128, 192, 576, 1536)] == [(8, 8), (4, 8), (8, 16), (12, 16), (24, 24), (32, 48)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec, r, both, factor", [
    ("lokr:r=8", 8, False, -1),  # q 64→64: W1 8×8, W2 8×8 whole (8 ≥ 8/2)
    ("lokr:r=2,targets=all-linear", 2, False, -1),  # W2 low rank (2 < 4)
    ("lokr:r=1,targets=all-linear,decompose_both=true", 1, True, -1),  # W1 low rank too
    ("lokr:r=2,targets=all-linear,decompose_factor=4,decompose_both=true", 2, True, 4),
])
def test_counts_match_the_closed_form(arch, spec, r, both, factor):
    model = load_model(arch).model
    prepare(model, spec)
    leaves = None if "all-linear" in spec else QV.get(arch, ("q_proj", "v_proj"))
    assert n_trainable(model) == sum(lokr_count(i, o, r, both, factor) for i, o in linear_dims(model, leaves))


def test_each_shape_branch_on_tiny_llama():
    """q: 64→64 = (8·8)×(8·8); v: 64→32 = (4·8)×(8·8); 2 blocks."""
    shapes = {}
    for spec in ("lokr:r=8", "lokr:r=2", "lokr:r=2,decompose_both=true"):
        model = load_model("tiny-llama").model
        prepare(model, spec)
        d = {h: s["default"] for h, _, s in attached(model, "lokr")}["model.layers.0.self_attn.v_proj"]
        shapes[spec] = ({k: tuple(p.shape) for k, p in d.named_parameters()}, n_trainable(model))
    assert shapes["lokr:r=8"] == ({"w1": (4, 8), "w2": (8, 8)}, 2 * ((64 + 64) + (32 + 64)))
    assert shapes["lokr:r=2"] == ({"w1": (4, 8), "w2_a": (8, 2), "w2_b": (2, 8)}, 2 * ((64 + 2 * 16) + (32 + 2 * 16)))
    assert shapes["lokr:r=2,decompose_both=true"] == (
        {"w1_a": (4, 2), "w1_b": (2, 8), "w2_a": (8, 2), "w2_b": (2, 8)}, 2 * (2 * 2 * 16 + (2 * 12 + 2 * 16)))


def test_delta_is_the_kronecker_product():
    model = load_model("tiny-llama").model
    prepare(model, "lokr:r=2,alpha=6,decompose_both=true")
    perturb(model, 0.3)
    d = next(attached(model, "lokr"))[2]["default"]
    w1, w2 = d.w1_a @ d.w1_b, d.w2_a @ d.w2_b  # (8, 8) each
    dw = d.delta_weight()
    assert dw.shape == (64, 64)
    torch.testing.assert_close(dw[8 * 2 + 3, 8 * 5 + 1], 3.0 * w1[2, 5] * w2[3, 1])
    torch.testing.assert_close(dw, 3.0 * torch.kron(w1, w2))


@pytest.mark.parametrize("arch", ARCHS)
def test_starts_at_the_base(arch):
    starts_at_the_base(arch, "lokr:r=2,targets=all-linear,decompose_both=true")


def test_lycoris_init_starts_at_the_base_with_w1_nonzero():
    starts_at_the_base("tiny-llama", "lokr:r=2,init=lycoris,targets=all-linear")
    model = load_model("tiny-llama").model
    prepare(model, "lokr:r=2,init=lycoris")
    d = next(attached(model, "lokr"))[2]["default"]
    assert d.w1.abs().sum() > 0 and d.w2_b.abs().sum() == 0


@pytest.mark.parametrize("arch, spec, kwargs", [
    ("tiny-llama", "lokr:r=2,alpha=6", dict(r=2, alpha=6)),
    ("tiny-gptneo", "lokr:r=8,targets=all-linear", dict(r=8, target_modules="all-linear")),
    ("tiny-gemma3", "lokr:r=1,decompose_both=true,targets=all-linear",
     dict(r=1, decompose_both=True, target_modules="all-linear")),
    ("tiny-llama", "lokr:r=2,decompose_factor=4,decompose_both=true,init=lycoris,targets=q_proj+down_proj,layers=1,"
     "rank_pattern=down_proj=1,alpha_pattern=q_proj=3",
     dict(r=2, decompose_factor=4, decompose_both=True, init_weights="lycoris", target_modules=["q_proj", "down_proj"],
          layers_to_transform=[1], rank_pattern={"down_proj": 1}, alpha_pattern={"q_proj": 3.0})),
])
def test_peft_agrees(arch, spec, kwargs, tmp_path):
    from peft import LoKrConfig

    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    peft_agrees(arch, spec, LoKrConfig(**kwargs), tmp_path)


def test_peft_refuses_gpt2_conv1d_which_peftlab_trains(tmp_path):
    """peft 0.21's LoKr takes nn.Linear (and convolutions) only; peftlab trains GPT-2's Conv1D
    through its (out, in) layout and saves it in its own format."""
    from peft import LoKrConfig

    native_where_peft_refuses("tiny-gpt2", "lokr:r=2,targets=all-linear", LoKrConfig(r=4, target_modules=["c_attn"]), tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_merges_exactly(arch):
    merges_exactly(arch, "lokr:r=2,targets=all-linear")


@pytest.mark.parametrize("arch", ARCHS)
def test_named_and_routed(arch):
    named_and_routed(arch, "lokr:r=2")


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointing_keeps_gradients(arch):
    checkpointing_keeps_gradients(arch, "lokr:r=2,decompose_both=true")


def test_compiles_like_eager(text_file):
    compiles_like_eager("lokr:r=2", text_file)


@pytest.mark.parametrize("spec, says", [
    ("lokr:targets=q_prj", "target module 'q_prj' is not in this model \\(did you mean: q_proj"),
    ("lokr:r=0", "r=0 is out of range"),
    ("lokr:decompose_factor=-2", "decompose_factor=-2 is out of range"),
    ("lokr:init=zeros", "choose one of: peft, lycoris"),
    ("lokr:decompose_both=maybe", "decompose_both=maybe is not a boolean"),
    ("lokr:rank_pattern=v_proj=-1", "rank_pattern gives model.layers.0.self_attn.v_proj rank -1"),
])
def test_errors(spec, says):
    with pytest.raises(UserError, match=says):
        prepare(load_model("tiny-llama").model, spec)


@pytest.mark.parametrize("key, value, says", [
    ("rank_dropout", 0.1, "rank_dropout=0.1 is not supported by peftlab \\(only 0\\)"),
    ("module_dropout", 0.5, "module_dropout=0.5 is not supported"),
])
def test_peft_options_we_cannot_honour_are_refused(tmp_path, key, value, says):
    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, "lokr:r=2")
    folder = save(loaded.model, prepared, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {key: value}))
    with pytest.raises(UserError, match=says):
        load(load_model("tiny-llama").model, folder)


@pytest.mark.slow
def test_smollm2_count_and_logits_match_peft():
    """SmolLM2-135M: hidden 576 = 24·24, k/v 192 = 12·16, MLP 1536 = 32·48, 30 blocks; r = 8.
    q, o: W1 24×24 + W2 8·(24+24) = 960; k, v: W1 12×24 + W2 8·(16+24) = 608;
    gate, up: W1 32×24 + W2 8·(48+24) = 1344; down: W1 24×32 + W2 8·(24+48) = 1344."""
    need_assets("smollm2-135m")
    from peft import LoKrConfig, get_peft_model

    loaded = load_model("smollm2-135m")
    base = copy.deepcopy(loaded.model)
    prepare(loaded.model, "lokr:r=8,targets=all-linear")
    assert n_trainable(loaded.model) == 30 * (2 * 960 + 2 * 608 + 3 * 1344) == 215_040
    perturb(loaded.model, 0.05)
    pm = get_peft_model(base, LoKrConfig(r=8, alpha=8, target_modules="all-linear"))
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == 215_040
    for host, _, slot in attached(loaded.model, "lokr"):
        theirs = pm.get_submodule("base_model.model." + host)
        with torch.no_grad():
            for name, p in slot["default"].named_parameters():
                getattr(theirs, "lokr_" + name)["default"].copy_(p)
    ids = sample_ids(loaded)
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5, rtol=0)
