"""Trainable tokens: count n·d, identity at init, tied output layers, equality with HF peft
(standalone TrainableTokensConfig and LoraConfig(trainable_token_indices=...)), merging, errors."""

import pytest
import torch

import method_checks as mc
from conftest import ARCHS, n_trainable, perturb, sample_ids
from peftlab import load_model, prepare
from peftlab.errors import UserError
from peftlab.merge import merge, unmerge

IDS = [64, 68, 220]  # 64, 68 and 220 occur in the sample text; the base would hide a no-op
SPEC = "tokens:ids=64+68+220"
TIED = {"tiny-llama": False, "tiny-gptneo": True, "tiny-gpt2": True, "tiny-gemma3": True}
FAN = {"tiny-gpt2": True}  # GPT-2's Conv1D


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_are_n_times_d(arch):
    model = load_model(arch).model
    prepare(model, SPEC)
    assert n_trainable(model) == len(IDS) * model.get_input_embeddings().embedding_dim


@pytest.mark.parametrize("arch", ARCHS)
def test_starts_at_the_base(arch):
    mc.starts_at_the_base(arch, SPEC)  # a tied lm_head recomputes n logits: ~1e-7


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_output_layer_follows_the_rows(arch):
    """Logits of the chosen ids use the trained rows where lm_head is tied; nothing else moves."""
    loaded = load_model(arch)
    ids = torch.tensor([[5, 6, 7, 8]])  # none of IDS: the input embeddings stay the base's
    base = loaded.model(input_ids=ids).logits
    prepare(loaded.model, SPEC)
    perturb(loaded.model)
    out = loaded.model(input_ids=ids).logits
    others = [v for v in range(base.shape[-1]) if v not in IDS]
    torch.testing.assert_close(out[..., others], base[..., others], atol=1e-6, rtol=0)
    assert (out[..., IDS] - base[..., IDS]).abs().max() > 1e-3 if TIED[arch] else torch.equal(out, base)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_as_peft_alone(arch, tmp_path):
    from peft import TrainableTokensConfig

    mc.peft_agrees(arch, SPEC, TrainableTokensConfig(token_indices=IDS), tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_as_peft_inside_lora(arch, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, trainable_token_indices=IDS[:2], fan_in_fan_out=FAN.get(arch, False))
    mc.peft_agrees(arch, "lora:r=4/tokens:ids=64+68", config, tmp_path)


def test_peft_dict_form_and_another_embedding(tmp_path):
    """{layer: ids} inside LoRA, and the rows of GPT-2's position embedding (not tied)."""
    from peft import LoraConfig, TrainableTokensConfig

    mc.peft_agrees("tiny-llama", "lora:r=4/tokens:ids=64+68,layer=embed_tokens",
                   LoraConfig(r=4, trainable_token_indices={"embed_tokens": [64, 68]}), tmp_path / "a")
    mc.peft_agrees("tiny-gpt2", "tokens:ids=0+3,layer=wpe", TrainableTokensConfig(token_indices=[0, 3],
                   target_modules=["wpe"]), tmp_path / "b")


def test_one_peft_folder_for_lora_and_tokens(tmp_path):
    """lora + tokens save as ONE LoRA folder and load back as the same two steps."""
    import json

    from peftlab.artifacts import load, save

    loaded = load_model("tiny-gemma3")
    prepared = prepare(loaded.model, "lora:r=4/tokens:ids=64+68")
    perturb(loaded.model)
    ids = sample_ids(loaded)
    folder = save(loaded.model, prepared, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == [64, 68]
    again = load_model("tiny-gemma3")
    steps = load(again.model, folder).steps
    assert [s.method for s in steps] == ["lora", "tokens"] and steps[1].options["ids"] == ("64", "68")
    torch.testing.assert_close(again.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_merges_exactly(arch):
    mc.merges_exactly(arch, SPEC)


def test_merge_writes_the_rows():
    loaded = load_model("tiny-gpt2")
    before = loaded.model.get_input_embeddings().weight.detach().clone()
    prepare(loaded.model, SPEC)
    perturb(loaded.model)
    rows = next(p for p in loaded.model.parameters() if p.requires_grad).detach().clone()
    merge(loaded.model)
    w = loaded.model.get_input_embeddings().weight
    torch.testing.assert_close(w[IDS], rows, atol=0, rtol=0)
    assert loaded.model.get_output_embeddings().weight is w  # still tied
    unmerge(loaded.model)
    assert torch.equal(w, before)


@pytest.mark.parametrize("arch", ARCHS)
def test_named_and_routed(arch):
    mc.named_and_routed(arch, SPEC)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointing_keeps_gradients(arch):
    mc.checkpointing_keeps_gradients(arch, SPEC)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_loss_sees_the_adapter(arch):
    """The training loop's chunked loss equals the model's own loss, gradients included."""
    mc.chunked_loss_agrees(arch, SPEC)


def test_compiles_like_eager(text_file):
    mc.compiles_like_eager(SPEC, text_file)


@pytest.mark.parametrize("spec, says", [
    ("tokens", "give the token ids to train"),
    ("tokens:ids=5+x", "ids must be token ids"),
    ("tokens:ids=5+264", "id 264 is outside the vocabulary"),
    ("tokens:ids=5+7+5", "id 5 is given twice"),
    ("tokens:ids=5,layer=wte", "layer=wte names no module"),
    ("tokens:ids=5,layer=lm_head", "layer=lm_head is not an embedding"),
    ("tokens:ids=5,rows=2", "unknown key 'rows'"),
])
def test_errors(spec, says):
    with pytest.raises(UserError, match=says):
        prepare(load_model("tiny-llama").model, spec)


def test_peft_configs_it_cannot_read():
    from peftlab.artifacts.hf import steps_of

    with pytest.raises(UserError, match="trainable_token_indices names 2 layers"):
        steps_of({"peft_type": "LORA", "r": 4, "trainable_token_indices": {"embed_tokens": [1], "lm_head": [1]}}, "x")
    with pytest.raises(UserError, match="one embedding per step"):
        steps_of({"peft_type": "TRAINABLE_TOKENS", "token_indices": [1], "target_modules": ["a", "b"]}, "x")
    with pytest.raises(UserError, match="empty"):
        steps_of({"peft_type": "TRAINABLE_TOKENS", "token_indices": []}, "x")
