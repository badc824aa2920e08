"""(IA)³: closed-form counts, identity at init, equality with HF peft, multiplicative merge, errors."""

import copy

import pytest
import torch

from conftest import ARCHS, n_trainable, need_assets, perturb, sample_ids
from method_checks import (checkpointing_keeps_gradients, compiles_like_eager, merges_exactly, named_and_routed,
                           peft_agrees, starts_at_the_base)
from peftlab import load_model, prepare
from peftlab.errors import UserError
from peftlab.methods.attach import attached
from peftlab.methods.ia3 import DEFAULTS, from_peft
from peftlab.methods.targets import dims, linear_layers

# peft's defaults, written out per architecture: (path endings of targets, of feedforward targets)
DEFAULT = {
    "tiny-llama": ((".k_proj", ".v_proj", ".down_proj"), (".down_proj",)),
    "tiny-gemma3": ((".q_proj", ".v_proj", ".down_proj"), (".down_proj",)),
    "tiny-gptneo": ((".q_proj", ".v_proj", ".c_proj"), (".c_proj",)),
    "tiny-gpt2": ((".c_attn", ".mlp.c_proj"), (".mlp.c_proj",)),
}


def closed_form(model, targets, feedforward) -> int:
    """Σ out over ordinary targets + Σ in over feedforward ones."""
    total = 0
    for path, layer in linear_layers(model).items():
        if targets is None or path.endswith(targets):
            d_in, d_out = dims(layer)
            total += d_in if path.endswith(feedforward) else d_out
    return total


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_are_out_plus_feedforward_in(arch):
    targets, ff = DEFAULT[arch]
    model = load_model(arch).model
    prepare(model, "ia3")
    assert n_trainable(model) == closed_form(model, targets, ff) > 0
    model = load_model(arch).model
    prepare(model, "ia3:targets=all-linear")
    assert n_trainable(model) == closed_form(model, None, ff)


def test_counts_on_chosen_layers_and_feedforward():
    model = load_model("tiny-llama").model  # hidden 64, k/v 32, MLP 128, 2 blocks
    prepare(model, "ia3:targets=q_proj+up_proj+down_proj,feedforward=up_proj,layers=1")
    assert n_trainable(model) == 64 + 64 + 64  # q out, up in (feedforward), down out (ordinary now)


def test_defaults_are_pefts():
    from peft.utils import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
                            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

    for mtype, (targets, ff) in DEFAULTS.items():
        assert set(targets) == set(TARGETS[mtype]) and set(ff) == set(FF[mtype]), mtype


@pytest.mark.parametrize("arch", ARCHS)
def test_starts_at_the_base(arch):
    starts_at_the_base(arch, "ia3:targets=all-linear", atol=0)


def peft_config(arch, **kw):
    from peft import IA3Config

    return IA3Config(fan_in_fan_out=arch == "tiny-gpt2", **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_agrees_on_its_defaults(arch, tmp_path):
    peft_agrees(arch, "ia3", peft_config(arch), tmp_path)


def test_peft_agrees_on_some_blocks_and_all_linear(tmp_path):
    # a block subset is written as regexes (IA3Config has no layers_to_transform)
    paths = "|".join(rf"model\.layers\.1\.{p}" for p in (r"self_attn\.k_proj", r"self_attn\.v_proj", r"mlp\.down_proj"))
    peft_agrees("tiny-llama", "ia3:layers=1", peft_config("tiny-llama", target_modules=paths,
                                                         feedforward_modules=r"model\.layers\.1\.mlp\.down_proj"), tmp_path / "a")
    # GPT-2 has c_proj twice: only the MLP's is feedforward
    peft_agrees("tiny-gpt2", "ia3:targets=all-linear", peft_config("tiny-gpt2", target_modules="all-linear",
                                                                   feedforward_modules=["mlp.c_proj"]), tmp_path / "b")


def test_forward_is_the_formula():
    loaded = load_model("tiny-gpt2")
    prepare(loaded.model, "ia3")
    perturb(loaded.model, 0.3)
    block = loaded.model.transformer.h[0]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    qkv, mlp = block.attn.c_attn, block.mlp.c_proj  # Conv1D: weight (in, out)
    l_out, l_in = qkv.ia3["default"].l, mlp.ia3_in["default"].l
    assert l_out.shape == (192, 1) and l_in.shape == (1, 128)  # peft's ia3_l shapes
    torch.testing.assert_close(qkv(x), l_out.reshape(-1) * (x @ qkv.weight + qkv.bias))
    h = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mlp(h), (l_in.reshape(-1) * h) @ mlp.weight + mlp.bias)


def test_two_active_adapters_multiply(tmp_path):
    from peftlab import adapters
    from peftlab.artifacts import load, save

    loaded = load_model("tiny-llama")
    prepare(loaded.model, "ia3:name=a")
    perturb(loaded.model, 0.2, seed=1)
    other = load_model("tiny-llama")
    prepared = prepare(other.model, "ia3:name=b")
    perturb(other.model, 0.2, seed=2)
    load(loaded.model, save(other.model, prepared, tmp_path / "b"), name="b")
    adapters.set_active(loaded.model, "a", "b")
    ids = sample_ids(loaded)
    both = loaded.model(input_ids=ids).logits
    with torch.no_grad():  # fold b into a: l_a ← l_a ⊙ l_b
        for _, _, slot in attached(loaded.model):
            slot["a"].l.mul_(slot["b"].l)
    adapters.set_active(loaded.model, "a")
    torch.testing.assert_close(both, loaded.model(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_merges_exactly(arch):
    merges_exactly(arch, "ia3:targets=all-linear")  # GPT-2 and GPT-Neo: biases scale too


def test_merge_with_a_zero_in_l_unmerges_exactly():
    from peftlab.merge import merge, unmerge

    loaded = load_model("tiny-gptneo")
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    prepare(loaded.model, "ia3")
    with torch.no_grad():
        for _, _, slot in attached(loaded.model):
            slot["default"].l.view(-1)[:3] = 0
    merge(loaded.model)
    unmerge(loaded.model)
    for n, p in loaded.model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


def test_delta_weight_is_the_merged_change():
    loaded = load_model("tiny-llama")
    prepare(loaded.model, "ia3")
    perturb(loaded.model, 0.2)
    for _, layer, slot in attached(loaded.model):
        child = slot["default"]
        w = layer.weight.detach().clone()
        delta = child.delta_weight(layer)
        child.merge(layer)
        torch.testing.assert_close(layer.weight - w, delta, atol=1e-6, rtol=0)
        child.unmerge(layer)


@pytest.mark.parametrize("arch", ARCHS)
def test_named_and_routed(arch):
    named_and_routed(arch, "ia3")


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointing_keeps_gradients(arch):
    checkpointing_keeps_gradients(arch, "ia3")


def test_compiles_like_eager(text_file):
    compiles_like_eager("ia3", text_file)


def test_reads_pefts_config_forms():
    step = from_peft({"peft_type": "IA3", "target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}, "x")
    assert step.options["feedforward"] == ("mlp.c_proj",) and step.options["targets"] == ()
    step = from_peft({"peft_type": "IA3", "target_modules": None, "feedforward_modules": r".*\.down_proj"}, "x")
    assert step.options == {"feedforward_regex": r".*\.down_proj"}
    with pytest.raises(UserError, match="exclude_modules"):
        from_peft({"peft_type": "IA3", "exclude_modules": ["lm_head"]}, "x")
    with pytest.raises(UserError, match="cannot carry"):
        from_peft({"peft_type": "IA3", "feedforward_modules": r"(down_proj)+"}, "x")


@pytest.mark.parametrize("arch, spec, says", [
    ("tiny-llama", "ia3:targets=k_prj", "target module 'k_prj' is not in this model (did you mean: k_proj"),
    ("tiny-llama", "ia3:feedforward=up_proj", "feedforward 'up_proj' names none of the targets"),
    ("tiny-gpt2", "ia3:targets=mlp.c_prj", "target 'mlp.c_prj' names no linear layer"),
    ("tiny-llama", "ia3:layers=0-7", "outside the model"),
    ("tiny-llama", "ia3:feedforward_regex=(", "bad feedforward_regex"),
    ("tiny-llama", "ia3:target_regex=(", "bad target_regex"),
    ("tiny-llama", "ia3:r=4", "unknown key 'r'"),
])
def test_errors(arch, spec, says):
    with pytest.raises(UserError, match=says.replace("(", r"\(")):
        prepare(load_model(arch).model, spec)


@pytest.mark.slow
def test_smollm2_count_and_pefts_logits(tmp_path):
    from peft import PeftModel

    from peftlab.artifacts import save

    need_assets("smollm2-135m")
    loaded = load_model("smollm2-135m")
    base = copy.deepcopy(loaded.model)
    L, KV, FF = 30, 192, 1536  # layers, k/v width, MLP width (hidden 576)
    prepared = prepare(loaded.model, "ia3")
    assert n_trainable(loaded.model) == L * (KV + KV + FF) == 57_600  # k, v outputs; down_proj input
    perturb(loaded.model, 0.1)
    ids = sample_ids(loaded)
    with torch.no_grad():
        ours = loaded.model(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(base, str(save(loaded.model, prepared, tmp_path / "a"))).eval()(input_ids=ids).logits
    print("max |Δ logit| vs peft on SmolLM2-135M:", (ours - theirs).abs().max().item())
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
