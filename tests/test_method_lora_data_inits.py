"""LoRA initialised from data: init=eva and init=corda. The same A, B, ranks, alphas and
residual base as peft's own (get_peft_model + initialize_lora_eva_weights / preprocess_corda)
on the same calibration batches; saved as the plain LoRA they amount to, which peft and
peftlab load on the original base with the trained model's logits; every mistake one line."""

import warnings

import pytest
import torch

from conftest import ARCHS, perturb
from peftlab import load_model, prepare
from peftlab.errors import UserError
from peftlab.methods.attach import attached

# Targets peft's EVA and CorDA both take as a list (peft's CorDA does not expand "all-linear").
TARGETS = {"tiny-llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
           "tiny-gptneo": ["q_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
           "tiny-gpt2": ["c_attn", "c_fc", "c_proj"],
           "tiny-gemma3": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def calibration(arch, n=6, batch=2, seq=48, padded=False):
    g = torch.Generator().manual_seed(0)
    vocab = load_model(arch).model.config.vocab_size
    out = [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long)} for _ in range(n)]
    if padded:  # padding and tokens without a label take no part (peft's default label mask)
        out[1]["attention_mask"][0, 40:] = 0
        out[2]["labels"] = out[2]["input_ids"].masked_fill(torch.arange(seq) < 10, -100)
    return out


def peft_model(arch, r, **config):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(load_model(arch).model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[arch],
                                                             fan_in_fan_out=arch == "tiny-gpt2", **config))


def same_layers(theirs, ours, base_too=False):
    """Every LoRA layer equal (A, B, scaling; the base weight too), none on one side only."""
    mine = {h: (s["default"], layer) for h, layer, s in attached(ours, "lora")}
    for name, m in theirs.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            delta, layer = mine.pop(name)
            torch.testing.assert_close(delta.A, m.lora_A["default"].weight, atol=1e-6, rtol=0)
            torch.testing.assert_close(delta.B, m.lora_B["default"].weight, atol=1e-6, rtol=0)
            assert delta.scaling == pytest.approx(m.scaling["default"], rel=1e-12)
            if base_too:
                torch.testing.assert_close(layer.weight, m.base_layer.weight, atol=1e-6, rtol=0)
    assert not mine, f"LoRA only here: {list(mine)}"
    return True


def patterns(items):
    return {k: float(v) for k, _, v in (i.rpartition("=") for i in items)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", ["eva_tau=0.9", "eva_tau=0.95,eva_rho=1.5,eva_adjust=false"])
def test_eva_equals_peft(arch, options):
    """A = the converged components, the rank budget shared out as peft shares it (layers that
    see the same input share one PCA), alphas adjusted, rank-0 layers dropped; equal logits."""
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    opts = dict(kv.split("=") for kv in options.split(","))
    batches = calibration(arch, padded=True)
    theirs = peft_model(arch, 3, init_lora_weights="eva", eva_config=EvaConfig(
        tau=float(opts["eva_tau"]), rho=float(opts.get("eva_rho", 2.0)), adjust_scaling_factors="eva_adjust" not in opts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initialize_lora_eva_weights(theirs, dataloader=batches, show_progress_bar=False)
    ours = load_model(arch).model
    prepared = prepare(ours, f"lora:r=3,targets={'+'.join(TARGETS[arch])},init=eva,{options}", calibration=batches)
    assert same_layers(theirs, ours)
    config, saved = theirs.peft_config["default"], prepared.saved[0].options
    assert patterns(saved["rank_pattern"]) == config.rank_pattern
    assert patterns(saved["alpha_pattern"]) == pytest.approx(config.alpha_pattern)
    ids = batches[0]["input_ids"]
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_eva_whitens_as_peft():
    """eva_whiten: A's rows divided by √singular values (layers with inputs of their own: peft
    divides a shared PCA's rows in place once per layer that shares it)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    batches = calibration("tiny-llama")
    theirs = get_peft_model(load_model("tiny-llama").model, LoraConfig(
        r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"], init_lora_weights="eva",
        eva_config=EvaConfig(tau=0.9, whiten=True)))
    initialize_lora_eva_weights(theirs, dataloader=batches, show_progress_bar=False)
    ours = load_model("tiny-llama").model
    prepare(ours, "lora:r=4,targets=o_proj+down_proj,init=eva,eva_tau=0.9,eva_whiten=true", calibration=batches)
    assert same_layers(theirs, ours)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_equals_peft(arch, mode):
    """A, B from the SVD of W·C and the residual base W − s·BA, as peft's preprocess_corda and
    corda_init compute them (one sequence per forward pass, as peft's hook needs); the model
    starts at its base."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    batches = [b["input_ids"][:1] for b in calibration(arch)]
    rslora = arch == "tiny-gemma3"
    plain = load_model(arch).model
    config = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS[arch], fan_in_fan_out=arch == "tiny-gpt2",
                        init_lora_weights="corda", corda_config=CordaConfig(corda_method=mode), use_rslora=rslora)
    preprocess_corda(plain, config, run_model=lambda: [plain(input_ids=b) for b in batches])
    theirs = get_peft_model(plain, config)
    ours = load_model(arch).model
    ids = batches[0]
    want = ours(input_ids=ids).logits
    spec = f"lora:r=2,targets={'+'.join(TARGETS[arch])},init=corda,corda_method={mode},rslora={str(rslora).lower()}"
    prepare(ours, spec, calibration=batches)
    assert same_layers(theirs, ours, base_too=True)
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(input_ids=ids).logits, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("init", ["eva", "corda"])
def test_saved_as_plain_lora_that_peft_loads_on_the_original_base(arch, init, tmp_path):
    """Trained, then saved in peft's format as plain LoRA (EVA: its ranks and alphas as
    rank_pattern / alpha_pattern; CorDA: rank 2r, s·[B, −B₀][A; A₀], relative to the original
    base); peft and peftlab load it onto a fresh base with the trained model's logits."""
    from peft import PeftModel

    from peftlab.artifacts import kind, load, save

    batches = calibration(arch)
    loaded = load_model(arch)
    prepared = prepare(loaded.model, f"lora:r=2,targets={'+'.join(TARGETS[arch])},init={init},eva_tau=0.9",
                       calibration=batches)
    perturb(loaded.model, 0.05)  # stands in for training: every A and B moves
    ids = batches[0]["input_ids"]
    want = loaded.model(input_ids=ids).logits
    folder = save(loaded.model, prepared, tmp_path / init)
    assert kind(folder) == "peft"
    theirs = PeftModel.from_pretrained(load_model(arch).model, folder)
    torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    fresh = load_model(arch)
    load(fresh.model, folder)
    torch.testing.assert_close(fresh.model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    ranks = {h: s["default"].A.shape[0] for h, _, s in attached(fresh.model, "lora")}
    trained = {h: s["default"].A.shape[0] for h, _, s in attached(loaded.model, "lora")}
    assert ranks == {h: (2 if init == "corda" else 1) * r for h, r in trained.items()}


def test_refusals_are_one_line():
    model = load_model("tiny-llama").model
    with pytest.raises(UserError, match=r"init=eva initialises from the model's activations on data: give calibration"):
        prepare(model, "lora:init=eva")
    with pytest.raises(UserError, match="init=corda takes plain LoRA"):
        prepare(load_model("tiny-llama").model, "lora:init=corda,dora=true", calibration=calibration("tiny-llama"))
    with pytest.raises(UserError, match=r"components need 2×40 ≤ the 64 inputs .* lower r or eva_rho"):
        prepare(load_model("tiny-llama").model, "lora:r=20,init=eva", calibration=calibration("tiny-llama"))
    with pytest.raises(UserError, match=r"still moved after 3 calibration batches; raise calibration_batches="):
        prepare(load_model("tiny-llama").model, "lora:r=2,init=eva,eva_tau=1,calibration_batches=3",
                calibration=calibration("tiny-llama"))
    with pytest.raises(UserError, match="calibration data holds no batch"):
        prepare(load_model("tiny-llama").model, "lora:init=corda", calibration=[])
    with pytest.raises(UserError, match="a calibration batch should be"):
        prepare(load_model("tiny-llama").model, "lora:init=corda", calibration=["text"])


def test_after_prompt_tuning_the_virtual_positions_count():
    """A step that prepends virtual tokens (prompt tuning) before an init from data: the layers
    see k more positions than the batch has; they take part, and nothing breaks."""
    batches = calibration("tiny-llama")
    model = load_model("tiny-llama").model
    prepare(model, "prompt:tokens=3/lora:r=2,init=corda,calibration_batches=2", calibration=batches)
    model2 = load_model("tiny-llama").model
    prepare(model2, "prompt:tokens=3/lora:r=2,init=eva,eva_tau=0.9", calibration=batches)
    assert list(attached(model, "lora")) and list(attached(model2, "lora"))

