"""Every method on every tiny architecture: trains only its own tensors, generates, checkpoints."""

import copy
import json

import pytest
import torch

from conftest import ARCHS, perturb, sample_ids
from method_checks import checkpointing_keeps_gradients, saves_and_loads
from peftlab import TrainConfig, load_blocks, load_model, prepare, train
from peftlab.artifacts import kind
from peftlab.artifacts.hf import known
from peftlab.generate import generate
from peftlab.methods import REGISTRY, trainable_parameters
from peftlab.methods.registry import CHECKS

MODEL_TYPE = {"tiny-llama": "llama", "tiny-gptneo": "gpt_neo", "tiny-gpt2": "gpt2", "tiny-gemma3": "gemma3_text"}


def cases(check: str, every_example: bool = True) -> list:
    """(arch, spec) for every registered method's examples (or its first) on every tiny
    architecture. Nothing lists the methods: a new method file is covered by registering. A
    method opts out of a check, or of an architecture, only in its `exempt`, with the reason
    (shown as the skip's reason)."""
    assert check in CHECKS
    out = []
    for method in REGISTRY.values():
        for spec in method.examples if every_example else method.examples[:1]:
            for arch in ARCHS:
                why = method.exempt.get(check) or method.exempt.get(MODEL_TYPE[arch])
                marks = [pytest.mark.skip(reason=f"{method.name}: {why}")] if why else []
                out.append(pytest.param(arch, spec, marks=marks, id=f"{arch}-{spec}"))
    return out


@pytest.mark.parametrize("arch,spec", cases("trains-its-own"))
def test_only_trainable_tensors_change(arch, spec, text_file):
    loaded = load_model(arch)
    prepared = prepare(loaded.model, spec, loaded.tokenizer)
    start = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    will_train = set(trainable_parameters(loaded.model)) | {n for names in prepared.unfreeze_at.values() for n in names}
    blocks = load_blocks(loaded, str(text_file), 32)
    records = train(loaded.model, blocks, prepared, TrainConfig(steps=4, lr=1e-2, batch_size=2, warmup=0), show=False)
    assert all(torch.isfinite(torch.tensor(r.get("loss", 0.0))) for r in records)
    moved = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, start[n])}
    assert moved <= will_train
    assert moved, "training changed nothing"
    for name, p in loaded.model.named_parameters():
        if name not in will_train:
            assert torch.equal(p, start[name]), name


@pytest.mark.parametrize("arch,spec", cases("round-trip"))
def test_saved_and_loaded_gives_the_same_logits_and_peft_agrees(arch, spec, tmp_path):
    """Saved (peft's format where it holds the strategy, else peftlab's) and loaded on a fresh
    base: the same logits; a peft-format folder loads in peft itself with the same logits."""
    folder, ids, want = saves_and_loads(arch, spec, tmp_path / "adapter", scale=0.1)
    if kind(folder) == "peft":
        from peft import PeftModel

        written = json.loads((folder / "adapter_config.json").read_text())
        assert set(written) <= known(), set(written) - known()  # its codec declares every key it writes

        theirs = PeftModel.from_pretrained(load_model(arch).model, str(folder))
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,spec", cases("generation", every_example=False))
def test_greedy_generation_is_deterministic_and_uses_the_cache_correctly(arch, spec):
    loaded = load_model(arch)
    prepare(loaded.model, spec, loaded.tokenizer)
    perturb(loaded.model)
    a = generate(loaded, "Call me", max_new_tokens=8)
    assert a == generate(loaded, "Call me", max_new_tokens=8)
    # cached decoding gives the same next-token logits as a full forward pass of the sequence
    ids = sample_ids(loaded, 1)
    out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    full = loaded.model(input_ids=out.sequences).logits
    offset = full.shape[1] - out.sequences.shape[1] + ids.shape[1] - 1
    for i, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], full[0, offset + i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,spec", cases("checkpointing", every_example=False))
def test_gradient_checkpointing_gives_the_same_gradients(arch, spec):
    checkpointing_keeps_gradients(arch, spec)


@pytest.mark.parametrize("spec", ["lora:r=4", "dora:r=4", "adapter:r=8", "lora:r=4,targets=all-linear,rslora=true"])
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_init_leaves_logits_unchanged(arch, spec):
    loaded = load_model(arch)
    base = copy.deepcopy(loaded.model)
    ids = sample_ids(loaded)
    prepare(loaded.model, spec)
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6, rtol=0)
