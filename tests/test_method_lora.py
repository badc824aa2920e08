"""LoRA, rsLoRA, DoRA: closed-form counts, identity at init, equality with HF peft, errors."""

import copy

import pytest
import torch

from conftest import ARCHS, linear_dims, n_trainable, perturb, sample_ids
from peftlab import load_model, prepare
from peftlab.errors import UserError
from peftlab.methods.attach import attached

QV = {"tiny-gpt2": ("c_attn",)}  # GPT-2 keeps q, k, v in one matrix


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec, extra", [("lora:r=4", 0), ("lora:r=3,targets=all-linear", 0), ("dora:r=4", 1)])
def test_counts_are_r_times_m_plus_n(arch, spec, extra):
    model = load_model(arch).model
    prepare(model, spec)
    leaves = None if "all-linear" in spec else QV.get(arch, ("q_proj", "v_proj"))
    r = int(spec.split("r=")[1].split(",")[0])
    assert n_trainable(model) == sum(r * (i + o) + extra * o for i, o in linear_dims(model, leaves))


def test_smollm2_shape_counts():
    # q: 576->576, v: 576->192 in 30 layers; r = 8
    model = load_model("tiny-llama").model
    prepare(model, "lora:r=8,targets=q_proj+v_proj,layers=1-1")
    assert n_trainable(model) == 8 * (64 + 64) + 8 * (64 + 32)


def to_peft(base, ours, spec_kwargs):
    from peft import LoraConfig, get_peft_model

    fan = base.config.model_type == "gpt2"
    pm = get_peft_model(base, LoraConfig(fan_in_fan_out=fan, **spec_kwargs))
    for host_name, _, slot in attached(ours, "lora"):
        delta = slot["default"]
        theirs = pm.get_submodule("base_model.model." + host_name)
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(delta.A)
            theirs.lora_B["default"].weight.copy_(delta.B)
            if delta.magnitude is not None:
                theirs.lora_magnitude_vector["default"].weight.copy_(delta.magnitude)
    return pm


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_same_weights_same_logits_as_hf_peft(arch, variant):
    loaded = load_model(arch)
    base = copy.deepcopy(loaded.model)
    targets = "all-linear" if arch != "tiny-llama" else "q_proj+v_proj"
    prepare(loaded.model, f"lora:r=4,alpha=8,targets={targets},{variant}=true" if variant != "lora" else f"lora:r=4,alpha=8,targets={targets}")
    perturb(loaded.model, 0.1)
    pm = to_peft(base, loaded.model, dict(r=4, lora_alpha=8, target_modules=targets if targets == "all-linear" else targets.split("+"),
                                          use_dora=variant == "dora", use_rslora=variant == "rslora"))
    ids = sample_ids(loaded)
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_pissa_starts_at_the_base_model():
    loaded = load_model("tiny-llama")
    base = copy.deepcopy(loaded.model)
    prepare(loaded.model, "lora:r=4,init=pissa")
    ids = sample_ids(loaded)
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=0)
    delta = next(attached(loaded.model, "lora"))[2]["default"]
    assert delta.B.abs().sum() > 0  # principal directions, not zeros


@pytest.mark.parametrize("spec, says", [
    ("lora:targets=q_prj", "target module 'q_prj' is not in this model (did you mean: q_proj"),
    ("lora:r=0", "r=0 is out of range"),
    ("lora:r=-2", "r=-2 is out of range"),
    ("lora:layers=0-7", "outside the model"),
    ("lora:dropout=1.5", "dropout=1.5 is out of range"),
    ("lora:init=xavier", "choose one of: kaiming, gaussian, pissa"),
    ("lora:rank=4", "unknown key 'rank'"),
])
def test_errors(spec, says):
    with pytest.raises(UserError, match=says.replace("(", r"\(")):
        prepare(load_model("tiny-llama").model, spec)


# ---- peft's LoraConfig in full -------------------------------------------------------------

def _leaves(arch):
    return ("c_attn", "c_fc") if arch == "tiny-gpt2" else ("q_proj", "v_proj")


FULL_CONFIGS = {
    "rank-and-alpha-patterns": (
        lambda a, b: f"lora:r=4,alpha=8,targets={a}+{b},rank_pattern={a}=2,alpha_pattern={b}=3",
        lambda a, b: dict(r=4, lora_alpha=8, target_modules=[a, b], rank_pattern={a: 2}, alpha_pattern={b: 3})),
    "path-pattern": (  # a pattern naming one layer's module by its path
        lambda a, b: f"lora:r=4,targets={a},rank_pattern=1.{'attn' if a == 'c_attn' else 'self_attn'}.{a}=6",
        lambda a, b: dict(r=4, lora_alpha=8, target_modules=[a], rank_pattern={f"1.{'attn' if a == 'c_attn' else 'self_attn'}.{a}": 6})),
    "layers-to-transform": (
        lambda a, b: f"lora:r=4,alpha=8,targets={a}+{b},layers=1",
        lambda a, b: dict(r=4, lora_alpha=8, target_modules=[a, b], layers_to_transform=[1])),
    "lora-bias": (
        lambda a, b: f"lora:r=4,alpha=8,targets={a}+{b},lora_bias=true",
        lambda a, b: dict(r=4, lora_alpha=8, target_modules=[a, b], lora_bias=True)),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(FULL_CONFIGS))
def test_peft_config_features_agree_with_peft(arch, case, tmp_path):
    """rank_pattern, alpha_pattern, layers_to_transform and lora_bias: same tensors, same logits, both ways."""
    from peft import LoraConfig

    from method_checks import peft_agrees

    spec, config = FULL_CONFIGS[case]
    if case == "path-pattern" and arch == "tiny-gptneo":
        pytest.skip("GPT-Neo's attention lives at attn.attention")
    a, b = _leaves(arch)
    peft_agrees(arch, spec(a, b), LoraConfig(fan_in_fan_out=arch == "tiny-gpt2", **config(a, b)), tmp_path)


def test_a_peft_regex_target_and_layers_pattern_load(tmp_path):
    """peft's target_modules as a regex string, and layers_to_transform with layers_pattern."""
    from peft import LoraConfig, get_peft_model

    from peftlab.artifacts import load

    for i, config in enumerate([LoraConfig(r=2, target_modules=r".*\.(q_proj|o_proj)"),
                                LoraConfig(r=2, target_modules=["k_proj"], layers_to_transform=[0], layers_pattern="layers")]):
        pm = get_peft_model(load_model("tiny-llama").model, config)
        perturb(pm, 0.1)
        pm.save_pretrained(str(tmp_path / str(i)))
        ours = load_model("tiny-llama")
        load(ours.model, tmp_path / str(i))
        ids = sample_ids(ours)
        torch.testing.assert_close(ours.model(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_lora_bias_merges_into_the_layer_bias():
    from method_checks import merges_exactly

    merges_exactly("tiny-gpt2", "lora:r=2,targets=c_attn,lora_bias=true")


@pytest.mark.parametrize("spec, says", [
    ("lora:rank_pattern=q_proj", "pattern 'q_proj' is not PATTERN=VALUE"),
    ("lora:rank_pattern=q_proj=x", "x is not a number"),
    ("lora:rank_pattern=q_proj=0", "ranks must be positive"),
])
def test_bad_patterns_are_one_line(spec, says):
    with pytest.raises(UserError, match=says):
        prepare(load_model("tiny-llama").model, spec)


EXCLUDED = {  # per architecture: a list (paths or their endings) and a regex matched in full
    "tiny-llama": (["model.layers.0.self_attn.v_proj", "o_proj"], r".*\.1\.self_attn\.q_proj"),
    "tiny-gemma3": (["model.layers.0.self_attn.v_proj", "o_proj"], r".*\.1\.mlp\.(up|down)_proj"),
    "tiny-gptneo": (["transformer.h.0.attn.attention.v_proj", "out_proj"], r".*\.1\.attn\.attention\.q_proj"),
    "tiny-gpt2": (["transformer.h.0.attn.c_attn", "c_fc"], r"transformer\.h\.1\.attn\.c_proj"),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("form", [0, 1], ids=["list", "regex"])
def test_exclude_modules_as_peft_reads_it(arch, form, tmp_path):
    """peft's exclude_modules (a list: paths or their endings; a string: a regex matched in
    full) and ours (`exclude`, what peft folders carrying it load as): the same layers, logits."""
    excluded = EXCLUDED[arch][form]
    from peft import LoraConfig, get_peft_model

    from peftlab.artifacts import load

    theirs = get_peft_model(load_model(arch).model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                                               exclude_modules=excluded, fan_in_fan_out=arch == "tiny-gpt2"))
    perturb(theirs, 0.1)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = load_model(arch)
    load(ours.model, tmp_path / "theirs")
    hosts = {h for h, _, _ in attached(ours.model, "lora")}
    wanted = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] for n, _ in theirs.named_parameters() if "lora_A" in n}
    assert hosts == wanted and 0 < len(hosts) < len(linear_dims(ours.model))  # some layers were excluded
    ids = sample_ids(ours)
    torch.testing.assert_close(ours.model(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_exclude_removes_layers_and_refuses_to_remove_all():
    model = load_model("tiny-llama").model
    prepare(model, "lora:r=2,targets=all-linear,exclude=mlp")
    assert all("mlp" not in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(UserError, match="exclude=proj removes every chosen layer"):
        prepare(load_model("tiny-llama").model, "lora:r=2,exclude=proj")


MOE = "lora:r=2,alpha=4,targets=,target_parameters=experts.gate_up_proj+experts.down_proj"


def test_moe_expert_parameters_count_r_e_m_plus_n():
    model = load_model("tiny-mixtral").model
    prepare(model, MOE)
    stacks = [p.shape for n, p in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert n_trainable(model) == sum(2 * e * (m + k) for e, m, k in stacks)


@pytest.mark.parametrize("spec, targets", [(MOE, []), (MOE.replace("targets=,", "targets=q_proj,"), ["q_proj"])])
def test_moe_expert_parameters_same_as_peft_target_parameters(spec, targets, tmp_path):
    """peft's LoraConfig(target_parameters=...) on a tiny Mixtral from transformers' own config:
    the same tensor names (peft nests one wrapper per parameter) and shapes, equal logits both ways."""
    from peft import LoraConfig

    from method_checks import peft_agrees

    peft_agrees("tiny-mixtral", spec, LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                  target_parameters=["experts.gate_up_proj", "experts.down_proj"]), tmp_path)


def test_moe_expert_parameters_train_save_and_load_in_peft(text_file, tmp_path):
    """Trained on text, only the expert factors move; the folder is peft's, and peft loads it
    with the trained model's logits; merging folds each expert's update into its stack."""
    from peft import PeftModel

    from method_checks import merges_exactly
    from peftlab import TrainConfig, load_blocks, train
    from peftlab.artifacts import kind, save

    loaded = load_model("tiny-mixtral", seed=0)
    prepared = prepare(loaded.model, MOE)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    records = train(loaded.model, load_blocks(loaded, str(text_file), 32), prepared,
                    TrainConfig(steps=6, lr=1e-2, batch_size=4, warmup=0), show=False)
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    moved = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".lora_param." in n for n in moved)
    ids = sample_ids(loaded)
    want = loaded.model(input_ids=ids).logits
    folder = save(loaded.model, prepared, tmp_path / "moe", base_model="tiny-mixtral")
    assert kind(folder) == "peft"
    theirs = PeftModel.from_pretrained(load_model("tiny-mixtral").model, str(folder))
    torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    merges_exactly("tiny-mixtral", MOE)


def test_moe_expert_parameters_refuse_what_peft_refuses():
    with pytest.raises(UserError, match="target_parameters experts.up names no parameter"):
        prepare(load_model("tiny-mixtral").model, "lora:targets=,target_parameters=experts.up")
    with pytest.raises(UserError, match="takes plain LoRA"):
        prepare(load_model("tiny-mixtral").model, MOE + ",dropout=0.1")


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gptneo", "tiny-gemma3"])
def test_olora_init_equals_peft(arch):
    """init=olora: the same A, B and residual base weight as peft's init_lora_weights="olora",
    so the same logits; such an adapter saves in peftlab's format (its base is the residual)."""
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(load_model(arch).model, LoraConfig(r=4, lora_alpha=8, init_lora_weights="olora",
                                                               target_modules=["q_proj", "v_proj"]))
    ours = load_model(arch)
    base = ours.model(input_ids=sample_ids(ours)).logits
    prepare(ours.model, "lora:r=4,alpha=8,init=olora")
    mine = {h: (s["default"], layer) for h, layer, s in attached(ours.model, "lora")}
    for host, (delta, layer) in mine.items():
        peft_layer = theirs.base_model.model.get_submodule(host)
        torch.testing.assert_close(delta.A, peft_layer.lora_A["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(delta.B, peft_layer.lora_B["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=0)
    ids = sample_ids(ours)
    torch.testing.assert_close(ours.model(input_ids=ids).logits, base, atol=1e-4, rtol=0)  # starts at the base
    torch.testing.assert_close(ours.model(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, bits, iters", [("tiny-llama", 4, 1), ("tiny-llama", 4, 3), ("tiny-llama", 8, 1),
                                              ("tiny-gptneo", 4, 1), ("tiny-gemma3", 4, 2)])
def test_loftq_init_is_peft_loop_on_the_cpu(arch, bits, iters):
    """init=loftq: the base becomes its quantization, the adapter the best rank-r fit of what
    quantizing lost (peft's loftq_init, which itself needs CUDA, run here with peft's own
    low-rank helper and bitsandbytes on the CPU); the start is closer to the base than the
    quantized base alone, and more rounds do not move it away."""
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    from peftlab.methods.targets import base_weight

    loaded = load_model(arch)
    original = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    ids = sample_ids(loaded)
    want = loaded.model(input_ids=ids).logits
    prepare(loaded.model, f"lora:r=4,alpha=4,init=loftq,loftq_bits={bits},loftq_iter={iters}")
    for host, layer, slot in attached(loaded.model, "lora"):
        w = original[f"{host}.weight"]
        res = w
        for i in range(iters):  # peft's loop (utils/loftq_utils.py), on the CPU
            if bits == 4:
                q = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
                deq = bnb.functional.dequantize_4bit(q.data, q.quant_state)
            else:
                q, scales, _ = bnb.functional.int8_vectorwise_quant(res.contiguous())
                deq = bnb.functional.int8_vectorwise_dequant(q, scales).float()
            out = _low_rank_decomposition(w - deq, reduced_rank=4)
            res = w - out["L"] @ out["R"]
        delta = slot["default"]
        torch.testing.assert_close(base_weight(layer), deq, atol=1e-6, rtol=0)
        torch.testing.assert_close(delta.delta_weight(), out["L"] @ out["R"], atol=1e-5, rtol=0)
        assert (base_weight(layer) + delta.delta_weight() - w).norm() < (deq - w).norm()
    got = loaded.model(input_ids=ids).logits
    assert (got - want).abs().max() < 0.1


def test_svd_and_qr_inits_save_in_peftlab_format_and_load_back(tmp_path):
    from peftlab.artifacts import kind, load, save

    for init in ("olora", "loftq"):
        loaded = load_model("tiny-llama")
        prepared = prepare(loaded.model, f"lora:r=4,init={init}")
        perturb(loaded.model, 0.05)
        ids = sample_ids(loaded)
        folder = save(loaded.model, prepared, tmp_path / init)
        assert kind(folder) == "peftlab"
        fresh = load_model("tiny-llama")
        load(fresh.model, folder)
        torch.testing.assert_close(fresh.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-5, rtol=0)
