"""Checks every method's test file runs on its own spec: a method file + its test file are the
whole of a new method. Each function asserts one property of the protocol on a tiny model."""

import copy

import torch

from conftest import perturb, sample_ids
from peftlab import TrainConfig, adapters, load_blocks, load_model, prepare, train
from peftlab.artifacts import kind, load, save
from peftlab.merge import merge, merge_and_unload, unmerge
from peftlab.methods import trainable_parameters
from peftlab.memory import enable_checkpointing


def logits(model, ids):
    return model(input_ids=ids).logits


def starts_at_the_base(arch, spec, atol=1e-6):
    """The method's init leaves the model's outputs unchanged (zero-init identity)."""
    loaded = load_model(arch)
    ids = sample_ids(loaded)
    want = logits(loaded.model, ids)
    prepare(loaded.model, spec, loaded.tokenizer)
    torch.testing.assert_close(logits(loaded.model, ids), want, atol=atol, rtol=0)


def peft_agrees(arch, spec, peft_config, tmp_path, scale=0.1):
    """Same weights, same logits, both ways through peft's folder format.

    1. peft's own `get_peft_model(peft_config)` makes exactly the tensors our spec makes
       (names and shapes), so the spec and the config describe one adapter;
    2. our adapter, saved, loads in `PeftModel.from_pretrained` with equal logits (fp32, 1e-5);
    3. peft's adapter (perturbed, saved by peft) loads here with equal logits.
    """
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict

    ours = load_model(arch)
    prepared = prepare(ours.model, spec, ours.tokenizer)
    perturb(ours.model, scale)
    ids = sample_ids(ours)
    want = logits(ours.model, ids)
    folder = save(ours.model, prepared, tmp_path / "ours", base_model=arch)
    assert kind(folder) == "peft"
    theirs = get_peft_model(load_model(arch).model, copy.deepcopy(peft_config))
    from safetensors.torch import load_file

    saved = load_file(str(folder / "adapter_model.safetensors"))
    expected = get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    loaded_by_peft = PeftModel.from_pretrained(load_model(arch).model, str(folder))
    torch.testing.assert_close(logits(loaded_by_peft, ids), want, atol=1e-5, rtol=0)

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    fresh = load_model(arch)
    load(fresh.model, tmp_path / "theirs")
    torch.testing.assert_close(logits(fresh.model, ids), logits(theirs, ids), atol=1e-5, rtol=0)


def saves_and_loads(arch, spec, where, scale=0.2):
    """Prepare, perturb, save into `where`, load on a fresh base: the same logits. Returns
    (folder, ids, the trained model's logits)."""
    loaded = load_model(arch)
    prepared = prepare(loaded.model, spec, loaded.tokenizer)
    perturb(loaded.model, scale)
    ids = sample_ids(loaded)
    want = loaded.model(input_ids=ids).logits
    folder = save(loaded.model, prepared, where, base_model=arch)
    fresh = load_model(arch)
    load(fresh.model, folder, tokenizer=fresh.tokenizer)
    torch.testing.assert_close(fresh.model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    return folder, ids, want


def merges_exactly(arch, spec, atol=1e-5):
    """merge → same logits as the adapter; unmerge → the base weights back; merge_and_unload
    → a plain model with the adapter's logits."""
    loaded = load_model(arch)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    prepare(loaded.model, spec, loaded.tokenizer)
    perturb(loaded.model, 0.1)
    ids = sample_ids(loaded)
    want = logits(loaded.model, ids)
    merge(loaded.model)
    torch.testing.assert_close(logits(loaded.model, ids), want, atol=atol, rtol=0)
    unmerge(loaded.model)
    params = dict(loaded.model.named_parameters())
    for n, p in before.items():
        torch.testing.assert_close(params[n], p, atol=atol, rtol=0, msg=n)
    torch.testing.assert_close(logits(loaded.model, ids), want, atol=atol, rtol=0)
    plain = merge_and_unload(loaded.model)
    assert set(dict(plain.named_parameters())) == set(before)
    torch.testing.assert_close(logits(plain, ids), want, atol=atol, rtol=0)


def named_and_routed(arch, spec):
    """Two named adapters of the method on one base: switching, disabling, per-row routing."""
    loaded = load_model(arch)
    ids = sample_ids(loaded)
    base = logits(loaded.model, ids)
    prepare(loaded.model, f"{spec},name=a,seed=1" if ":" in spec else f"{spec}:name=a,seed=1", loaded.tokenizer)
    perturb(loaded.model, 0.1, seed=1)
    from peftlab.methods import REGISTRY, parse_strategy

    step = parse_strategy(spec)[0]
    assert "name" in REGISTRY[step.method].options
    # a second adapter: prepare() refreezes, so load it the way users do (from a saved folder)
    second = load_model(arch)
    prepared = prepare(second.model, f"{spec},name=b" if ":" in spec else f"{spec}:name=b", second.tokenizer)
    perturb(second.model, 0.1, seed=2)
    want_b = logits(second.model, ids)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        load(loaded.model, save(second.model, prepared, Path(tmp) / "b"), name="b", tokenizer=loaded.tokenizer)
    assert set(adapters.adapter_names(loaded.model)) == {"a", "b"}
    adapters.set_active(loaded.model, "a")
    want_a = logits(loaded.model, ids)
    assert not torch.allclose(want_a, base, atol=1e-4), "the adapter changes nothing"
    adapters.set_active(loaded.model, "b")
    torch.testing.assert_close(logits(loaded.model, ids), want_b, atol=1e-5, rtol=0)
    with adapters.disabled(loaded.model):
        torch.testing.assert_close(logits(loaded.model, ids), base, atol=1e-6, rtol=0)
    rows = ids[:1].repeat(3, 1)
    with adapters.per_row(loaded.model, ["a", "b", "__base__"]):
        mixed = logits(loaded.model, rows)
    for i, want in enumerate((want_a, want_b, base)):
        torch.testing.assert_close(mixed[i], want[0], atol=1e-5, rtol=0)
    adapters.delete(loaded.model, "b")
    assert adapters.adapter_names(loaded.model) == ["a"]


def checkpointing_keeps_gradients(arch, spec):
    """Gradient checkpointing gives the same gradients as a plain backward pass."""
    grads = []
    for checkpointing in (False, True):
        loaded = load_model(arch)
        prepare(loaded.model, spec, loaded.tokenizer)
        perturb(loaded.model)
        if checkpointing:
            enable_checkpointing(loaded.model)
        loaded.model.train()
        ids = sample_ids(loaded)
        loaded.model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in loaded.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert (grads[0][n] - grads[1][n]).norm() <= 1e-4 * grads[0][n].norm() + 1e-7, n


def compiles_like_eager(spec, text_file):
    """--compile trains step for step like eager (losses and final weights)."""
    runs = []
    for compiled in (False, True):
        loaded = load_model("tiny-llama", seed=0)
        blocks = load_blocks(loaded, str(text_file), 32)
        prepared = prepare(loaded.model, spec, loaded.tokenizer)
        cfg = TrainConfig(steps=3, batch_size=2, seq_len=32, lr=1e-2, warmup=0, eval_every=3, compile=compiled)
        runs.append((train(loaded.model, blocks, prepared, cfg, show=False), trainable_parameters(loaded.model)))
    (eager, w_eager), (fused, w_fused) = runs
    for a, b in zip(eager, fused):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]) + 1e-5, (key, a["step"])
    for name, p in w_eager.items():
        torch.testing.assert_close(w_fused[name], p, atol=1e-4, rtol=1e-3, msg=name)


def chunked_loss_agrees(arch, spec):
    """The training loop's chunked loss (it multiplies by the head's weight without calling the
    head) equals the model's own loss, gradients included: what a method adds on the output
    layer reaches the loss through `head_weight`."""
    from peftlab.loss import batch_loss

    results = []
    for chunked in (True, False):
        loaded = load_model(arch)
        prepare(loaded.model, spec)
        perturb(loaded.model)
        ids = sample_ids(loaded)
        loss = batch_loss(loaded.model, ids, ids, chunked=chunked)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in loaded.model.parameters() if p.requires_grad]))
    (chunked_loss, g1), (plain_loss, g2) = results
    torch.testing.assert_close(chunked_loss, plain_loss, atol=1e-5, rtol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def native_where_peft_refuses(arch, spec, peft_config, tmp_path, refusal="Conv1D"):
    """peft cannot build this adapter on `arch` (it raises `refusal`); peftlab trains it and
    saves it in its own format (never a peft folder peft would refuse), which loads back."""
    import pytest
    from peft import get_peft_model

    with pytest.raises(TypeError, match=refusal):
        get_peft_model(load_model(arch).model, peft_config)
    loaded = load_model(arch)
    prepared = prepare(loaded.model, spec)
    perturb(loaded.model, 0.1)
    ids = sample_ids(loaded)
    folder = save(loaded.model, prepared, tmp_path / "a")
    assert kind(folder) == "peftlab"
    fresh = load_model(arch)
    load(fresh.model, folder)
    torch.testing.assert_close(logits(fresh.model, ids), logits(loaded.model, ids), atol=1e-6, rtol=0)
