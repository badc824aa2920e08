"""Modules to save: full copies of named modules. Counts (tied lm_head too), identity at init,
equality with HF peft's LoraConfig(modules_to_save=...), merging (refused when tied), errors."""

import pytest
import torch

import method_checks as mc
from conftest import ARCHS, n_trainable, perturb, sample_ids
from peftlab import load_model, prepare
from peftlab.errors import UserError
from peftlab.merge import merge, merge_and_unload

NORM = {"tiny-gpt2": "ln_f", "tiny-gptneo": "ln_f"}  # the final norm's leaf name (else "norm")
EMBED = {"tiny-gpt2": "wte", "tiny-gptneo": "wte"}
FAN = {"tiny-gpt2": True}  # GPT-2's Conv1D


def norm(arch):
    return NORM.get(arch, "norm")


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_are_the_modules_sizes(arch):
    """Σ parameters of every module whose path ends with a name (peft's rule: 'norm' picks
    input_layernorm too); a tied lm_head counts V·d once more, as its own copy."""
    model = load_model(arch).model
    names = ("lm_head", norm(arch))
    hosts = {p: m for p, m in model.named_modules() if p and p.endswith(names)}
    want = sum(p.numel() for m in hosts.values() for p in m.parameters(recurse=False))
    prepare(model, f"modules:names={'+'.join(names)}")
    assert n_trainable(model) == want
    emb = model.get_input_embeddings().weight
    assert not emb.requires_grad and want >= emb.numel()


def test_a_path_picks_one_module():
    model = load_model("tiny-llama").model
    prepare(model, "modules:names=model.norm")
    assert n_trainable(model) == model.config.hidden_size


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_match_peft(arch):
    from peft import LoraConfig, get_peft_model

    names = ["lm_head", EMBED.get(arch, "embed_tokens"), norm(arch)]
    theirs = get_peft_model(load_model(arch).model, LoraConfig(r=4, modules_to_save=names, fan_in_fan_out=FAN.get(arch, False)))
    ours = load_model(arch).model
    prepare(ours, f"lora:r=4/modules:names={'+'.join(names)}")
    assert n_trainable(ours) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_starts_at_the_base(arch):
    mc.starts_at_the_base(arch, f"modules:names=lm_head+{norm(arch)}", atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_as_peft_inside_lora(arch, tmp_path):
    from peft import LoraConfig

    names = ["lm_head", norm(arch)]
    config = LoraConfig(r=4, modules_to_save=names, fan_in_fan_out=FAN.get(arch, False))
    mc.peft_agrees(arch, f"lora:r=4/modules:names={'+'.join(names)}", config, tmp_path)


def test_same_as_peft_with_tokens_and_embedding(tmp_path):
    """modules_to_save and trainable_token_indices in one LoRA config; a copied embedding."""
    from peft import LoraConfig

    mc.peft_agrees("tiny-llama", "lora:r=4/modules:names=lm_head/tokens:ids=64+68",
                   LoraConfig(r=4, modules_to_save=["lm_head"], trainable_token_indices=[64, 68]), tmp_path / "a")
    mc.peft_agrees("tiny-gemma3", "lora:r=4/modules:names=embed_tokens",
                   LoraConfig(r=4, modules_to_save=["embed_tokens"]), tmp_path / "b")


@pytest.mark.parametrize("arch", ARCHS)
def test_merges_exactly(arch):
    names = "lm_head+" + norm(arch) if arch == "tiny-llama" else norm(arch)  # lm_head is tied elsewhere
    mc.merges_exactly(arch, f"modules:names={names}")


def test_tied_copy_is_its_own_and_refuses_to_merge():
    loaded = load_model("tiny-gpt2")
    ids = sample_ids(loaded)
    prepare(loaded.model, "modules:names=lm_head")
    perturb(loaded.model)
    emb = loaded.model.get_input_embeddings().weight
    before = emb.detach().clone()
    loaded.model(input_ids=ids).logits.sum().backward()
    assert emb.grad is None and torch.equal(emb, before)  # the embedding (= base lm_head) stays
    with pytest.raises(UserError, match="tied"):
        merge(loaded.model)
    with pytest.raises(UserError, match="tied"):
        merge_and_unload(loaded.model)


TIED = ["tiny-gemma3", "tiny-gpt2", "tiny-gptneo"]


@pytest.mark.parametrize("arch", TIED)
def test_tie_shares_one_trained_copy_between_tied_modules(arch, text_file):
    """tie=true (peft's ensure_weight_tying): lm_head's copy and the embedding's are one tensor,
    trained once and counted once; the tied base weight itself stays frozen."""
    from peftlab import TrainConfig, load_blocks, train

    loaded = load_model(arch, seed=0)
    model = loaded.model
    base = model.get_input_embeddings().weight.detach().clone()
    prepared = prepare(model, "modules:names=lm_head,tie=true")
    assert n_trainable(model) == base.numel()
    copies = {p: m for p, m in model.named_modules() if type(m).__name__ == "ModuleCopy"}
    weights = {id(m.module.weight) for m in copies.values()}
    assert len(copies) == 2 and len(weights) == 1
    train(model, load_blocks(loaded, str(text_file), 32), prepared, TrainConfig(steps=3, lr=1e-2, batch_size=2), show=False)
    trained = next(iter(copies.values())).module.weight
    assert not torch.equal(trained, base)  # it learned
    assert torch.equal(model.get_input_embeddings().weight, base)  # the base stays


@pytest.mark.parametrize("arch", ["tiny-gemma3", "tiny-gptneo"])
def test_tie_same_as_peft_ensure_weight_tying(arch, tmp_path):
    """peft's LoraConfig(modules_to_save=[lm_head], ensure_weight_tying=True) and ours: the same
    tensors, equal logits both ways."""
    from peft import LoraConfig

    targets = ["q_proj"] if arch == "tiny-gemma3" else ["q_proj", "v_proj"]
    mc.peft_agrees(arch, f"lora:r=2,targets={'+'.join(targets)}/modules:names=lm_head,tie=true",
                   LoraConfig(r=2, lora_alpha=4, target_modules=targets, modules_to_save=["lm_head"], ensure_weight_tying=True),
                   tmp_path)


@pytest.mark.parametrize("arch", ["tiny-gemma3", "tiny-gpt2"])
def test_tie_survives_save_load_and_merge(arch, tmp_path):
    """The trained output layer survives saving (both formats), loading and merging: the merged
    model's embedding and lm_head are the one trained matrix, logits as the adapter's; unmerge
    gives the base back."""
    from peftlab.artifacts import load, save
    from peftlab.merge import unmerge

    for spec in ("modules:names=lm_head,tie=true", "lora:r=2/modules:names=lm_head,tie=true"):
        if arch == "tiny-gpt2" and spec.startswith("lora"):
            spec = "lora:r=2,targets=c_attn/modules:names=lm_head,tie=true"
        loaded = load_model(arch)
        base = loaded.model.get_input_embeddings().weight.detach().clone()
        prepared = prepare(loaded.model, spec)
        perturb(loaded.model, 0.1)
        ids = sample_ids(loaded)
        want = loaded.model(input_ids=ids).logits
        fresh = load_model(arch)
        load(fresh.model, save(loaded.model, prepared, tmp_path / spec.replace("/", "_").replace(":", "_")))
        torch.testing.assert_close(fresh.model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        merge(fresh.model)
        torch.testing.assert_close(fresh.model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        emb, head = fresh.model.get_input_embeddings().weight, fresh.model.get_output_embeddings().weight
        assert emb is head and not torch.equal(emb, base)
        unmerge(fresh.model)
        torch.testing.assert_close(fresh.model.get_input_embeddings().weight, base, atol=0, rtol=0)
        plain = merge_and_unload(fresh.model)
        torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_tie_on_an_untied_model_is_refused():
    with pytest.raises(UserError, match="tie=true, but lm_head's weight is tied to no other module"):
        prepare(load_model("tiny-llama").model, "modules:names=lm_head,tie=true")


@pytest.mark.parametrize("arch", ARCHS)
def test_named_and_routed(arch):
    mc.named_and_routed(arch, "modules:names=lm_head")


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointing_keeps_gradients(arch):
    mc.checkpointing_keeps_gradients(arch, f"modules:names=lm_head+{norm(arch)}")


@pytest.mark.parametrize("names", ["norm", "lm_head"])
def test_training_loss_sees_the_copy(names):
    """The training loop's chunked loss equals the model's own loss, gradients included."""
    mc.chunked_loss_agrees("tiny-gpt2" if names == "lm_head" else "tiny-llama", f"modules:names={names}")


def test_compiles_like_eager(text_file):
    mc.compiles_like_eager("modules:names=lm_head+norm", text_file)


@pytest.mark.parametrize("spec, says", [
    ("modules:names=lm_haed", "'lm_haed' is not in this model (did you mean: lm_head"),
    ("modules:names=layers.0", "model.layers.0 is a block of modules"),
    ("modules:names=", "give the modules to train"),
    ("modules:nmes=lm_head", "unknown key 'nmes'"),
])
def test_errors(spec, says):
    with pytest.raises(UserError, match=says.replace("(", r"\(")):
        prepare(load_model("tiny-llama").model, spec)


def test_peft_ensure_weight_tying_reads_as_tie():
    from peftlab.artifacts.hf import steps_of

    steps = steps_of({"peft_type": "LORA", "r": 4, "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True}, "x")
    assert steps[1].method == "modules" and steps[1].options == {"names": ("embed_tokens",), "tie": True}
