"""VeRA: closed-form counts, shared frozen projections equal to peft's, identity at init,
equality with HF peft both ways, exact merges, native and peft folders that carry A and B."""

import copy

import pytest
import torch

import method_checks as checks
from conftest import ARCHS, linear_dims, n_trainable, need_assets, perturb, sample_ids
from peftlab import load_model, prepare
from peftlab.artifacts import load, native, save
from peftlab.errors import UserError
from peftlab.methods import trainable_parameters
from peftlab.methods.attach import attached
from peftlab.params import count

QV = {"tiny-gpt2": ("c_attn",)}  # GPT-2 keeps q, k, v in one matrix
SPEC = "vera:r=4"


def deltas(model, name="default"):
    return {host: slot[name] for host, _, slot in attached(model, "vera") if name in slot}


def peft_config(arch, **kw):
    from peft import VeraConfig

    leaves = list(QV.get(arch, ("q_proj", "v_proj")))
    return VeraConfig(target_modules=kw.pop("target_modules", leaves), fan_in_fan_out=arch == "tiny-gpt2", **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [SPEC, "vera:r=3,targets=all-linear"])
def test_counts_are_r_plus_m_and_projections_are_shared_and_frozen(arch, spec):
    model = load_model(arch).model
    prepare(model, spec)
    r = int(spec.split("r=")[1].split(",")[0])
    dims = linear_dims(model, None if "all-linear" in spec else QV.get(arch, ("q_proj", "v_proj")))
    assert n_trainable(model) == sum(r + o for _, o in dims)
    found = deltas(model)
    proj = next(iter(found.values())).proj
    assert all(d.proj is proj for d in found.values())  # one module, not a copy per layer
    n_max, m_max = max(i for i, _ in dims), max(o for _, o in dims)
    assert proj.A.shape == (r, n_max) and proj.B.shape == (m_max, r)
    assert not proj.A.requires_grad and not proj.B.requires_grad
    assert all(".proj." not in n for n in trainable_parameters(model))
    assert count(model)["added"] == (sum(r + o for _, o in dims), sum(r + o for _, o in dims) + r * (n_max + m_max))
    assert sum(d.owns for d in found.values()) == 1


def test_counts_for_one_block_of_two_shapes():
    # q: 64->64, v: 64->32 in block 1 of tiny-llama; r = 8
    model = load_model("tiny-llama").model
    prepare(model, "vera:r=8,targets=q_proj+v_proj,layers=1-1")
    assert n_trainable(model) == (8 + 64) + (8 + 32)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])  # layers of several shapes; Conv1D
def test_projections_are_peft_s_for_the_same_key(arch):
    from peft import get_peft_model

    ours = load_model(arch).model
    prepare(ours, "vera:r=4,projection_prng_key=7,targets=all-linear")
    theirs = get_peft_model(load_model(arch).model, peft_config(arch, r=4, projection_prng_key=7, target_modules="all-linear"))
    proj = next(iter(deltas(ours).values())).proj
    assert torch.equal(proj.A, theirs.base_model.vera_A["default"])
    assert torch.equal(proj.B, theirs.base_model.vera_B["default"])


@pytest.mark.parametrize("arch", ARCHS)
def test_starts_at_the_base(arch):
    checks.starts_at_the_base(arch, SPEC)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_agrees(arch, tmp_path):
    checks.peft_agrees(arch, SPEC, peft_config(arch, r=4), tmp_path)


@pytest.mark.parametrize("spec, kw", [
    ("vera:r=6,projection_prng_key=5,d_initial=0.5,save_projection=false,targets=all-linear",
     dict(r=6, projection_prng_key=5, d_initial=0.5, save_projection=False, target_modules="all-linear")),
    ("vera:r=4,targets=q_proj+down_proj,layers=1", dict(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1])),
])
def test_peft_agrees_with_options(spec, kw, tmp_path):
    checks.peft_agrees("tiny-llama", spec, peft_config("tiny-llama", **kw), tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_merges_exactly(arch):
    checks.merges_exactly(arch, "vera:r=4,targets=all-linear")


@pytest.mark.parametrize("arch", ARCHS)
def test_named_and_routed(arch):
    checks.named_and_routed(arch, SPEC)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointing_keeps_gradients(arch):
    checks.checkpointing_keeps_gradients(arch, SPEC)


def test_compiles_like_eager(text_file):
    checks.compiles_like_eager(SPEC, text_file)


def _tampered(arch="tiny-llama"):
    """An adapter whose projections differ from what its key regenerates (e.g. kept in bf16)."""
    loaded = load_model(arch)
    prepared = prepare(loaded.model, "vera:r=4,targets=all-linear")
    perturb(loaded.model, 0.1)
    proj = next(iter(deltas(loaded.model).values())).proj
    with torch.no_grad():
        proj.A.copy_(proj.A.bfloat16().float() + 0.01)
        proj.B.mul_(-1)
    return loaded, prepared, proj


@pytest.mark.parametrize("fmt", ["peft", "peftlab"])
def test_folders_carry_the_projections(fmt, tmp_path):
    loaded, prepared, proj = _tampered()
    ids = sample_ids(loaded)
    want = loaded.model(input_ids=ids).logits
    if fmt == "peft":
        folder = save(loaded.model, prepared, tmp_path / "a")
    else:
        folder = tmp_path / "a"
        folder.mkdir()
        native.save(loaded.model, prepared, folder)
    from safetensors.torch import load_file

    saved = load_file(str(next(folder.glob("*.safetensors"))))
    assert sum(k.endswith(("vera_A", "proj.A")) for k in saved) == 1  # once, not once per layer
    fresh = load_model("tiny-llama")
    load(fresh.model, folder)
    mine = next(iter(deltas(fresh.model).values())).proj
    assert torch.equal(mine.A, proj.A) and torch.equal(mine.B, proj.B)
    torch.testing.assert_close(fresh.model(input_ids=ids).logits, want, atol=1e-6, rtol=0)
    assert n_trainable(fresh.model) == n_trainable(loaded.model)


def test_training_moves_only_the_lambdas(text_file):
    from peftlab import TrainConfig, load_blocks, train

    loaded = load_model("tiny-llama")
    prepared = prepare(loaded.model, SPEC)
    start = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    train(loaded.model, load_blocks(loaded, str(text_file), 32), prepared,
          TrainConfig(steps=2, lr=1e-2, batch_size=2, warmup=0), show=False)
    moved = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, start[n])}
    assert moved == set(trainable_parameters(loaded.model))
    assert all(n.rsplit(".", 1)[-1] in ("lambda_b", "lambda_d") for n in moved)


def test_projections_follow_the_model_across_dtypes():
    model = load_model("tiny-llama").model
    prepare(model, SPEC)
    model.to(torch.float64)
    found = deltas(model).values()
    assert all(d.proj.A.dtype == torch.float64 and d.proj is next(iter(found)).proj for d in found)


def test_low_rank_factors_give_delta_weight():
    model = load_model("tiny-gpt2").model
    prepare(model, "vera:r=4,targets=all-linear")
    perturb(model, 0.1)
    for host, d in deltas(model).items():
        s, B, A = d.low_rank()
        layer = model.get_submodule(host)
        torch.testing.assert_close(s * B @ A, d.delta_weight(layer))
        assert d.delta_weight(layer).shape == (layer.nf, layer.weight.shape[0])


@pytest.mark.parametrize("spec, says", [
    ("vera:targets=q_prj", "target module 'q_prj' is not in this model (did you mean: q_proj"),
    ("vera:r=0", "r=0 is out of range"),
    ("vera:layers=0-7", "outside the model"),
    ("vera:dropout=1.5", "dropout=1.5 is out of range"),
    ("vera:d_initial=big", "d_initial=big is not a number"),
    ("vera:projection_prng_key=-1", "projection_prng_key=-1 is out of range"),
    ("vera:save_projection=maybe", "save_projection=maybe is not a boolean"),
    ("vera:rank=4", "unknown key 'rank'"),
])
def test_errors(spec, says):
    with pytest.raises(UserError, match=says.replace("(", r"\(")):
        prepare(load_model("tiny-llama").model, spec)


def test_peft_bias_option_is_refused(tmp_path):
    import json

    loaded = load_model("tiny-llama")
    folder = save(loaded.model, prepare(loaded.model, SPEC), tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"bias": "vera_only"}))
    with pytest.raises(UserError, match="bias='vera_only' is not supported by peftlab's VeRA"):
        load(load_model("tiny-llama").model, folder)


@pytest.mark.slow
def test_smollm2_counts_and_logits_match_peft():
    need_assets("smollm2-135m")
    from peft import VeraConfig, get_peft_model

    D, L, KV = 576, 30, 192  # hidden, layers, k/v width
    loaded = load_model("smollm2-135m")
    base = copy.deepcopy(loaded.model)
    prepare(loaded.model, "vera")  # r = 256, q_proj + v_proj
    assert n_trainable(loaded.model) == L * ((256 + D) + (256 + KV))  # 38,400
    perturb(loaded.model, 0.1)
    pm = get_peft_model(base, VeraConfig(r=256, target_modules=["q_proj", "v_proj"]))
    proj = next(iter(deltas(loaded.model).values())).proj
    assert torch.equal(proj.A, pm.base_model.vera_A["default"]) and torch.equal(proj.B, pm.base_model.vera_B["default"])
    for host, d in deltas(loaded.model).items():
        theirs = pm.get_submodule("base_model.model." + host)
        with torch.no_grad():
            theirs.vera_lambda_b["default"].copy_(d.lambda_b)
            theirs.vera_lambda_d["default"].copy_(d.lambda_d)
    ids = sample_ids(loaded)
    with torch.no_grad():
        ours, want = loaded.model(input_ids=ids).logits, pm(input_ids=ids).logits
    diff = (ours - want).abs().max().item()
    print(f"max |Δ logit| vs peft on smollm2-135m: {diff:.3g}")
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
